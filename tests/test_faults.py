"""Faults a user meets, and what the shared scaffolding of every method file does about them: each gives
one line naming what is wrong and what is accepted (never a traceback), exits non-zero and leaves every
existing file as it was; nothing a run wrote is ever lost."""
import json
import shutil

import pytest
import torch

from conftest import METHOD_FLAGS, METHOD_SCRIPTS, TINY_RUN, run_script

FAKE = [*TINY_RUN, "--dataset", "fake", "--subset", "128"]  # 2 steps per epoch on generated images


def snapshot(folder):
    """Every file under `folder` with its bytes and modification time: equal snapshots, nothing touched."""
    return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(folder.rglob("*")) if path.is_file()}


def one_line_error(result, *expected):
    """The run failed with exactly one line on stderr (no traceback) that contains every `expected` text."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode not in (0, None) and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert str(text) in lines[0], lines[0]
    return lines[0]


def epochs_logged(run):
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished 1-epoch tna.py run; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_script("tna.py", *FAKE, "--out-dir", out).returncode == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "run")


# ==== data loss ====
@pytest.mark.parametrize("script", METHOD_SCRIPTS)
def test_a_new_run_never_overwrites_a_run_in_its_out_dir(script, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl", "summary.json"):
        (out / name).write_text(f"an earlier run's {name}")
    before = snapshot(out)
    one_line_error(run_script(script, *FAKE, *METHOD_FLAGS.get(script, []), "--out-dir", out), out, "--resume", "--overwrite")
    assert snapshot(out) == before


def test_overwrite_starts_the_run_again(run_copy):
    (run_copy / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n')
    result = run_script("tna.py", *FAKE, "--out-dir", run_copy, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert epochs_logged(run_copy) == [1]
    assert one_line_error(run_script("tna.py", "--resume", run_copy, "--overwrite"), "not allowed")


def test_resuming_a_finished_run_says_so_and_writes_nothing(run_copy):
    before = snapshot(run_copy)
    result = run_script("tna.py", "--resume", run_copy)
    assert result.returncode == 0 and "complete" in result.stdout, result.stdout + result.stderr
    assert snapshot(run_copy) == before


def test_resume_refuses_flags_that_would_change_the_run(run_copy):
    before = snapshot(run_copy)
    one_line_error(run_script("tna.py", "--resume", run_copy, "--epochs", "2", "--lr", "0.5", "--alpha", "1"),
                   "--lr 0.5 (run: 0.05)", "--alpha 1.0 (run: 0.005)")
    assert snapshot(run_copy) == before
    # the default's value given explicitly is still a change from the run's own
    one_line_error(run_script("tna.py", "--resume", run_copy, "--model", "resnet18"), "--model resnet18 (run: convnet)")
    one_line_error(run_script("tna.py", "--resume", run_copy, "--epochs", "0"), "--epochs")
    assert snapshot(run_copy) == before


def test_resume_with_more_epochs_extends_the_run_and_says_so(run_copy):
    result = run_script("tna.py", "--resume", run_copy, "--epochs", "2", "--eval-every", "1")
    assert result.returncode == 0, result.stderr
    assert "--epochs 2 (run: 1)" in result.stdout and "schedule" in result.stdout
    checkpoint = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["epochs"] == 2
    assert epochs_logged(run_copy) == [1, 2] and json.loads((run_copy / "summary.json").read_text())["epochs"] == 2
    one_line_error(run_script("tna.py", "--resume", run_copy, "--epochs", "1"), "already trained 2 epochs")


def test_a_run_interrupted_and_resumed_again_and_again_logs_each_epoch_once(tmp_path):
    """A kill after an epoch's metrics line but before its checkpoint leaves a line (or half a line) that the
    resumed run writes again: the resume drops what the checkpoint does not cover."""
    out = tmp_path / "run"
    assert run_script("tna.py", *FAKE, "--epochs", "4", "--stop-after", "1", "--out-dir", out).returncode == 0
    with open(out / "metrics.jsonl", "a") as log:  # as if killed in epoch 2, between the two writes
        log.write('{"epoch": 2, "losses": {}}\n{"epoch": 3, "los')
    for stop in ("2", "3"):
        assert run_script("tna.py", "--resume", out, "--stop-after", stop).returncode == 0
    assert run_script("tna.py", "--resume", out).returncode == 0
    assert epochs_logged(out) == [1, 2, 3, 4]


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(run_copy, monkeypatch):
    import tna

    path = run_copy / "checkpoint.pt"
    before = path.read_bytes()

    def killed_midway(obj, file):
        open(file, "wb").write(before[: len(before) // 2])
        raise KeyboardInterrupt  # the process dies before the rename

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        tna.save_atomic({"epoch": 2}, path)
    assert path.read_bytes() == before and torch.load(path, weights_only=True)["epoch"] == 1
