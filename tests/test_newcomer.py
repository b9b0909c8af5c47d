"""A newcomer's first hour, as the README writes it: its quickstart blocks, run through the installed `openalign`
command in fresh processes, from generated data to a tokenizer, a trained model and every command on that
model's own folder, then the same model under a hub id resolved from a local cache (a stand-in hub: the cache
holds the trained folder as "kakaobrain/align-base", HF_HUB_OFFLINE=1, no network).

Every command must exit 0 with no traceback and no warning. The train block runs on a smaller dataset and a
shorter time budget than the README gives (the substitutions below, each of which must apply, so the README
cannot drift from what is run); serve and pip lines are not run."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from openalign.inference.encoders import load_encoders
from openalign.model_config import AlignConfig
from tests.cli_fixtures import make_hub_cache

README = Path(__file__).resolve().parents[1] / "README.md"
SMALLER = {"train": {"--n 2000": "--n 300", "--run.max_minutes 5": "--run.max_minutes 0.05"}}
NOT_RUN = ("openalign serve", "pip install")


def readme_blocks() -> dict[str, tuple[str, str]]:
    """{name: (language, code)} of the README's fenced blocks marked `<!-- quickstart: NAME ... -->`."""
    pattern = re.compile(r"<!-- quickstart: (\w+)[^>]*-->\n```(\w+)\n(.*?)```", re.S)
    return {name: (language, code) for name, language, code in pattern.findall(README.read_text())}


