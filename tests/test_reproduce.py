"""The reproduction harness (benchmarks/reproduce.py): every registry row's command parses, a sample
trains a step, `run` survives being killed and never redoes a finished run, `report` computes what it says."""
import contextlib
import csv
import importlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CIFAR10_SAMPLE, REPO, parse_error, require_cifar10_sample, run_script

sys.path.insert(0, str(REPO / "benchmarks"))
import reproduce

# The script's outputs in summary.json (see each script's predict)
OUTPUTS = {"tna.py": {"base", "twin"}, "dml.py": {"student1", "student2"}, "sila.py": {"net1", "net2"},
           "fdl.py": {"head", "base1", "base2"}, "amln.py": {"peer1", "peer2"}, "css.py": {"net1", "net2"}}



def distinct_commands():
    """One row per distinct (script, arguments): rows that share a command share its runs."""
    seen = {}
    for row in reproduce.REGISTRY:
        seen.setdefault((row.script, row.args), row)
    return list(seen.values())


def filled_argv(row, run_folder="/tmp/run"):
    fill = {"{data}": str(CIFAR10_SAMPLE)}  # the CPU tier's dataset argument: any .npz
    return [fill.get(token, run_folder if token.startswith("{run:") else token) for token in row.argv]


def reproduce_cli(*argv, **kwargs):
    return subprocess.run([sys.executable, REPO / "benchmarks" / "reproduce.py", *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, check=False, **kwargs)


def report_csv(*argv):
    result = reproduce_cli("report", *argv, "--format", "csv")
    assert result.returncode == 0, result.stderr
    return {line["row"]: line for line in csv.DictReader(io.StringIO(result.stdout))}


def summary_of(folder):
    return json.loads((folder / "summary.json").read_text())


# ---- the registry ----
def test_registry_rows_are_complete():
    for row in reproduce.REGISTRY:
        assert row.script in reproduce.SCRIPTS and row.epochs and row.source, row.id
        assert all(dependency in reproduce.ROWS for dependency in row.needs), row.id
        for reads in [row.reads, *(reads for reads, _ in row.also)]:
            output, metric = reads.rsplit(".", 1)
            assert metric in ("top1", "top2", "top5", "nll", "best"), row.id
            assert set(output.split("+")) <= OUTPUTS[row.script] | {"deployed", "ensemble", "mean"}, row.id
    named = ["tna-t1-resnet18-cifar100", "tna-t2-mobilenetv2-cifar100-lr0.05-dml", "tna-t4-resnet18_w4-cifar100",
             "tna-t7-resnet18-cifar10-alpha1e-3", "tna-f4-frozen-twin", "tna-s42-reinit-layer0",
             "tna-f5-late-matching-50", "sila-t1-resnet18-sila-dml-net2", "sila-t2-resnet34-ind",
             "sila-t3-wrn_16_10-cifar100-sila-net1", "sila-msdnet-budgeted-cifar100", "sila-msdnet-anytime-cifar100",
             "fdl-vgg16-cifar100-x2", "fdl-vgg16-cifar10-x2", "fdl-vgg16-cifar100-x3", "fdl-vgg16-cifar100-x4",
             "amln-t2-resnet32-cifar100", "amln-t3-wrn_16_2-resnet32-cifar10-amln-net2", "amln-t6-e-cifar100",
             "css-t1-resnet110", "css-t4-resnet110-pyramidnet-ensemble", "css-t5-d"]
    assert [row_id for row_id in named if row_id not in reproduce.ROWS] == []
    assert {row.script for row in reproduce.REGISTRY if row.id.startswith("cpu-")} == set(reproduce.SCRIPTS)


def test_rows_with_equal_commands_share_runs_and_others_do_not(tmp_path):
    folders = {}
    for row in reproduce.REGISTRY:
        folders.setdefault(reproduce.run_folder(tmp_path, row, 0), set()).add((row.script, row.args))
    assert all(len(commands) == 1 for commands in folders.values())
    # Table 6's case A is Table 2's vanilla pair: one run serves both
    a, vanilla = reproduce.ROWS["amln-t6-a-cifar100"], reproduce.ROWS["amln-t2-resnet32-cifar100-vanilla"]
    assert reproduce.run_folder(tmp_path, a, 1) == reproduce.run_folder(tmp_path, vanilla, 1)


def check_names(args):
    """What argparse cannot check: the backbones, the augmentation and the dataset exist."""
    from data import AUGMENTATIONS, DATASETS
    from models import MODEL_NAMES

    names = [args.model, *(getattr(args, name, None) for name in ("twin_model", "net2_model")),
             *(getattr(args, "models", None) or [])]
    assert [name for name in names if name and name not in MODEL_NAMES] == []
    assert args.augment in AUGMENTATIONS
    assert args.dataset in DATASETS or args.dataset.endswith(".npz")


@pytest.mark.parametrize("row", [pytest.param(row, id=row.id) for row in distinct_commands()])
def test_every_command_parses(row, capsys):
    module = importlib.import_module(row.script[:-3])
    try:
        args = module.parse_args(filled_argv(row))
    except SystemExit:
        pytest.fail(f"{row.script} {row.args}: {capsys.readouterr().err.strip()}")
    check_names(args)
    assert args.epochs == row.epochs


# A sample of rows, one step each on 32 images of the small CIFAR-10 set (the CPU tier's rows on their own set)
SAMPLE = ["tna-t1-convnet-cifar100", "sila-t1-mobilenet-resnet18-sila-dml-net1", "sila-msdnet-anytime-cifar100",
          "fdl-vgg16-cifar10-x2", "amln-t3-wrn_16_2-resnet32-cifar100-amln-net1", "amln-t6-c-cifar10", "css-t5-a",
          "amln-t2-resnet32-cifar10-dml", *[row.id for row in reproduce.REGISTRY if row.id.startswith("cpu-")]]


@pytest.mark.parametrize("row_id", SAMPLE)
def test_sample_rows_train_one_step(row_id, tmp_path):
    row = reproduce.ROWS[row_id]
    tiny = ["--subset", "32", "--batch-size", "32", "--epochs", "1", "--amp", "off", "--out-dir", tmp_path / "run"]
    tiny += ["--pretrain-epochs", "0"] if row.script == "fdl.py" else []
    tiny += [] if row_id.startswith("cpu-") else ["--dataset", require_cifar10_sample()]
    result = run_script(row.script, *filled_argv(row), *tiny)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = summary_of(tmp_path / "run")
    for reads in [row.reads, *(reads for reads, _ in row.also)]:  # the row reads outputs the script writes
        assert set(reads.rsplit(".", 1)[0].split("+")) <= {*summary["networks"], "deployed", "ensemble", "mean"}
        assert reproduce.read_value(summary, reads) >= 0


# ---- reading summaries ----
SUMMARY = {"format_version": 2, "deployed_network": "head", "deployed": {"top1": 0.5, "top5": 0.9, "nll": 2.0},
           "networks": {"head": {"top1": 0.5, "top2": 0.6, "top5": 0.9, "nll": 2.0},
                        "net1": {"top1": 0.25, "top2": 0.3, "top5": 0.5, "nll": 3.0},
                        "net2": {"top1": 0.35, "top2": 0.4, "top5": 0.6, "nll": 2.5}},
           "ensemble": {"top1": 0.45, "top2": 0.5, "top5": 0.8, "nll": 2.2},
           "networks_mean": {"top1": 0.3, "top2": 0.35, "top5": 0.55, "nll": 2.75},
           "best": {"selected_on": "test", "outputs": {"head": {"top1": 0.55, "epoch": 7},
                                                       "net1": {"top1": 0.3, "epoch": 3},
                                                       "net2": {"top1": 0.4, "epoch": 9}}}}


@pytest.mark.parametrize("reads,expected", [("net1.top1", 25.0), ("net2.top2", 40.0), ("deployed.top5", 90.0),
                                            ("ensemble.nll", 2.2), ("mean.top1", 30.0), ("net1+net2.top1", 30.0),
                                            ("net1+net2.nll", 2.75), ("head.best", 55.0), ("deployed.best", 55.0),
                                            ("net1+net2.best", 35.0)])
def test_read_value(reads, expected):
    assert reproduce.read_value(SUMMARY, reads) == pytest.approx(expected)


def fake_run(folder, summary=None, epochs_done=None, epochs=10):
    """A run folder as a script leaves it: finished (summary.json) or interrupted (checkpoint.pt, metrics.jsonl)."""
    folder.mkdir(parents=True)
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if epochs_done:
        (folder / "checkpoint.pt").write_bytes(b"")
        records = [json.dumps({"epoch": epoch, "epochs": epochs}) + "\n" for epoch in range(1, epochs_done + 1)]
        (folder / "metrics.jsonl").write_text("".join(records))


def test_report_on_fake_runs(tmp_path):
    row, base = reproduce.ROWS["css-t1-resnet110"], reproduce.ROWS["css-t1-resnet110-baseline"]
    ours, theirs = [[0.80, 0.70], [0.81, 0.72], [0.79, 0.69]], [0.76, 0.75, 0.77]
    for seed, ((net1, net2), single) in enumerate(zip(ours, theirs)):
        summary = json.loads(json.dumps(SUMMARY))
        summary["best"]["outputs"]["net1"]["top1"], summary["best"]["outputs"]["net2"]["top1"] = net1, net2  # CSS: best
        fake_run(reproduce.run_folder(tmp_path, row, seed), summary)
        single_summary = {**SUMMARY, "best": {"outputs": {"net1": {"top1": single}}}}
        fake_run(reproduce.run_folder(tmp_path, base, seed), single_summary)
    fake_run(reproduce.run_folder(tmp_path, reproduce.ROWS["css-t1-resnet56"], 0), epochs_done=4, epochs=300)
    lines = report_csv("css-t1-resnet110", "css-t1-resnet56", "--out-dir", tmp_path)
    values = 100 * np.array(ours).mean(1)  # the row reads the mean of the two networks' best epochs
    mean, std = values.mean(), values.std(ddof=1)
    line = lines["css-t1-resnet110"]
    assert float(line["ours"]) == pytest.approx(mean) and float(line["ours_std"]) == pytest.approx(std)
    assert line["n"] == "3" and line["unfinished"] == ""
    assert float(line["baseline_ours"]) == pytest.approx(100 * np.mean(theirs))
    assert float(line["our_gain"]) == pytest.approx(mean - 100 * np.mean(theirs))
    assert float(line["paper_gain"]) == pytest.approx(80.71 - 76.21)
    assert line["within_2std"] == str(abs(80.71 - mean) <= 2 * std)
    # an interrupted seed is named, never averaged; nothing is invented for the missing ones
    resnet56 = lines["css-t1-resnet56"]
    assert resnet56["n"] == "0" and resnet56["ours"] == "" and "seed 0 at epoch 4/300" in resnet56["unfinished"]
    assert "2 not started" in resnet56["unfinished"]
    # a summary without the number the row reads (an older format) is named, not averaged
    fake_run(reproduce.run_folder(tmp_path, reproduce.ROWS["css-t1-resnet56-dml"], 0), {"networks": {}})
    assert "seed 0 unreadable (student1+student2.best" in report_csv("css-t1-resnet56-dml", "--out-dir", tmp_path)[
        "css-t1-resnet56-dml"]["unfinished"]
    markdown = reproduce_cli("report", "css-t1-*", "--out-dir", tmp_path).stdout
    assert "| css-t1-se_resnet110 | net1+net2.best | 80.42 ± 0.13 | not yet run |" in markdown
    assert f"{mean:.2f} ± {std:.2f} (n=3)" in markdown


# ---- run ----
def test_missing_data_is_one_line(tmp_path):
    result = reproduce_cli("run", "cpu-tna", "--out-dir", tmp_path, "--data", tmp_path / "absent.npz")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--data PATH" in result.stderr and "absent.npz does not exist" in result.stderr


def test_unknown_row_is_one_line():
    result = reproduce_cli("run", "tna-t9-*")
    assert result.returncode == 2
    assert result.stderr.strip() == "reproduce.py: error: no row matches tna-t9-* (see `reproduce.py list`)"


def test_dry_run_skips_finished_and_resumes_interrupted(tmp_path):
    row, single = reproduce.ROWS["tna-f4-frozen-twin"], reproduce.ROWS["tna-t1-resnet18-tinyimagenet-single"]
    fake_run(reproduce.run_folder(tmp_path, single, 0), SUMMARY)  # finished: not printed
    fake_run(reproduce.run_folder(tmp_path, row, 1), epochs_done=3)  # interrupted: resumed
    result = reproduce_cli("run", row.id, "--seeds", "0", "1", "--dry-run", "--out-dir", tmp_path, "--launcher",
                           "torchrun --nproc_per_node=8", "--", "--data-dir", "/data")
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0 and "6 runs: 1 finished, 5 to run" in result.stderr
    assert all(line[:2] == ["torchrun", "--nproc_per_node=8"] for line in lines)
    assert all(line[-2:] == ["--data-dir", "/data"] for line in lines)
    folders = [line[line.index("--out-dir" if "--out-dir" in line else "--resume") + 1] for line in lines]
    assert str(reproduce.run_folder(tmp_path, single, 0)) not in folders
    assert ["--resume", str(reproduce.run_folder(tmp_path, row, 1))] == lines[-1][3:5]
    # the frozen twin starts from the single network of the same seed, printed before it
    frozen = lines[folders.index(str(reproduce.run_folder(tmp_path, row, 0)))]
    assert frozen[frozen.index("--twin-checkpoint") + 1] == str(reproduce.run_folder(tmp_path, single, 0))


def summary_stamps(out_dir):
    return {path.parent: (path.stat().st_mtime_ns, path.read_bytes()) for path in out_dir.glob("*/seed*/summary.json")}


def unfinished(out_dir):
    return [path.parent for path in out_dir.glob("*/seed*/checkpoint.pt")
            if not (path.parent / "summary.json").exists()]


def test_run_killed_and_restarted_completes_without_redoing(tmp_path):
    sample, data = np.load(require_cifar10_sample()), tmp_path / "small.npz"  # the rows' recipe on 256 images
    np.savez(data, **{key: sample[key][:256] for key in ("x_train", "y_train", "x_test", "y_test")})
    out_dir = tmp_path / "runs"
    argv = ["run", "cpu-tna", "--seeds", "0", "1", "--out-dir", out_dir, "--data", data, "--", "--eval-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, REPO / "benchmarks" / "reproduce.py", *map(str, argv)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:  # wait for one finished run and one mid-way
        if summary_stamps(out_dir) and unfinished(out_dir):
            break
        time.sleep(0.02)
    assert first.poll() is None, "the runs ended before they could be interrupted"
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM, stderr
    before, interrupted = summary_stamps(out_dir), unfinished(out_dir)
    assert before and interrupted

    separator = argv.index("--")
    second = reproduce_cli(*argv[:separator], "--jobs", "2", *argv[separator:], env=env, timeout=600)  # 2 at a time
    assert second.returncode == 0, second.stderr
    rows = [reproduce.ROWS["cpu-tna"], reproduce.ROWS["cpu-tna-baseline"]]
    assert all((reproduce.run_folder(out_dir, row, seed) / "summary.json").is_file() for row in rows for seed in (0, 1))
    after = summary_stamps(out_dir)
    assert all(after[folder] == stamp for folder, stamp in before.items())  # finished runs untouched
    for folder in interrupted:  # continued from its checkpoint, each epoch logged
        assert f"--resume {folder}" in second.stderr
        epochs = [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert set(epochs) == {1, 2, 3, 4} and epochs[-1] == 4
    third = reproduce_cli(*argv, env=env)
    assert third.returncode == 0 and "4 runs: 4 finished, 0 to run" in third.stderr and after == summary_stamps(out_dir)

    # the report: mean ± sample std over the seeds of what each row reads, computed here from the summaries
    lines = report_csv("cpu-tna", "--seeds", "0", "1", "--out-dir", out_dir)
    method, baseline = ([100 * summary_of(reproduce.run_folder(out_dir, row, s))["networks"]["base"]["top1"]
                         for s in (0, 1)] for row in rows)
    line = lines["cpu-tna"]
    assert line["n"] == "2" and float(line["ours"]) == pytest.approx(np.mean(method))
    assert float(line["ours_std"]) == pytest.approx(np.std(method, ddof=1))
    assert float(line["baseline_ours"]) == pytest.approx(np.mean(baseline))
    assert float(line["our_gain"]) == pytest.approx(np.mean(method) - np.mean(baseline))


# ---- each script's docstring headline command is a registry row ----
def headline(script):
    """The first `python <script> ...` command of a script's docstring (continuation lines joined)."""
    doc = importlib.import_module(script[:-3]).__doc__.replace("\\\n", " ")
    line = next(line for line in doc.splitlines() if line.strip().startswith(f"python {script}"))
    return shlex.split(line.split("#")[0])[2:]


NOT_THE_EXPERIMENT = reproduce.NOT_THE_RECIPE - {"dataset", "twin_checkpoint"}  # here the data must match too


def namespace(module, argv):
    """The parsed arguments that define an experiment (None when they do not parse on this branch)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return {k: v for k, v in vars(module.parse_args(argv)).items() if k not in NOT_THE_EXPERIMENT}
    except SystemExit:
        return None


@pytest.mark.parametrize("script", reproduce.SCRIPTS)
def test_docstring_headline_is_in_the_registry(script):
    module = importlib.import_module(script[:-3])
    wanted = namespace(module, headline(script))
    assert wanted is not None, f"{script}'s headline command does not parse"
    rows = [row for row in reproduce.REGISTRY if row.script == script and "{" not in row.args]
    matches = [row.id for row in rows if namespace(module, row.argv) == wanted]
    assert matches, f"{script}'s headline command `{shlex.join(headline(script))}` is not a registry row"


# ---- the command line ----
def test_list_shows_paper_values_and_epochs():
    result = reproduce_cli("list", "tna-t1-resnet18-cifar100*")
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and "2 rows; 2 distinct commands" in lines[-1]
    assert any(line.startswith("tna-t1-resnet18-cifar100 ") and " 200 " in line and "79.00 ± 0.35" in line
               for line in lines)


def test_arguments_after_the_separator_are_for_run_only(capsys):
    assert "for `run`" in parse_error(reproduce.parse_args, ["report", "--", "--epochs", "1"], capsys)
    assert "set per run" in parse_error(reproduce.parse_args, ["run", "cpu-tna", "--", "--out-dir", "x"], capsys)
    assert reproduce.parse_args(["run", "cpu-tna", "--jobs", "2", "--", "--amp", "bf16"]).extra == ["--amp", "bf16"]
    # a flag that changes the recipe would put another experiment in the row's folders
    for recipe_flag in (["--augment", "standard"], ["--lr=0.05"], ["--channels-last", "--epochs", "3"]):
        error = parse_error(reproduce.parse_args, ["run", "cpu-tna", "--", *recipe_flag], capsys)
        assert "would change what the row's runs measure" in error and "--eval-every" in error


def test_a_run_made_with_another_recipe_is_named_not_averaged(tmp_path):
    """A finished run whose saved arguments differ from what its row's command gives now (a default changed
    since) is not the row's: report names it and leaves it out; how a run executed (amp, seed, folder) may differ."""
    row = reproduce.ROWS["cpu-tna"]
    args = reproduce.parsed_command(row)
    summary = {**SUMMARY, "networks": {"base": SUMMARY["networks"]["net1"]}}
    executed_otherwise = {"seed": 2, "out_dir": "elsewhere", "amp": "bf16", "eval_every": 5, "dataset": "cifar10"}
    for seed, ran_with in enumerate([args, {**args, "augment": "standard"}, {**args, **executed_otherwise}]):
        fake_run(reproduce.run_folder(tmp_path, row, seed), {**summary, "args": ran_with})
    line = report_csv(row.id, "--seeds", "0", "1", "2", "--out-dir", tmp_path)[row.id]
    assert line["n"] == "2" and float(line["ours"]) == 25.0
    assert line["unfinished"].startswith("seed 1 made with augment='standard', now 'meanpad': not averaged")


def test_another_copy_of_a_dataset_gets_runs_of_its_own(tmp_path):
    row = reproduce.ROWS["tna-t1-convnet-cifar10"]
    runs = lambda *argv: reproduce_cli("run", row.id, "--seeds", "0", "--dry-run", "--out-dir", tmp_path, *argv)
    plain, jpeg = runs(), runs("--dataset", f"cifar10=folder:{tmp_path}/a/cifar10_jpeg")
    moved = runs("--dataset", f"cifar10=folder:{tmp_path}/b/cifar10_jpeg")
    commands = [[shlex.split(line) for line in result.stdout.splitlines()] for result in (plain, jpeg, moved)]
    assert all(result.returncode == 0 for result in (plain, jpeg, moved))
    folders = [{line[line.index("--out-dir") + 1] for line in lines} for lines in commands]
    assert all(line[line.index("--dataset") + 1] == "cifar10" for line in commands[0])
    # the row and its baseline both train on the copy, in folders of their own, found again wherever it lives
    assert all(line[line.index("--dataset") + 1] == f"folder:{tmp_path}/a/cifar10_jpeg" for line in commands[1])
    assert len(commands[1]) == 2 and not folders[0] & folders[1] and folders[1] == folders[2]
    base_only = {**SUMMARY, "networks": {"base": SUMMARY["networks"]["net1"]}}
    fake_run(Path(sorted(folders[1])[0]), base_only)  # report finds the copy's runs only when told of it
    for argv, finished in (([], 0), (["--dataset", f"cifar10=folder:{tmp_path}/b/cifar10_jpeg"], 1)):
        lines = report_csv(f"{row.id}*", "--seeds", "0", "--out-dir", tmp_path, *argv)
        assert sum(int(line["n"]) for line in lines.values()) == finished


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "cifar1=folder:x"], "NAME one of the registry's datasets"),
    (["--dataset", "cifar10"], "--dataset takes NAME=SPEC"),
    (["--dataset", "cifar100=folder:x"], "no selected row trains on the dataset of --dataset cifar100=folder:x"),
    (["--", "--dataset", "folder:x"], "give it before --, as --dataset NAME=SPEC")])
def test_bad_dataset_override_is_one_line(argv, message):
    result = reproduce_cli("run", "tna-t1-convnet-cifar10", "--dry-run", *argv)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
