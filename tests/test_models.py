"""Backbones: every name builds, has its published size, and is stem -> stages -> head as models.py says."""
import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.resnet import Bottleneck

import models
from models import MODEL_NAMES, build_model

torch.set_num_threads(2)
NATURAL_SIZE = {"vit_s16": 224}  # every other backbone runs at 32x32 (MNIST ones: data.py's 32-px MNIST)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def on_meta(name, num_classes, image_size=32):
    """The model with shape-only tensors: counting parameters needs no memory and no init."""
    with torch.device("meta"):
        return build_model(name, num_classes, image_size)


def channels(feature):
    return feature.shape[1] if feature.dim() == 4 else feature.shape[-1]  # ViT: [B, tokens, width]


# MSDNet returns one logits tensor per exit: tests/test_msdnet.py covers it; of the one-layer MNIST
# ConvNets (one builder, ten widths) the authors' width 256 stands for all
STAGED_NAMES = [name for name in MODEL_NAMES if not name.startswith(("msdnet", "mnist_onelayer"))]
STAGED_NAMES.append("mnist_onelayer_m256")


@pytest.fixture(scope="module", params=STAGED_NAMES)
def model_and_input(request):
    """Each backbone once (100 classes, its natural input size), shared by the tests below."""
    torch.manual_seed(0)
    size = NATURAL_SIZE.get(request.param, 32)
    return build_model(request.param, 100, size), torch.randn(2, 3, size, size)


# ---------------------------------------------------------------- the Backbone contract
def test_trains_forward_and_backward(model_and_input):
    model, x = model_and_input
    model.train()
    logits = model(x)
    assert logits.shape == (2, 100)
    logits.logsumexp(1).mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reaches {missing[:5]}"
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_stage_features_are_stem_stages_head_by_hand(model_and_input):
    model, x = model_and_input
    model.eval()
    x = x[:1]
    logits, features = model(x, return_features=True)
    assert len(features) == len(model.stages) == len(model.stage_channels)
    assert [channels(f) for f in features] == model.stage_channels
    assert torch.equal(logits, model(x))
    h = model.stem(x)
    for stage, feature in zip(model.stages, features):
        h = stage(h)
        assert torch.equal(h, feature)
    penultimate = model.head.pool(h)
    assert penultimate.shape == (1, model.feature_dim)
    assert isinstance(model.head.fc, models.FP32Linear) and model.head.fc.in_features == model.feature_dim
    assert torch.equal(model.head.fc(penultimate), logits)


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("mobilenetv2", 32), ("vit_s16", 32), ("mnist_2d", 28)])
@torch.no_grad()
def test_logits_are_fp32_under_bf16_autocast(name, size):
    """The classifier layer runs in fp32 under autocast (torchvision-built heads included): the logits
    are the fp32 head's on the same (bf16) penultimate features, not bf16-rounded."""
    torch.manual_seed(0)
    model = build_model(name, 10, size).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, features = model(torch.randn(2, 3 if size == 32 else 1, size, size), return_features=True)
        penultimate = model.head.pool(features[-1])
        plain_linear = nn.functional.linear(penultimate, model.head.fc.weight, model.head.fc.bias)
    assert plain_linear.dtype == torch.bfloat16  # what an nn.Linear head gives under autocast
    assert logits.dtype == torch.float32
    assert torch.equal(logits, model.head.fc(penultimate.float()))


def test_fp32_linear_holds_the_linear_it_replaces():
    linear = nn.Linear(4, 3)
    fp32 = models.FP32Linear.like(linear)
    assert fp32.weight is linear.weight and fp32.bias is linear.bias and models.FP32Linear.like(fp32) is fp32
    x = torch.randn(2, 4)
    assert torch.equal(fp32(x), linear(x))


def test_unknown_name_lists_the_accepted_ones():
    with pytest.raises(ValueError) as error:
        build_model("resnet19", 10)
    message = str(error.value)
    assert "'resnet19'" in message and "\n" not in message
    assert all(name in message for name in MODEL_NAMES)


