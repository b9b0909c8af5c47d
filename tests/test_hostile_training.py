"""The training half of the hostile-input battery (tests/test_hostile_inputs.py has the rest): a received run
folder runs no command, a diverged run stops with an error instead of reporting success, a new run does not
silently mix with an old one, a damaged checkpoint is detected and passed over, a full disk is named. Tiny runs
of a few steps; the file takes well under a minute."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from openalign.cli import main
from openalign.errors import CheckpointError, ConfigError
from openalign.files import DiskFullError, reporting_full_disk
from openalign.train.checkpointing import list_checkpoints, verify_checkpoint
from openalign.train.config import load_config
from openalign.train.loop import NonFiniteLossError
from openalign.train.run_log import read_metrics
from openalign.train.trainer import train
from tests.train_data import make_data, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), num_pairs=64, samples_per_shard=32, num_val=16)


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    """Four steps with a checkpoint after steps 2 and 4; each test works on its own copy."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    train(tiny_config(data, run_dir, **{"optim.total_steps": 4, "run.checkpoint_every": 2}))
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["run"]["out_dir"] = str(copy)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


def run_command(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    status = main(argv)
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return status, error


# -- item 1: a received run folder runs no command ------------------------------------------------------------


def test_a_run_folders_config_runs_no_command_unless_trusted(run_copy, data, tmp_path, capsys):
    marker = tmp_path / "executed"
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["data"]["train"] = f"pipe:sh -c 'touch {marker}; cat {data['shards']}/shard-00000.tar'"
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    for resume in (str(run_copy / "checkpoint-00000002"), "latest"):
        extra = ["--run.out_dir", str(run_copy)] if resume == "latest" else []
        status, error = run_command(["train", "--resume", resume, *extra], capsys)
        assert status == 1 and "config.yaml" in error and "data.train" in error and "--trust-run-config" in error
        assert not marker.exists()
    # A config file the user names is theirs to vouch for; so is a value on the command line.
    named = tmp_path / "named.yaml"
    named.write_text(yaml.safe_dump(config))
    assert load_config(named).data.train.startswith("pipe:")
    with pytest.raises(ConfigError, match="data.train"):
        load_config(run_copy / "config.yaml", trusted=False)
    assert load_config(run_copy / "config.yaml", {"data.train": str(data["train"])}, trusted=False)
    # Trusted on request: the command runs (and the changed source is a changed trajectory: --force).
    status, _ = run_command(["train", "--resume", str(run_copy / "checkpoint-00000002"), "--trust-run-config",
                             "--data.epoch_size", "32", "--force"], capsys)
    assert status == 0 and marker.exists()


# -- item 2: a diverged run stops -------------------------------------------------------------------------------


@pytest.mark.parametrize("limits, reason", [
    ({"run.max_consecutive_skipped_steps": 3}, "4 steps skipped in a row, over the limit of 3"),
    ({"run.max_consecutive_skipped_steps": 100, "run.max_skipped_steps": 4},
     "5 steps skipped since the run began, over the limit of 4"),
])
def test_a_run_that_keeps_skipping_non_finite_steps_stops_with_an_error(data, tmp_path, limits, reason):
    config = tiny_config(data, tmp_path / "run", **{"optim.lr": 1e8, "optim.grad_clip": None,
                                                    "run.nan_policy": "skip", "optim.total_steps": 30,
                                                    "run.checkpoint_every": 100, "data.val": data["val"],
                                                    **limits})
    with pytest.raises(NonFiniteLossError, match=reason):
        train(config)
    steps = [record["step"] for record in read_metrics(tmp_path / "run") if "loss" in record]
    assert max(steps, default=0) < 30


# -- item 4: a new run in an old run's folder, a resume under other settings ------------------------------------


def test_a_fresh_run_in_an_old_runs_folder_is_refused_unless_overwrite(run_copy, data, capsys):
    config = tiny_config(data, run_copy, **{"optim.total_steps": 2, "run.checkpoint_every": 2, "optim.lr": 1e-3})
    with pytest.raises(ConfigError, match="another run's checkpoints"):
        train(config)
    assert [step for step, _ in list_checkpoints(run_copy)] == [2, 4]  # untouched
    status, error = run_command(["train", "--config", str(run_copy / "config.yaml"), "--optim.total_steps", "2"],
                                capsys)
    assert status == 1 and str(run_copy) in error and "--overwrite" in error
    train(config, overwrite=True)
    assert [step for step, _ in list_checkpoints(run_copy)] == [2]  # the old run's checkpoint-4 is gone
    assert [record["step"] for record in read_metrics(run_copy) if "loss" in record] == [1, 2]


def test_resuming_under_settings_that_change_the_updates_lists_them_and_needs_force(run_copy, data, capsys):
    checkpoint = str(run_copy / "checkpoint-00000002")
    status, error = run_command(["train", "--resume", checkpoint, "--optim.lr", "1e-4", "--loss.label_smoothing",
                                 "0.2"], capsys)
    assert status == 1 and "optim.lr: 0.002 -> 0.0001" in error and "loss.label_smoothing: 0.1 -> 0.2" in error
    # Settings that only watch, save or place the run may change freely.
    status, error = run_command(["train", "--resume", checkpoint, "--run.log_every", "3", "--run.keep_last", "5"],
                                capsys)
    assert status == 0, error
    status, _ = run_command(["train", "--resume", checkpoint, "--optim.lr", "1e-4", "--force"], capsys)
    assert status == 0


# -- item 7: a damaged checkpoint -------------------------------------------------------------------------------


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt"])
def test_a_flipped_byte_is_detected_and_latest_falls_back_to_the_checkpoint_before(run_copy, data, name, caplog):
    latest = run_copy / "checkpoint-00000004"
    _flip_a_byte(latest / name)  # inside the tensor data: sizes and headers still fine
    with pytest.raises(CheckpointError, match=f"{name} does not match the SHA-256"):
        verify_checkpoint(latest)
    config = tiny_config(data, run_copy, **{"optim.total_steps": 4, "run.checkpoint_every": 2})
    with caplog.at_level(logging.WARNING, logger="openalign.train.checkpointing"):
        result = train(config, resume="latest")
    assert any("checkpoint-00000004" in message and "skipping damaged" in message for message in caplog.messages)
    assert result.step == 4
    steps = [record["step"] for record in read_metrics(run_copy) if "loss" in record]
    assert steps == [1, 2, 3, 4]  # resumed after step 2: steps 3 and 4 were run again
    verify_checkpoint(run_copy / "checkpoint-00000004")  # and written again, whole


# -- item 8: a full disk ----------------------------------------------------------------------------------------


def test_a_full_disk_is_named_in_plain_words():
    # /dev/full fails every write with ENOSPC: torch.save's own error says "unexpected pos" and hides it.
    with pytest.raises(DiskFullError, match="no space left on device while writing /dev/full"):
        with reporting_full_disk("/dev/full"), open("/dev/full", "wb") as handle:
            torch.save({"state": torch.zeros(100_000)}, handle)
    with pytest.raises(ValueError, match="unrelated"), reporting_full_disk("/dev/full"):
        raise ValueError("unrelated")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare for a small file system of its own")
def test_a_checkpoint_on_a_full_file_system_says_so_and_leaves_the_earlier_ones(tmp_path):
    # A 1 MB tmpfs of its own (a user and mount namespace): the first checkpoint fits, the second does not.
    script = textwrap.dedent(f"""
        import sys, torch
        from openalign.files import DiskFullError
        from openalign.model_config import get_preset
        from openalign.models.align import AlignModel
        from openalign.train.checkpointing import list_checkpoints, save_checkpoint, verify_checkpoint
        model = AlignModel(get_preset("tiny"))
        run = "{tmp_path}/disk/run"
        save_checkpoint(run, 1, model, {{"step": 1}})
        try:
            save_checkpoint(run, 2, model, {{"step": 2, "padding": torch.zeros(400_000)}})
        except DiskFullError as error:
            print("ERROR", error)
        print("LEFT", [step for step, _ in list_checkpoints(run)])
        verify_checkpoint(run + "/checkpoint-00000001")
    """)
    (tmp_path / "disk").mkdir()
    finished = subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c",
         f"mount -t tmpfs -o size=2m tmpfs {tmp_path}/disk && {sys.executable} -c '{script}'"],
        capture_output=True, text=True, timeout=120)
    if "mount" in finished.stderr and finished.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {finished.stderr.strip()[:200]}")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "ERROR no space left on device while writing" in finished.stdout and "checkpoint-00000002" in \
        finished.stdout
    assert "LEFT [1]" in finished.stdout


