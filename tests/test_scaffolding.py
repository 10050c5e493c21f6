"""The training scaffolding every method file shares: no host read-back of device values per step
(on CUDA each one stalls the launch queue), and a diverging run stops at once with exit 3 and an
intact checkpoint; fp16 on CPU; torchrun keeps every rank's networks equal."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import (
    METHOD_FLAGS,
    METHOD_SCRIPTS,
    REPO,
    TINY_RUN,
    check_resume_equals_uninterrupted,
    parser_of,
    run_script,
)


class HostReadbacks(TorchDispatchMode):
    """Counts the operations that copy a device value to the host (or need its value to size their
    output): on CUDA each is a synchronisation. `Tensor.tolist` bypasses the dispatcher, so it is
    counted by wrapping it."""
    READBACK_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2",
                    "aten.unique_dim"}

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        original_tolist = torch.Tensor.tolist

        def counted_tolist(tensor):
            self.count += 1
            return original_tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)  # e.g. "aten._local_scalar_dense"
        boolean_index = name == "aten.index" and any(  # x[mask]: the mask's count sizes the output
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1])
        self.count += name in self.READBACK_OPS or boolean_index
        return func(*args, **(kwargs or {}))


def readbacks_of_one_epoch(script, steps, tmp_path, monkeypatch):
    batch = 32
    args = [*TINY_RUN, "--dataset", "fake", "--batch-size", batch, "--subset", steps * batch,
            "--out-dir", tmp_path / f"{steps}_steps", *METHOD_FLAGS.get(script, [])]
    with monkeypatch.context() as patch, HostReadbacks(patch) as counter:
        result = run_script(script, *args)
    assert result.returncode == 0, result.stderr
    return counter.count


@pytest.mark.parametrize("script", METHOD_SCRIPTS)
def test_host_readbacks_do_not_grow_with_the_steps_of_an_epoch(script, tmp_path, monkeypatch):
    """Losses accumulate on the device and are read once per epoch; the divergence check reads one
    value every 50 steps. So an epoch of 2 steps and one of 5 read the device back equally often."""
    short = readbacks_of_one_epoch(script, 2, tmp_path, monkeypatch)
    long = readbacks_of_one_epoch(script, 5, tmp_path, monkeypatch)
    assert short == long, f"{script}: {short} host read-backs in a 2-step epoch, {long} in a 5-step one"
    assert short > 0  # the counter sees the per-epoch reads (it is not blind)


def test_divergence_exits_3_naming_term_epoch_and_step_and_keeps_the_checkpoint(tmp_path):
    """Epoch 1 trains normally (matching off before --late-matching 1); in epoch 2 alpha = 1e38 sends
    the weights to infinity within two steps."""
    out = tmp_path / "run"
    result = run_script("tna.py", *TINY_RUN, "--dataset", "fake", "--subset", "128", "--epochs", "2",
                        "--alpha", "1e38", "--late-matching", "1", "--out-dir", out)
    assert result.returncode == 3, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    bad = re.search(r"non-finite loss \(([a-z_, ]+)\) at epoch (\d+), step (\d+)", message)
    assert bad and "match" in bad[1].split(", ") and bad[2] == "2" and int(bad[3]) <= 2, message
    assert "lower --lr" in message and str(out) in message
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and not (out / "summary.json").exists()
    weights = checkpoint["networks"]["base"].values()
    assert all(torch.isfinite(value).all() for value in weights if value.is_floating_point())


# ==== fp16 with a GradScaler (also on CPU) ====
def test_fp16_scaler_skips_an_overflowing_step_and_halves_its_scale():
    from tna import backward_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    images = torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(images).float().pow(2).mean()
    before = [p.detach().clone() for p in model.parameters()]
    backward_step(loss * float("inf"), scaler, optimizer)  # every gradient overflows: the step is skipped
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(images).float().pow(2).mean()
    backward_step(loss, scaler, optimizer)  # a finite step changes the weights
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow
def test_fp16_on_cpu_trains_and_resumes_exactly(tmp_path):
    fp16 = [*TINY_RUN, "--dataset", "fake", "--subset", "64", "--batch-size", "32", "--amp", "fp16"]
    straight, split = check_resume_equals_uninterrupted("tna.py", fp16, tmp_path)
    checkpoint = torch.load(split / "checkpoint.pt", weights_only=True)
    assert checkpoint["args"]["amp"] == "fp16" and checkpoint["scaler"]["scale"] > 1  # the scaler ran and was saved


# ==== torchrun ====
# A method script's main under torchrun; after each epoch's averaging of the BatchNorm statistics, rank 0
# logs the largest difference between ranks of the parameters (DDP) and the buffers (averaged) of every module.
PROBE = """
import json, os, sys
sys.path.insert(0, os.environ["REPO"])
import torch, torch.distributed as dist
module = __import__(sys.argv[1])
average_buffers = module.average_buffers