# ---------------------------------------------------------------- sizes
EXACT_PARAMS = [  # (name, classes, image size, count, source)
    ("convnet", 10, 32, 76_522, "TNA Table 10"),
    ("resnet20", 100, 32, 278_324, "RepDistiller resnet20; AMLN Table 1: 0.28M"),
    ("resnet32", 100, 32, 472_756, "RepDistiller resnet32; AMLN Table 1: 0.48M"),
    ("resnet56", 100, 32, 861_620, "RepDistiller resnet56; AMLN Table 1: 0.86M"),
    ("resnet110", 100, 32, 1_736_564, "RepDistiller resnet110; AMLN Table 1: 1.74M"),
    ("resnet110_bottleneck", 100, 32, 1_170_868, "ONE/OKDDip/CSS code"),
    ("wide_resnet20_8", 100, 32, 6_871_220, "CSS code: ResNet(Bottleneck, [2, 2, 2], width_per_group=512)"),
    ("resnet18", 100, 32, 11_220_132, "torchvision's, CIFAR stem (3x3 conv, no max-pool)"),
    ("wrn_16_2", 100, 32, 703_284, "RepDistiller wrn_16_2; AMLN Table 1: 0.72M"),
    ("wrn_40_1", 100, 32, 569_780, "RepDistiller wrn_40_1; AMLN Table 1: 0.57M"),
    ("wrn_40_2", 100, 32, 2_255_156, "RepDistiller wrn_40_2; AMLN Table 1: 2.27M"),
    ("mobilenetv2", 100, 32, 2_351_972, "torchvision's, 100 classes"),
    ("vgg13", 100, 32, 9_462_180, "RepDistiller vgg13 (vgg13_bn)"),
    ("se_resnet110", 100, 32, 1_750_802, "osmr/imgclsmob seresnet110_cifar100"),
    ("pyramidnet110_a84", 100, 32, 3_913_536, "osmr/imgclsmob pyramidnet110_a84_cifar100; Han et al. 2017: 3.8M"),
    ("vit_s16", 1000, 224, 22_050_664, "torchvision ViT-S/16 dimensions, 1000 classes"),
    # at 224 the ImageNet networks are torchvision's own (torchvision's model docs)
    ("resnet18", 1000, 224, 11_689_512, "torchvision resnet18"),
    ("resnet34", 1000, 224, 21_797_672, "torchvision resnet34"),
    ("resnet50", 1000, 224, 25_557_032, "torchvision resnet50"),
    ("mobilenetv2", 1000, 224, 3_504_872, "torchvision mobilenet_v2"),
    ("densenet121", 1000, 224, 7_978_856, "torchvision densenet121"),
]


@pytest.mark.parametrize("name,classes,size,expected,source", EXACT_PARAMS)
def test_parameter_count_is_the_published_one(name, classes, size, expected, source):
    assert num_params(on_meta(name, classes, size)) == expected, source


APPROX_PARAMS = [  # (name, classes, image size, published figure, source); within 3%
    ("mobilenet", 1000, 224, 4.2e6, "Howard et al. 2017, Table 8: 1.0 MobileNet-224"),
    ("densenet121", 100, 32, 7.0e6, "torchvision's minus the 7x7 stem and 900 classes"),
    ("resnext29_2x64d", 100, 32, 9.2e6, "ResNeXt-29 2x64d as in the OKDDip/PCL/CSS tables"),
    ("wrn_28_10", 100, 32, 36.5e6, "Zagoruyko & Komodakis 2016: WRN-28-10 36.5M"),
]


@pytest.mark.parametrize("name,classes,size,figure,source", APPROX_PARAMS)
def test_parameter_count_is_near_the_published_one(name, classes, size, figure, source):
    assert num_params(on_meta(name, classes, size)) == pytest.approx(figure, rel=0.03), source


