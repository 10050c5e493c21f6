"""SiLa (Gan et al. 2021, arXiv:2103.00200): the siamese-label loss against hand-computed values and
its soft-label reading, where its gradient goes, dynamic SiLa on a multi-exit network, the default
recipe's schedule, and the script end to end (two networks and an MSDNet; outputs, resume, bad input)."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import TINY_RUN, check_resume_equals_uninterrupted, parse_error, read_summary, run_script
from sila import lr_factor, mutual_kl, parse_args, sila_loss


# ---- losses ----
def test_sila_loss_matches_hand_computation():
    # N = 2 classes, C = 2 networks, one sample of class 1: z_bar = [1, 2, 0, 1], terms at classes 1 and 3
    logits = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]])]
    log_partition = math.log(math.exp(1) + math.exp(2) + math.exp(0) + math.exp(1))
    term_1, term_2 = log_partition - 2.0, log_partition - 1.0  # eq. 2 on z_bar with y and y + N
    assert sila_loss(logits, torch.tensor([1]), [1.0, 1.0]).item() == pytest.approx(term_1 + term_2)
    assert sila_loss(logits, torch.tensor([1]), [1.0, 0.5]).item() == pytest.approx(term_1 + 0.5 * term_2)
    # with one block of logits it is the ordinary cross-entropy
    assert sila_loss(logits[:1], torch.tensor([1]), [1.0]).item() == pytest.approx(math.log(1 + math.e) - 2 + 1)


def test_sila_loss_is_a_soft_label_cross_entropy_over_c_times_n_classes():
    """sum_c beta_c CE(z_bar, y + (c-1)N) = sum(beta) * CE(z_bar, q), q = beta_c / sum(beta) at y of block c."""
    torch.manual_seed(0)
    batch, num_classes, betas = 6, 5, [0.3, 2.0, 1.0]
    logits = [torch.randn(batch, num_classes) for _ in betas]
    targets = torch.randint(0, num_classes, (batch,))
    soft_targets = torch.zeros(batch, len(betas) * num_classes)
    for c, beta in enumerate(betas):
        soft_targets[torch.arange(batch), targets + c * num_classes] = beta / sum(betas)
    expected = sum(betas) * F.cross_entropy(torch.cat(logits, 1), soft_targets)
    assert sila_loss(logits, targets, betas).item() == pytest.approx(expected.item(), rel=1e-6)


def test_every_sila_term_reaches_every_network():
    """The gradient w.r.t. z_bar is (sum(beta) softmax(z_bar) - sum_c beta_c onehot(y + (c-1)N)) / B:
    term c pushes down the other blocks' logits too (the coupling of section 3.1)."""
    torch.manual_seed(0)
    logits = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    targets, betas = torch.tensor([0, 2, 1, 1]), [1.0, 0.5]
    sila_loss(logits, targets, betas).backward()
    siamese = torch.cat([z.detach() for z in logits], 1)
    expected = sum(betas) * F.softmax(siamese, 1)
    for c, beta in enumerate(betas):
        expected[torch.arange(4), targets + 3 * c] -= beta
    assert torch.allclose(torch.cat([z.grad for z in logits], 1), expected / 4, atol=1e-6)
    # one term alone (beta_2 = 0) still moves network 2's logits
    logits[1].grad = None
    sila_loss(logits, targets, [1.0, 0.0]).backward()
    assert logits[1].grad.abs().sum() > 0


