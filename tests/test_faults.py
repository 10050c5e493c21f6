"""Faults a user meets, and what the shared scaffolding of every method file does about them: each gives
one line naming what is wrong and what is accepted (never a traceback), exits non-zero and leaves every
existing file as it was; nothing a run wrote is ever lost."""
import json
import shutil

import pytest
import torch

from conftest import METHOD_FLAGS, METHOD_SCRIPTS, TINY_RUN, parser_of, run_script

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
    result = run_script(script, *FAKE, *METHOD_FLAGS.get(script, []), "--out-dir", out)
    one_line_error(result, out, "--resume", "--overwrite")
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


# ==== arguments ====
@pytest.mark.parametrize("script", METHOD_SCRIPTS)
def test_every_numeric_flag_is_range_checked_at_parse_time(script, monkeypatch):
    """No flag parses a bare int or float: each numeric one has a validator refusing nan and infinity."""
    import argparse
    import importlib

    module = importlib.import_module(script[:-3])
    checked = 0
    for action in parser_of(module, monkeypatch)._actions:
        assert action.type not in (int, float), f"{script} {action.option_strings[0]}: type={action.type.__name__}"
        if action.type not in (None, str, module.device_name):
            for bad in ("nan", "inf", "-inf", "x"):
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type(bad)
            checked += 1
    assert checked >= 12  # the common block's numeric flags at least


@pytest.mark.parametrize("argv, expected", [
    (["--subset", "0"], "--subset: expected an integer >= 1, got '0'"),
    (["--subset", "-5"], "--subset"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["--epochs", "-1"], "--epochs: expected an integer >= 1"),
    (["--lr", "nan"], "--lr: expected a number > 0, got 'nan'"),
    (["--lr", "-0.1"], "--lr: expected a number > 0"),
    (["--weight-decay", "inf"], "--weight-decay: expected a number >= 0"),
    (["--momentum", "1.5"], "--momentum: expected a number >= 0 and <= 1"),
    (["--eval-every", "0"], "--eval-every: expected an integer >= 1"),
    (["--stop-after", "0"], "--stop-after: expected an integer >= 1"),
    (["--milestones", "100", "1e9x"], "--milestones: expected an integer >= 1"),
    (["--warmup-epochs", "-1"], "--warmup-epochs: expected a number >= 0"),
    (["--gamma", "0"], "--gamma: expected a number > 0"),
    (["--seed", "-1"], "--seed: expected an integer >= 0"),
    (["--device", "nonsense"], "--device: expected auto, cpu, cuda or cuda:N, got 'nonsense'"),
    (["--resume", "run", "--overwrite"], "--overwrite: not allowed with argument --resume"),
    (["--epoch", "3"], "unrecognized arguments: --epoch"),  # no abbreviations: a typo is not taken for --epochs
])
def test_bad_common_flags_give_one_line_naming_the_flag_and_range(argv, expected, capsys):
    import dml
    from conftest import parse_error

    assert expected in parse_error(dml.parse_args, argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path):
    one_line_error(run_script("tna.py", *FAKE, "--device", "cuda", "--out-dir", tmp_path / "run"), "--device", "CUDA")
    assert not (tmp_path / "run").exists()


def test_subset_beyond_the_data_says_what_it_uses_and_a_batch_beyond_the_training_set_is_refused(tmp_path):
    result = run_script("tna.py", *FAKE, "--subset", "5000", "--batch-size", "2048", "--out-dir", tmp_path / "run")
    assert "--subset 5000 is more than the data holds: using 1024 training and 256 test images" in result.stdout
    one_line_error(result, "--batch-size 2048 is larger than the training set (1024 images)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("in_the_way", ["the folder", "a parent"])
def test_an_output_folder_that_cannot_be_created_is_one_line_naming_it(in_the_way, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" if in_the_way == "the folder" else tmp_path / "file" / "run"
    one_line_error(run_script("tna.py", *FAKE, "--out-dir", out), f"cannot create the output folder {out}")
    assert (tmp_path / "file").read_text() == "not a folder"


# ==== checkpoints ====
def break_checkpoint(path, fault):
    """Damage a run's checkpoint.pt as `fault` says."""
    checkpoint = torch.load(path, weights_only=True)
    if fault == "empty":
        path.write_bytes(b"")
    elif fault == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif fault == "not a checkpoint":
        torch.save([1, 2, 3], path)
    elif fault == "other networks":  # its arguments build resnet18s; the weights are a convnet's
        checkpoint["args"]["model"] = "resnet18"
        torch.save(checkpoint, path)
    elif fault == "missing network":
        del checkpoint["networks"]["twin"]
        torch.save(checkpoint, path)


@pytest.mark.parametrize("fault, expected", [
    ("empty", "is not a readable checkpoint"), ("truncated", "is not a readable checkpoint"),
    ("not a checkpoint", "is not a checkpoint written by these scripts"),
    ("other networks", "does not fit the networks its arguments build"),
    ("missing network", "does not fit the networks its arguments build (KeyError: 'twin')"),
])
def test_a_broken_checkpoint_is_one_line_naming_it_and_nothing_changes(fault, expected, run_copy):
    (run_copy / "summary.json").unlink()  # an unfinished run, so the resume would train
    break_checkpoint(run_copy / "checkpoint.pt", fault)
    before = snapshot(run_copy)
    one_line_error(run_script("tna.py", "--resume", run_copy), run_copy / "checkpoint.pt", expected)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("script", ["dml.py", "css.py"])
def test_a_checkpoint_of_another_method_is_one_line_naming_the_right_script(script, run_copy):
    before = snapshot(run_copy)
    result = run_script(script, "--resume", run_copy)
    one_line_error(result, run_copy / "checkpoint.pt", "is a tna run: resume it with tna.py")
    assert snapshot(run_copy) == before
