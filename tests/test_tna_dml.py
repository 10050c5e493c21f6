"""TNA (Vandersmissen et al., ICLR 2025) and DML (Zhang et al., CVPR 2018): the losses against
hand-computed values, where their gradients go, DML's Algorithm 1 step, the twin's re-initialisation,
the paper defaults, and the scripts end to end (outputs, resume, torchrun, learning, bad input)."""
import contextlib
import copy
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import TINY_RUN, check_resume_equals_uninterrupted, parse_error, read_summary, run_script
from dml import dml_loss, mutual_learning_step
from dml import parse_args as dml_parse_args
from models import build_model
from tna import build_networks, tna_loss
from tna import parse_args as tna_parse_args


# ---- losses ----
def test_tna_loss_matches_hand_computation():
    logits_a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    logits_b = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    targets = torch.tensor([1, 0])
    total, ce_a, ce_b, match = tna_loss(logits_a, logits_b, targets, alpha=0.5)
    expected_ce_a = (-math.log(math.exp(2) / (math.exp(1) + math.exp(2))) + math.log(2)) / 2
    assert ce_a.item() == pytest.approx(expected_ce_a)
    assert ce_b.item() == pytest.approx(math.log(2))
    # squared error summed over classes ((1+4) and (1+1)), averaged over the batch of 2
    assert match.item() == pytest.approx(3.5)
    assert total.item() == pytest.approx(expected_ce_a + math.log(2) + 0.5 * 3.5)
    _, _, _, match_mean = tna_loss(logits_a, logits_b, targets, alpha=0.5, reduction="mean")
    assert match_mean.item() == pytest.approx(7 / 4)  # nn.MSELoss's reading


def test_tna_matching_term_reaches_both_networks():
    torch.manual_seed(0)
    base, twin = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    _, _, _, match = tna_loss(base(x), twin(x), y, alpha=1.0)
    match.backward()
    assert base.weight.grad.abs().sum() > 0 and twin.weight.grad.abs().sum() > 0
    # the two gradients w.r.t. the logits are equal and opposite: nothing is detached
    logits_a, logits_b = base(x).detach().requires_grad_(), twin(x).detach().requires_grad_()
    tna_loss(logits_a, logits_b, y, alpha=1.0)[3].backward()
    assert torch.allclose(logits_a.grad, -logits_b.grad)


def test_tna_alpha_zero_is_independent_training():
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    total, ce_a, ce_b, _ = tna_loss(x, x + 1.0, y, alpha=0.0)
    assert total.item() == pytest.approx((ce_a + ce_b).item())


def test_dml_loss_matches_hand_computation():
    logits = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    targets = torch.tensor([0])
    losses, ces, kls = dml_loss(logits, targets)
    p = [F.softmax(output, 1)[0] for output in logits]
    kl_1 = sum(p[1][c] * math.log(p[1][c] / p[0][c]) for c in range(2))  # KL(p_2 || p_1), summed over classes
    kl_2 = sum(p[0][c] * math.log(p[0][c] / p[1][c]) for c in range(2))
    assert kls[0].item() == pytest.approx(float(kl_1), rel=1e-5)
    assert kls[1].item() == pytest.approx(float(kl_2), rel=1e-5)
    assert ces[0].item() == pytest.approx(-math.log(float(p[0][0])), rel=1e-5)
    assert losses[1].item() == pytest.approx(ces[1].item() + kls[1].item(), rel=1e-6)


