"""TrainConfig: files, overrides, typed coercion, errors naming the key, the saved config reloading to the
same values, and the recipes validating."""

from __future__ import annotations

import pytest
import yaml

from openalign.cli import build_parser
from openalign.errors import ConfigError
from openalign.train.config import TrainConfig, field_names, load_config
from openalign.train.recipes import RECIPES, get_recipe


def test_yaml_then_overrides_then_roundtrip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  betas: [0.9, 0.98]\nrun:\n  dtype: bf16\n  ema_decay: 0.999\n")
    config = load_config(path, ["optim.lr=5e-4", "data.flip=auto", "optim.grad_clip=none", "data.train=2024"])
    assert config.optim.lr == 5e-4 and isinstance(config.optim.lr, float)  # YAML 1.1 reads "1e-3" as a string
    assert config.optim.betas == (0.9, 0.98)
    assert (config.run.dtype, config.run.ema_decay, config.data.flip) == ("bf16", 0.999, "auto")
    assert config.optim.grad_clip is None
    assert config.data.train == "2024"  # a string field keeps a numeric-looking path as written
    saved = config.save(tmp_path / "config.yaml")
    assert load_config(saved).to_dict() == config.to_dict()


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[optim]\nname = "adamw"\nlr = 0.002\n[model]\ngradient_checkpointing = "both"\n')
    config = load_config(path)
    assert (config.optim.name, config.optim.lr, config.model.gradient_checkpointing) == ("adamw", 0.002, "both")


@pytest.mark.parametrize("override, named", [
    ("optim.lrr=1", "optim.lrr"),
    ("optimizer.lr=1", "optimizer"),
    ("optim.lr=fast", "optim.lr"),
    ("run.dtype=fp8", "run.dtype"),
    ("optim.batch_size=0", "optim.batch_size"),
    ("data.flip=maybe", "data.flip"),
    ("loss.hard_negative_beta=-1", "loss.hard_negative_beta"),
])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(overrides=[override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.learning_rate"):
        load_config(path)


def test_accumulation_must_divide_batch():
    with pytest.raises(ConfigError, match="accumulation"):
        load_config(overrides={"optim.batch_size": 10, "optim.accumulation": 3})


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_validate(name):
    config = load_config(base=get_recipe(name))
    assert isinstance(config, TrainConfig)


def test_paper_recipe_holds_the_published_settings():
    config = load_config(base=get_recipe("paper"))
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay) == ("lamb", 1e-3, 1e-5)
    assert (config.optim.warmup_steps, config.optim.total_steps, config.optim.schedule) == (10_000, 1_200_000,
                                                                                             "linear")
    assert (config.optim.batch_size, config.data.image_size, config.data.resize) == (16_384, 289, 346)
    assert (config.data.flip, config.data.max_length, config.loss.label_smoothing) == (True, 64, 0.1)


def test_every_field_is_a_command_line_flag():
    parser = build_parser()
    args = parser.parse_args(["train", "--optim.lr", "3e-4", "--set", "run.seed=7", "--data.train", "x.jsonl"])
    assert getattr(args, "field:optim.lr") == "3e-4" and args.set == ["run.seed=7"]
    assert len(field_names()) == sum(len(section) for section in TrainConfig().to_dict().values())


def test_every_field_has_a_description_its_type_default_and_choices_for_help(capsys):
    """`train --help` tells each flag's description, type, choices and default, all read from the fields."""
    import dataclasses

    from openalign.train.config import describe_field, field_choices, field_type_name

    defaults = TrainConfig()
    for name in field_names():
        section, key = name.split(".")
        field = next(entry for entry in dataclasses.fields(getattr(defaults, section)) if entry.name == key)
        assert len(field.metadata.get("help", "")) > 10, name
        assert describe_field(name).startswith(field.metadata["help"])
    assert describe_field("optim.name").endswith("(one of lamb, adamw; default: lamb)")
    assert "one of align, clip, siglip" in describe_field("loss.name")  # from the loss registry
    assert describe_field("run.max_minutes").endswith("(default: none)")
    assert field_type_name("optim.lr") == "FLOAT" and field_type_name("run.max_minutes") == "FLOAT|none"
    assert set(field_choices()) <= set(field_names())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--optim.lr FLOAT" in help_text and "(default: 0.001)" in help_text and "examples:" in help_text


def test_print_config_prints_what_a_run_would_use(capsys, tmp_path, monkeypatch):
    from openalign.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--recipe", "cpu-small", "--optim.lr", "5e-4", "--data.train", "pairs.jsonl",
                 "--print-config"]) == 0
    printed = capsys.readouterr().out
    expected = load_config(overrides={"optim.lr": "5e-4", "data.train": "pairs.jsonl"}, base=get_recipe("cpu-small"))
    assert TrainConfig.from_dict(yaml.safe_load(printed)) == expected
    assert not (tmp_path / "runs").exists()  # printed, not run


def test_the_names_other_commands_use_are_shorthands_for_their_keys(capsys, tmp_path, monkeypatch):
    from openalign.cli import main
    from openalign.cli.train import SHORTHANDS

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--device", "cpu", "--out", "runs/x", "-m", "runs/first/model", "--data", "pairs.jsonl",
                 "--tokenizer", "tok", "--steps", "7", "--minutes", "2", "--batch-size", "8", "--seed", "3",
                 "--preset", "tiny", "--print-config"]) == 0
    printed = TrainConfig.from_dict(yaml.safe_load(capsys.readouterr().out))
    expected = load_config(overrides={
        "run.device": "cpu", "run.out_dir": "runs/x", "model.init_from": "runs/first/model",
        "data.train": "pairs.jsonl", "data.tokenizer": "tok", "optim.total_steps": 7, "run.max_minutes": 2.0,
        "optim.batch_size": 8, "run.seed": 3, "model.preset": "tiny"})
    assert printed == expected
    assert set(SHORTHANDS.values()) <= set(field_names())
    # Where a shorthand and its key are both given, the later one wins, as with any repeated flag.
    assert main(["train", "--device", "cpu", "--run.device", "cuda", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["device"] == "cuda"


@pytest.mark.parametrize("arguments, suggested", [
    (["--optim.learning_rate", "3e-4"], "did you mean --optim.lr?"),
    (["--run.out-dir", "x"], "did you mean --run.out_dir?"),
    (["--lr", "3e-4"], "did you mean --optim.lr?"),
    (["--optim.batchsize", "8"], "did you mean --optim.batch_size?"),
    (["--optim.max_steps", "8"], "did you mean --optim.total_steps"),
])
def test_a_mistyped_flag_gets_the_nearest_key(arguments, suggested, capsys):
    from openalign.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["train", *arguments, "--print-config"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "openalign train: error: unrecognized arguments" in error and suggested in error, error


def test_a_mistyped_key_in_set_or_a_file_gets_the_nearest_key(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean optim\.lr\?"):
        load_config(overrides=["optim.learning_rate=3e-4"])
    (tmp_path / "run.yaml").write_text("run:\n  outdir: runs/x\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*did you mean run\.out_dir\?"):
        load_config(tmp_path / "run.yaml")
