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
from pathlib import Path

import pytest

from tests.train_data import make_data, tiny_config

# A file name that is also a command: touch a marker beside it, then print a real shard (read twice if run).
EVIL_NAME = "pipe:sh -c 'touch MARKER; cat shard-00000.tar' x.tar"


def openalign(*argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed command (this tree's package first on the path) in `cwd`."""
    environment = {key: value for key, value in os.environ.items() if key != "OPENALIGN_DEBUG"}
    command = [shutil.which("openalign")] if shutil.which("openalign") else [sys.executable, "-m", "openalign"]
    return subprocess.run([*command, *argv], cwd=cwd, capture_output=True, text=True, env=environment,
                          timeout=timeout)


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
