"""What every index module shares, on the floor below them all: the error type, FAISS's import, the plan that
says what an index is, and a guard for the lines FAISS prints."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, fields

from openalign.errors import OpenAlignError


class IndexBuildError(OpenAlignError, ValueError):
    """An index cannot be built or loaded: unknown kind, budget too small, or a malformed index folder."""


def import_faiss():
    """The faiss module, or IndexBuildError saying how to install it."""
    try:
        import faiss
    except ImportError as error:  # a dependency of openalign: only a broken or partial install lacks it
        raise IndexBuildError("faiss is not installed (a dependency of openalign): pip install faiss-cpu") from error
    return faiss


@dataclass
class IndexPlan:
    """What choose_index decided: the FAISS factory string, search defaults and the memory it needs.

    estimated_bytes: what the index holds in memory (for "ivfpq": its inverted lists, which are memory-mapped
    from disk). rerank_bytes: the float16 copy an "ivfpq" index re-scores from, on disk and memory-mapped.
    nprobe and k_factor are the search defaults: the rule's until the build has tuned them on the collection
    (openalign.index.tuning), then the tuned ones.
    """

    kind: str
    factory: str
    num_vectors: int
    dim: int
    estimated_bytes: int
    k_factor: int = 1
    nlist: int = 0
    nprobe: int = 0
    reason: str = ""
    rerank_bytes: int = 0

    @classmethod
    def from_json(cls, values: dict) -> IndexPlan:
        """The plan saved in an index.json (fields added since are left at their defaults)."""
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


@contextlib.contextmanager
def quiet_native_stdout():
    """Send what C++ code prints on file descriptor 1 to /dev/null meanwhile.

    FAISS's on-disk inverted lists print progress lines ("resizing ...", "updating ondisk filename ...") with
    printf, which would otherwise land inside `openalign search --json` output.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
