"""CSS (Fan et al. 2022, arXiv:2203.11660): joint labels and aggregated inference against hand-computed values,
the masks and the networks against the authors' code, the dynamically weighted distillation, fp32 terms under
bf16, the lr schedule, and the script end to end (outputs, resume, bad input)."""
import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

import css
from conftest import CIFAR10_SAMPLE, TINY_RUN, parse_error, read_summary, require_cifar10_sample, run_script
from models import MODEL_NAMES, Head, build_model

# the end-to-end runs: TINY_RUN on 128 images (2 steps of 64)
CSS_RUN = [*TINY_RUN, "--subset", "128"]


def css_args(*flags):
    return css.parse_args(["--model", "convnet", *flags])


# ---- target diversity and aggregated inference (eq. 2-4) ----
def test_joint_labels_are_y_times_m_plus_j():
    targets = torch.tensor([0, 2, 1])
    assert css.joint_labels(targets, 1, 3).tolist() == [1, 7, 4]
    assert css.joint_labels(targets, 0, 1).tolist() == [0, 2, 1]  # one branch: the plain labels


def test_aggregate_logits_averages_each_branch_own_joint_logits():
    # K = 2 classes, m = 2 branches: branch j's logit for class i sits at i*m + j
    branch_0 = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # classes 0, 1 at indices 0, 2
    branch_1 = torch.tensor([[10.0, 20.0, 30.0, 40.0]])  # classes 0, 1 at indices 1, 3
    assert css.aggregate_logits([branch_0, branch_1], 2).tolist() == [[(1 + 20) / 2, (3 + 40) / 2]]
    assert css.branch_class_logits(branch_1, 1, 2).tolist() == [[20.0, 40.0]]


def test_branch_cross_entropy_uses_the_joint_labels_and_averages_branches():
    torch.manual_seed(0)
    branch_logits, targets = [torch.randn(4, 6), torch.randn(4, 6)], torch.tensor([0, 1, 2, 1])
    expected = (F.cross_entropy(branch_logits[0], targets * 2) + F.cross_entropy(branch_logits[1], targets * 2 + 1)) / 2
    assert css.branch_cross_entropy(branch_logits, targets).item() == pytest.approx(expected.item())
    plain = [logits[:, :3] for logits in branch_logits]
    expected_plain = (F.cross_entropy(plain[0], targets) + F.cross_entropy(plain[1], targets)) / 2
    assert css.branch_cross_entropy(plain, targets, joint=False).item() == pytest.approx(expected_plain.item())


# ---- sample diversity: the masks (section 3.1, eq. 1) ----
@pytest.mark.parametrize("branch,rows,columns", [(0, (0, 2), (0, 2)), (1, (6, 8), (6, 8)), (2, (6, 8), (0, 2)),
                                                 (3, (0, 2), (6, 8)), (4, (0, 2), (2, 4))])
def test_grid_mask_zeroes_exactly_its_square_in_every_channel(branch, rows, columns):
    masked = css.mask_features(torch.ones(2, 3, 8, 8), branch, "grid")
    expected = torch.ones(2, 3, 8, 8)
    expected[:, :, rows[0]:rows[1], columns[0]:columns[1]] = 0
    assert torch.equal(masked, expected)


def test_grid_masks_tile_the_4x4_grid_and_stay_flush_with_the_edges():
    covered = sum(1 - css.mask_features(torch.ones(1, 1, 8, 8), j, "grid") for j in range(16))
    assert torch.equal(covered, torch.ones(1, 1, 8, 8))  # 16 disjoint squares of side h/4
    assert css.mask_region(1, 14, 14, "grid") == (slice(11, 14), slice(11, 14))  # h = 14: side 3, bottom-right corner


def test_authors_masks_are_the_authors_code_branch_by_branch():
    """PumpkinsLemon/CSS resnet_css.py `transform` on a 16x16 map (len = 4): three corner squares, then
    `mask[0:len, w - len] = 0` (one column, 4 pixels) for branch 4, and no mask from branch 5 on."""
    ones = torch.ones(1, 2, 16, 16)
    for branch in range(3):  # the same corners as the grid
        assert torch.equal(css.mask_features(ones, branch), css.mask_features(ones, branch, "grid"))
    expected = ones.clone()
    expected[:, :, 0:4, 12] = 0
    assert torch.equal(css.mask_features(ones, 3), expected)
    assert torch.equal(css.mask_features(ones, 4), ones) and torch.equal(css.mask_features(ones, 9), ones)
    assert css.parse_args(["--branches", "17"]).mask_layout == "authors"  # any m: the extra branches are unmasked


