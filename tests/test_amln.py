"""AMLN (Zhang et al., ECCV 2020): the losses against hand-computed values, the block-wise modules' shapes, which
parameters each step changes, the ablation flags, and the script end to end (outputs, resume, bad input)."""
import argparse
import contextlib
import copy
import json
import math
import shlex

import pytest
import torch
import torch.nn.functional as F

import amln
from amln import (
    AlignmentContainer,
    adversarial_loss,
    alignment_loss,
    amln_step,
    build_block_modules,
    discriminator_loss,
    lr_factor,
    make_optimizer,
    outcome_loss,
    parse_args,
    stage_shapes,
)
from conftest import TINY_RUN, check_resume_equals_uninterrupted, read_summary, run_script
from models import build_model


# ---- losses ----
def test_outcome_loss_matches_hand_computation():
    logits, peer_logits, targets = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]]), torch.tensor([0])
    ce, kl = outcome_loss(logits, peer_logits, targets, temperature=3.0)
    rho, rho_peer = F.softmax(logits / 3, 1)[0], F.softmax(peer_logits / 3, 1)[0]
    kl_peer_self = sum(rho_peer[c] * math.log(rho_peer[c] / rho[c]) for c in range(2))  # KL(rho_peer || rho): DML
    assert ce.item() == pytest.approx(math.log(1 + math.exp(-3)), rel=1e-5)
    assert kl.item() == pytest.approx(9 * float(kl_peer_self), rel=1e-5)  # scaled by T^2 (eq. 8)
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    peer_logits = torch.tensor([[0.0, 1.0, 0.0]])
    _, kl_printed = outcome_loss(logits, peer_logits, torch.tensor([0]), temperature=1.0, direction="self_peer")
    p, q = F.softmax(logits, 1)[0], F.softmax(peer_logits, 1)[0]
    assert kl_printed.item() == pytest.approx(float(sum(p[c] * math.log(p[c] / q[c]) for c in range(3))), rel=1e-5)


def test_outcome_loss_detaches_the_peer():
    logits, peer_logits = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    for direction in ("peer_self", "self_peer"):
        outcome_loss(logits, peer_logits, torch.randint(0, 5, (4,)), direction=direction)[1].backward()
    assert logits.grad.abs().sum() > 0 and peer_logits.grad is None


def test_adversarial_and_discriminator_losses_match_hand_computation():
    undecided = torch.zeros(4, 2)  # D outputs equal logits: CE log 2 for any label
    confident = torch.tensor([[5.0, 0.0]] * 2 + [[0.0, 5.0]] * 2)  # right on labels 0, 0, 1, 1
    assert adversarial_loss([undecided, undecided], 1).item() == pytest.approx(2 * math.log(2))
    # the network side is the cross-entropy towards the PEER's id: large when D recognises network 0
    assert adversarial_loss([confident[:2]], 1).item() == pytest.approx(5 + math.log(1 + math.exp(-5)))
    # eq. 1 as printed: 1 - P(peer id), bounded by 1 per stage
    assert adversarial_loss([confident[:2]], 1, form="probability").item() == pytest.approx(1 - 1 / (1 + math.exp(5)))
    assert adversarial_loss([undecided, undecided], 0, form="probability").item() == pytest.approx(1.0)
    labels = torch.tensor([0, 0, 1, 1])
    loss, accuracies = discriminator_loss([[confident, undecided]], labels)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-5)) + math.log(2))
    assert accuracies[0][0].item() == 1.0 and accuracies[0][1].item() == 0.5  # argmax of a tie is class 0
    # eq. 1 as printed for the discriminators: the mean of 1 - P(true id)
    loss, _ = discriminator_loss([[confident, undecided]], labels, form="probability")
    assert loss.item() == pytest.approx(1 / (1 + math.exp(5)) + 0.5)


