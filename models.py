"""Backbones for the online-distillation scripts: `build_model(name, num_classes, image_size=32)`.

Every network is a `Backbone`, `stem` -> `stages` -> `head`, so a method reads intermediate
features and splits a network into shared and branched parts without hooks:

- `model(x)` gives logits [B, num_classes]; `model(x, return_features=True)` gives
  `(logits, [output of each stage])`.
- `model.stem`: the input layers (nn.Identity for the ConvNet); `model.stages`: an nn.ModuleList;
  `model.head`: a `Head`, last stage's output -> logits.
- `model.head.pool` maps the last stage's output to the penultimate features [B, feature_dim]
  (global average pooling and flatten; ConvNet: flatten; ViT: final LayerNorm and class token;
  mnist_2d: flatten and its 2-wide linear layer, the features SiLa's Fig. 6 plots);
  `model.head.fc` is the final linear layer, an `FP32Linear`: the logits are fp32 under autocast
  (MSDNet's exits too). So `model.head(x) == model.head.fc(model.head.pool(x))`.
- `model.stage_channels[i]`: channels of stage i's output; `model.feature_dim`: input width of
  `model.head.fc`. ViT stage outputs are token sequences [B, tokens, width]; their "channels" is
  the width.
- Stages are a network's resolution levels: the residual groups of the ResNets and WRNs, the dense
  blocks (with their transitions) of DenseNet, the conv groups of VGG (at 32 px the last two both
  run at 4x4, as RepDistiller's), the blocks from one stride-2 block to the next of the MobileNets.
  Pre-activation networks (WRN, PyramidNet, DenseNet) end their last stage with the final BN + ReLU,
  so every network's last stage output is activated, as in the post-activation ResNets.
- image_size <= 64 selects the small-image (CIFAR, TinyImageNet) stems of the ImageNet networks;
  the CIFAR networks end in global pooling and run at any size.
- The MNIST networks (mnist_onelayer_mM, mnist_2d) take 1x28x28 digits, or data.py's MNIST (padded
  to 32 px, 3 equal channels), from which their stem reads the 1x28x28 digit back (`Digits`).

MSDNet (Huang et al., ICLR 2018) is the exception: its `forward(x)` returns a list of logits. New
backbones are one entry in `_BUILDERS`: a callable `(num_classes, image_size) -> nn.Module`.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3
from torchvision.ops import SqueezeExcitation


# ---------------------------------------------------------------- the common interface
class FP32Linear(nn.Linear):
    """The classifier layer, computed in fp32 even under autocast: bf16 logits are rounded to about 0.4% of
    their size, as large as the differences between networks' logits late in training that the methods'
    terms between networks (TNA's matching term, the KLs) are made of. Cheap: one small matmul per network.
    Without autocast it computes in its weight's dtype, as nn.Linear."""

    def forward(self, x):
        if not torch.amp.is_autocast_available(x.device.type):  # e.g. the meta device
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))

    @classmethod
    def like(cls, linear):
        """`linear` as an FP32Linear holding the same parameters (built on the meta device: no init, no RNG)."""
        if isinstance(linear, cls):
            return linear
        fp32 = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        fp32.weight, fp32.bias = linear.weight, linear.bias
        return fp32


class Head(nn.Module):
    """Last stage's output -> logits: `pool` gives the penultimate features, `fc` (an FP32Linear: fp32
    logits under autocast, for every backbone) the logits."""

    def __init__(self, pool, fc):
        super().__init__()
        self.pool, self.fc = pool, FP32Linear.like(fc)

    def forward(self, x):
        return self.fc(self.pool(x))


class Backbone(nn.Module):
    """stem -> stages -> head; see the module docstring for the contract."""

    def __init__(self, stem, stages, head):
        super().__init__()
        self.stem, self.stages, self.head = stem, nn.ModuleList(stages), head
        self.stage_channels = [_out_channels(stage) for stage in self.stages]
        self.feature_dim = head.fc.in_features

    def forward(self, x, return_features=False):
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        logits = self.head(x)
        return (logits, features) if return_features else logits