def checked(modules):
    if os.environ["AVERAGE"] == "1":
        average_buffers(modules)
    result = {}
    for kind in ("parameters", "buffers"):
        mine = torch.cat([t.detach().float().flatten() for m in modules for t in getattr(m, kind)()])
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        result[kind] = max((e - mine).abs().max().item() for e in every)
    if dist.get_rank() == 0:
        with open(os.environ["PROBE_OUT"], "a") as out:
            out.write(json.dumps(result) + "\\n")

module.average_buffers = checked
module.main(module.parse_args(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("script, average", [("tna", True), ("fdl", True), ("amln", True), ("tna", False)])
def test_under_torchrun_every_rank_holds_the_same_networks_and_extra_modules(script, average, tmp_path):
    """Two CPU processes on different batches: DDP keeps the parameters of every trainable module equal
    (FDL's head and AMLN's discriminators included) and the BatchNorm running statistics, which each rank
    tracks on its own batches, are averaged before evaluating and saving (without it they differ)."""
    (tmp_path / "probe.py").write_text(PROBE)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
               str(tmp_path / "probe.py"), script, "--model", "resnet20", "--dataset", "fake", "--subset", "128",
               "--batch-size", "64", "--epochs", "1", "--amp", "off", "--out-dir", tmp_path / "run",
               *METHOD_FLAGS.get(f"{script}.py", [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REPO": str(REPO), "AVERAGE": str(int(average)),
           "PROBE_OUT": str(tmp_path / "probe.jsonl")}
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    (checks,) = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert checks["parameters"] == 0
    assert (checks["buffers"] == 0) == average, checks


def test_a_global_batch_the_processes_do_not_divide_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    result = run_script("tna.py", *TINY_RUN, "--dataset", "fake", "--batch-size", "63", "--out-dir", tmp_path / "run")
    assert result.returncode == 1 and not (tmp_path / "run").exists()
    expected = "tna.py: error: --batch-size 63 is not divisible by the 2 processes (use a multiple)"
    assert result.stderr.strip() == expected


# ==== what a run reports ====
def independent_scores(logits, labels):
    """Top-1/2/5 and NLL computed with numpy from a ranking of the classes, not with the scripts' code."""
    import numpy as np

    logits, labels = logits.double().numpy(), labels.numpy()
    ranking = np.argsort(-logits, axis=1)
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    scores = {f"top{k}": float((ranking[:, :k] == labels[:, None]).any(1).mean()) for k in (1, 2, 5)}
    return {**scores, "nll": float(-log_probs[np.arange(len(labels)), labels].mean())}


@pytest.mark.parametrize("script", ["tna.py", "fdl.py"])  # fdl: the deployed head is an output but no network
def test_top2_mean_of_networks_and_best_epoch_agree_with_an_independent_computation(script, tmp_path):
    import argparse
    import importlib

    from data import build_data

    out = tmp_path / "run"
    result = run_script(script, *TINY_RUN, "--dataset", "fake", "--subset", "128", "--epochs", "3", "--lr", "0.2",
                        "--out-dir", out, *METHOD_FLAGS.get(script, []))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    args = argparse.Namespace(**checkpoint["args"])
    module = importlib.import_module(script[:-3])
    networks = module.build_networks(args, checkpoint["num_classes"], checkpoint["image_size"])
    test = build_data(args.dataset, args.data_dir, args.batch_size, "cpu", subset=args.subset).test
    with torch.no_grad():
        for name, net in networks.items():
            net.load_state_dict(checkpoint["networks"][name])
            logits = torch.cat([net.eval()(images) for images, _ in test])
            expected = independent_scores(logits, torch.cat([labels for _, labels in test]))
            assert summary["networks"][name] == pytest.approx(expected, abs=1e-6), name
    assert summary["format_version"] == 2 and summary["deployed"] == summary["networks"][module.DEPLOYED]
    assert summary["networks_mean"] == pytest.approx(
        {key: sum(summary["networks"][name][key] for name in networks) / len(networks) for key in expected})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"top1", "top2", "top5", "nll"} == set(r["test"]["ensemble"]) and "networks_mean" in r for r in records)
    assert summary["best"]["selected_on"] == "test"
    for name, best in summary["best"]["outputs"].items():
        curve = [r["test"][name]["top1"] for r in records]
        assert best == {"top1": max(curve), "epoch": curve.index(max(curve)) + 1}, name
    assert records[-1]["best"] == summary["best"]


def test_optimizer_adam_is_plain_adam_with_l2_weight_decay(tmp_path):
    import tna

    args = tna.parse_args(["--optimizer", "adam", "--lr", "1e-3", "--weight-decay", "0.05"])
    optimizer = tna.make_optimizer(torch.nn.Linear(2, 2).parameters(), args)
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["weight_decay"] == 0.05
    assert not optimizer.defaults.get("decoupled_weight_decay", False)
    out = tmp_path / "run"
    result = run_script("tna.py", *TINY_RUN, "--dataset", "fake", "--subset", "128", "--optimizer", "adam",
                        "--lr", "1e-3", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)["optimizers"]["main"]["state"]
    assert all("exp_avg_sq" in s for s in state.values())


def test_holdout_keeps_its_images_out_of_training_and_names_them(tmp_path):
    import inspect

    from data import build_data

    if "holdout" not in inspect.signature(build_data).parameters:
        pytest.skip("data.py has no build_data(holdout=N) yet")
    out = tmp_path / "run"
    result = run_script("tna.py", *TINY_RUN, "--dataset", "fake", "--subset", "160", "--holdout", "32",
                        "--out-dir", out)
    assert result.returncode == 0, result.stderr
    indices = json.loads((out / "holdout.json").read_text())["indices"]
    data = build_data("fake", batch_size=64, subset=160, seed=0, holdout=32)
    assert indices == data.holdout_indices and len(set(indices)) == 32
    assert "2 steps/epoch" in result.stdout  # 128 training images left: two batches of 64


def test_a_method_adds_its_own_metrics_to_each_evaluation_css_branch_diversity(tmp_path):
    """css.py logs, through the scaffolding's hook, how far apart its branches' softmax outputs are (Fig. 3);
    recomputed here from the saved networks. Other methods log nothing through it."""
    import argparse
    import itertools

    import css
    from data import build_data

    out = tmp_path / "run"
    result = run_script("css.py", *TINY_RUN, "--dataset", "fake", "--subset", "128", "--epochs", "2",
                        "--warmup-epochs", "0", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    args = argparse.Namespace(**checkpoint["args"])
    networks = css.build_networks(args, checkpoint["num_classes"], checkpoint["image_size"])
    test = build_data(args.dataset, args.data_dir, args.batch_size, "cpu", subset=args.subset).test
    votes = {}
    with torch.no_grad():
        for name, net in networks.items():
            net.load_state_dict(checkpoint["networks"][name])
            branches = [net.eval()(images, return_branches=True) for images, _ in test]
            votes[name] = [torch.cat([net.branch_prediction(b[j], j) for b in branches]).float().softmax(1)
                           for j in range(args.branches)]

    def disagreement(pairs):  # mean Euclidean distance between the softmax outputs, over images and pairs
        return sum((a - b).norm(dim=1).mean().item() for a, b in pairs) / len(pairs)

    expected = {f"diversity_{name}": disagreement(list(itertools.combinations(v, 2))) for name, v in votes.items()}
    expected["diversity_between"] = disagreement(list(itertools.product(votes["net1"], votes["net2"])))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method_metrics"] == pytest.approx(expected, abs=1e-9)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [set(r["method_metrics"]) for r in records] == [set(expected)] * 2
    tna_run = tmp_path / "tna"
    assert run_script("tna.py", *TINY_RUN, "--dataset", "fake", "--subset", "64", "--out-dir", tna_run).returncode == 0
    assert "method_metrics" not in json.loads((tna_run / "summary.json").read_text())


@pytest.mark.parametrize("script", METHOD_SCRIPTS)
def test_help_shows_the_defaults_in_effect(script, monkeypatch):
    """A method's parser.set_defaults (its paper's protocol) changes what --help prints, not only the values."""
    import importlib

    module = importlib.import_module(script[:-3])
    parsed = vars(module.parse_args([]))
    parser = parser_of(module, monkeypatch)
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.dest in parsed and action.default is not None:  # None: resolved after parsing (fdl's lrs)
            assert action.default == parsed[action.dest], action.dest
            if action.help and action.option_strings[0] in ("--epochs", "--batch-size", "--lr", "--weight-decay"):
                assert f"(default: {parsed[action.dest]})" in text.split(action.option_strings[0], 2)[-1][:300]


def test_help_of_css_prints_its_papers_protocol(capsys):
    import css

    with pytest.raises(SystemExit):
        css.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS training epochs (default: 300)" in text and "(default: [149, 224])" in text


@pytest.mark.parametrize("script, flags, expected", [
    ("tna.py", [], "tna__resnet18__cifar100__0__"),
    ("tna.py", ["--twin-model", "resnet50", "--dataset", "data/small.npz"], "tna__resnet18-resnet50__small__0__"),
    ("dml.py", ["--models", "mobilenet,resnet32,mobilenet", "--seed", "3"], "dml__mobilenet-resnet32__cifar100__3__"),
    ("css.py", ["--model", "resnet110_bottleneck", "--net2-model", "resnet56_bottleneck"],
     "css__resnet110_bottleneck-resnet56_bottleneck__cifar100__0__"),
    ("amln.py", ["--models", "resnet32,wrn_16_2"], "amln__resnet32-wrn_16_2__"),
])
def test_the_default_run_folder_names_every_architecture_trained(script, flags, expected):
    import importlib

    module = importlib.import_module(script[:-3])
    out_dir = module.default_out_dir(module.parse_args(flags))
    assert out_dir.parent.name == "runs" and out_dir.name.startswith(expected), out_dir


# The scaffolding's regions of a method file, each from its first line up to (not including) the second marker.
SCAFFOLDING = [("import argparse", "METHOD = "),
               ("# ==== arguments", "    common.add_argument(\"--stop-after\""),
               ("# ==== scaffolding helpers", "    # ==== the method's networks"),
               ("    # ==== device placement", "    # ==== the method's training step"),
               ("    # ==== training loop", None)]


def scaffolding_of(script):
    lines = (REPO / script).read_text().splitlines()
    regions = []
    for start, end in SCAFFOLDING:
        first = next(i for i, line in enumerate(lines) if line.startswith(start))
        last = len(lines) if end is None else next(i for i in range(first, len(lines)) if lines[i].startswith(end))
        regions.append(lines[first:last])
    return regions


@pytest.mark.parametrize("script", METHOD_SCRIPTS[1:])
def test_the_scaffolding_is_the_same_text_in_every_method_file(script):
    """So that `diff tna.py X.py` shows only the method."""
    for (start, _), ours, theirs in zip(SCAFFOLDING, scaffolding_of("tna.py"), scaffolding_of(script)):
        assert ours == theirs, f"{script}: the region from {start.strip()!r} differs from tna.py's"