def test_resnext_builder_reproduces_the_papers_8x64d():
    """Xie et al. 2017, section 5.3: ResNeXt-29 8x64d has 34.4M parameters (CIFAR-10)."""
    with torch.device("meta"):
        resnext = models._cifar_resnet(Bottleneck, 3, 10, 32, widths=(64, 128, 256), stem_width=64,
                                       groups=8, base_width=64)
    assert num_params(resnext) == pytest.approx(34.4e6, rel=0.01)


@pytest.mark.parametrize("vgg,torchvision_count", [("vgg13", 133_053_736), ("vgg16", 138_365_992),
                                                   ("vgg19", 143_678_248)])
def test_vgg_convs_are_torchvisions_vgg_bn(vgg, torchvision_count):
    """torchvision's vggXX_bn count minus its 3-layer classifier, plus one 512 -> 100 linear."""
    classifier = (512 * 7 * 7 + 1) * 4096 + (4096 + 1) * 4096 + (4096 + 1) * 1000
    assert num_params(on_meta(vgg, 100)) == torchvision_count - classifier + 513 * 100


@pytest.mark.parametrize("vgg", ["vgg13", "vgg16", "vgg19"])
@torch.no_grad()
def test_vgg_stage_resolutions_are_repdistillers(vgg):
    """RepDistiller's vgg.py applies its fourth max-pool only to 64-px inputs: at 32 px the last two
    stages both run at 4x4. Same parameters, under the same names, at both sizes."""
    sides, names = {}, {}
    for size in (32, 64):
        model = build_model(vgg, 100, size).eval()
        _, features = model(torch.zeros(1, 3, size, size), return_features=True)
        assert [f.shape[1] for f in features] == [64, 128, 256, 512, 512]
        sides[size], names[size] = [f.shape[-1] for f in features], list(model.state_dict())
    assert sides == {32: [32, 16, 8, 4, 4], 64: [64, 32, 16, 8, 4]}
    assert names[32] == names[64]


@torch.no_grad()
def test_css_wide_resnet20_8_layout_is_the_css_authors():
    """The CSS authors' ResNet: 3x3 stem to 16, bottleneck stages of planes 16, 32, 64 (outputs x4)
    with 3x3 convs 8x as wide, at 32, 16, 8 px; css.py branches the last stage."""
    import css

    model = build_model("wide_resnet20_8", 100).eval()
    _, features = model(torch.zeros(1, 3, 32, 32), return_features=True)
    assert [tuple(f.shape[1:]) for f in features] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert model.stem[0].out_channels == 16
    assert [block.conv2.out_channels for stage in model.stages for block in stage] == [128] * 2 + [256] * 2 + [512] * 2
    css.check_branchable(model, True, 32)


# ---------------------------------------------------------------- MNIST networks
def fdl_onelayer_params(m):
    """The FDL authors' Net(m): Conv2d(1, m, 3) with bias, BN(m), Conv1d(49m, 10, 1) with bias."""
    return (9 * m + m) + 2 * m + (49 * m * 10 + 10)


def conv_bn_params(c_in, c_out):
    return c_in * c_out * 9 + c_out + 2 * c_out  # 3x3 conv with bias, BN scale and shift


SILA_FIG6_PARAMS = (conv_bn_params(1, 64) + 3 * conv_bn_params(64, 64)
                    + conv_bn_params(64, 128) + 2 * conv_bn_params(128, 128)
                    + conv_bn_params(128, 256) + 2 * conv_bn_params(256, 256)
                    + (256 * 4 * 4 * 2 + 2) + (2 * 10 + 10))  # 4x4x256 -> 2 -> 10


@pytest.mark.parametrize("name,expected", [(f"mnist_onelayer_m{m}", fdl_onelayer_params(m)) for m in (1, 16, 256, 512)]
                         + [("mnist_2d", SILA_FIG6_PARAMS)])
