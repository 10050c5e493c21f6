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


def run_script(script, *args, timeout=600, env=None, launcher=None):
    """Run a method script as a new user would (a subprocess in the repository root); returns the
    CompletedProcess with text stdout/stderr. `launcher` replaces `python` (e.g. torchrun)."""
    import subprocess

    command = (launcher or [sys.executable]) + [str(REPO / script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


# A tiny, fast configuration every end-to-end test of a method script starts from.
TINY_RUN = ["--model", "convnet", "--subset", "256", "--batch-size", "64", "--epochs", "1", "--amp", "off", "--lr", "0.05"]
