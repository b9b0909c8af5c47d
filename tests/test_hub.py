"""Model folders or hub ids, resolved in one place (openalign.hub): a stand-in hub (a prepared cache, offline) for
the found case, huggingface_hub's own errors for the others; no network."""

from __future__ import annotations

import os
import subprocess
import sys

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from openalign.errors import CheckpointError
from openalign.hub import resolve_folder
from openalign.inference.encoders import check_checkpoint_folder
from tests.cli_fixtures import make_hub_cache


def _raise(error):
    def fake_snapshot_download(*args, **kwargs):
        raise error

    return fake_snapshot_download


def test_unreachable_hub_says_so_and_how_to_pass_a_folder(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raise(LocalEntryNotFoundError("no connection")))
    with pytest.raises(CheckpointError) as caught:
        resolve_folder("kakaobrain/align-base", allow_patterns=["*.json"])
    message = str(caught.value)
    assert "'kakaobrain/align-base' is not a local folder" in message and "cannot be reached" in message
    assert "Pass a folder holding config.json" in message and "hf download kakaobrain/align-base" in message


def test_unknown_hub_id_and_local_paths_are_named(monkeypatch, tmp_path):
    response = type("Response", (), {"status_code": 404, "headers": {}, "request": None})()
    try:
        missing = RepositoryNotFoundError("404", response=response)
    except TypeError:  # older huggingface_hub signatures
        missing = RepositoryNotFoundError("404")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raise(missing))
    with pytest.raises(CheckpointError, match="no folder 'owner/typo' here, and no model 'owner/typo' on the"):
        resolve_folder("owner/typo", allow_patterns=["*.json"])
    with pytest.raises(CheckpointError, match=f"no model folder at '{tmp_path / 'runs' / 'model'}'"):
        check_checkpoint_folder(tmp_path / "runs" / "model")
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="is a file; expected a folder"):
        check_checkpoint_folder(tmp_path / "file")


def test_a_hub_id_resolves_from_the_cache_offline(checkpoint, tmp_path):
    """In a fresh process (huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported): the cached
    snapshot is the folder the encoders load."""
    cache = make_hub_cache(tmp_path / "hub", "stand-in/tiny-align", checkpoint)
    code = ("from openalign.inference.encoders import check_checkpoint_folder; "
            "print(check_checkpoint_folder('stand-in/tiny-align'))")
    environment = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr
    folder = completed.stdout.strip()
    assert folder.startswith(str(cache)) and sorted(os.listdir(folder)) == sorted(os.listdir(checkpoint))
