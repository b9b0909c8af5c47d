"""Every example in every command's --help runs, as written, on the README's data: `openalign data synth` (with
shards), its tokenizer and the README's first run, plus the files a user brings that the examples name (photos/
with .txt captions, cat.jpg, run.yaml, ...), each made from that data. A hub id resolves to a local stand-in (the
README's model in huggingface_hub's cache, offline).

Each example runs in its own copy of that folder, in this process (`openalign` lines through the command's
`main`, so torch loads once), `python` and `torchrun` lines as processes. Sizes and time budgets are cut to a test's
(SMALLER: each substitution must apply, so the examples cannot drift from what is run); the examples that cannot
run here are EXEMPT, each with its reason."""

from __future__ import annotations

import csv
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from openalign.cli import main
from tests.cli_fixtures import make_hub_cache
from tests.test_cli_help import COMMANDS

TRAIN_MINUTES = "0.05"
CURATE_SMALLER = (f"--bootstrap-minutes {TRAIN_MINUTES} --minutes {TRAIN_MINUTES} --set optim.batch_size=32 "
                  "--set data.image_size=32 --set data.resize=36 "
                  "--allow-weak-scorer")
SMALLER = {  # example -> {as written: as run here}
    "openalign data synth --out data --n 2000": {"--n 2000": "--n 300"},
    "openalign data synth --out data --n 20000 --clean --shards --format parquet": {"--n 20000": "--n 300"},
    "openalign data synth --out data --n 2000 && openalign tokenizer train data/train/manifest.jsonl --vocab-size 400 "
    "--out tokenizer": {"--n 2000": "--n 300"},
    # The workspace holds the README's first run already.
    "openalign train --recipe cpu-small --data.train data/train/manifest.jsonl --data.val data/heldout/manifest.jsonl "
    "--data.tokenizer tokenizer --run.out_dir runs/first --run.max_minutes 5": {
        "--run.out_dir runs/first": "--run.out_dir runs/again", "--run.max_minutes 5": "--run.max_minutes 0.05"},
    # Seconds of training on what 300 pairs keep: batches that fit, and a scorer that has learnt nothing, which the
    # scorer check rightly stops curate after.
    "openalign curate data/train/manifest.jsonl --recipe cpu-small --min-side 48 --max-images-per-caption 10 "
    "--keep-fraction 0.7 --out curated": {"--keep-fraction 0.7": f"--keep-fraction 0.7 {CURATE_SMALLER}"},
    "openalign curate 'data/shards/train-*.tar' --config run.yaml --no-rules --rounds 2 --keep-fraction 0.5 "
    "--out curated": {"--keep-fraction 0.5": f"--keep-fraction 0.5 {CURATE_SMALLER}"},
    # No GPU here: the same run on the CPU.
    "openalign train --config run.yaml --device cuda --out runs/gpu": {"--device cuda": "--device cpu"},
    # One process: two are tested with these commands in test_curation_filter.py and test_inference_embed.py.
    "torchrun --nproc-per-node 4 -m openalign embed 'data/shards/train-*.tar' -m runs/first/model --out "
    "train-embeddings": {"--nproc-per-node 4": "--nproc-per-node 1"},
    "torchrun --nproc-per-node 4 -m openalign filter 'data/shards/train-*.tar' --similarity -m runs/first/model "
    "--keep-fraction 0.3 --out kept": {"--nproc-per-node 4": "--nproc-per-node 1"},
}
BEFORE = {  # example -> the commands that make what it needs (a run to resume)
    "openalign train --config run.yaml --resume latest": ["openalign train --config run.yaml"],
}
EXEMPT = {  # the start of an example -> why it is not run here
    "openalign demo": "generates its own data and trains for minutes; tests/test_demo.py runs it, smaller",
    "openalign serve": "a server that runs until stopped; tests/test_serve.py starts it and queries it",
    "python -c \"from clip_retrieval": "a client of a running server; tests/test_serve.py sends its requests",
    "openalign index EMB --out IDX --kind ivfpq": "IVF-PQ trains on thousands of vectors; test_index_faiss.py "
                                                  "runs its stages",
    "torchrun --standalone --nproc_per_node 8": "eight training processes; test_train_distributed.py trains with "
                                                "two",
}


def help_examples() -> list[str]:
    """Every example line of every command's --help, once, comments dropped."""
    examples = []
    for parser in COMMANDS.values():
        for line in parser.epilog.split("examples:\n", 1)[1].splitlines():
            example = line.split("   #")[0].strip()
            if example and example not in examples:
                examples.append(example)
    return examples


