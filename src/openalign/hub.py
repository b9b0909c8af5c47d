"""Folders from the Hugging Face hub: a local folder is used as is, an `owner/name` id is downloaded (or taken
from the local cache), in this one place for every command and loader."""

from __future__ import annotations

import os
from pathlib import Path

from openalign.errors import CheckpointError


def resolve_folder(path_or_hub_id: str | os.PathLike, *, allow_patterns: list[str],
                   revision: str | None = None) -> Path:
    """A local folder as is; anything else that looks like `owner/name` is downloaded with huggingface_hub's
    snapshot_download, only the files matching allow_patterns, at revision (a branch, tag or commit; None: the
    default branch), or found in huggingface_hub's cache when the hub cannot be reached (or HF_HUB_OFFLINE=1).
    Raises CheckpointError naming the path or id, and saying what to do, when there is neither."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a folder (or a hub id such as 'owner/name')")
    name = str(path_or_hub_id)
    if name.count("/") != 1 or name.startswith((".", "/")) or name.endswith("/"):
        raise CheckpointError(f"no model folder at {name!r} (and it is not a hub id such as 'owner/name')")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError as error:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"downloading {name!r} needs huggingface_hub: pip install huggingface_hub") from error
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError:
        # Raised when the hub could not be asked (offline, or no connection) and the cache has no copy.
        raise CheckpointError(
            f"{name!r} is not a local folder, and the Hugging Face hub cannot be reached to download it "
            f"(nor is it in the local cache, {constants.HF_HUB_CACHE}"
            f"{'; HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else ''}). Pass a folder holding "
            f"config.json, the weights and the tokenizer files instead, e.g. one fetched where the hub is "
            f"reachable with `hf download {name} --local-dir DIR`"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"the hub model {name!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"no folder {name!r} here, and no model {name!r} on the Hugging Face hub (or it is private: log "
            "in with `hf auth login`)"
        ) from None
    except Exception as error:
        raise CheckpointError(f"could not download {name!r} from the Hugging Face hub: {error}") from error