def _out_channels(stage):
    """Channels of a stage's output: those of its last conv, norm or linear layer (tests check it)."""
    layers = [m for m in stage.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    return layers[-1].weight.shape[0]


# ---------------------------------------------------------------- shared pieces
def _global_pool():
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _pooled_head(channels, num_classes):
    return Head(_global_pool(), nn.Linear(channels, num_classes))


def _conv_bn_relu(in_channels, out_channels, kernel_size=3, stride=1, groups=1, bias=False):
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _kaiming_init(module):
    """He et al. (2015) normal init of every conv (fan_out, as torchvision's ResNet and the zoo); BN = identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def _residual_stage(block, in_channels, planes, num_blocks, stride, **block_kwargs):
    """`num_blocks` torchvision-style residual blocks; the first strides and, when the shape changes,
    has the projection shortcut 1x1 conv + BN (He et al. 2016, option B)."""
    out_channels = planes * block.expansion
    shortcut = None
    if stride != 1 or in_channels != out_channels:
        shortcut = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
    blocks = [block(in_channels, planes, stride, shortcut, **block_kwargs)]
    blocks += [block(out_channels, planes, **block_kwargs) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _plain_stage(block, in_channels, widths, stride):
    """One `block(in, out, stride)` per entry of `widths`; only the first strides."""
    blocks = []
    for i, width in enumerate(widths):
        blocks.append(block(in_channels, width, stride if i == 0 else 1))
        in_channels = width
    return nn.Sequential(*blocks)


def _end_with_bn_relu(stage, channels):
    """A pre-activation network's final BN + ReLU, appended to its last stage (choice: the head could
    hold them; here the last stage output is activated like a post-activation ResNet's)."""
    stage.extend([nn.BatchNorm2d(channels), nn.ReLU(inplace=True)])


# ---------------------------------------------------------------- blocks torchvision lacks
class SEBasicBlock(BasicBlock):
    """torchvision's BasicBlock with squeeze-and-excitation on the residual branch before the sum
    (Hu et al. 2018, Fig. 3), reduction 16."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, reduction=16):
        super().__init__(inplanes, planes, stride, downsample)
        self.se = SqueezeExcitation(planes, planes // reduction)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.se(out) + shortcut)


class WideBasicBlock(nn.Module):
    """Pre-activation block of a Wide ResNet (Zagoruyko & Komodakis 2016), no dropout; when the
    shape changes a 1x1 conv shortcut reads the activated input, as RepDistiller's wrn.py."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(in_channels), conv3x3(in_channels, out_channels, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(out_channels), conv3x3(out_channels, out_channels)
        self.shortcut = None if in_channels == out_channels else conv1x1(in_channels, out_channels, stride)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class PyramidBlock(nn.Module):
    """PyramidNet basic block (Han et al. 2017, Fig. 6d): BN-conv-BN-ReLU-conv-BN; the shortcut
    average-pools when strided and pads the new channels with zeros."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(in_channels), conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True), conv3x3(out_channels, out_channels), nn.BatchNorm2d(out_channels))
        self.shortcut = nn.AvgPool2d(2, ceil_mode=True) if stride > 1 else nn.Identity()
        self.new_channels = out_channels - in_channels

    def forward(self, x):
        return self.residual(x) + F.pad(self.shortcut(x), (0, 0, 0, 0, 0, self.new_channels))


class PatchEmbedding(nn.Module):
    """ViT input: 16x16 patches -> tokens, class token prepended, position embedding added; the
    same computation as torchvision's `VisionTransformer._process_input` and `Encoder`, on its modules."""

    def __init__(self, vit):
        super().__init__()
        self.conv_proj, self.class_token = vit.conv_proj, vit.class_token
        self.pos_embedding, self.dropout = vit.encoder.pos_embedding, vit.encoder.dropout

    def forward(self, x):
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)  # [B, patches, width]
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.dropout(tokens + self.pos_embedding)


class Digits(nn.Module):
    """The input of the MNIST networks: one channel, 28x28. data.py's MNIST is the digit padded by 2 px
    and repeated to 3 channels (so that every CIFAR network runs on it); this takes one channel and the
    central 28x28 back, so a script trains the published network (same layers, same parameters) on it.
    choice: a train translation of up to 2 px then cuts the outer 2 px of the 28x28 frame on one side,
    where MNIST's digits (size-normalised to 20x20 and centred) are almost always blank."""

    def forward(self, x):
        crop = (x.shape[-1] - 28) // 2
        return x[:, :1, crop:crop + 28, crop:crop + 28]


class ClassToken(nn.Module):
    """ViT's penultimate features: the class token of the final token sequence."""

    def forward(self, tokens):
        return tokens[:, 0]