def test_dml_kl_is_batchmean_and_scaled_by_temperature_squared():
    torch.manual_seed(0)
    logits = [torch.randn(5, 7), torch.randn(5, 7)]
    targets = torch.randint(0, 7, (5,))
    _, _, kls = dml_loss(logits, targets, temperature=3.0)
    p_peer, log_p_self = F.softmax(logits[1] / 3, 1), F.log_softmax(logits[0] / 3, 1)
    expected = (p_peer * (p_peer.log() - log_p_self)).sum(1).mean() * 9
    assert kls[0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_dml_kl_term_of_student_k_reaches_only_student_k():
    torch.manual_seed(0)
    students = [nn.Linear(4, 3) for _ in range(3)]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    losses, _, kls = dml_loss([s(x) for s in students], y)
    kls[1].backward()
    assert students[1].weight.grad.abs().sum() > 0
    assert students[0].weight.grad is None and students[2].weight.grad is None
    assert len(losses) == 3


def test_dml_no_detach_lets_the_kl_reach_the_peer():
    """--no-detach (the TNA authors' DML): KL(p_2 || p_1) also moves student 2."""
    torch.manual_seed(0)
    students = [nn.Linear(4, 3) for _ in range(2)]
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    _, _, kls = dml_loss([s(x) for s in students], y, detach=False)
    kls[0].backward()
    assert students[0].weight.grad.abs().sum() > 0 and students[1].weight.grad.abs().sum() > 0


# ---- DML's training step (Algorithm 1 of Zhang et al. 2018) ----
def _cohort(k=2, seed=0):
    """K small students with BatchNorm, their SGD optimizers (no momentum: one step is checkable by hand)."""
    torch.manual_seed(seed)
    students = {f"student{i + 1}": nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
                for i in range(k)}
    return students, {name: torch.optim.SGD(net.parameters(), lr=0.5) for name, net in students.items()}


def _dml_step(students, optimizers, x, y, **flags):
    args = SimpleNamespace(**{"sequential": False, "no_detach": False, "temperature": 1.0, "kl_weight": 1.0, **flags})
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return mutual_learning_step(students, optimizers, x, y, args, contextlib.nullcontext, scaler)


def _sgd_step(net, loss_of_logits, x, lr=0.5):
    """net after one plain SGD step on loss_of_logits(net(x)) (train mode)."""
    net = copy.deepcopy(net)
    loss_of_logits(net(x)).backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= lr * p.grad
    return net


def test_sequential_step_is_algorithm_1_and_next_student_sees_the_updated_prediction():
    students, optimizers = _cohort(3)
    initial = copy.deepcopy(students)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    _dml_step(students, optimizers, x, y, sequential=True)

    def loss_against(peer_logits):
        return lambda logits: dml_loss([logits, *peer_logits], y)[0][0]

    # by hand: each student steps on CE + KL to its peers' latest train-mode predictions on this batch
    latest = {name: copy.deepcopy(net)(x).detach() for name, net in initial.items()}  # before any update
    expected, names = {}, list(initial)
    for name in names:
        expected[name] = _sgd_step(initial[name], loss_against([latest[n] for n in names if n != name]), x)
        latest[name] = copy.deepcopy(expected[name])(x).detach()  # its post-update prediction (batch statistics)
    for name in names:
        for got, want in zip(students[name].parameters(), expected[name].parameters()):
            torch.testing.assert_close(got, want)
    # the test tells the two readings apart: student 2 stepping on student 1's pre-update prediction differs
    stale_peers = [copy.deepcopy(initial[name])(x).detach() for name in ("student1", "student3")]
    stale = _sgd_step(initial["student2"], loss_against(stale_peers), x)
    assert not torch.allclose(stale[0].weight, students["student2"][0].weight)


@pytest.mark.parametrize("sequential", [False, True])
def test_every_batchnorm_sees_each_batch_once(sequential):
    students, optimizers = _cohort(3)
    initial = copy.deepcopy(students)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(2):
        _dml_step(students, optimizers, x, y, sequential=sequential)
    for name, net in students.items():
        assert net[1].num_batches_tracked.item() == 2
    # after the first step the running statistics are those of one forward of the initial weights
    students, optimizers = _cohort(3)
    _dml_step(students, optimizers, x, y, sequential=sequential)
    for name, net in students.items():
        reference = copy.deepcopy(initial[name])
        reference(x)
        torch.testing.assert_close(net[1].running_mean, reference[1].running_mean)
        torch.testing.assert_close(net[1].running_var, reference[1].running_var)


def test_no_detach_step_is_the_tna_authors_dml():
    """kd_lth's train_mutual: CE_1 + CE_2 + KL(p_2||p_1) + KL(p_1||p_2), nothing detached, one step of both."""
    students, optimizers = _cohort(2)
    initial = copy.deepcopy(students)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    _dml_step(students, optimizers, x, y, no_detach=True)
    a, b = initial["student1"], initial["student2"]
    la, lb = a(x), b(x)
    total = (F.cross_entropy(la, y) + F.cross_entropy(lb, y)
             + F.kl_div(F.log_softmax(la, 1), F.softmax(lb, 1), reduction="batchmean")
             + F.kl_div(F.log_softmax(lb, 1), F.softmax(la, 1), reduction="batchmean"))
    total.backward()
    for net, trained in ((a, students["student1"]), (b, students["student2"])):
        for p, got in zip(net.parameters(), trained.parameters()):
            torch.testing.assert_close(got, p - 0.5 * p.grad)


def test_dml_sequential_run_moves_batchnorm_statistics_once_per_step(cifar10_sample, tmp_path):
    out = tmp_path / "seq"
    result = run_script("dml.py", *TINY_RUN, "--model", "resnet20", "--subset", "128", "--dataset", cifar10_sample,
                        "--sequential", "--num-students", "3", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    steps = checkpoint["schedulers"]["student1"]["last_epoch"]
    assert steps > 0
    for name, state in checkpoint["networks"].items():
        counts = {value.item() for key, value in state.items() if key.endswith("num_batches_tracked")}
        assert counts == {steps}, (name, counts)


def test_dml_sequential_and_no_detach_exclude_each_other(capsys):
    assert "--no-detach" in parse_error(dml_parse_args, ["--sequential", "--no-detach"], capsys)


# ---- mixed precision: losses between networks in fp32 ----
@pytest.mark.parametrize("term", ["tna_match", "dml_kl"])
def test_bf16_step_matching_loss_equals_fp32(term, cifar10_sample):
    """Two near-identical twins (late in training): under bf16 autocast the term between them must
    equal fp32's closely; with bf16 logits, rounding (~0.4% of a logit) swamps their difference."""
    import numpy as np

    torch.manual_seed(0)
    base = build_model("resnet20", 10, 32)
    twin = copy.deepcopy(base)
    with torch.no_grad():
        twin.head.fc.weight.mul_(1.01)
    images = torch.from_numpy(np.load(cifar10_sample)["x_train"][:64]).permute(0, 3, 1, 2).float() / 255
    labels = torch.zeros(64, dtype=torch.long)

    def between(logits_a, logits_b):
        if term == "tna_match":
            return tna_loss(logits_a, logits_b, labels, alpha=1.0)[3]
        return dml_loss([logits_a, logits_b], labels)[2][0]

    with torch.no_grad():
        fp32 = between(base(images), twin(images))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_a, logits_b = base(images), twin(images)
        bf16 = between(logits_a, logits_b)
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.02)


# ---- TNA: the twin's initialisation (section 4.2) ----
def _tna_networks(*argv, seed=0):
    torch.manual_seed(seed)
    return build_networks(tna_parse_args(["--model", "resnet18", *argv]), 100, 32)


@pytest.mark.parametrize("flags,part", [(["--reinit-layer", "2"], "stages.0.0.conv2."),
                                        (["--reinit-layer", "stages.2.1.conv1"], "stages.2.1.conv1."),
                                        (["--reinit-layer", "-1"], "head.fc."),
                                        (["--reinit-stage", "1"], "stages.1.")])
def test_reinit_redraws_exactly_one_part_with_the_models_own_init(flags, part):
    """The twin equals the base except the chosen part, which is exactly what a differently
    initialised twin of the same architecture gets (the model's own init: Kaiming for resnet18's convs)."""
    copied = _tna_networks("--twin-init", "copy", *flags)
    random = _tna_networks()  # same seed: the twin's own random draw
    base, twin, own_draw = copied["base"].state_dict(), copied["twin"].state_dict(), random["twin"].state_dict()
    redrawn = [key for key in twin if key.startswith(part)]
    assert redrawn and any(key.endswith("weight") for key in redrawn)
    for key in twin:
        torch.testing.assert_close(twin[key], own_draw[key] if key in redrawn else base[key])
    assert any(not torch.equal(twin[key], base[key]) for key in redrawn)


def test_reinit_conv_has_kaiming_not_pytorch_default_scale():
    twin = _tna_networks("--twin-init", "copy", "--reinit-layer", "stages.3.1.conv1")["twin"]
    conv = twin.stages[3][1].conv1.weight  # 512 -> 512, 3x3: Kaiming fan-out std sqrt(2 / (512 * 9))
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)


