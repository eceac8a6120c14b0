"""Fixtures of the training tests (helpers live in training_helpers.py)."""

import pytest

from training_helpers import Snippet


@pytest.fixture
def snippet():
    """`snippet.run(code, logical_cpus)` / `snippet.json(...)`: code in a fresh interpreter."""
    return Snippet