# ---------------------------------------------------------------- builders: (..., num_classes, image_size)
def _convnet(num_classes, image_size):
    """TNA's ConvNet (appendix A.2, Table 10): unpadded 3x3 convs 16, 32, pool, 64, 64, pool,
    ReLU after each conv, linear on 64x5x5 = 1600 features. Stages end at the pools; the last is
    adaptive to 5x5 (TNA's TinyImageNet change; at 32x32 it is the 2x2 pool, 10x10 -> 5x5)."""
    def conv_relu(in_channels, out_channels):
        return [nn.Conv2d(in_channels, out_channels, 3), nn.ReLU(inplace=True)]

    stages = [nn.Sequential(*conv_relu(3, 16), *conv_relu(16, 32), nn.AvgPool2d(2)),
              nn.Sequential(*conv_relu(32, 64), *conv_relu(64, 64), nn.AdaptiveAvgPool2d(5))]
    return Backbone(nn.Identity(), stages, Head(nn.Flatten(), nn.Linear(64 * 5 * 5, num_classes)))


def _check_digit_size(image_size):
    if image_size not in (28, 32):
        raise ValueError(f"the MNIST networks take 28-px digits (or data.py's 32-px padded MNIST); got {image_size} px")


def _mnist_onelayer(width, num_classes, image_size):
    """The one-layer ConvNet of M = `width` filters of the FDL poster's MNIST experiment (Das & Dutta Roy,
    "Identical Neural Networks"; accuracy against M, one network of M filters against an FDL ensemble of
    two of M/2), as the authors' basic_mnist.py: 3x3 stride-2 conv (with bias) + BN + ReLU + 2x2 max-pool
    (28 -> 14 -> 7), then a linear layer on the flattened 7x7xM map (their Conv1d(49M, 10, 1) on it is
    this linear). One stage: the conv block."""
    _check_digit_size(image_size)
    stage = nn.Sequential(*_conv_bn_relu(1, width, stride=2, bias=True), nn.MaxPool2d(2))
    return _kaiming_init(Backbone(Digits(), [stage], Head(nn.Flatten(), nn.Linear(width * 7 * 7, num_classes))))


def _mnist_2d(num_classes, image_size):
    """SiLa's Fig. 6 network (Gan, Liu, Chen & Zhang, "Siamese Labels Auxiliary Learning"): the "12-layer
    convolutional network" of Large-Margin Softmax (Liu et al., ICML 2016) whose features before the last
    linear layer are plotted, so that layer is 2 wide. Layers as the L-Softmax authors' released MNIST
    network: 3x3 conv 64; three stages of three 3x3 convs (64, 128, 256), each followed by a 2x2 max-pool
    rounded up as Caffe does (28 -> 14 -> 7 -> 4); linear 4096 -> 2 (the features), linear 2 -> classes:
    10 convs + 2 linear layers = 12. Every conv has a bias and is followed by BN + ReLU.
    choice: no BN or ReLU after the 2-wide layer (theirs, 512 wide, has both), so the plotted features
    may point anywhere in the plane instead of one quadrant. choice: the shared fan-out init (Caffe's
    "msra" filler is fan-in: the same for equal widths, sqrt(2) apart at the three widening convs)."""
    _check_digit_size(image_size)
    stages, channels = [], 64
    for width in (64, 128, 256):
        convs = [_conv_bn_relu(c, width, bias=True) for c in (channels, width, width)]
        stages.append(nn.Sequential(*convs, nn.MaxPool2d(2, ceil_mode=True)))
        channels = width
    stem = nn.Sequential(Digits(), *_conv_bn_relu(1, 64, bias=True))
    head = Head(nn.Sequential(nn.Flatten(), nn.Linear(256 * 4 * 4, 2)), nn.Linear(2, num_classes))
    return _kaiming_init(Backbone(stem, stages, head))


def _cifar_resnet(block, blocks_per_stage, num_classes, image_size, widths=(16, 32, 64), stem_width=16,
                  **block_kwargs):
    """CIFAR ResNet (He et al. 2016, section 4.2): 3x3 conv stem, three stages of torchvision blocks
    at full, 1/2 and 1/4 resolution, projection shortcuts (RepDistiller's resnet.py; with Bottleneck
    the ONE/OKDDip/CSS code's; with groups the ResNeXt CIFAR design, Xie et al. 2017)."""
    stages, channels = [], stem_width
    for i, planes in enumerate(widths):
        stages.append(_residual_stage(block, channels, planes, blocks_per_stage, 1 if i == 0 else 2, **block_kwargs))
        channels = planes * block.expansion
    return _kaiming_init(Backbone(_conv_bn_relu(3, stem_width), stages, _pooled_head(channels, num_classes)))


