"""The data half of the hostile battery (tests/test_hostile_inputs.py and tests/test_hostile_training.py have the
rest): a file name never runs as a command, filter outputs are committed whole and one filter writes a folder at
a time, non-finite embeddings are refused where written and where read, damaged score files and empty manifests
are named. Small data; the reproductions that matter run the installed command in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from openalign.cli import main
from tests.train_data import make_data, tiny_config

# A file name that is also a command: touch a marker beside it, then print a real shard (read twice if run).
EVIL_NAME = "pipe:sh -c 'touch MARKER; cat shard-00000.tar' x.tar"


def openalign(*argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed command (this tree's package first on the path) in `cwd`."""
    environment = {key: value for key, value in os.environ.items() if key != "OPENALIGN_DEBUG"}
    command = [shutil.which("openalign")] if shutil.which("openalign") else [sys.executable, "-m", "openalign"]
    return subprocess.run([*command, *argv], cwd=cwd, capture_output=True, text=True, env=environment,
                          timeout=timeout)


def run_command(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of one command run in this process; the error is one line, no traceback."""
    capsys.readouterr()
    status = main(argv)
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.count("\n") <= 1, error
    return status, error


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 pairs in two shards of 12, a manifest and a tokenizer."""
    return make_data(tmp_path_factory.mktemp("data"), num_pairs=24, samples_per_shard=12, num_val=8)


@pytest.fixture
def evil_shards(data, tmp_path):
    """A copy of the shard folder beside a file named like a command; the file itself is a valid, empty tar."""
    folder = tmp_path / "shards"
    shutil.copytree(data["shards"], folder)
    with tarfile.open(folder / EVIL_NAME, "w"):
        pass
    return folder


# -- a listed or globbed name is a path -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [".", "*.tar"])
def test_a_file_named_like_a_command_is_read_as_a_file_by_filter(evil_shards, tmp_path, spec):
    finished = openalign("filter", spec, "--out", str(tmp_path / "out"), "--quiet", cwd=evil_shards)
    assert not (evil_shards / "MARKER").exists()
    assert finished.returncode == 0, finished.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["total"] == 24  # each of the two real shards once; the empty tar adds nothing


def test_a_file_named_like_a_command_is_read_as_a_file_by_embed(evil_shards, checkpoint, tmp_path):
    finished = openalign("embed", "*.tar", "--model", str(checkpoint), "--out", str(tmp_path / "embeddings"),
                         "--no-progress", cwd=evil_shards)
    assert not (evil_shards / "MARKER").exists()
    assert finished.returncode == 0, finished.stderr
    assert "embedded 24 items" in finished.stdout


def test_a_file_named_like_a_command_is_read_as_a_file_by_train(evil_shards, data, tmp_path):
    # An epoch size given, so the run would start even if it took a name for a command (which it cannot count).
    config = tiny_config(data, tmp_path / "run", **{"optim.total_steps": 2, "optim.batch_size": 8,
                                                    "data.epoch_size": 24})
    config.save(tmp_path / "config.yaml")
    finished = openalign("train", "--config", str(tmp_path / "config.yaml"), "--set", "data.train=*.tar",
                         cwd=evil_shards)
    assert not (evil_shards / "MARKER").exists()
    assert finished.returncode == 0, finished.stderr


def test_a_pipe_spec_the_user_wrote_runs_and_a_listed_name_stays_a_file(evil_shards, monkeypatch):
    from openalign.data.sources import Shard, expand_shards, iter_records

    (command,) = expand_shards(f"pipe:cat {evil_shards}/shard-00001.tar")
    assert command == Shard(f"cat {evil_shards}/shard-00001.tar", command=True)
    assert len(list(iter_records(str(command)))) == 12
    monkeypatch.chdir(evil_shards)
    listed = expand_shards(".")
    assert Shard(EVIL_NAME) in listed and not any(shard.command for shard in listed)
    # Written out and read back as a spec, the name is still a file.
    assert str(Shard(EVIL_NAME)) == f"./{EVIL_NAME}"
    assert list(iter_records(str(Shard(EVIL_NAME)))) == []
    assert not (evil_shards / "MARKER").exists()


# -- filter outputs: whole, from one run, one filter at a time ---------------------------------------------------

# Runs one filter in a process of its own, which at the `stop_at`-th pair of its writing pass kills itself
# (action "kill": kill -9, no clean-up runs) or, holding the folder, waits for a file to appear ("wait").
FILTER_SCRIPT = r"""
import json, os, signal, sys, time
from pathlib import Path
import openalign.data.sources as sources
from openalign.curation.similarity_filter import SimilarityConfig, filter_by_scores
from openalign.data.filters import FilterConfig, run_filter

settings = json.loads(sys.argv[1])
original, calls = sources.iter_records, []

def interrupted(source):
    calls.append(source)
    for number, record in enumerate(original(source)):
        if len(calls) == settings["writing_pass"] and number == settings["stop_at"]:
            if settings["action"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if settings["action"] == "wait":
                Path(settings["waiting"]).touch()
                while not Path(settings["go"]).exists():
                    time.sleep(0.05)
        yield record

sources.iter_records = interrupted
if settings["kind"] == "rules":
    run_filter(settings["source"], settings["out"], FilterConfig(min_side=10))
else:
    filter_by_scores(settings["source"], settings["out"], SimilarityConfig(keep_fraction=0.5),
                     scores_from=settings["scores"])
"""


@pytest.fixture(scope="module")
def scored(data, checkpoint, tmp_path_factory):
    """The pairs of `data` scored under the test checkpoint, every pair kept."""
    out = tmp_path_factory.mktemp("scored")
    assert main(["filter", str(data["train"]), "--similarity", "--model", str(checkpoint), "--keep-fraction", "1",
                 "--out", str(out), "--quiet"]) == 0
    return out


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _whole_outputs(out: Path) -> dict | None:
    """The report, after checking that the files beside it are the ones it describes; None without one."""
    if not (out / "report.json").exists():
        return None
    report = json.loads((out / "report.json").read_text())
    dropped = report.get("dropped", report.get("dropped_by_score", 0) + report.get("dropped_as_duplicate", 0)
                         + report.get("unscored", 0))
    assert (_lines(out / "manifest.jsonl"), _lines(out / "dropped.jsonl")) == (report["kept"], dropped)
    assert not list(out.glob("*.tmp"))
    return report


def _start_filter(kind: str, data, scored, out: Path, tmp_path: Path, action: str) -> subprocess.Popen:
    settings = {"kind": kind, "source": str(data["train"]), "out": str(out), "scores": str(scored),
                "writing_pass": 2 if kind == "rules" else 1, "stop_at": 6, "action": action,
                "waiting": str(tmp_path / "waiting"), "go": str(tmp_path / "go")}
    return subprocess.Popen([sys.executable, "-c", FILTER_SCRIPT, json.dumps(settings)], stderr=subprocess.PIPE,
                            text=True)


def _complete_run(kind: str, data, scored, out: Path) -> dict:
    flags = ["--min-side", "10", "--no-rare-token"] if kind == "rules" else ["--scores-from", str(scored)]
    assert main(["filter", str(data["train"]), "--out", str(out), "--quiet", *flags]) == 0
    return _whole_outputs(out)


@pytest.mark.parametrize("kind", ["rules", "similarity"])
def test_a_filter_killed_while_writing_leaves_no_report_that_misdescribes_the_folder(kind, data, scored,
                                                                                     tmp_path):
    out = tmp_path / "out"
    earlier = _complete_run(kind, data, scored, out)
    assert earlier["kept"] > 6
    process = _start_filter(kind, data, scored, out, tmp_path, action="kill")
    assert process.wait(timeout=300) == -9, process.stderr.read()
    _whole_outputs(out)  # a report is left only beside the outputs it describes
    assert _lines(out / "manifest.jsonl") in (0, earlier["kept"])  # never half of the new manifest
    # The rerun completes the folder.
    process = _start_filter(kind, data, scored, out, tmp_path, action="none")
    assert process.wait(timeout=300) == 0, process.stderr.read()
    assert _whole_outputs(out) is not None


@pytest.mark.parametrize("kind", ["rules", "similarity"])
def test_a_second_filter_into_a_folder_being_written_fails_with_one_line(kind, data, scored, tmp_path):
    out = tmp_path / "out"
    first = _start_filter(kind, data, scored, out, tmp_path, action="wait")
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "waiting").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.05)
        flags = ["--min-side", "10"] if kind == "rules" else ["--similarity", "--scores-from", str(scored),
                                                               "--keep-fraction", "1"]
        second = openalign("filter", str(data["train"]), "--out", str(out), "--quiet", *flags, cwd=tmp_path)
        assert second.returncode == 1, second.stderr
        assert second.stderr.count("\n") == 1 and str(out) in second.stderr and "another process" in second.stderr
    finally:
        (tmp_path / "go").touch()
        assert first.wait(timeout=300) == 0, first.stderr.read()
    assert _whole_outputs(out)["kept"] == _lines(out / "manifest.jsonl")


