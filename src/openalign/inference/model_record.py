"""model.json: which model an embedding folder's vectors (and an index built from them) were made with.

Vectors are only comparable with queries encoded by the same model; another model of the same size gives
answers of the right shape and no meaning. So the record holds the model's fingerprint (SHA-256 over its
config.json and weight files, `model_fingerprint`) beside where it is, and `model_mismatch` compares a model
with it. Where it is: a local folder is recorded both relative to the folder holding model.json (an index or
embedding folder moved together with its model keeps working) and as an absolute path (one moved alone still
finds it); a hub id as it is.

    {"model": "../run/model", "absolute": "/data/run/model", "fingerprint": "9f2c..."}

Records written before fingerprints (`{"model": "/abs/path"}`) are still read; they cannot be compared.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from openalign.errors import OpenAlignError
from openalign.files import atomic_write_bytes, file_digest
from openalign.untrusted import MAX_TEXT_BYTES, parse_json, read_text_file

MODEL_FILE = "model.json"
# The files whose bytes make a model what it is: its settings and its weights (every layout pretrained.py reads).
_FINGERPRINTED = ("config.json", "*.safetensors", "pytorch_model*.bin")


class ModelRecordError(OpenAlignError, ValueError):
    """model.json is unreadable, names a model that is not there, or the model given is not the one it names."""


def model_fingerprint(folder: str | os.PathLike) -> str | None:
    """SHA-256 over the names and SHA-256 of a model folder's config.json and weight files; None when the folder
    has none of them (nothing to compare). Costs a read of the weights (about a second a gigabyte)."""
    folder = Path(folder)
    files = sorted({path for pattern in _FINGERPRINTED for path in folder.glob(pattern) if path.is_file()})
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


def _record(folder: Path, model: str | os.PathLike, fingerprint: str | None) -> dict:
    """The model.json contents for `model` as seen from `folder`."""
    path = Path(model)
    if not path.exists():
        return {"model": str(model), "fingerprint": fingerprint}  # a hub id, resolved again from the cache
    absolute = path.resolve()
    try:
        relative = os.path.relpath(absolute, folder.resolve())
    except ValueError:  # another drive (Windows): no relative path exists
        relative = str(absolute)
    return {"model": Path(relative).as_posix(), "absolute": str(absolute), "fingerprint": fingerprint}


def write_model_reference(out_dir: str | os.PathLike, model: str | os.PathLike, *,
                          fingerprint: str | None = None) -> None:
    """Write out_dir/model.json for `model` (a local folder or a hub id). The fingerprint is computed from a local
    folder unless given (callers that resolved a hub id to its cached folder pass that folder's)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fingerprint is None and Path(model).is_dir():
        fingerprint = model_fingerprint(model)
    record = _record(out_dir, model, fingerprint)
    atomic_write_bytes(out_dir / MODEL_FILE, (json.dumps(record) + "\n").encode())


def read_model_record(folder: str | os.PathLike) -> dict | None:
    """The parsed model.json of `folder` ({"model", "absolute"?, "fingerprint"?}); None when it has none."""
    path = Path(folder) / MODEL_FILE
    if not path.exists():
        return None
    try:
        record = parse_json(read_text_file(path, MAX_TEXT_BYTES, "model record"), str(path))
        if not isinstance(record, dict) or not isinstance(record.get("model"), str):
            raise TypeError("no \"model\" string")
    except (ValueError, TypeError, OpenAlignError) as error:
        raise ModelRecordError(f"{path} does not name a model ({error}); pass --model (-m)") from None
    return record


def read_model_reference(folder: str | os.PathLike) -> str | None:
    """The model named by folder's model.json as a path that exists (its place relative to the folder first, then
    its absolute path) or a hub id; None when there is no model.json. A local model that is in neither place is a
    ModelRecordError naming model.json and --model."""
    folder = Path(folder)
    record = read_model_record(folder)
    if record is None:
        return None
    recorded = record["model"]
    local = "absolute" in record or Path(recorded).is_absolute()
    if not local:
        return recorded
    for candidate in (folder / recorded, Path(record.get("absolute", recorded))):
        if candidate.is_dir():
            return str(candidate)
    raise ModelRecordError(
        f"{folder / MODEL_FILE} names the model {record.get('absolute', recorded)} (or {recorded} from there), "
        "which is not there: moved or removed? Pass the model the embeddings were made with as --model (-m)")


def copy_model_reference(from_dir: str | os.PathLike, to_dir: str | os.PathLike) -> bool:
    """Record in to_dir the model from_dir's model.json names (its paths rewritten as seen from to_dir); False
    when from_dir has none."""
    record = read_model_record(from_dir)
    if record is None:
        return False
    try:
        model = read_model_reference(from_dir)
    except ModelRecordError:  # the model is gone: keep its record as it is, for the user to restore the model
        Path(to_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(to_dir) / MODEL_FILE, (json.dumps(record) + "\n").encode())
        return True
    write_model_reference(to_dir, model, fingerprint=record.get("fingerprint"))
    return True


def model_mismatch(folder: str | os.PathLike, model_folder: str | os.PathLike) -> str | None:
    """Why the model in model_folder is not the one folder's model.json records, or None when it is (or when
    either has no fingerprint to compare)."""
    record = read_model_record(folder)
    recorded = record and record.get("fingerprint")
    if not recorded:
        return None
    given = model_fingerprint(model_folder)
    if given is None or given == recorded:
        return None
    return (f"the model {model_folder} is not the one {Path(folder) / MODEL_FILE} records ({record['model']}): its "
            f"config and weights differ (fingerprint {given[:12]}, recorded {recorded[:12]}), so its queries "
            "would not match the indexed vectors")