def command_lines(name: str, code: str) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments dropped, substitutions made."""
    for written, smaller in SMALLER.get(name, {}).items():
        assert written in code, f"the README's {name} block no longer holds {written!r}"
        code = code.replace(written, smaller)
    lines = code.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.startswith(NOT_RUN)]


def run(arguments: list[str], cwd: Path, environment: dict) -> subprocess.CompletedProcess:
    """Run one command as a user would; it must succeed with no traceback and no warning."""
    if arguments[0] == "openalign":
        arguments = [shutil.which("openalign") or sys.exit("openalign is not installed"), *arguments[1:]]
    elif arguments[0] == "python":
        arguments = [sys.executable, *arguments[1:]]
    completed = subprocess.run(arguments, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)
    shown = " ".join(arguments[1:])
    assert completed.returncode == 0, f"{shown}\n{completed.stdout}\n{completed.stderr}"
    complaints = ("traceback", "warning", "missing", "fewer than")  # nothing wrong, nothing guessed
    assert not any(word in completed.stderr.lower() for word in complaints), (shown, completed.stderr)
    return completed


def refused(arguments: list[str], cwd: Path, environment: dict) -> str:
    """Run a command that must fail: one line on stderr (argparse's usage aside), no traceback; returns it."""
    arguments = [shutil.which("openalign") or sys.exit("openalign is not installed"), *arguments[1:]]
    completed = subprocess.run(arguments, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0 and "traceback" not in completed.stderr.lower(), completed.stderr
    lines = [line for line in completed.stderr.splitlines() if line.strip() and not line.startswith((" ", "usage:"))]
    assert len(lines) == 1, completed.stderr
    return lines[0]


@pytest.fixture(scope="module")
def walked(tmp_path_factory):
    """The train block, run once: (working folder, environment, {command: its output})."""
    folder = tmp_path_factory.mktemp("newcomer")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(folder / "hub")}
    outputs = {}
    for arguments in command_lines("train", readme_blocks()["train"][1]):
        outputs[" ".join(arguments[:2])] = run(arguments, folder, environment).stdout
    return folder, environment, outputs


def test_the_readme_marks_every_quickstart_block():
    assert set(readme_blocks()) == {"checkpoint", "python", "photos", "train", "onnx"}


def test_train_block_from_generated_data_to_a_model_every_command_takes(walked):
    folder, _, outputs = walked
    model = folder / "runs" / "first" / "model"
    vocabulary = (folder / "tokenizer" / "vocab.txt").read_text().split()
    assert "image_path" not in vocabulary and "heldout" not in vocabulary  # captions only, not the manifest's keys
    trained = outputs["openalign train"]
    assert f"model: {Path('runs/first/model')}" in trained and "openalign zero-shot -m runs/first/model" in trained
    figures = [float(value) for value in re.findall(r"R@\d+ (\d\.\d+)", trained)]
    assert len(figures) == 7 and all(0 <= value <= 1 for value in figures)  # chance and six recalls: fractions
    assert "recall as a fraction" in outputs["openalign eval"]
    # The model runs at the size it trained at (the recipe's 64 px), its processor read without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoders = load_encoders(model, device="cpu")
    assert AlignConfig.from_json_file(model / "config.json").vision_config.image_size == 64
    assert encoders.processor.image_processor.crop_size == {"height": 64, "width": 64}
    assert encoders.processor.tokenizer.max_length == 16  # the recipe's data.max_length
    hits = outputs["openalign search"].splitlines()[1:4]
    assert [line.split()[0] for line in hits] == ["1.", "2.", "3."]


def test_the_same_model_as_a_hub_id_and_the_other_blocks(walked):
    folder, environment, outputs = walked
    model = folder / "runs" / "first" / "model"
    make_hub_cache(folder / "hub", "kakaobrain/align-base", model)
    images = sorted((folder / "data" / "heldout" / "images").glob("*.jpg"))
    shutil.copy(images[0], folder / "cat.jpg")
    shutil.copy(images[1], folder / "dog.jpg")
    (folder / "photos").mkdir()
    for image in images[:8]:
        shutil.copy(image, folder / "photos" / image.name)
    blocks = readme_blocks()
    for name in ("checkpoint", "photos", "onnx"):
        for arguments in command_lines(name, blocks[name][1]):
            outputs[f"{name}: {' '.join(arguments[:2])}"] = run(arguments, folder, environment).stdout
    printed = run([sys.executable, "-c", blocks["python"][1]], folder, environment).stdout
    assert printed.count("tensor") == 1  # the probabilities of cat.jpg against the two captions
    # The hub id is the trained folder: the same table as with the folder itself.
    from_folder = run(["openalign", "zero-shot", "-m", str(model), "cat.jpg", "--labels", "cat", "dog", "red car"],
                      folder, environment).stdout
    assert outputs["checkpoint: openalign zero-shot"] == from_folder
    assert (folder / "results.html").is_file() and (folder / "heat.png").is_file()
    assert json.loads((folder / "model-onnx" / "export.json").read_text())["processor"]["max_length"] == 16
    similarities = [float(line.split()[0]) for line in outputs["onnx: python model-onnx/example.py"].splitlines()]
    assert len(similarities) == 2 and all(-1.0 <= value <= 1.0 for value in similarities)


def test_the_second_walk_says_what_each_step_reached_and_what_to_do(walked):
    """What the second walk found silent or unclear (issue 26), on the walk's own data and model."""
    folder, environment, outputs = walked
    assert "" not in outputs["openalign tokenizer"].splitlines()  # no blank lines from the vocabulary's bars
    trained = outputs["openalign train"]  # how far the run got, and what a usable model takes
    assert re.search(r"mean R@1 is \d+\.\d times chance", trained)
    assert "the demo's usable model took about 1,000 steps of 256 over 20,000 pairs" in trained

    # The walk's model trained for seconds: filtering by it says whether it separates anything, and names its files.
    scored = run(["openalign", "filter", "data/train/manifest.jsonl", "--similarity", "-m", "runs/first/model",
                  "--keep-fraction", "0.7", "--out", "scored", "--quiet"], folder, environment).stdout
    assert "scorer check: " in scored and scored.strip().splitlines()[-1].startswith("wrote scored/manifest.jsonl")
    if "WEAK" in scored:
        assert "train the scorer longer" in scored

    # An image folder with .txt captions is a source of pairs for eval, as for train and embed.
    captioned = folder / "captioned"
    captioned.mkdir()
    for line in (folder / "data" / "heldout" / "manifest.jsonl").read_text().splitlines()[:10]:
        row = json.loads(line)
        shutil.copy(folder / "data" / "heldout" / row["image_path"], captioned / f"{row['key']}.jpg")
        (captioned / f"{row['key']}.txt").write_text(row["caption"])
    assert "recall as a fraction" in run(["openalign", "eval", "retrieval", "captioned", "-m", "runs/first/model"],
                                         folder, environment).stdout

    # train takes the names the other commands use, and a mistyped key gets the nearest one.
    printed = run(["openalign", "train", "--device", "cpu", "--out", "runs/x", "--print-config"], folder,
                  environment).stdout
    assert "device: cpu" in printed and "out_dir: runs/x" in printed
    error = refused(["openalign", "train", "--optim.learning_rate", "3e-4", "--print-config"], folder, environment)
    assert "did you mean --optim.lr?" in error
    # A figure extension that cannot be written: one line naming it, before the model loads.
    error = refused(["openalign", "compare", "cat.jpg", "-t", "a cat", "-m", "runs/first/model", "--out", "heat.jpgg"],
                    folder, environment)
    assert "cannot be written as .jpgg" in error and ".png" in error
