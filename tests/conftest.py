"""Fixtures shared by several test files (pytest finds them here; test files do not import this module)."""

from __future__ import annotations

import pytest

from tests.cli_fixtures import make_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint folder (model + processor, tests.cli_fixtures.make_checkpoint), built once and only
    read: the command and encoder tests embed, search and classify with it."""
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="session")
def serve_collection(tmp_path_factory):
    """A small captioned collection, embedded and indexed in both kinds (tests.serve_fixtures.make_collection),
    built once and only read: the service tests serve it."""
    from tests.serve_fixtures import make_collection

    return make_collection(tmp_path_factory.mktemp("serve"))