class ThreeExitNet(nn.Module):
    """A toy early-exit network (MSDNet's interface): a trunk and one classifier per block, forward ->
    list of the exits' logits."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.stages = nn.ModuleList([nn.Linear(6, 6) for _ in range(3)])
        self.classifiers = nn.ModuleList([nn.Linear(6, num_classes) for _ in range(3)])

    def forward(self, x):
        exits = []
        for stage, classifier in zip(self.stages, self.classifiers):
            x = torch.relu(stage(x))
            exits.append(classifier(x))
        return exits


def test_dynamic_sila_on_three_exits():
    torch.manual_seed(0)
    net, x, y = ThreeExitNet(), torch.randn(8, 6), torch.randint(0, 4, (8,))
    exits = net(x)
    log_probs = F.log_softmax(torch.cat(exits, 1), 1)  # eq. 11: one softmax over the 12 exit logits
    expected = sum(-log_probs[torch.arange(8), y + 4 * c].mean() for c in range(3))
    assert sila_loss(exits, y, [1.0, 1.0, 1.0]).item() == pytest.approx(expected.item(), rel=1e-6)
    # the first exit's classifier learns from the deeper exits' terms (they share its softmax)
    sila_loss(exits, y, [0.0, 1.0, 1.0]).backward()
    assert net.classifiers[0].weight.grad.abs().sum() > 0


def test_sila_loss_and_kl_are_fp32_on_bf16_logits():
    """Losses between networks are computed in fp32 whatever the autocast dtype of the logits."""
    torch.manual_seed(0)
    logits, targets = [torch.randn(4, 5), torch.randn(4, 5)], torch.randint(0, 5, (4,))
    low = [z.bfloat16() for z in logits]
    assert sila_loss(low, targets, [1.0, 1.0]).dtype == torch.float32
    assert sila_loss(low, targets, [1.0, 1.0]).item() == pytest.approx(
        sila_loss([z.float() for z in low], targets, [1.0, 1.0]).item(), rel=1e-6)
    assert all(kl.dtype == torch.float32 for kl in mutual_kl(low))


def test_dml_term_is_kl_of_peer_to_self_summed_over_classes():
    torch.manual_seed(0)
    logits = [torch.randn(5, 3), torch.randn(5, 3)]
    kls = mutual_kl(logits)
    p_peer, log_p_self = F.softmax(logits[1], 1), F.log_softmax(logits[0], 1)  # KL(p_2 || p_1), batchmean
    assert kls[0].item() == pytest.approx((p_peer * (p_peer.log() - log_p_self)).sum(1).mean().item(), rel=1e-5)


def test_dml_term_of_network_k_reaches_only_network_k():
    torch.manual_seed(0)
    networks, x = [nn.Linear(4, 3) for _ in range(3)], torch.randn(8, 4)
    kls = mutual_kl([net(x) for net in networks])
    kls[1].backward()
    assert networks[1].weight.grad.abs().sum() > 0
    assert networks[0].weight.grad is None and networks[2].weight.grad is None


def test_sila_loss_rejects_betas_of_the_wrong_length():
    with pytest.raises(ValueError, match="2 betas for 3"):
        sila_loss([torch.zeros(1, 2)] * 3, torch.tensor([0]), [1.0, 1.0])


# ---- the recipe ----
def test_default_schedule_is_section_4_1_halved_at_each_of_the_ten_milestones():
    """Section 4.1: 260 epochs, batch 128, lr 0.1, MultiStep at 30, 55, ..., 240. With x0.5 per milestone the
    lr ends at 0.1 / 2^10 (not 1e-11, as PyTorch's default x0.1 would make it) and every milestone halves it."""
    args = parse_args([])
    assert (args.model, args.dataset, args.epochs, args.batch_size, args.lr) == ("resnet18", "cifar100", 260, 128, 0.1)
    epochs = (0, 29, 30, 54, 55, 80, 105, 135, 239, 240, 259)
    lr_at = {epoch: args.lr * lr_factor(epoch * 10, 10, args) for epoch in epochs}
    expected = {0: 0.1, 29: 0.1, 30: 0.05, 54: 0.05, 55: 0.025, 80: 0.1 / 8, 105: 0.1 / 16, 135: 0.1 / 32,
                239: 0.1 / 512, 240: 0.1 / 1024, 259: 0.1 / 1024}
    assert lr_at == pytest.approx(expected, rel=1e-12)
    assert args.momentum == 0.9 and args.weight_decay == 5e-4 and not args.nesterov
    # the literal PyTorch default stays one flag away
    assert parse_args(["--gamma", "0.1"]).gamma == 0.1


# ---- the script end to end ----
SMALL = ["--subset", "128"]  # after TINY_RUN, so it wins
MSDNET_RUN = ["--model", "msdnet5", "--subset", "16", "--batch-size", "8"]  # MSDNet: ~0.25 s per image on 2 CPU cores


def run_and_read(out, *extra, dataset):
    """One epoch of sila.py in `out`; returns (checkpoint, summary, last epoch's losses)."""
    result = run_script("sila.py", *TINY_RUN, *SMALL, "--dataset", dataset, "--out-dir", out, *extra, isolated=True)
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["method"] == "sila" and checkpoint["deployed"] == "net1"
    summary = read_summary(out)
    assert 0 <= summary["deployed"]["top1"] <= 1 and summary["deployed"]["nll"] > 0
    assert summary["deployed"] == summary["networks"]["net1"]
    return checkpoint, summary, json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["losses"]


def test_two_networks_write_checkpoint_and_summary(cifar10_sample, tmp_path):
    extra = ["--models", "convnet,resnet20", "--plus-ce", "--betas", "1", "0.5", "--dml"]
    checkpoint, summary, losses = run_and_read(tmp_path / "run", *extra, dataset=cifar10_sample)
    assert set(checkpoint["networks"]) == set(summary["networks"]) == {"net1", "net2"}
    assert summary["ensemble"] is not None
    assert {"loss", "sila", "ce_net1", "ce_net2", "kl_net1", "kl_net2"} == set(losses)
    assert losses["loss"] == pytest.approx(losses["sila"] + losses["ce_net1"] + 0.5 * losses["ce_net2"]
                                           + losses["kl_net1"] + losses["kl_net2"], rel=1e-4)


def test_msdnet_exits_write_checkpoint_and_summary(cifar10_sample, tmp_path):
    """Dynamic SiLa: one MSDNet, every exit reported, net1 = its last exit, no ensemble. Untrained exits
    predict near-uniformly over the 5 * 10 siamese classes, so the SiLa loss starts near 5 log 50."""
    checkpoint, summary, losses = run_and_read(tmp_path / "run", *MSDNET_RUN, dataset=cifar10_sample)
    assert set(checkpoint["networks"]) == {"net1"} and summary["ensemble"] is None
    assert set(summary["networks"]) == {"exit1", "exit2", "exit3", "exit4", "exit5", "net1"}
    assert summary["networks"]["exit5"] == summary["networks"]["net1"]
    assert losses["sila"] == pytest.approx(5 * math.log(50), rel=0.05)


def test_resumed_run_equals_uninterrupted_run(cifar10_sample, tmp_path):
    """On the DML baseline (--no-sila --dml): each network's own CE plus its KL, no SiLa term."""
    straight, _ = check_resume_equals_uninterrupted("sila.py", [*TINY_RUN, *SMALL, "--dataset", cifar10_sample,
                                                               "--no-sila", "--dml"], tmp_path)
    losses = json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])["losses"]
    assert set(losses) == {"loss", "ce_net1", "ce_net2", "kl_net1", "kl_net2"}
    terms = losses["ce_net1"] + losses["ce_net2"] + losses["kl_net1"] + losses["kl_net2"]
    assert losses["loss"] == pytest.approx(terms, rel=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--betas", "1", "1", "1"], "--betas has 3 values but there are 2 networks"),
    (["--models", "convnet,convnet,convnet", "--betas", "1", "1"], "--betas has 2 values but there are 3 networks"),
    (["--model", "msdnet5", "--models", "convnet,resnet20"], "--model msdnet* without --models"),
    (["--models", "msdnet5,resnet18"], "--model msdnet* without --models"),
    (["--models", "convnet"], "at least 2 networks"),
    (["--betas", "1", "-1"], "--betas: expected a number >= 0"),
    (["--betas", "0", "0"], "--betas must not be all 0"),
    (["--no-sila", "--plus-ce"], "--plus-ce"),
])
def test_bad_arguments_are_rejected_by_the_parser(args, message, capsys):
    assert message in parse_error(parse_args, args, capsys)


def test_betas_not_matching_the_msdnet_exits_give_one_line_error(cifar10_sample):
    result = run_script("sila.py", *TINY_RUN, *MSDNET_RUN, "--dataset", cifar10_sample, "--betas", "1", "1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    expected = "sila.py: error: --betas has 2 values but there are 5 exits in msdnet5"
    assert result.stderr.strip().splitlines() == [expected]
