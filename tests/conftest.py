"""Shared test fixtures: the repository root on sys.path and the shipped sample of CIFAR-10 (samples/)."""
import contextlib
import io
import os
import runpy
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CIFAR10_SAMPLE = REPO / "samples" / "cifar10_sample.npz"  # shipped: 1,000 / 200 CIFAR-10 images (`--dataset sample`)


def require_cifar10_sample():
    """Path to the shipped sample of CIFAR-10 (every clone has it, so nothing skips)."""
    assert CIFAR10_SAMPLE.exists(), f"{CIFAR10_SAMPLE} is missing: it ships with the repository"
    return CIFAR10_SAMPLE


@pytest.fixture
def cifar10_sample():
    return require_cifar10_sample()


def read_summary(out_dir):
    """The summary.json a finished run writes."""
    import json

    return json.loads((Path(out_dir) / "summary.json").read_text())


def run_script(script, *args, timeout=600, env=None, launcher=None, isolated=False):
    """Run a script as `python script args...` would, returning a CompletedProcess-like result with
    returncode, stdout and stderr (text).

    By default the script runs in this process (`runpy` as __main__, sys.argv set, output captured,
    SystemExit and uncaught exceptions turned into exit codes and stderr as the interpreter would):
    importing torch in a fresh interpreter costs seconds per run, which the suite cannot afford many
    times. `isolated=True` (used by each script's first end-to-end test) or a `launcher` (e.g. torchrun)
    runs a real subprocess, exactly as a new user would."""
    if isolated or launcher or env:
        command = (launcher or [sys.executable]) + [str(REPO / script), *map(str, args)]
        full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    stdout, stderr, returncode = io.StringIO(), io.StringIO(), 0
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    sys.argv = [str(REPO / script), *map(str, args)]
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            stderr.write(exit_.code + "\n")
        returncode = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception:  # noqa: BLE001 - the interpreter would print it and exit with 1
        stderr.write(traceback.format_exc())
        returncode = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(sys.argv, returncode, stdout.getvalue(), stderr.getvalue())


# A tiny, fast configuration every end-to-end test of a method script starts from.
TINY_RUN = ["--model", "convnet", "--subset", "256", "--batch-size", "64", "--epochs", "1", "--amp", "off",
            "--lr", "0.05"]
METHOD_SCRIPTS = ["tna.py", "dml.py", "sila.py", "fdl.py", "amln.py", "css.py"]
METHOD_FLAGS = {"fdl.py": ["--pretrain-epochs", "0"]}  # FDL: all four sub-steps from the first batch of a 1-epoch run


def check_resume_equals_uninterrupted(script, common_args, tmp_path):
    """Train 2 epochs straight, and 1 epoch + --resume for the 2nd; the final evaluations must be equal
    (on CPU, exactly). Returns the two run folders (straight, split) for further checks."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_script(script, *common_args, "--epochs", "2", "--out-dir", straight).returncode == 0
    first = run_script(script, *common_args, "--epochs", "2", "--out-dir", split, "--stop-after", "1")
    assert first.returncode == 0 and not (split / "summary.json").exists()
    resumed = run_script(script, "--resume", split)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_summary(straight), read_summary(split)
    assert a["networks"] == b["networks"] and a["ensemble"] == b["ensemble"]
    assert len((split / "metrics.jsonl").read_text().splitlines()) == 2
    return straight, split


def parse_error(parse_args, argv, capsys):
    """The one-line error a script's argument parser prints for `argv` (it must exit non-zero)."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    message = capsys.readouterr().err.strip()
    assert exit_info.value.code not in (0, None) and len(message.splitlines()) == 1, message
    return message


class CapturedParser(Exception):
    pass


def parser_of(module, monkeypatch):
    """The argument parser a script's parse_args builds (caught as it starts parsing)."""
    def capture(self, args=None, namespace=None):
        raise CapturedParser(self)

    monkeypatch.setattr(module.Parser, "parse_args", capture)
    with pytest.raises(CapturedParser) as captured:
        module.parse_args([])
    return captured.value.args[0]