def test_branch_input_is_masked_in_training_and_at_test():
    torch.manual_seed(0)
    net = css.MultiBranchNet([build_model("convnet", 20) for _ in range(2)], num_classes=10)
    seen = []
    net.branch_stages[1].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    images = torch.randn(2, 3, 32, 32)
    for training in (True, False):
        net.train(training)
        net(images)
    rows, columns = css.mask_region(1, 14, 14)  # convnet: the last stage reads a 14x14 map
    for branch_input in seen:
        assert (branch_input[:, :, rows, columns] == 0).all()
        assert (branch_input != 0).float().mean() > 0.5


# ---- distillation (eq. 5-7) ----
def test_distillation_loss_matches_hand_computation():
    self_logits, peer_logits = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    p_peer, p_self = F.softmax(peer_logits / 3, 1)[0], F.softmax(self_logits / 3, 1)[0]
    kl = sum(p_peer[c] * math.log(p_peer[c] / p_self[c]) for c in range(2))
    value = css.distillation_loss([self_logits], [peer_logits], temperature=3.0)
    assert value.item() == pytest.approx(9 * float(kl), rel=1e-5)  # times T^2
    # averaged over branches: a second, identical pair of branches adds zero
    halved = css.distillation_loss([self_logits, peer_logits], [peer_logits, peer_logits], temperature=3.0)
    assert halved.item() == pytest.approx(9 * float(kl) / 2, rel=1e-5)


def two_networks_logits(seed=0, branches=2, classes=3):
    torch.manual_seed(seed)
    return [[torch.randn(5, classes * branches, requires_grad=True) for _ in range(branches)] for _ in range(2)]


def test_distillation_weights_are_the_ce_ratios():
    logits_1, logits_2 = two_networks_logits()
    targets = torch.tensor([0, 1, 2, 0, 1])
    total, terms = css.css_loss(logits_1, logits_2, targets)
    alpha = terms["ce_net1"] / terms["ce_net2"]
    assert terms["alpha_net1"].item() == pytest.approx(alpha.item())
    assert terms["alpha_net2"].item() == pytest.approx(1 / alpha.item())
    expected = terms["ce_net1"] + terms["ce_net2"] + alpha * terms["kd_net1"] + terms["kd_net2"] / alpha
    assert total.item() == pytest.approx(expected.item())
    assert not terms["alpha_net1"].requires_grad  # detached by default (choice: a weight, not a learning signal)
    _, fixed = css.css_loss(logits_1, logits_2, targets, fixed_weights=True)
    assert fixed["alpha_net1"].item() == fixed["alpha_net2"].item() == 1.0
    _, undetached = css.css_loss(logits_1, logits_2, targets, detach=False)
    assert undetached["alpha_net1"].requires_grad


@pytest.mark.parametrize("detach", [True, False])
def test_peer_targets_are_detached_unless_no_detach(detach):
    logits_1, logits_2 = two_networks_logits()
    css.distillation_loss(logits_1, logits_2, detach_peer=detach).backward()
    assert all(logits.grad.abs().sum() > 0 for logits in logits_1)
    assert all((logits.grad is not None) != detach for logits in logits_2)


def test_single_network_loss_is_its_cross_entropy():
    logits_1, _ = two_networks_logits()
    total, terms = css.css_loss(logits_1, None, torch.tensor([0, 1, 2, 0, 1]))
    assert set(terms) == {"ce_net1"} and total is terms["ce_net1"]


# ---- mixed precision: the terms between networks in fp32 ----
class ExactBody(torch.nn.Module):
    """A backbone whose stages pass their input on unchanged, so under bf16 autocast only the heads could round."""

    def __init__(self, outputs):
        super().__init__()
        self.stem, self.stages = torch.nn.Identity(), torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
        pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head, self.stage_channels, self.feature_dim = Head(pool, torch.nn.Linear(3, outputs)), [3, 3], 3


