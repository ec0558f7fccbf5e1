"""Fixtures of the weights tests (the S3 server comes from tests/conftest.py: ``s3_server``, ``s3_bucket``)."""

from __future__ import annotations

import pytest

from tests.weights.helpers import make_small_model


@pytest.fixture
def small_model():
    """A random width-0.125 LargeFOV (see ``helpers.make_small_model`` for other variants)."""
    return make_small_model("largefov")
