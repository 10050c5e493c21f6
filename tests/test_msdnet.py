"""MSDNet (Huang et al., ICLR 2018): exact parameter counts of the authors' release, the
list-of-exits forward, and the per-exit MAC counts checked against an independent counter."""
import pytest
import torch
import torch.nn as nn

from models import MSDNET_CONFIGS, build_msdnet

# name -> (num_classes, image_size, parameters in the authors' PyTorch code)
EXPECTED = {
    "msdnet5": (100, 32, 1_951_040),
    "msdnet7": (100, 32, 3_067_960),
    "msdnet10": (100, 32, 4_955_644),
    "msdnet5_lingrow": (100, 32, 2_078_924),
    "msdnet_imagenet": (1000, 224, 23_958_440),
}


def build(name):
    num_classes, image_size, _ = EXPECTED[name]
    return build_msdnet(name, num_classes, image_size)


def count_macs_with_hooks(model, image_size):
    """Independent MAC count: forward hooks on every Conv2d and Linear, the running total
    read off after each exit's linear layer."""
    total, per_exit, handles = [0], [], []

    def conv_hook(module, inputs, output):
        kh, kw = module.kernel_size
        total[0] += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module, inputs, output):
        total[0] += output.numel() * module.in_features
        per_exit.append(total[0])

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for handle in handles:
        handle.remove()
    return per_exit


def test_every_config_is_tested():
    assert set(MSDNET_CONFIGS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_count_matches_reference(name):
    model = build(name)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[name][2]
    assert len(model.stages) == len(model.classifiers) == MSDNET_CONFIGS[name]["n_blocks"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_backward_gives_one_logits_per_exit(name):
    num_classes, image_size, _ = EXPECTED[name]
    model = build(name)
    logits = model(torch.randn(2, 3, image_size, image_size))
    assert len(logits) == MSDNET_CONFIGS[name]["n_blocks"]
    assert all(out.shape == (2, num_classes) for out in logits)
    sum(out.square().mean() for out in logits).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_return_features_gives_coarsest_scale_of_each_block():
    model = build("msdnet5")
    x = torch.randn(2, 3, 32, 32)
    logits, features = model(x, return_features=True)
    assert len(features) == len(logits) == 5
    # the coarsest of the three scales is 8x8 at 32x32 input
    assert all(f.shape[0] == 2 and f.shape[-2:] == (8, 8) for f in features)
    model.eval()
    with torch.no_grad():
        plain = model(x)
        again, _ = model(x, return_features=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, again))


@torch.no_grad()
def test_exit_logits_are_fp32_under_bf16_autocast():
    """Every exit's classifier layer runs in fp32 under autocast, as every backbone's head (models.FP32Linear)."""
    torch.manual_seed(0)
    model = build("msdnet5").eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, features = model(torch.randn(2, 3, 32, 32), return_features=True)
        hidden = [classifier.features(f) for classifier, f in zip(model.classifiers, features)]
    assert all(h.dtype == torch.bfloat16 for h in hidden)
    assert all(out.dtype == torch.float32 for out in logits)
    for out, classifier, h in zip(logits, model.classifiers, hidden):
        assert torch.equal(out, classifier.linear(h.float()))


def test_cifar_config_runs_at_64():
    model = build_msdnet("msdnet5", 10, 64)
    logits = model(torch.randn(2, 3, 64, 64))
    assert [out.shape for out in logits] == [(2, 10)] * 5


@pytest.mark.parametrize("name", ["msdnet5", "msdnet5_lingrow"])
def test_exit_macs_cumulative_and_equal_to_hook_count(name):
    model = build(name)
    macs = model.exit_macs
    assert len(macs) == MSDNET_CONFIGS[name]["n_blocks"]
    assert all(a < b for a, b in zip(macs, macs[1:]))
    assert macs == count_macs_with_hooks(model, EXPECTED[name][1])


def test_exit_macs_of_first_exit_by_hand():
    """msdnet5_lingrow, exit 1 (block 1 = stem + one layer) at 32x32, counted by hand:
    scale widths 16/32/64 at 32x32, 16x16, 8x8; growth 6 x (1, 2, 4)."""
    stem = 3 * 16 * 9 * 32 * 32 + 16 * 32 * 9 * 16 * 16 + 32 * 64 * 9 * 8 * 8
    # layer 1, scale 0: 1x1 bottleneck 16->min(16, 1*6)=6, 3x3 6->6 (no finer scale)
    scale0 = (16 * 6 + 6 * 6 * 9) * 32 * 32
    # scale 1: from scale 0 (1x1 16->min(16, 1*6)=6, 3x3 stride 2 6->6) + from scale 1
    # (1x1 32->min(32, 2*6)=12, 3x3 12->6), at 16x16 output
    scale1 = 16 * 6 * 32 * 32 + (6 * 6 * 9 + 32 * 12 + 12 * 6 * 9) * 16 * 16
    # scale 2: from scale 1 (1x1 32->min(32, 2*12)=24 at 16x16, 3x3 stride 2 24->12) + from
    # scale 2 (1x1 64->min(64, 4*12)=48, 3x3 48->12), at 8x8 output
    scale2 = 32 * 24 * 16 * 16 + (24 * 12 * 9 + 64 * 48 + 48 * 12 * 9) * 8 * 8
    # classifier on the 88-channel 8x8 scale: 3x3 s2 -> 128 at 4x4, 3x3 s2 -> 128 at 2x2, linear
    classifier = 88 * 128 * 9 * 4 * 4 + 128 * 128 * 9 * 2 * 2 + 128 * 100
    assert build("msdnet5_lingrow").exit_macs[0] == stem + scale0 + scale1 + scale2 + classifier


def test_measuring_exit_macs_keeps_mode_and_batchnorm_statistics():
    model = build("msdnet5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.exit_macs
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