# -- a received run folder whose outputs are symbolic links ------------------------------------------------------


def _files_under(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and modification time, to tell whether anything wrote it."""
    return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("entry", ["config.yaml", "metrics.jsonl", "model", "checkpoint-00000004"])
def test_resuming_a_run_folder_whose_outputs_are_links_changes_nothing_outside_it(run_copy, tmp_path, entry):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(run_copy / entry, outside / entry)  # the entry's own content, moved out and linked back
    (run_copy / entry).symlink_to(outside / entry)
    before = _files_under(outside)
    environment = {key: value for key, value in os.environ.items() if key != "OPENALIGN_DEBUG"}
    command = [shutil.which("openalign")] if shutil.which("openalign") else [sys.executable, "-m", "openalign"]
    finished = subprocess.run([*command, "train", "--resume", "latest", "--run.out_dir", str(run_copy)],
                              capture_output=True, text=True, env=environment, timeout=300)
    assert _files_under(outside) == before
    assert finished.returncode == 1, finished.stderr
    assert finished.stderr.count("\n") == 1 and "Traceback" not in finished.stderr, finished.stderr
    assert f"{entry} is a symbolic link" in finished.stderr and str(run_copy) in finished.stderr


def test_plotting_into_a_linked_plots_folder_is_refused(run_copy, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (run_copy / "plots").symlink_to(outside)
    status, error = run_command(["plot", str(run_copy)], capsys)
    assert status == 1 and "plots is a symbolic link" in error
    assert list(outside.iterdir()) == []
    assert main(["plot", str(run_copy), "--out", str(tmp_path / "figures")]) == 0  # a folder the user names