def _wrn(depth, widen_factor, num_classes, image_size):
    """WRN-depth-widen_factor (Zagoruyko & Komodakis 2016), no dropout, as RepDistiller's wrn.py."""
    stages, channels = [], 16
    for i, width in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor)):
        stages.append(_plain_stage(WideBasicBlock, channels, [width] * ((depth - 4) // 6), 1 if i == 0 else 2))
        channels = width
    _end_with_bn_relu(stages[-1], channels)
    return _kaiming_init(Backbone(conv3x3(3, 16), stages, _pooled_head(channels, num_classes)))


def _pyramidnet(depth, alpha, num_classes, image_size):
    """PyramidNet-depth with basic blocks (Han et al. 2017; the authors' PyramidNet-PyTorch): widths
    grow from 16 by alpha / (3n) per block, rounded; no ReLU after the stem (blocks start with BN)."""
    n = (depth - 2) // 6
    widths = [round(16 + alpha * (k + 1) / (3 * n)) for k in range(3 * n)]
    stages, channels = [], 16
    for i in range(3):
        stages.append(_plain_stage(PyramidBlock, channels, widths[i * n:(i + 1) * n], 1 if i == 0 else 2))
        channels = widths[(i + 1) * n - 1]
    _end_with_bn_relu(stages[-1], channels)
    stem = nn.Sequential(conv3x3(3, 16), nn.BatchNorm2d(16))
    return _kaiming_init(Backbone(stem, stages, _pooled_head(channels, num_classes)))


def _torchvision_resnet(arch, num_classes, image_size, width=1):
    """torchvision's resnet18/34/50 (He et al. 2016); `width` multiplies every layer's filters (TNA
    Table 4, "Wide ResNet-18"); image_size <= 64: 3x3 stride-1 stem conv, no max-pool (TNA A.2)."""
    net = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    if width > 1:
        _widen_resnet(net, width)
    if image_size <= 64:
        net.conv1, net.maxpool = _kaiming_init(conv3x3(3, net.bn1.num_features)), nn.Identity()
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    return Backbone(stem, stages, Head(nn.Sequential(net.avgpool, nn.Flatten()), net.fc))


def _widen_resnet(net, width):
    """Re-make every layer of a torchvision ResNet with `width` times its filters (torchvision fixes 64..512)."""
    channels = 64 * width
    net.conv1, net.bn1 = nn.Conv2d(3, channels, 7, 2, 3, bias=False), nn.BatchNorm2d(channels)
    for i in range(1, 5):
        layer = getattr(net, f"layer{i}")
        block, planes = type(layer[0]), 64 * 2 ** (i - 1) * width
        setattr(net, f"layer{i}", _residual_stage(block, channels, planes, len(layer), layer[0].stride))
        channels = planes * block.expansion
    net.fc = nn.Linear(channels, net.fc.out_features)
    _kaiming_init(net)


def _mobilenetv2(num_classes, image_size):
    """torchvision's MobileNetV2 (Sandler et al. 2018), width 1.0. image_size <= 64: the first conv and
    the first stride-2 block stride 1. Stages start at the ImageNet network's stride-2 blocks:
    features[1], [2:4], [4:7], [7:14], [14:] (the last ends with the 1x1 conv to 1280)."""
    net = tvm.mobilenet_v2(weights=None, num_classes=num_classes)
    if image_size <= 64:
        for layer in (net.features[0], net.features[2]):
            next(m for m in layer.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)).stride = (1, 1)
    bounds = (1, 2, 4, 7, 14, len(net.features))  # choice: by resolution, as torchvision's ImageNet layout
    stages = [net.features[start:end] for start, end in zip(bounds, bounds[1:])]
    dropout, fc = net.classifier
    return Backbone(net.features[0], stages, Head(nn.Sequential(*_global_pool(), dropout), fc))


def _mobilenet(num_classes, image_size):
    """MobileNet v1 (Howard et al. 2017, Table 1), width 1.0, depthwise-separable conv-BN-ReLU blocks;
    image_size <= 64: the first conv strides 1 (the CIFAR variant). Stages start at stride-2 blocks."""
    plan = [[(64, 1)], [(128, 2), (128, 1)], [(256, 2), (256, 1)], [(512, 2)] + [(512, 1)] * 5, [(1024, 2), (1024, 1)]]
    stages, channels = [], 32
    for stage_plan in plan:
        layers = []
        for out_channels, stride in stage_plan:
            layers += [_conv_bn_relu(channels, channels, stride=stride, groups=channels),
                       _conv_bn_relu(channels, out_channels, kernel_size=1)]
            channels = out_channels
        stages.append(nn.Sequential(*layers))
    stem = _conv_bn_relu(3, 32, stride=1 if image_size <= 64 else 2)
    return _kaiming_init(Backbone(stem, stages, _pooled_head(channels, num_classes)))


def _vgg(config, num_classes, image_size):
    """VGG with batch norm (Simonyan & Zisserman 2015) from torchvision's `make_layers`, in the CIFAR
    layout of RepDistiller's vgg.py: the fifth max-pool becomes global average pooling, then one
    linear layer. Stem: the first conv; each later stage starts at a max-pool. As RepDistiller, the
    fourth max-pool is applied only to 64-px inputs, so at 32 px the last two stages both run at 4x4
    (32, 16, 8, 4, 4; at 64 px: 64, 32, 16, 8, 4)."""
    layers = list(tvm.vgg.make_layers(tvm.vgg.cfgs[config][:-1], batch_norm=True))
    pools = [i for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
    starts = [3] + pools + [len(layers)]
    stages = [nn.Sequential(*layers[start:end]) for start, end in zip(starts, starts[1:])]
    if image_size < 64:
        # choice: RepDistiller pools here only at exactly 64 px; any size below keeps the 4x4 (and
        # every larger one pools, so that a 128-px input does not run the last stage at 8x8); an
        # Identity in the pool's place keeps the parameter names of both sizes the same
        stages[-1][0] = nn.Identity()
    return _kaiming_init(Backbone(nn.Sequential(*layers[:3]), stages, _pooled_head(512, num_classes)))


def _densenet121(num_classes, image_size):
    """torchvision's DenseNet-121 (Huang et al. 2017); image_size <= 64: 3x3 stride-1 stem conv, no
    max-pool. Stages: the dense blocks with their transitions; the last ends with norm5 and ReLU."""
    net = tvm.densenet121(weights=None, num_classes=num_classes)
    features = net.features
    if image_size <= 64:
        features.conv0, features.pool0 = _kaiming_init(conv3x3(3, 64)), nn.Identity()
    stem = nn.Sequential(features.conv0, features.norm0, features.relu0, features.pool0)
    stages = [nn.Sequential(features.get_submodule(f"denseblock{i}"), features.get_submodule(f"transition{i}"))
              for i in (1, 2, 3)]
    stages.append(nn.Sequential(features.denseblock4, features.norm5, nn.ReLU(inplace=True)))
    return Backbone(stem, stages, Head(_global_pool(), net.classifier))


def _vit_s16(num_classes, image_size):
    """ViT-S/16 (Dosovitskiy et al. 2021; DeiT-S dimensions) from torchvision's VisionTransformer.
    Stem: patch embedding + class token + position embedding; stages: the 12 encoder blocks in 4
    groups of 3; head: final LayerNorm, class token, linear (torchvision initialises it to zero)."""
    vit = tvm.VisionTransformer(image_size=image_size, patch_size=16, num_layers=12, num_heads=6,
                                hidden_dim=384, mlp_dim=1536, num_classes=num_classes)
    blocks = list(vit.encoder.layers)
    stages = [nn.Sequential(*blocks[i:i + 3]) for i in range(0, len(blocks), 3)]
    return Backbone(PatchEmbedding(vit), stages, Head(nn.Sequential(vit.encoder.ln, ClassToken()), vit.heads.head))


# ---------------------------------------------------------------- registry
# ---------------------------------------------------------------- MSDNet
# MSDNet: Multi-Scale Dense Networks for resource-efficient image classification.
#
# Huang, Chen, Li, Wu, van der Maaten, Weinberger, "Multi-Scale Dense Networks for Resource
# Efficient Image Classification", ICLR 2018. The layout (first layer, 'max' scale pruning,
# transition layers, exit classifiers) follows the authors' PyTorch release, so the parameter
# counts equal theirs; the SiLa paper (Dynamic SiLa) trains this network with its C exits.
#
# Structure, in the shape of the other backbones:
#   - `stages`: one `nn.Sequential` per block. Block 1 starts with the stem (`MSDStem`, the
#     "first layer" that makes the coarser scales); every module of a block maps a list of
#     per-scale tensors (finest first) to a list of per-scale tensors.
#   - `classifiers`: one exit per block, reading the coarsest scale of that block's output.
#   - `forward(x)` returns a list with one logits tensor per exit; `forward(x,
#     return_features=True)` returns `(logits_list, features)` where `features[k]` is the
#     coarsest-scale tensor of block k's output (the input of exit k's classifier).
#   - `exit_macs[k]`: multiply-accumulates (conv and linear layers) for one image at the
#     model's input size to reach exit k, cumulative: all blocks up to k and the classifiers
#     of exits 1..k, since an anytime/budgeted evaluation evaluates every earlier exit on the
#     way. Measured with FlopCounterMode on first access, not typed in.
# Shared by the CIFAR configurations (authors' defaults for CIFAR).
_MSDNET_CIFAR = dict(
    stem="cifar", stem_channels=16, growth_rate=6, growth_factors=(1, 2, 4),
    bottleneck=True, bottleneck_factors=(1, 2, 4), prune="max", reduction=0.5,
    classifier_channels=128,
)

MSDNET_CONFIGS = {
    # Anytime-prediction CIFAR networks: a block of `base` layers, then `step` layers per block.
    "msdnet5": dict(_MSDNET_CIFAR, n_blocks=5, step_mode="even", step=2, base=4),
    "msdnet7": dict(_MSDNET_CIFAR, n_blocks=7, step_mode="even", step=2, base=4),
    "msdnet10": dict(_MSDNET_CIFAR, n_blocks=10, step_mode="even", step=2, base=4),
    # Budgeted-batch CIFAR network: block k (k >= 1, 0-based) has step * k + 1 layers.
    "msdnet5_lingrow": dict(_MSDNET_CIFAR, n_blocks=5, step_mode="lin_grow", step=1, base=1),
    # ImageNet network: four scales, 7x7 stem, classifiers as wide as the coarsest scale.
    "msdnet_imagenet": dict(
        stem="imagenet", stem_channels=32, growth_rate=16, growth_factors=(1, 2, 4, 4),
        bottleneck=True, bottleneck_factors=(1, 2, 4, 4), prune="max", reduction=0.5,
        classifier_channels=None, n_blocks=5, step_mode="even", step=4, base=4,
    ),
}


def msd_dense_conv(in_channels, out_channels, stride, bottleneck, bottleneck_factor):
    """The 3x3 conv that produces new dense features, behind an optional 1x1 bottleneck.

    The bottleneck is min(in, factor * out) wide, so it never widens a thin input.
    """
    layers = []
    if bottleneck:
        inner = min(in_channels, bottleneck_factor * out_channels)
        layers.append(_conv_bn_relu(in_channels, inner, 1))
        in_channels = inner
    layers.append(_conv_bn_relu(in_channels, out_channels, 3, stride))
    return nn.Sequential(*layers)


class MSDStem(nn.Module):
    """First layer: the finest scale from the image, each coarser scale by a stride-2 conv of
    the scale above it. CIFAR: 3x3 conv; ImageNet: 7x7 stride-2 conv (with bias, as the
    authors' code) + 3x3 stride-2 max-pool."""

    def __init__(self, stem, stem_channels, growth_factors):
        super().__init__()
        widths = [stem_channels * factor for factor in growth_factors]
        if stem == "cifar":
            finest = _conv_bn_relu(3, widths[0], 3)
        elif stem == "imagenet":
            finest = nn.Sequential(
                nn.Conv2d(3, widths[0], 7, 2, 3),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            raise ValueError(f"unknown MSDNet stem {stem!r}")
        coarser = [_conv_bn_relu(widths[s - 1], widths[s], 3, 2) for s in range(1, len(widths))]
        self.scales = nn.ModuleList([finest] + coarser)

    def forward(self, x):
        features = []
        for conv in self.scales:
            x = conv(x)
            features.append(x)
        return features


class MSDScaleUnit(nn.Module):
    """One scale of one MSD layer: the input at this scale is kept (dense connectivity) and
    new features are appended, half from this scale and half from the finer scale
    (strided), or all from this scale when no finer scale is in the input."""

    def __init__(self, same_channels, finer_channels, new_channels, bottleneck,
                 same_bottleneck_factor, finer_bottleneck_factor):
        super().__init__()
        self.from_finer = None
        if finer_channels:
            if new_channels % 2:
                raise ValueError(f"new channels {new_channels} must be even to split over two scales")
            new_channels //= 2
            self.from_finer = msd_dense_conv(finer_channels, new_channels, 2, bottleneck,
                                         finer_bottleneck_factor)
        self.from_same = msd_dense_conv(same_channels, new_channels, 1, bottleneck, same_bottleneck_factor)

    def forward(self, same, finer=None):
        parts = [same]
        if self.from_finer is not None:
            parts.append(self.from_finer(finer))
        parts.append(self.from_same(same))
        return torch.cat(parts, dim=1)


class MSDLayer(nn.Module):
    """A layer across scales: takes `in_scales` coarsest scales, returns `out_scales`
    (one fewer when the finest scale is pruned away here). Scale s has width
    `channels * growth_factors[s]` and grows by `growth_rate * growth_factors[s]`."""

    def __init__(self, channels, growth_rate, in_scales, out_scales, cfg):
        super().__init__()
        growth_factors, bottleneck_factors = cfg["growth_factors"], cfg["bottleneck_factors"]
        n_scales = len(growth_factors)
        self.first_in_scale = n_scales - in_scales
        self.first_out_scale = n_scales - out_scales
        units = []
        for s in range(self.first_out_scale, n_scales):
            has_finer = s > self.first_in_scale
            units.append(MSDScaleUnit(
                same_channels=channels * growth_factors[s],
                finer_channels=channels * growth_factors[s - 1] if has_finer else 0,
                new_channels=growth_rate * growth_factors[s],
                bottleneck=cfg["bottleneck"],
                same_bottleneck_factor=bottleneck_factors[s],
                finer_bottleneck_factor=bottleneck_factors[s - 1],
            ))
        self.units = nn.ModuleList(units)

    def forward(self, features):
        outputs = []
        for s, unit in enumerate(self.units, start=self.first_out_scale):
            same = features[s - self.first_in_scale]
            finer = features[s - 1 - self.first_in_scale] if s > self.first_in_scale else None
            outputs.append(unit(same, finer))
        return outputs


class MSDTransition(nn.Module):
    """1x1 conv per remaining scale that compresses the dense features after a scale is
    pruned ('max' pruning), keeping the width proportional to the growth factor."""

    def __init__(self, channels, reduced_channels, out_scales, growth_factors):
        super().__init__()
        kept_factors = growth_factors[len(growth_factors) - out_scales:]
        self.convs = nn.ModuleList(
            _conv_bn_relu(channels * factor, reduced_channels * factor, 1) for factor in kept_factors
        )

    def forward(self, features):
        return [conv(x) for conv, x in zip(self.convs, features)]


class MSDExitClassifier(nn.Module):
    """Exit head on the coarsest scale: two 3x3 stride-2 convs, average pool, linear.

    The authors pool with AvgPool2d(2), which sees exactly 2x2 at CIFAR 32 and ImageNet 224;
    a global average pool is identical there and also works at other sizes (e.g. 64)."""

    def __init__(self, in_channels, hidden_channels, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, hidden_channels, 3, 2),
            _conv_bn_relu(hidden_channels, hidden_channels, 3, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.linear = FP32Linear(hidden_channels, num_classes)  # fp32 logits under autocast, as every head

    def forward(self, x):
        return self.linear(self.features(x))


def msd_block_depths(cfg):
    """Layers per block: `base` for block 0, then `step` ('even') or `step * k + 1` ('lin_grow')."""
    if cfg["step_mode"] not in ("even", "lin_grow"):
        raise ValueError(f"unknown MSDNet step mode {cfg['step_mode']!r}")
    grow = cfg["step_mode"] == "lin_grow"
    return [cfg["base"]] + [cfg["step"] * k + 1 if grow else cfg["step"] for k in range(1, cfg["n_blocks"])]


def msd_scales_at_layer(layer_index, total_layers, n_scales):
    """'max' pruning: the network is cut into n_scales equal spans of layers and the finest
    scale is dropped at the start of each new span. Returns (in_scales, out_scales) of the
    1-based layer `layer_index`."""
    span = math.ceil(total_layers / n_scales)
    in_scales = n_scales - max(0, layer_index - 2) // span
    out_scales = n_scales - (layer_index - 1) // span
    return in_scales, out_scales


class MSDNet(nn.Module):
    """MSDNet (Huang et al., ICLR 2018) with one early exit per block; see the module docstring."""

    def __init__(self, cfg, num_classes, image_size):
        super().__init__()
        if cfg["prune"] != "max":
            raise ValueError("only the 'max' scale pruning of the MSDNet configs is implemented")
        growth_factors = cfg["growth_factors"]
        n_scales = len(growth_factors)
        depths = msd_block_depths(cfg)
        total_layers = sum(depths)
        self.image_size = image_size
        self.stages = nn.ModuleList()
        self.classifiers = nn.ModuleList()

        channels = cfg["stem_channels"]
        layer_index = 0
        for block_index, depth in enumerate(depths):
            modules = [MSDStem(cfg["stem"], channels, growth_factors)] if block_index == 0 else []
            for _ in range(depth):
                layer_index += 1
                in_scales, out_scales = msd_scales_at_layer(layer_index, total_layers, n_scales)
                modules.append(MSDLayer(channels, cfg["growth_rate"], in_scales, out_scales, cfg))
                channels += cfg["growth_rate"]
                if in_scales > out_scales and cfg["reduction"] > 0:
                    reduced = math.floor(cfg["reduction"] * channels)
                    modules.append(MSDTransition(channels, reduced, out_scales, growth_factors))
                    channels = reduced
            self.stages.append(nn.Sequential(*modules))
            coarsest_channels = channels * growth_factors[-1]
            hidden = cfg["classifier_channels"] or coarsest_channels
            self.classifiers.append(MSDExitClassifier(coarsest_channels, hidden, num_classes))

        self._init_weights()
        self._exit_macs = None

    def _init_weights(self):
        # He init (fan-out) as the authors' code intends; note their loop only visits the
        # top-level children of each block, so in their release PyTorch's defaults remain.
        _kaiming_init(self)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x, return_features=False):
        logits, features = [], []
        for stage, classifier in zip(self.stages, self.classifiers):
            x = stage(x)
            features.append(x[-1])
            logits.append(classifier(x[-1]))
        return (logits, features) if return_features else logits

    @property
    def exit_macs(self):
        """Cumulative MACs per exit for one image (conv + linear), measured once and cached."""
        if self._exit_macs is None:
            self._exit_macs = self._measure_exit_macs()
        return list(self._exit_macs)

    def _measure_exit_macs(self):
        # Eval mode and no_grad so the dummy pass leaves BatchNorm statistics untouched.
        reference = next(self.parameters())
        x = torch.zeros(1, 3, self.image_size, self.image_size,
                        device=reference.device, dtype=reference.dtype)
        was_training = self.training
        self.eval()
        macs, total = [], 0
        try:
            with torch.no_grad():
                for stage, classifier in zip(self.stages, self.classifiers):
                    with FlopCounterMode(display=False) as counter:
                        x = stage(x)
                        classifier(x[-1])
                    total += counter.get_total_flops() // 2  # conv/matmul FLOPs count 2 per MAC
                    macs.append(total)
        finally:
            self.train(was_training)
        return macs


def build_msdnet(name, num_classes, image_size):
    """Build the MSDNet named in MSDNET_CONFIGS for `num_classes` classes and square
    `image_size` inputs (CIFAR configs: 32 or 64; msdnet_imagenet: 224)."""
    if name not in MSDNET_CONFIGS:
        raise ValueError(f"unknown MSDNet {name!r}; choose from {sorted(MSDNET_CONFIGS)}")
    return MSDNet(MSDNET_CONFIGS[name], num_classes, image_size)


_BUILDERS = {
    "convnet": _convnet,
    **{f"resnet{depth}": partial(_cifar_resnet, BasicBlock, (depth - 2) // 6) for depth in (20, 32, 56, 110)},
    **{f"resnet{depth}_bottleneck": partial(_cifar_resnet, Bottleneck, (depth - 2) // 9) for depth in (56, 110)},
    **{f"resnet{depth}": partial(_torchvision_resnet, f"resnet{depth}") for depth in (18, 34, 50)},
    **{f"resnet18_w{width}": partial(_torchvision_resnet, "resnet18", width=width) for width in (2, 4)},
    **{f"wrn_{d}_{k}": partial(_wrn, d, k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2), (16, 10), (28, 10))},
    "mobilenet": _mobilenet,
    "mobilenetv2": _mobilenetv2,
    "vgg13": partial(_vgg, "B"),
    "vgg16": partial(_vgg, "D"),
    "vgg19": partial(_vgg, "E"),
    "densenet121": _densenet121,
    "resnext29_2x64d": partial(_cifar_resnet, Bottleneck, 3, widths=(64, 128, 256), stem_width=64, groups=2,
                               base_width=64),
    # CSS's WRN-20-8 (Tables 1-2): the CSS authors' `ResNet(Bottleneck, [2, 2, 2], width_per_group=512)`,
    # i.e. the CIFAR bottleneck ResNet-20 with 8x wider 3x3 convs (16 * 8 = 128, 256, 512), not a
    # pre-activation WRN (those are the wrn_* entries)
    "wide_resnet20_8": partial(_cifar_resnet, Bottleneck, 2, base_width=512),
    "se_resnet110": partial(_cifar_resnet, SEBasicBlock, 18),
    "pyramidnet110_a84": partial(_pyramidnet, 110, 84),
    "vit_s16": _vit_s16,
    # MNIST (1x28x28 digits, or data.py's 3x32x32 MNIST): FDL's one-layer ConvNet of M filters, SiLa's Fig. 6
    **{f"mnist_onelayer_m{2 ** k}": partial(_mnist_onelayer, 2 ** k) for k in range(10)},
    "mnist_2d": _mnist_2d,
    **{name: partial(build_msdnet, name) for name in MSDNET_CONFIGS},
}
MODEL_NAMES = tuple(_BUILDERS)


def build_model(name, num_classes, image_size=32):
    """The backbone `name` (one of MODEL_NAMES) with `num_classes` outputs, for images of side `image_size`."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](num_classes, image_size)