# -- non-finite embeddings: refused where written, and where read ------------------------------------------------


@pytest.fixture(scope="module")
def nan_checkpoint(checkpoint, tmp_path_factory):
    """The test checkpoint with every weight NaN, as a run that diverged may save it."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("nan") / "model"
    shutil.copytree(checkpoint, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({name: torch.full_like(value, float("nan")) if value.is_floating_point() else value
               for name, value in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_nan_checkpoint_is_refused_by_filter_and_embed_naming_the_model(nan_checkpoint, data, tmp_path):
    filtered = openalign("filter", str(data["train"]), "--similarity", "--model", str(nan_checkpoint),
                         "--keep-fraction", "0.5", "--out", str(tmp_path / "kept"), "--quiet", cwd=tmp_path)
    embedded = openalign("embed", str(data["train"]), "--model", str(nan_checkpoint), "--out",
                         str(tmp_path / "embeddings"), "--no-progress", cwd=tmp_path)
    for finished in (filtered, embedded):
        assert finished.returncode == 1, finished.stderr
        assert finished.stderr.count("\n") == 1 and "Traceback" not in finished.stderr, finished.stderr
        assert str(nan_checkpoint) in finished.stderr and "non-finite" in finished.stderr
        assert "item 0" in finished.stderr  # the first item, named with its source
    assert not (tmp_path / "kept" / "manifest.jsonl").exists()
    assert not list((tmp_path / "embeddings").glob("img_emb/*.npy"))


def test_the_non_finite_row_test_agrees_with_numpy_on_every_float16_bit_pattern():
    from openalign.inference.embedding_folder import first_non_finite

    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    rows = np.stack([np.zeros(2**16, np.float16), every], axis=1)  # (65536, 2): one pattern a row
    expected = ~np.isfinite(rows.astype(np.float32)).all(axis=1)
    first = first_non_finite(rows)
    assert first == int(np.argmax(expected))
    assert [first_non_finite(rows[start:]) for start in (first + 1, 0x8000)] == \
        [int(np.argmax(expected[start:])) for start in (first + 1, 0x8000)]  # rows counted from the slice
    assert first_non_finite(rows[~expected]) is None
    assert first_non_finite(rows.astype(np.float32)) == first


def _embedding_folder(out: Path, rows: np.ndarray) -> Path:
    """An embedding folder of `rows` (n, D) written by the folder's own writer, as another tool might."""
    from openalign.inference.embedding_folder import write_parts

    def fill(part_items, first_index, advance):
        items = list(part_items)
        metadata = [{"index": first_index + offset, "source": f"item-{first_index + offset}", "caption": None,
                     "width": None, "height": None} for offset in range(len(items))]
        return {"image": rows[first_index:first_index + len(items)].astype(np.float16)}, metadata, [], len(items)

    write_parts(range(len(rows)), out, fill, kinds=("image",), part_size=4, progress=False)
    return out


