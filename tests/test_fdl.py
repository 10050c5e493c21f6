"""FDL (Das & Dutta Roy, identical neural networks; authors' code bishshoy/FDL): the losses against
hand-computed values, the recorded conv features, the head step leaving the bases unchanged, the
feature difference step pushing features apart, the authors' recipes, and the script end to end
(every sub-step's forwards, outputs, resume across the pretrain phase, bad input)."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_RUN, parse_error, read_summary, require_cifar10_sample, run_script
from fdl import (
    ConvOutputRecorder,
    all_pairs_feature_difference_loss,
    authors_lrs,
    feature_difference_loss,
    frozen_base_logits,
    parse_args,
    similarity_loss,
)
from models import build_model


# ---- losses ----
def test_feature_difference_loss_matches_hand_computation():
    features_a = [torch.tensor([[[[1.0, 2.0]]]]), torch.ones(1, 2, 1, 1)]
    features_b = [torch.zeros(1, 1, 1, 2), torch.full((1, 2, 1, 1), 3.0)]
    # layer 1: (1 + 4) / 2 = 2.5; layer 2: (4 + 4) / 2 = 4; minus their mean over the 2 layers
    assert feature_difference_loss(features_a, features_b).item() == pytest.approx(-3.25)
    features_c = [torch.zeros(1, 1, 1, 2), torch.zeros(1, 2, 1, 1)]
    # pairs (a,b) -3.25, (a,c) -(2.5 + 1) / 2 = -1.75, (b,c) -(0 + 9) / 2 = -4.5
    assert all_pairs_feature_difference_loss([features_a, features_b, features_c]).item() == pytest.approx(-9.5 / 3)


def test_similarity_loss_is_squared_ce_difference_and_reaches_both():
    ce_a, ce_b = torch.tensor(1.5, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    loss = similarity_loss(ce_a, ce_b)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert ce_a.grad.item() == pytest.approx(2.0) and ce_b.grad.item() == pytest.approx(-2.0)


# ---- mechanisms ----
def test_recorder_collects_every_conv_output_but_the_shortcuts_before_its_batchnorm_and_only_while_recording():
    torch.manual_seed(0)
    network, images = build_model("resnet20", 10), torch.randn(2, 3, 32, 32)
    recorder = ConvOutputRecorder(network)
    logits, features = recorder.record(network, images)
    # the stem and the 18 convs of the residual branches; not the two 1x1 projection shortcuts (authors' code)
    assert len(features) == 19 == sum(isinstance(m, torch.nn.Conv2d) for m in network.modules()) - 2
    assert [f.shape[1] for f in features] == [16] * 7 + [32] * 6 + [64] * 6
    shortcut_outputs = []
    for stage in (1, 2):
        shortcut = network.stages[stage][0].downsample[0]
        shortcut.register_forward_hook(lambda m, i, output: shortcut_outputs.append(output))
    _, features = recorder.record(network, images)
    assert len(shortcut_outputs) == 2 and not any(f is output for f in features for output in shortcut_outputs)
    assert torch.equal(features[0], network.stem[0](images))  # the stem conv, before its BN
    assert torch.allclose(logits, network(images)) and recorder.outputs is None
    # ConvNet's ReLU(inplace=True) follows each conv: the recorded outputs are still the pre-ReLU values
    convnet = build_model("convnet", 10)
    _, features = ConvOutputRecorder(convnet).record(convnet, images)
    assert len(features) == 4 and (features[0] < 0).any()


def test_head_step_changes_no_base_parameter():
    torch.manual_seed(0)
    bases = [build_model("resnet20", 10) for _ in range(2)]
    head = torch.nn.Linear(20, 10)
    before = [{k: v.clone() for k, v in base.state_dict().items()} for base in bases]
    head_before = head.weight.detach().clone()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    F.cross_entropy(head(frozen_base_logits(bases, images)), labels).backward()
    optimizer.step()
    for base, state in zip(bases, before):  # weights and BN running statistics alike
        assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
        assert base.training and all(p.grad is None for p in base.parameters())
    assert not torch.equal(head.weight, head_before)


def mean_squared_feature_difference(networks, recorders, images):
    with torch.no_grad():
        features = [recorders[k].record(net, images)[1] for k, net in enumerate(networks)]
        return -all_pairs_feature_difference_loss(features).item()


def test_feature_difference_steps_move_the_features_apart():
    torch.manual_seed(0)
    networks = [build_model("resnet20", 10) for _ in range(2)]
    recorders = [ConvOutputRecorder(net) for net in networks]
    images = torch.randn(8, 3, 16, 16)  # small, for speed: the CIFAR ResNets end in global pooling
    # the script's FDL optimizer (momentum 0.85, Nesterov) with a large lr, so that 3 steps show
    # (1e-5 moves them 1e-5 as far)
    optimizer = torch.optim.SGD([p for net in networks for p in net.parameters()], lr=0.1, momentum=0.85, nesterov=True)
    differences = [mean_squared_feature_difference(networks, recorders, images)]
    for _ in range(3):
        optimizer.zero_grad()
        features = [recorders[k].record(net, images)[1] for k, net in enumerate(networks)]
        all_pairs_feature_difference_loss(features).backward()
        optimizer.step()
        differences.append(mean_squared_feature_difference(networks, recorders, images))
    assert differences == sorted(differences) and differences[-1] > 1.5 * differences[0]  # 3.24 -> 5.68 measured


# ---- the recipes ----
def test_authors_learning_rates():
    """bishshoy/FDL: VGG-16 x2 uses FDL lr 1e-5 and head lr 0.1 on CIFAR-10 as on CIFAR-100 (not 1e-4); x3 1e-4 on
    CIFAR-10 only; x4 1e-4 and 0.01; the CIFAR ResNets 1e-5 (CIFAR-100) or 1e-4 (CIFAR-10) and 0.01."""
    assert authors_lrs("vgg16", 2, 10) == authors_lrs("vgg16", 2, 100) == (1e-5, 0.1)
    assert authors_lrs("vgg16", 3, 10) == (1e-4, 0.1) and authors_lrs("vgg16", 3, 100) == (1e-5, 0.1)
    assert authors_lrs("vgg16", 4, 10) == authors_lrs("vgg16", 4, 100) == (1e-4, 0.01)
    for n in (2, 3, 4):
        assert authors_lrs("resnet20", n, 10) == (1e-4, 0.01) and authors_lrs("resnet56", n, 100) == (1e-5, 0.01)


def test_defaults_are_the_authors_vgg16_cifar100_setting():
    args = parse_args([])
    assert (args.model, args.dataset, args.batch_size, args.lr, args.nesterov) == ("vgg16", "cifar100", 128, 0.1, True)
    assert (args.momentum, args.weight_decay, args.num_nets, args.pretrain_epochs) == (0.9, 5e-4, 2, 1)
    assert args.fdl_lr is None and args.head_lr is None  # resolved by authors_lrs once the class count is known
    assert parse_args(["--num-nets", "4"]).pretrain_epochs == 2  # authors' vgg_net_expt_x4.py
    assert parse_args(["--num-nets", "4", "--model", "resnet20"]).pretrain_epochs == 1


def test_every_sub_step_forwards_all_networks_and_the_lrs_follow_the_authors(cifar10_sample, tmp_path):
    """With 3 networks the similarity sub-step forwards all of them (authors' code), so every BatchNorm counts
    each joint batch 3 times (CE, similarity, FDL; the head runs the bases in eval mode) and each pretrain batch
    once. The FDL and head lrs default to the authors' values for a CIFAR ResNet on 10 classes."""
    out = tmp_path / "run"
    result = run_script("fdl.py", *TINY_RUN, "--model", "resnet20", "--subset", "32", "--batch-size", "16",
                        "--epochs", "2", "--pretrain-epochs", "1", "--num-nets", "3", "--dataset", cifar10_sample,
                        "--out-dir", out)
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    steps_per_epoch = checkpoint["schedulers"]["main"]["last_epoch"] // 2
    for name in ("base1", "base2", "base3"):
        counts = {v.item() for k, v in checkpoint["networks"][name].items() if k.endswith("num_batches_tracked")}
        assert counts == {steps_per_epoch * (1 + 3)}, (name, counts)
    assert checkpoint["optimizers"]["fdl"]["param_groups"][0]["lr"] == 1e-4
    assert checkpoint["optimizers"]["head"]["param_groups"][0]["lr"] == 0.01
    assert (checkpoint["args"]["fdl_lr"], checkpoint["args"]["head_lr"]) == (1e-4, 0.01)


# ---- the script end to end ----
# One uninterrupted run, shared by the output and the resume tests (each run pays torch's import):
# 3 networks (a random similarity pair per step), 2 pretrain epochs, then one epoch of all four sub-steps.
FDL_RUN = [*TINY_RUN, "--subset", "128", "--epochs", "3", "--pretrain-epochs", "2", "--num-nets", "3"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    from conftest import CIFAR10_SAMPLE
    require_cifar10_sample()
    out = tmp_path_factory.mktemp("fdl") / "straight"
    result = run_script("fdl.py", *FDL_RUN, "--dataset", CIFAR10_SAMPLE, "--out-dir", out, isolated=True)
    assert result.returncode == 0, result.stderr
    return out, result


def test_script_writes_checkpoint_and_summary(straight_run):
    out, result = straight_run
    assert "lr_scheduler.step()" not in result.stderr  # no schedule steps an optimizer before its first step
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["deployed"] == "head"
    assert set(checkpoint["networks"]) == {"base1", "base2", "base3"}
    assert checkpoint["extra"]["head"]["weight"].shape == (10, 30)
    assert set(checkpoint["optimizers"]) == {"main", "similarity", "fdl", "head"}
    summary = read_summary(out)
    assert summary["deployed"] == summary["networks"]["head"]
    assert set(summary["networks"]) == {"head", "base1", "base2", "base3"}
    assert 0 <= summary["ensemble"]["top1"] <= 1
    records = [json.loads(line)["losses"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    terms = {"ce_base1", "ce_base2", "ce_base3", "similarity", "fdl", "feature_diff", "head_ce"}
    assert all(set(losses) == terms for losses in records)
    # the pretrain epochs run the CE sub-step only; then every sub-step runs
    assert [losses["head_ce"] > 0 for losses in records] == [False, False, True]
    assert [losses["fdl"] < 0 for losses in records] == [False, False, True] and records[-1]["similarity"] > 0


def test_resumed_run_equals_uninterrupted_run_across_the_pretrain_phase(straight_run, cifar10_sample, tmp_path):
    """Stopped during the pretrain phase (after epoch 1 of 2), then right after it (epoch 2), then run to the end."""
    split = tmp_path / "split"
    first = run_script("fdl.py", *FDL_RUN, "--dataset", cifar10_sample, "--out-dir", split, "--stop-after", "1")
    assert first.returncode == 0 and not (split / "summary.json").exists()
    second = run_script("fdl.py", "--resume", split, "--stop-after", "2")
    assert second.returncode == 0 and not (split / "summary.json").exists(), second.stderr
    last = run_script("fdl.py", "--resume", split)
    assert last.returncode == 0, last.stderr
    a, b = read_summary(straight_run[0]), read_summary(split)
    assert a["networks"] == b["networks"] and a["ensemble"] == b["ensemble"]
    assert len((split / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("args,message", [
    (["--num-nets", "1"], "--num-nets"),
    (["--num-nets", "5"], "--num-nets"),
    (["--epochs", "1", "--pretrain-epochs", "1"], "--pretrain-epochs"),  # no joint phase would remain to train the head
    (["--fdl-lr", "0"], "--fdl-lr"),
    (["--model", "msdnet5"], "msdnet5"),
])
def test_bad_input_gives_one_line_error(args, message, capsys):
    assert message in parse_error(parse_args, args, capsys)


def test_bad_input_from_the_command_line(cifar10_sample):
    result = run_script("fdl.py", *TINY_RUN, "--dataset", cifar10_sample, "--num-nets", "1")
    assert result.returncode != 0 and result.stderr.startswith("fdl.py: error: --num-nets must be 2, 3 or 4")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