def test_alignment_loss_sums_mse_over_stages_and_detaches_the_peer():
    aligned = [torch.ones(2, 3, 4, 4, requires_grad=True), torch.zeros(2, 3, 4, 4, requires_grad=True)]
    peer_final = torch.full((2, 3, 4, 4), 2.0, requires_grad=True)
    loss = alignment_loss(aligned, peer_final)
    assert loss.item() == pytest.approx(1.0 + 4.0)
    loss.backward()
    assert aligned[0].grad.abs().sum() > 0 and peer_final.grad is None


# ---- the block-wise modules ----
@pytest.mark.parametrize("own_shape,peer_final,expected", [
    ((16, 32, 32), (64, 8, 8), (64, 8, 8)),  # ResNet stage 1 -> peer's final: stride 4
    ((32, 16, 16), (128, 8, 8), (128, 8, 8)),  # stride 2, to a wider peer
    ((32, 14, 14), (64, 5, 5), (64, 5, 5)),  # ConvNet: no integer stride, the rest is pooled
])
def test_alignment_container_reaches_the_peers_final_shape(own_shape, peer_final, expected):
    container = AlignmentContainer(own_shape, peer_final)
    assert tuple(container(torch.randn(2, *own_shape)).shape[1:]) == expected
    assert container.depthwise.groups == own_shape[0]  # depthwise, then pointwise (section 3.2)


def test_mixed_pair_gets_an_adapter_on_the_wider_network_only():
    shapes = [stage_shapes(build_model(name, 10), 32) for name in ("resnet20", "wrn_16_2")]
    discriminators, blocks = build_block_modules(shapes)
    assert [len(list(a.parameters())) for a in blocks[0].adapters] == [0, 0, 0]  # ResNet-20: 16/32/64 channels
    assert all(len(list(a.parameters())) > 0 for a in blocks[1].adapters)  # WRN-16-2: 32/64/128 -> 16/32/64
    assert [pair[0].sigma.out_channels for pair in discriminators.stages] == [8, 16, 32]  # sigma halves the channels
    features = [torch.randn(2, *shape) for shape in shapes[1]]
    adapted, aligned = blocks[1](features)
    assert [tuple(a.shape[1:]) for a in adapted] == shapes[0]
    assert all(tuple(a.shape[1:]) == shapes[0][-1] for a in aligned)  # WRN's stages -> ResNet-20's final map


# ---- the step: which parameters each part changes ----
def tiny_pair(model="convnet", image_size=32, **flags):
    """Two networks, their block-wise modules and optimizers, a batch, and the step's arguments."""
    torch.manual_seed(0)
    options = {"temperature": 3.0, "beta": 1.0, "kl_direction": "peer_self", "adversarial_loss": "ce",
               "sequential": False, "no_kl": False, "no_adversarial": False, "no_alignment": False, "lr": 0.1,
               "disc_lr": 0.1, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False}
    args = argparse.Namespace(**{**options, **flags})
    nets = [build_model(model, 10, image_size) for _ in range(2)]
    shapes = [stage_shapes(net, image_size) for net in nets]
    discriminators, blocks = build_block_modules(shapes, not args.no_adversarial, not args.no_alignment)
    optimizers = {f"peer{j + 1}": make_optimizer([*net.parameters(), *blocks[j].parameters()], args)
                  for j, net in enumerate(nets)}
    if discriminators is not None:
        optimizers["disc"] = make_optimizer(discriminators.parameters(), args, lr=args.disc_lr)
    images, targets = torch.randn(8, 3, image_size, image_size), torch.randint(0, 10, (8,))
    return nets, blocks, discriminators, optimizers, images, targets, args


def step(nets, blocks, discriminators, optimizers, images, targets, args, autocast=contextlib.nullcontext):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return amln_step(nets, blocks, discriminators, optimizers, images, targets, args, scaler, autocast)


def snapshot(*modules):
    return [p.detach().clone() for module in modules for p in module.parameters()]


def changed(before, *modules):
    return [not torch.equal(old, new) for old, new in zip(before, (p for m in modules for p in m.parameters()))]