def test_bf16_step_gives_the_fp32_losses_and_gradients():
    """Two nearly identical networks (late training): their KL is smaller than bf16's rounding of a logit,
    so it must be computed from fp32 logits; the CE, KL and alpha terms and the heads' gradients of a step
    under bf16 autocast equal fp32's on a fixed batch (bf16 heads made the KL several times too large)."""
    torch.manual_seed(0)
    nets = [css.MultiBranchNet([ExactBody(20) for _ in range(2)], num_classes=10) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    with torch.no_grad():
        for param in nets[1].heads.parameters():
            param.mul_(1 + 1e-3 * torch.randn_like(param))
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))

    def step(bf16):
        for net in nets:
            net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            branch_logits = [net(images, return_branches=True) for net in nets]
        loss, terms = css.css_loss(*branch_logits, labels)
        loss.backward()
        return terms, [param.grad.clone() for net in nets for param in net.heads.parameters()]

    (terms_32, grads_32), (terms_16, grads_16) = step(False), step(True)
    assert terms_32["kd_net1"] < 1e-4  # the regime where bf16 rounding dominates
    for name, value in terms_16.items():
        assert value.dtype == torch.float32 and value.item() == pytest.approx(terms_32[name].item(), rel=1e-4), name
    for grad_16, grad_32 in zip(grads_16, grads_32):
        assert torch.allclose(grad_16, grad_32, rtol=1e-4, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a real backbone too: fp32 logits under autocast
        logits = css.build_networks(css_args("--single-network"), 10, 32)["net1"](images[:2], return_branches=True)
    assert logits[0].dtype == torch.float32


# ---- the networks ----
def test_forward_gives_the_aggregated_logits_and_branches_on_request():
    torch.manual_seed(0)
    networks = css.build_networks(css_args("--branches", "3"), 10, 32)
    assert set(networks) == {"net1", "net2"}
    net, images = networks["net1"].eval(), torch.randn(2, 3, 32, 32)
    branch_logits = net(images, return_branches=True)
    assert len(branch_logits) == 3 and branch_logits[0].shape == (2, 30)
    assert torch.allclose(net(images), css.aggregate_logits(branch_logits, 3))
    logits, features = net(images, return_features=True)
    assert logits.shape == (2, 10) and [f.shape[1] for f in features] == net.stage_channels
    # branches start independently initialised, each with its own copy of the last stage
    assert not torch.equal(net.branch_stages[0][0].weight, net.branch_stages[1][0].weight)


def test_no_joint_labels_gives_k_way_heads_and_a_plain_mean():
    net = css.build_networks(css_args("--branches", "2", "--no-joint-labels", "--single-network"), 10, 32)["net1"]
    images = torch.randn(2, 3, 32, 32)
    branch_logits = net(images, return_branches=True)
    assert branch_logits[0].shape == (2, 10)
    assert torch.allclose(net(images), (branch_logits[0] + branch_logits[1]) / 2)


def test_one_unmasked_branch_of_one_network_is_the_plain_backbone():
    """The baseline switch: --single-network --branches 1 --no-mask trains exactly the backbone."""
    torch.manual_seed(0)
    net = css.build_networks(css_args("--single-network", "--branches", "1", "--no-mask"), 10, 32)["net1"]
    torch.manual_seed(0)
    backbone = build_model("convnet", 10)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(net(images), backbone(images))


@pytest.mark.parametrize("model,count", [("resnet110_bottleneck", 3_116_244), ("wide_resnet20_8", 17_508_308)])
def test_bottleneck_networks_are_the_authors_branched_networks(model, count):
    """Tables 1-2's ResNet-110 and WRN-20-8 as the authors build them for CSS (PumpkinsLemon/CSS resnet_css.py,
    `resnet110` / `wide_resnet20_8(num_classes=100, branch=3)`, counted there): stem, layer1 and layer2 shared,
    three copies of layer3 and of Linear(256, 300). Branch j reads layer2's 16x16 map with its region zeroed."""
    if model not in MODEL_NAMES:
        pytest.skip(f"{model} is not in models.py yet")
    net = css.build_networks(css.parse_args(["--model", model, "--single-network"]), 100, 32)["net1"]
    assert sum(p.numel() for p in net.parameters()) == count
    seen = []
    net.branch_stages[2].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        branch_logits = net.eval()(torch.randn(1, 3, 32, 32), return_branches=True)
    assert len(branch_logits) == 3 and branch_logits[0].shape == (1, 300)
    assert seen[0].shape[1:] == (128, 16, 16) and (seen[0][:, :, 12:, :4] == 0).all()  # branch 3: bottom-left


def test_runs_saved_before_mask_layouts_rebuild_with_their_grid_masks():
    saved = vars(css_args("--single-network", "--branches", "4"))
    del saved["mask_layout"]
    assert css.build_networks(argparse.Namespace(**saved), 10, 32)["net1"].mask_layout == "grid"


def test_lr_drops_where_the_authors_code_drops_it():
    """The authors' train.py multiplies the lr by 0.1 when its 1-based epoch counter reaches 150 and 225, so
    the 150th epoch (0-based 149) already runs at 0.01; warm-up is over after 5 epochs."""
    args, steps = css.parse_args([]), 10
    factor_at = [css.lr_factor(epoch * steps, steps, args) for epoch in (5, 148, 149, 223, 224, 299)]
    assert factor_at == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_docstring_headline_command_is_the_authors_experiment():
    """The one command of the docstring parses, runs the authors' ResNet-110 and protocol, and their gradients."""
    commands = [line.split()[2:] for line in css.__doc__.splitlines() if line.strip().startswith("python css.py")]
    assert len(commands) == 1
    args = css.parse_args(commands[0])
    assert (args.model, args.epochs, args.batch_size, args.branches) == ("resnet110_bottleneck", 300, 128, 3)
    assert args.no_detach and args.mask_layout == "authors" and not args.fixed_weights


# ---- the script end to end ----
@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Two epochs without interruption, shared by the output and resume tests (each run costs seconds)."""
    require_cifar10_sample()
    out = tmp_path_factory.mktemp("css") / "straight"
    result = run_script("css.py", *CSS_RUN, "--epochs", "2", "--dataset", CIFAR10_SAMPLE, "--out-dir", out,
                        isolated=True)
    assert result.returncode == 0, result.stderr
    return out


def test_script_writes_checkpoint_summary_and_branch_accuracies(straight_run):
    checkpoint = torch.load(straight_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["method"] == "css" and checkpoint["deployed"] == "net1"
    saved = checkpoint["args"]  # the authors' protocol
    assert saved["warmup_epochs"] == 5 and saved["schedule"] == "multistep" and saved["mask_layout"] == "authors"
    summary = read_summary(straight_run)
    assert summary["deployed"] == summary["networks"]["net1"] and 0 <= summary["deployed"]["top1"] <= 1
    assert {f"net{n}_branch{j}" for n in (1, 2) for j in (1, 2, 3)} | {"net2"} <= set(summary["networks"])
    assert summary["ensemble"]["nll"] > 0
    losses = json.loads((straight_run / "metrics.jsonl").read_text().splitlines()[-1])["losses"]
    assert set(losses) == {"loss", "ce_net1", "ce_net2", "kd_net1", "kd_net2", "alpha_net1", "alpha_net2"}


def test_resumed_run_equals_uninterrupted_run(straight_run, tmp_path):
    split = tmp_path / "split"
    first = run_script("css.py", *CSS_RUN, "--epochs", "2", "--dataset", CIFAR10_SAMPLE, "--out-dir", split,
                       "--stop-after", "1")
    assert first.returncode == 0 and not (split / "summary.json").exists()
    resumed = run_script("css.py", "--resume", split)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_summary(straight_run), read_summary(split)
    assert a["networks"] == b["networks"] and a["ensemble"] == b["ensemble"]


# ---- bad input ----
@pytest.mark.parametrize("flags,message", [
    (["--branches", "0"], "--branches"),
    (["--branches", "17", "--mask-layout", "grid"], "16 squares"),
    (["--mask-layout", "random"], "--mask-layout"),
    (["--temperature", "0"], "--temperature"),
    (["--single-network", "--net2-model", "resnet20"], "--net2-model"),
])
def test_bad_flags_give_one_line_error(flags, message, capsys):
    assert message in parse_error(lambda argv: css_args(*argv), flags, capsys)


def test_backbone_that_cannot_be_branched_is_refused():
    with pytest.raises(ValueError, match="at least 2 stages"):
        css.check_branchable(torch.nn.Linear(3, 3), use_mask=True, image_size=32)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):  # ViT's token sequences cannot be masked
        args = argparse.Namespace(**{**vars(css_args()), "model": "vit_s16", "single_network": True})
        css.build_networks(args, 10, 32)


def test_unmaskable_backbone_gives_one_line_error_from_the_script(cifar10_sample):
    result = run_script("css.py", *CSS_RUN, "--dataset", cifar10_sample, "--model", "vit_s16")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--no-mask" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