def _run(line: str, folder: Path, hub: Path) -> None:
    """Run one command line in `folder` as a shell would (globs expanded there); fail with its output."""
    words = []
    for token in shlex.split(line, posix=False):  # quotes kept: a quoted pattern reaches the command as is
        if token[:1] in "'\"":
            words.append(shlex.split(token)[0])
        elif glob.has_magic(token):
            words.extend(sorted(glob.glob(token, root_dir=folder)) or [token])
        else:
            words.append(token)
    if words[0] == "openalign":
        try:
            status = main(words[1:])
        except SystemExit as exit:
            status = exit.code
        assert status == 0, f"{line}: exit status {status}"
        return
    program = [sys.executable] if words[0] == "python" else [sys.executable, "-m", "torch.distributed.run"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([*program, *words[1:]], cwd=folder, env=environment, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, f"{line}\n{completed.stdout[-2000:]}\n{completed.stderr[-3000:]}"


def _in(folder: Path, line: str, hub: Path) -> None:
    current = Path.cwd()
    os.chdir(folder)
    try:
        _run(line, folder, hub)
    finally:
        os.chdir(current)


def _user_files(folder: Path) -> None:
    """What the examples name beyond the README's data, made from it: photos/ with .txt captions, single images,
    captions.txt, labels.txt, a CSV of caption pairs, class folders (by shape) and run.yaml."""
    heldout = [json.loads(line) for line in (folder / "data/heldout/manifest.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (folder / "data/train/manifest.jsonl").read_text().splitlines()]
    image = {row["key"]: folder / "data/heldout" / row["image_path"] for row in heldout}
    (folder / "photos").mkdir()
    for row in heldout[:8]:
        shutil.copy(image[row["key"]], folder / "photos" / f"{row['key']}.jpg")
        (folder / "photos" / f"{row['key']}.txt").write_text(row["caption"] + "\n")
    for name, row in zip(("cat.jpg", "dog.jpg", "photo.jpg", "query.jpg"), heldout):
        shutil.copy(image[row["key"]], folder / name)
    for name, row in zip(("red.png", "blue.png"), heldout[4:]):
        Image.open(image[row["key"]]).save(folder / name)
    shutil.copy(folder / "data/heldout/captions.txt", folder / "captions.txt")
    (folder / "labels.txt").write_text("a red circle\na blue star\na green square\n")
    with open(folder / "coco-karpathy-test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for row in heldout:
            writer.writerow([str(image[row["key"]]), row["caption"]])
    shapes = sorted({row["shape"] for row in train if row["noise"] == "clean"})
    for split, rows, root in (("train", train, "data/train"), ("val", heldout, "data/heldout")):
        for shape in shapes:  # a few clean images of each shape: the classes
            target = folder / "imagenet" / split / shape
            target.mkdir(parents=True)
            for row in [row for row in rows if row["shape"] == shape and row["noise"] == "clean"][:4]:
                shutil.copy(folder / root / row["image_path"], target)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The README's data, tokenizer and first run (with the example's own substitution), the embeddings the
    README makes, the user's files, and the stand-in hub; built once, copied for each example."""
    folder = tmp_path_factory.mktemp("readme") / "work"
    folder.mkdir()
    hub = folder.parent / "hub"
    for line in ("openalign data synth --out data --n 300 --shards --quiet",
                 "openalign tokenizer train data/train/manifest.jsonl --vocab-size 400 --out tokenizer --quiet",
                 "openalign train --recipe cpu-small --data.train data/train/manifest.jsonl --data.val "
                 f"data/heldout/manifest.jsonl --data.tokenizer tokenizer --run.out_dir runs/first --run.max_minutes "
                 f"{TRAIN_MINUTES} --run.progress false",
                 "openalign embed data/heldout/manifest.jsonl -m runs/first/model --out embeddings --no-progress",
                 "openalign embed data/heldout/manifest.jsonl -m runs/first/model --kind both --out emb --no-progress",
                 "openalign index embeddings"):
        _in(folder, line, hub)
    _user_files(folder)
    config = (folder / "runs/first/config.yaml").read_text().replace("runs/first", "runs/align")
    (folder / "run.yaml").write_text(config)  # a user's config: the README run's settings, its own folder
    make_hub_cache(hub, "kakaobrain/align-base", folder / "runs/first/model")
    return folder, hub


def _example_id(example: str) -> str:
    return example[:90]


@pytest.mark.parametrize("example", help_examples(), ids=_example_id)
def test_the_example_runs_on_the_readme_data(example, workspace, tmp_path, monkeypatch):
    from huggingface_hub import constants

    exempt = next((reason for start, reason in EXEMPT.items() if example.startswith(start)), None)
    if exempt is not None:
        assert example not in SMALLER  # an exempt example has nothing to cut
        return
    folder, hub = workspace
    # huggingface_hub reads these when imported; this process imported it already.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    work = tmp_path / "work"
    shutil.copytree(folder, work)
    line = example
    for written, smaller in SMALLER.get(example, {}).items():
        assert written in line, f"{example!r} no longer holds {written!r}"
        line = line.replace(written, smaller)
    for before in BEFORE.get(example, []):
        _in(work, before, hub)
    for part in line.split(" && "):
        _in(work, part, hub)


def test_every_substitution_and_exemption_names_an_example():
    examples = help_examples()
    assert set(SMALLER) <= set(examples) and set(BEFORE) <= set(examples)
    assert all(any(example.startswith(start) for example in examples) for start in EXEMPT)