@pytest.mark.parametrize("sequential,form", [(False, "ce"), (True, "probability")])
def test_discriminators_learn_from_their_own_loss_only(sequential, form):
    """The discriminators' gradients are exactly those of eq. 1's max over D (in the chosen form) on the batch's
    detached features: the networks' side (min over f) uses them with detached parameters and adds nothing."""
    pair = tiny_pair(sequential=sequential, adversarial_loss=form)
    nets, blocks, discriminators, _, images, _, _ = pair
    reference = copy.deepcopy(discriminators)
    with torch.no_grad():
        adapted = [blocks[j](net(images, return_features=True)[1])[0] for j, net in enumerate(nets)]
    ids = torch.tensor([0] * 8 + [1] * 8)
    expected, _ = discriminator_loss(reference([torch.cat(stage) for stage in zip(*adapted)]), ids, form)
    expected.backward()
    terms = step(*pair)
    assert terms["d_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(discriminators.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad)
    assert {f"d_acc_peer{j}_stage{b}" for j in (1, 2) for b in (1, 2)} <= set(terms)
    assert terms["d_acc_peer1_stage1"].dim() == 0


def test_adversarial_gradient_reaches_the_first_stage():
    """L_D^j trains network j's early stages through D_j^b: with and without it, one step moves stage 1 differently."""
    stage_one = []
    for adversarial in (True, False):
        nets, *rest = tiny_pair(no_kl=True, no_alignment=True, no_adversarial=not adversarial)
        step(nets, *rest)
        stage_one.append(nets[0].stages[0][0].weight.detach().clone())
    assert not torch.allclose(stage_one[0], stage_one[1])


@pytest.mark.parametrize("sequential", [False, True])
def test_whole_iteration_changes_discriminators_only_through_their_optimizer(sequential):
    """With the discriminators' lr at 0, an AMLN iteration leaves them unchanged while both peers learn."""
    nets, blocks, discriminators, optimizers, images, targets, args = tiny_pair(sequential=sequential)
    optimizers["disc"].param_groups[0]["lr"] = 0.0
    before_disc, before_peers = snapshot(discriminators), [snapshot(net) for net in nets]
    terms = step(nets, blocks, discriminators, optimizers, images, targets, args)
    assert not any(changed(before_disc, discriminators))
    assert all(any(changed(before, net)) for before, net in zip(before_peers, nets))
    assert all(value.dim() == 0 and torch.isfinite(value) for value in terms.values())


class CountingNetwork(torch.nn.Module):
    """A network that counts its forwards."""

    def __init__(self, network):
        super().__init__()
        self.network, self.forwards = network, 0

    def forward(self, images, return_features=False):
        self.forwards += 1
        return self.network(images, return_features=return_features)


def test_sequential_step_moves_each_running_statistic_once_and_wastes_no_forward():
    """Algorithm 1 (--sequential): each network's BN statistics see each batch once (as one train-mode forward
    of the network before the step would move them), S_2 is forwarded once and S_1 twice (its update, then
    its updated prediction for S_2), and S_2's KL target is S_1's updated training-mode prediction."""
    nets, blocks, discriminators, optimizers, images, targets, args = tiny_pair("resnet20", 16, sequential=True)
    before = copy.deepcopy(nets)
    counted = [CountingNetwork(net) for net in nets]
    steps = 3
    for index in range(steps):
        terms = step(counted, blocks, discriminators, optimizers, images, targets, args)
        if index == 0:
            once = [copy.deepcopy(net) for net in before]
            initial_logits = [net(images) for net in once]  # one train-mode forward each: the expected statistics
            for net, expected in zip(nets, once):
                for (name, got), want in zip(net.named_buffers(), expected.buffers()):
                    torch.testing.assert_close(got, want, msg=name)
            with torch.no_grad():
                updated_peer1 = copy.deepcopy(nets[0])(images)  # train mode: the batch's statistics
            expected_kl = outcome_loss(initial_logits[1], updated_peer1, targets, args.temperature)[1]
            assert terms["kl_peer2"].item() == pytest.approx(expected_kl.item(), rel=1e-5)
    for net in nets:
        tracked = [m.num_batches_tracked.item() for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert tracked and set(tracked) == {steps}
    assert [net.forwards for net in counted] == [2 * steps, steps]


def test_sequential_step_skips_the_second_forward_when_nothing_reads_it():
    """Without L_KL and L_F, S_2's loss does not read S_1's prediction: S_1 is forwarded once per step."""
    nets, *rest = tiny_pair(sequential=True, no_kl=True, no_alignment=True)
    counted = [CountingNetwork(net) for net in nets]
    step(counted, *rest)
    assert [net.forwards for net in counted] == [1, 1]


class FixedOutputs(torch.nn.Module):
    """A stand-in network whose logits and stage features are parameters, so they stay fp32 under autocast:
    a bf16 step then differs from an fp32 step only where the method itself computes in bf16."""

    def __init__(self, logits, features):
        super().__init__()
        self.logits, self.features = torch.nn.Parameter(logits), torch.nn.ParameterList(features)

    def forward(self, images, return_features=False):
        return self.logits * 1, [features * 1 for features in self.features]


@pytest.mark.parametrize("sequential", [False, True])
def test_losses_between_networks_are_fp32_in_a_bf16_step(sequential):
    """Issue: under bf16 autocast a difference between near-equal quantities is mostly rounding. On a fixed batch
    (peers whose logits differ by ~1e-3), a bf16 step gives the fp32 step's CE, KL and alignment terms to fp32
    precision. The discriminators' convolutions run in the autocast precision (a classifier, no difference of
    near-equal values): their terms agree to bf16 precision."""
    torch.manual_seed(0)
    logits = torch.randn(8, 10)
    shapes = [(16, 8, 8), (32, 4, 4)]
    features = [[torch.randn(8, *shape) for shape in shapes] for _ in range(2)]
    nets = [FixedOutputs(logits + 1e-3 * torch.randn(8, 10) * j, features[j]) for j in range(2)]
    *_, targets, args = tiny_pair(sequential=sequential)
    discriminators, blocks = build_block_modules([shapes, shapes])
    runs = []
    for autocast in (contextlib.nullcontext, lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        pair = copy.deepcopy((nets, blocks, discriminators))
        optimizers = {f"peer{j + 1}": make_optimizer([*pair[0][j].parameters(), *pair[1][j].parameters()], args)
                      for j in range(2)}
        optimizers["disc"] = make_optimizer(pair[2].parameters(), args, lr=args.disc_lr)
        runs.append(step(*pair, optimizers, torch.zeros(8, 3, 4, 4), targets, args, autocast=autocast))
    fp32, bf16 = runs
    assert fp32["kl_peer1"].item() < 1e-5  # near-equal peers
    for name in (name for name in fp32 if not name.startswith("d_acc")):  # accuracies: counts of argmaxes
        tolerance = 2e-2 if name.startswith(("adv_", "d_")) else 1e-5
        assert bf16[name].dtype == torch.float32, name
        assert bf16[name].item() == pytest.approx(fp32[name].item(), rel=tolerance, abs=1e-9), name


@pytest.mark.parametrize("flag,prefixes",
                         [("no_kl", ("kl_",)), ("no_adversarial", ("adv_", "d_")), ("no_alignment", ("align_",))])
def test_each_ablation_flag_removes_its_term(flag, prefixes):
    """Table 6: each flag drops its loss terms (absent from the log) and the total is the sum of the rest."""
    full = step(*tiny_pair())
    removed = {name for name in full if name.startswith(prefixes)}
    assert len(removed) >= 2
    pair = tiny_pair(**{flag: True})
    ablated = step(*pair)
    assert set(ablated) == set(full) - removed
    network_terms = [value * (pair[-1].beta if name.startswith("align") else 1) for name, value in ablated.items()
                     if name.startswith(("ce_", "kl_", "adv_", "align_"))]
    assert ablated["loss"].item() == pytest.approx(sum(network_terms).item(), rel=1e-5)
    if flag == "no_adversarial":
        assert pair[2] is None and "disc" not in pair[3]  # no discriminators at all


# ---- the paper's protocols ----
def docstring_commands():
    """Every `python amln.py ...` command of the docstring, continuation lines joined, as argument lists."""
    text = amln.__doc__.replace("\\\n", " ")
    return [shlex.split(line.strip())[2:] for line in text.splitlines() if line.strip().startswith("python amln.py")]


def lr_at_epochs(args, epochs, steps_per_epoch=10):
    return [args.lr * lr_factor(epoch * steps_per_epoch, steps_per_epoch, args) for epoch in epochs]


def test_defaults_are_the_papers_cifar_protocol():
    """Section 4.2 on CIFAR: SGD, Nesterov 0.9, wd 1e-4, batch 128, lr 0.1 x0.1 every 200 epochs (600), Algorithm 1."""
    args = parse_args([])
    assert (args.model, args.epochs, args.batch_size, args.optimizer, args.momentum, args.nesterov, args.weight_decay,
            args.warmup_epochs, args.temperature, args.sequential) == ("resnet32", 600, 128, "sgd", 0.9, True, 1e-4, 0,
                                                                        3.0, True)
    assert lr_at_epochs(args, [0, 199, 200, 399, 400, 599]) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert not parse_args(["--no-sequential"]).sequential


def test_docstring_commands_parse_and_the_imagenet_one_is_section_4_2s():
    commands = docstring_commands()
    assert len(commands) >= 2
    for command in commands:
        parse_args([arg.replace("PATH", "/data") for arg in command])
    imagenet = parse_args(next(c for c in commands if "imagenet" in c))
    assert (imagenet.model, imagenet.batch_size, imagenet.epochs, imagenet.weight_decay) == ("resnet34", 128, 90, 1e-4)
    assert lr_at_epochs(imagenet, [0, 29, 30, 59, 60, 89]) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


# ---- the script end to end ----
def test_script_writes_checkpoint_summary_and_discriminator_accuracies(cifar10_sample, tmp_path):
    out = tmp_path / "run"
    result = run_script("amln.py", *TINY_RUN, "--dataset", cifar10_sample, "--out-dir", out, isolated=True)
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["deployed"] == "peer1"
    assert set(checkpoint["extra"]) == {"discriminators", "peer1_blocks", "peer2_blocks"}
    assert "disc" in checkpoint["optimizers"]
    summary = read_summary(out)
    assert set(summary["networks"]) == {"peer1", "peer2"} and 0 <= summary["ensemble"]["top1"] <= 1
    assert summary["deployed"] == summary["networks"]["peer1"]
    losses = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["losses"]
    assert {"loss", "d_loss", "ce_peer1", "kl_peer2", "adv_peer1", "align_peer2", "d_acc_peer2_stage2"} <= set(losses)
    assert 0 <= losses["d_acc_peer1_stage1"] <= 1


def test_resumed_run_equals_uninterrupted_run(cifar10_sample, tmp_path):
    straight, split = check_resume_equals_uninterrupted("amln.py", [*TINY_RUN, "--dataset", cifar10_sample], tmp_path)
    logs = [json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["losses"] for run in (straight, split)]
    assert logs[0] == logs[1]  # the discriminators and their optimizer were restored too


@pytest.mark.parametrize("args,message", [
    (["--models", "resnet20,resnet18"], "same number of stages"),
    (["--models", "resnet20"], "--models"),
    (["--temperature", "0"], "--temperature"),
])
def test_bad_input_gives_one_line_error(args, message, cifar10_sample):
    result = run_script("amln.py", *TINY_RUN, "--dataset", cifar10_sample, *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
