"""Fixtures shared by the store tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from fsrecrypt.store import LocalStore


@pytest.fixture
def local(tmp_path: Path) -> LocalStore:
    """A local store in an empty directory of its own (``<tmp>/objects``)."""
    root = tmp_path / "objects"
    root.mkdir()
    return LocalStore(root)