@pytest.mark.parametrize("flags,message", [(["--reinit-layer", "99"], "--reinit-layer 99"),
                                           (["--reinit-layer", "stages.9"], "stages.9"),
                                           (["--reinit-stage", "7"], "--reinit-stage 7")])
def test_bad_reinit_part_is_a_clear_error(flags, message):
    with pytest.raises(ValueError, match=message):
        _tna_networks("--twin-init", "copy", *flags)


def test_identical_twins_warn_and_their_matching_term_stays_zero(cifar10_sample, tmp_path, capsys):
    tna_parse_args(["--twin-init", "copy"])
    assert "matching term stays 0" in capsys.readouterr().err
    result = run_script("tna.py", *TINY_RUN, "--dataset", cifar10_sample, "--twin-init", "copy",
                        "--out-dir", tmp_path / "c")
    assert result.returncode == 0 and "warning" in result.stderr
    record = json.loads((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["losses"]["match"] == 0.0
    tna_parse_args(["--twin-init", "copy", "--reinit-layer", "0"])
    assert "warning" not in capsys.readouterr().err


# ---- defaults: each script's paper protocol ----
def test_tna_defaults_are_table_9_cifar100():
    args = tna_parse_args([])
    assert (args.model, args.dataset, args.batch_size, args.lr, args.epochs) == ("resnet18", "cifar100", 256, 0.1, 200)
    assert (args.optimizer, args.schedule, args.warmup_epochs) == ("sgd", "cosine", 0)
    assert (args.momentum, args.nesterov, args.weight_decay, args.alpha) == (0.9, False, 5e-4, 5e-3)


def test_dml_defaults_are_amln_cifar_protocol():
    args = dml_parse_args([])
    assert (args.model, args.batch_size, args.lr, args.momentum) == ("resnet32", 128, 0.1, 0.9)
    assert (args.nesterov, args.weight_decay, args.warmup_epochs) == (True, 1e-4, 0)
    assert (args.schedule, args.milestones, args.gamma, args.epochs) == ("multistep", [200, 400], 0.1, 600)
    assert not args.no_detach and not args.sequential


# ---- the scripts end to end ----
@pytest.mark.parametrize("script,extra", [("tna.py", ["--alpha", "5e-3"]), ("dml.py", []),
                                          ("dml.py", ["--sequential", "--num-students", "3"])])
def test_script_writes_checkpoint_and_summary(script, extra, cifar10_sample, tmp_path):
    out = tmp_path / "run"
    result = run_script(script, *TINY_RUN, "--dataset", cifar10_sample, "--out-dir", out, *extra, isolated=True)
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["method"] == script[:-3]
    summary = read_summary(out)
    assert set(summary) >= {"method", "deployed", "networks", "ensemble", "epochs", "args", "train_time_s"}
    assert 0 <= summary["deployed"]["top1"] <= 1 and summary["deployed"]["nll"] > 0
    assert summary["deployed"] == summary["networks"][checkpoint["deployed"]]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss" in record["losses"] and "ensemble" in record["test"]


@pytest.mark.parametrize("script", ["tna.py", "dml.py"])
def test_resumed_run_equals_uninterrupted_run(script, cifar10_sample, tmp_path):
    check_resume_equals_uninterrupted(script, [*TINY_RUN, "--dataset", cifar10_sample], tmp_path)


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(cifar10_sample, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"]
    result = run_script("tna.py", *TINY_RUN, "--dataset", cifar10_sample, "--out-dir", tmp_path / "ddp",
                        launcher=torchrun, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(tmp_path / "ddp")
    assert summary["args"]["batch_size"] == 64 and 0 <= summary["deployed"]["top1"] <= 1


def test_training_learns(cifar10_sample, tmp_path):
    """ConvNet, 3 epochs on the 1,000 images of the shipped sample: chance is 10%; on its 200 test images the
    standard error at chance is about 2%, so 18% is 4 standard errors above chance, while this run reaches
    25.5-27% (measured with seeds 0 and 1)."""
    result = run_script("tna.py", "--model", "convnet", "--dataset", cifar10_sample, "--epochs", "3",
                        "--batch-size", "32", "--lr", "0.05", "--amp", "off", "--out-dir", tmp_path / "learn")
    assert result.returncode == 0, result.stderr
    assert read_summary(tmp_path / "learn")["deployed"]["top1"] > 0.18


@pytest.mark.parametrize("args,message", [
    (["--model", "resnet9000"], "resnet9000"),
    (["--dataset", "imagenet9000"], "imagenet9000"),
    (["--alpha", "-1"], "--alpha"),
    (["--resume", "/nonexistent/run"], "/nonexistent/run"),
])
def test_bad_input_gives_one_line_error(args, message, cifar10_sample):
    base = ["--dataset", cifar10_sample] if "--dataset" not in args else []
    result = run_script("tna.py", *TINY_RUN, *base, *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
