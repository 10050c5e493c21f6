"""Shared test fixtures: the repository root on sys.path and the offline datasets in ../shared/data."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_DATA = Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR10_SMALL = SHARED_DATA / "cifar10_small.npz"


@pytest.fixture
def cifar10_small():
    """Path to ../shared/data/cifar10_small.npz; skips the test when the folder is absent (a user's clone)."""
    if not CIFAR10_SMALL.exists():
        pytest.skip(f"{CIFAR10_SMALL} not found: the small offline datasets live in ../shared/data")
    return CIFAR10_SMALL