def test_an_embedding_folder_holding_nan_is_refused_by_index_naming_the_part_and_item(tmp_path):
    rows = np.random.default_rng(0).standard_normal((10, 8))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows[6, 3] = np.nan
    folder = _embedding_folder(tmp_path / "embeddings", rows)
    finished = openalign("index", str(folder), "--out", str(tmp_path / "index"), cwd=tmp_path)
    assert finished.returncode == 1, finished.stderr
    assert finished.stderr.count("\n") == 1 and "Traceback" not in finished.stderr, finished.stderr
    assert "img_emb_00001.npy" in finished.stderr and "row 2 (item-6)" in finished.stderr
    assert "not finite" in finished.stderr


# -- score files and manifests that cannot be used: one line naming the file --------------------------------------


def test_a_damaged_or_non_finite_scores_file_is_named(scored, data, tmp_path, capsys):
    import pyarrow.parquet as pq

    truncated, nan = tmp_path / "truncated", tmp_path / "nan"
    for folder in (truncated, nan):
        shutil.copytree(scored, folder)
    scores = (scored / "scores.parquet").read_bytes()
    (truncated / "scores.parquet").write_bytes(scores[: len(scores) // 2])
    table = pq.read_table(scored / "scores.parquet")
    values = table.column("score").to_numpy().copy()
    values[5] = np.nan
    pq.write_table(table.set_column(3, "score", pa.array(values, type=pa.float32())), nan / "scores.parquet")
    key = table.column("key")[5].as_py()
    for folder, words in ((truncated, ["is damaged", "rerun"]), (nan, ["pair 5", key, "not finite"])):
        status, error = run_command(["filter", str(data["train"]), "--scores-from", str(folder), "--keep-fraction",
                                     "0.5", "--out", str(tmp_path / f"kept-{folder.name}"), "--quiet"], capsys)
        assert status == 1 and str(folder / "scores.parquet") in error, error
        assert all(word in error for word in words), error


@pytest.mark.parametrize("content", ["", "image_path,caption\n"], ids=["empty", "header-only"])
def test_an_empty_manifest_is_named_and_leaves_no_output_folder(content, checkpoint, tmp_path, capsys):
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(content)
    commands = [["filter", str(manifest), "--min-side", "10"],
                ["filter", str(manifest), "--similarity", "--model", str(checkpoint), "--keep-fraction", "0.5"],
                ["embed", str(manifest), "--model", str(checkpoint), "--no-progress"]]
    for number, argv in enumerate(commands):
        out = tmp_path / f"out-{number}"
        status, error = run_command([*argv, "--out", str(out)], capsys)
        assert status == 1 and str(manifest) in error and "empty" in error, error
        assert not out.exists()


def test_embed_on_a_missing_source_creates_nothing(checkpoint, tmp_path, capsys):
    status, error = run_command(["embed", str(tmp_path / "missing.jsonl"), "--model", str(checkpoint), "--out",
                                 str(tmp_path / "embeddings"), "--no-progress"], capsys)
    assert status == 1 and "missing.jsonl" in error
    assert not (tmp_path / "embeddings").exists()