@torch.no_grad()
def test_mnist_networks_have_the_published_layers(name, expected):
    """1x28x28 digits: every stage's output shape and the parameter count of the authors' layers."""
    model = build_model(name, 10, 28).eval()
    assert num_params(model) == expected == num_params(on_meta(name, 10, 32))
    logits, features = model(torch.randn(2, 1, 28, 28), return_features=True)
    assert logits.shape == (2, 10)
    if name == "mnist_2d":
        assert [tuple(f.shape[1:]) for f in features] == [(64, 14, 14), (128, 7, 7), (256, 4, 4)]
        assert model.feature_dim == 2 and model.head.pool(features[-1]).shape == (2, 2)
    else:
        width = int(name.rsplit("m", 1)[1])
        assert [tuple(f.shape[1:]) for f in features] == [(width, 7, 7)]


@pytest.mark.parametrize("name", ["mnist_onelayer_m8", "mnist_2d"])
@torch.no_grad()
def test_mnist_networks_read_the_digit_back_from_datas_mnist_layout(name):
    """data.py's MNIST: the 28x28 digit padded by 2 px and repeated to 3 channels, at image_size 32."""
    model = build_model(name, 10, 32).eval()
    digits = torch.randn(2, 1, 28, 28)
    as_data_gives_it = torch.nn.functional.pad(digits, (2, 2, 2, 2)).expand(-1, 3, -1, -1)
    torch.testing.assert_close(model(as_data_gives_it), model(digits), rtol=0, atol=0)


def test_mnist_networks_refuse_other_sizes():
    with pytest.raises(ValueError, match="28-px digits"):
        build_model("mnist_2d", 10, 64)


def conv_params(model):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("width", [2, 4])
def test_wide_resnet18_has_width_squared_conv_parameters(width):
    """TNA Table 4: every filter count times `width`, so conv parameters times width**2 (the RGB stem only x width)."""
    ratio = conv_params(on_meta(f"resnet18_w{width}", 100)) / conv_params(on_meta("resnet18", 100))
    assert ratio == pytest.approx(width ** 2, rel=0.001)


# ---------------------------------------------------------------- image sizes
@pytest.mark.parametrize("name", ["convnet", "resnet20", "resnet18", "wrn_16_2", "vgg13", "mobilenet",
                                  "mobilenetv2", "vit_s16"])
@torch.no_grad()
def test_runs_on_tinyimagenet_size(name):
    model = build_model(name, 200, image_size=64).eval()
    logits, features = model(torch.randn(1, 3, 64, 64), return_features=True)
    assert logits.shape == (1, 200)
    assert [channels(f) for f in features] == model.stage_channels


@torch.no_grad()
def test_small_image_stem_keeps_full_resolution():
    """TNA appendix A.2: ResNet-18's 3x3 stride-1 stem without max-pool keeps 32x32; ImageNet's gives 56x56 at 224."""
    _, small = build_model("resnet18", 10, 32).eval()(torch.randn(1, 3, 32, 32), return_features=True)
    _, large = build_model("resnet18", 10, 224).eval()(torch.randn(1, 3, 224, 224), return_features=True)
    assert small[0].shape[-1] == 32 and large[0].shape[-1] == 56


TORCHVISION_AT_224 = {
    "resnet18": lambda: tvm.resnet18(num_classes=1000),
    "mobilenetv2": lambda: tvm.mobilenet_v2(num_classes=1000),
    "densenet121": lambda: tvm.densenet121(num_classes=1000),
    "vit_s16": lambda: tvm.VisionTransformer(224, 16, 12, 6, 384, 1536, num_classes=1000),
}


@pytest.mark.parametrize("name", TORCHVISION_AT_224)
@torch.no_grad()
def test_at_224_the_backbone_computes_torchvisions_network(name):
    torch.manual_seed(0)
    reference = TORCHVISION_AT_224[name]().eval()
    torch.manual_seed(0)
    model = build_model(name, 1000, image_size=224).eval()
    reference_fc = [m for m in reference.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.normal_(reference_fc.weight, std=0.01)  # torchvision's ViT head starts at zero: make logits informative
    model.head.fc.weight.copy_(reference_fc.weight)
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(model(x), reference(x))
