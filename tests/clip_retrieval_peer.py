"""clip-retrieval's modules, imported as its users' code would, for the compatibility tests.

clip-retrieval is installed with --no-deps (its declared dependencies pin numpy<2 and pull torchvision, CLIP
models, wandb). Its package `__init__.py` imports the whole inference and front-end stack, so importing
`clip_retrieval.clip_client` the ordinary way would need all of it. The modules the tests use (clip_client,
clip_back's loaders) import only requests, flask, pandas, h5py, fire, faiss and friends, so the package is
registered here without running its `__init__.py` and the modules themselves are imported unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def clip_retrieval_module(name: str):
    """clip_retrieval.NAME, or skip the test when clip-retrieval is not installed."""
    if "clip_retrieval" not in sys.modules:
        spec = importlib.util.find_spec("clip_retrieval")
        if spec is None:
            pytest.skip("clip-retrieval is not installed: pip install --no-deps clip-retrieval autofaiss")
        package = types.ModuleType("clip_retrieval")
        package.__spec__ = spec
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["clip_retrieval"] = package
    return importlib.import_module(f"clip_retrieval.{name}")
