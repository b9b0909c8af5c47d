"""Folders from the Hugging Face hub: a local folder is used as is, an `owner/name` id is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

from openalign.errors import CheckpointError


def resolve_folder(path_or_hub_id: str | os.PathLike, *, allow_patterns: list[str],
                   revision: str | None = None) -> Path:
    """A local folder as is; anything else that looks like `owner/name` is downloaded with huggingface_hub's
    snapshot_download, only the files matching allow_patterns, at revision (a branch, tag or commit; None: the
    default branch). Raises CheckpointError naming the path or id when there is neither."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a folder (or a hub id such as 'owner/name')")
    name = str(path_or_hub_id)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"no checkpoint folder at {name!r} (and it is not a hub id such as 'owner/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"downloading {name!r} needs huggingface_hub: pip install huggingface_hub") from error
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=allow_patterns))
    except Exception as error:
        raise CheckpointError(f"could not download {name!r} from the hub: {error}") from error
