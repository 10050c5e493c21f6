"""Adversarial-based Mutual Learning Network (AMLN) for online knowledge distillation.

Xiaobing Zhang, Shijian Lu, Haigang Gong, Zhipeng Luo and Ming Liu, "AMLN: Adversarial-based Mutual Learning Network
for Online Knowledge Distillation", ECCV 2020 (LNCS 12357, pp. 158-173, doi:10.1007/978-3-030-58610-2_10). The
authors' code is not public.

Two peer networks S_1 and S_2 learn from each other's outcome (the labels and the peer's softened prediction) and from
each other's process: after every stage b, a discriminator D_j^b learns to tell which network a feature map came from
while S_j learns to fool it, and an alignment container C_j^b maps the stage's features onto the peer's final feature
map. Each peer is deployed alone: peer1 is reported as deployed; peer2 and the two peers' logit average too.

The paper's equations (j = 1, 2 and its peer 3 - j; stages b = 1..B, B = 3 for the CIFAR networks; f_j^b: the output
of S_j's stage b; z_j: its logits):
    L_D^j = min_f max_D sum_b E[1 - D_j^b(sigma(f_j^b))] + E[D_j^b(sigma(f_{3-j}^b))]                             (1)
    L_F^j = sum_b d(C_j^b(f_j^b), f_{3-j}^B),  d = "L2"                                                            (2)
    L_{S_j^P} = L_D^j + beta L_F^j                                                                                 (3)
    p_j = softmax(z_j),  L_C^j = -sum_i log p_j^{y_i}(x_i)                                                      (4, 5)
    rho_j = softmax(z_j / T),  T = 3                                                                               (6)
    L_KL^j = KL(rho_j || rho_{3-j}) = sum_i sum_m rho_j^m log(rho_j^m / rho_{3-j}^m)                               (7)
    L_{S_j^R} = L_C^j + T^2 L_KL^j                                                                                 (8)
    L_{S_j} = L_{S_j^P} + L_{S_j^R}                                                                                (9)
Algorithm 1, each iteration: compute f_1^b, p_1, rho_1; L_{S_1}; update S_1; compute f_2^b, p_2, rho_2; L_{S_2};
update S_2. `amln_step` is one iteration in that order, each equation's number where it is computed.

Paper vs code: (printed -> here; why; the flag for the printed reading)
- eq. 7 KL(rho_j || rho_{3-j}) -> KL(rho_{3-j} || rho_j), the direction of DML (Zhang et al., CVPR 2018): Table 6's
  case B (L_C + L_KL only) reports 70.98%, Table 2(b)'s DML number. Printed: `--kl-direction self_peer`.
- eq. 1, linear in D's probability of the peer's id -> the log (cross-entropy) form of GANs on the network ids, for
  S_j the non-saturating one (cross-entropy towards the peer's id): the printed S_j side's gradient fades as D grows
  confident. Both players take the mean over their two expectations (a factor 2 in `--disc-lr`). Printed:
  `--adversarial-loss probability` (1 - P_D(id) for both players).
- eq. 1's max over D, for which Algorithm 1 has no step -> each iteration first one step of every D_j^b on both
  networks' detached features of the batch, then S_1 and S_2 learn against the updated D_j^b (the usual alternation
  of GANs; choice). No flag.
- D_j^b (section 3.2): "three convolution layers with ReLU operation", "the last layer with two neurons"; sigma is
  "utilized to reduce the number of channels"; widths, kernels, pooling and which player trains sigma are unstated
  -> sigma: a 1x1 conv halving the channels, trained with D (trained by S_j, sigma could fool D by shrinking instead
  of S_j changing its features); three 3x3 convs at sigma's width, global average pooling to two logits (choices).
  No flag.
- D's optimizer and lr: unstated -> SGD with the networks' momentum, Nesterov and weight decay, lr `--disc-lr` 0.003,
  on the networks' schedule (the players keep their ratio as the lr anneals). Short CPU runs on CIFAR-10 ResNet-20
  pairs: 0.1 diverged in the first epoch, 0.01 let the discriminators win and the networks fall to chance, 0.001
  left them at a constant output, 0.003 kept their accuracy around 50-70%.
- eq. 2's d, "L2" -> the mean squared error over the batch and C*H*W of f_{3-j}^B. Every stage aligns to the same
  f_{3-j}^B, so a per-sample sum of squares weighted beta is `--beta` beta*C*H*W (4096 beta for ResNet-32 on CIFAR:
  64x8x8). The paper gives no beta: 1 here (choice).
- eq. 5 and 7 sum over the samples, eq. 1 takes expectations -> every term is a batch mean (sums would weight L_C and
  L_KL by the batch size against L_D and L_F). No flag.
- the peer's index: the paper's 3 - j is 1 - j in the code, whose networks are 0 and 1 (logged as peer1, peer2).
- C_j^b, "depthwise convolution and pointwise convolution" -> a depthwise 3x3 conv whose stride brings f_j^b to
  f_{3-j}^B's size (pooling the rest where no integer stride fits), then a pointwise conv to its channels (choices).
- mixed pairs: how one sigma reads two widths is unstated -> a 1x1 conv trained with the wider network maps its stage
  outputs to the narrower's channels (choice).
- CIFAR epochs: unstated ("multiplied by 0.1 every 200 epochs") -> 600, x0.1 at 200 and 400: Fig. 3(b) discusses the
  test error "after 400 epoch". `--epochs`, `--milestones`.
- precision: unstated -> bf16 autocast, with the alignment containers and every loss between the networks in fp32.
  `--amp off` for fp32 throughout.
- not in the paper: the peers' logit average is reported as "ensemble".

Defaults: section 4.2's CIFAR protocol (SGD, Nesterov momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 x0.1 at
epochs 200 and 400, 600 epochs), Algorithm 1 (`--no-sequential`: both updates from one forward), ResNet-32 pairs.
Headline, Table 2(b)'s ResNet-32 pair on CIFAR-100: the paper prints "Avg", the mean of Net1's and Net2's top-1,
74.69% (69.71% trained alone, 70.98% with DML), without saying final or best epoch or how many runs; compare the mean
of the two peers' final top-1 in summary.json, over seeds. The command departs from the print on the lines above; add
`--kl-direction self_peer --adversarial-loss probability` for the printed eq. 7 and eq. 1:
    python amln.py --dataset cifar100
Table 6 (ResNet-32 pair, averaged accuracy, CIFAR-10 / CIFAR-100): the same command (or `--dataset cifar10`) plus
    --no-kl --no-adversarial --no-alignment    # A: L_C only        93.10 / 69.71
    --no-adversarial --no-alignment            # B: + L_KL (DML)    93.15 / 70.98
    --no-adversarial                           # C: + L_F           93.89 / 73.24
    --no-alignment                             # D: + L_D           94.01 / 74.16
                                               # E: AMLN            94.25 / 74.69
Table 2(b)'s other pairs (Avg): `--model resnet56` 75.77%, `wrn_16_2` 75.56%, `wrn_40_2` 77.97%. Table 3(b), a mixed
pair (Net1 WRN-16-2 75.88%, Net2 ResNet-32 74.65%): `--models wrn_16_2,resnet32`. Table 4, ImageNet (ResNet-34 pair,
one number for the pair: 75.48% top-1, 92.54% top-5; section 4.2: batch 128, lr 0.1 x0.1 every 30 epochs, 90 epochs,
weight decay 1e-4; the momentum is unstated there, the CIFAR setting's Nesterov 0.9 is kept):
    python amln.py --model resnet34 --dataset imagenet --data-dir PATH --epochs 90 --milestones 30 60
"""
import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from data import AUGMENTATIONS, DATASETS, build_data
from models import MODEL_NAMES, build_model

METHOD = "amln"


# ==== arguments: the common block is identical in every method file ====
class Parser(argparse.ArgumentParser):
    """One-line errors; `args.given` lists the flags on the command line (--resume checks them)."""

    def error(self, message):  # one clear line instead of the whole usage block
        fail(f"{message} (see --help)")

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else [str(arg) for arg in args]
        parsed = super().parse_args(argv, namespace)
        parsed.given = [a.dest for a in self._actions if any(x.split("=")[0] in a.option_strings for x in argv)]
        return parsed


def ranged(kind, low, high=math.inf, above=False):
    """An argparse type: a finite int or float (`kind`) in [low, high], or in (low, high] when `above`."""
    accepted = f"{'an integer' if kind is int else 'a number'} {'>' if above else '>='} {low}"
    accepted += f" and <= {high}" if high < math.inf else ""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if above else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")  # argparse names the flag
        return value
    return parse


positive_int, nonnegative_int, fraction = ranged(int, 1), ranged(int, 0), ranged(float, 0, 1)
positive_float, nonnegative_float = ranged(float, 0, above=True), ranged(float, 0)


def device_name(text):
    """An argparse type for --device: auto, cpu, cuda or cuda:N, present on this machine."""
    try:
        device = torch.device("cpu" if text == "auto" else text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA devices; use cpu")
    return text


def parse_args(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                    allow_abbrev=False)
    # The common flags, the same in every method file. Their defaults are generic: each method sets its paper's
    # protocol right below this block (parser.set_defaults), and --help shows the values in effect.
    common = parser.add_argument_group("common (identical in every method file; defaults: the method's paper)")
    common.add_argument("--model", default="resnet18", help=f"architecture of every network: {', '.join(MODEL_NAMES)}")
    common.add_argument("--dataset", default="cifar100", help=", ".join(DATASETS))
    common.add_argument("--data-dir", default="./data", help="where the dataset lives (downloaded there when online)")
    common.add_argument("--subset", type=positive_int, help="use only the first N training and N test images")
    common.add_argument("--augment", default="standard", choices=AUGMENTATIONS,
                        help="standard: crop + flip; meanpad: the crop's padding in the mean colour "
                        "(TNA's CIFAR); rrc: RandomResizedCrop + flip (TNA's Tiny ImageNet)")
    common.add_argument("--holdout", type=nonnegative_int, default=0,
                        help="keep N training images out of training (seeded, class-stratified; run/holdout.json)")
    common.add_argument("--seed", type=ranged(int, 0, 2**31 - 1), default=0, help="random seed (+ rank under torchrun)")
    common.add_argument("--device", type=device_name, default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    common.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"],
                        help="autocast precision; fp16 uses a GradScaler")
    common.add_argument("--channels-last", action="store_true", help="channels-last memory format (tensor cores)")
    common.add_argument("--compile", action="store_true", help="torch.compile every network")
    common.add_argument("--epochs", type=positive_int, default=200, help="training epochs")
    common.add_argument("--batch-size", type=positive_int, default=256, help="global batch size (split across ranks)")
    common.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"],
                        help="optimizer of the networks (adam: L2 weight decay; adamw: decoupled)")
    common.add_argument("--lr", type=positive_float, default=0.1, help="peak learning rate")
    common.add_argument("--momentum", type=fraction, default=0.9, help="SGD momentum")
    common.add_argument("--weight-decay", type=nonnegative_float, default=5e-4, help="weight decay")
    common.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False, help="Nesterov momentum")
    common.add_argument("--warmup-epochs", type=nonnegative_float, default=0, help="linear learning-rate warm-up")
    common.add_argument("--schedule", default="cosine", choices=["cosine", "multistep"],
                        help="cosine to 0 per step, or x --gamma at each of --milestones")
    common.add_argument("--milestones", type=positive_int, nargs="+", default=[150, 225], help="multistep: epochs")
    common.add_argument("--gamma", type=positive_float, default=0.1, help="multistep: lr factor at each milestone")
    common.add_argument("--eval-every", type=positive_int, default=1, help="evaluate every N epochs and after the last")
    common.add_argument("--out-dir", help="output folder (default runs/<method>__<models>__<dataset>__<seed>__<time>)")
    run = common.add_mutually_exclusive_group()
    run.add_argument("--resume", help="continue a run (its folder or checkpoint.pt) with its saved arguments; only "
                     "--epochs (more), --eval-every and this job's --device, --data-dir, --stop-after... may change")
    run.add_argument("--overwrite", action="store_true", help="start anew in an --out-dir holding a run (its files go)")
    common.add_argument("--stop-after", type=positive_int, help="stop after this epoch (--resume continues the run)")
    # AMLN's CIFAR protocol replaces the defaults above (section 4.2: SGD, Nesterov momentum 0.9, weight decay 1e-4,
    # batch 128, lr 0.1 x0.1 every 200 epochs) on Table 2's first pair, ResNet-32. choice: 600 epochs, which the paper
    # does not state: Fig. 3(b) discusses the test error "after 400 epoch", so training runs past the second decay
    parser.set_defaults(model="resnet32", epochs=600, batch_size=128, lr=0.1, momentum=0.9, nesterov=True,
                        weight_decay=1e-4, schedule="multistep", milestones=[200, 400], gamma=0.1, warmup_epochs=0)
    method = parser.add_argument_group("AMLN (Zhang et al., ECCV 2020)")
    method.add_argument("--models", default=None, help="two comma-separated architectures, S_1 and S_2, with the same "
                        "number of stages (default: --model twice)")
    method.add_argument("--temperature", type=positive_float, default=3.0,
                        help="softmax temperature T of L_KL, which is scaled by T^2 (eq. 6-8; T = 3 in section 3.3)")
    method.add_argument("--beta", type=nonnegative_float, default=1.0,
                        help="weight beta of the alignment loss L_F (eq. 3; unstated in the paper; L_F is a mean over "
                        "C*H*W)")
    method.add_argument("--disc-lr", type=positive_float, default=0.003,
                        help="peak lr of the discriminators' SGD, on the networks' schedule (unstated in the paper)")
    method.add_argument("--adversarial-loss", default="ce", choices=["ce", "probability"],
                        help="eq. 1 for both players: cross-entropy on the network ids (non-saturating for the "
                        "networks), or 1 - P_D(id) as printed")
    method.add_argument("--kl-direction", default="peer_self", choices=["peer_self", "self_peer"],
                        help="KL(rho_peer || rho_self) as DML, or KL(rho_self || rho_peer) as eq. 7 is printed")
    method.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                        help="Algorithm 1: update S_1, then S_2 against S_1's updated prediction; --no-sequential: "
                        "both updates from one forward")
    method.add_argument("--no-kl", action="store_true", help="drop L_KL (Table 6)")
    method.add_argument("--no-adversarial", action="store_true", help="drop L_D and the discriminators (Table 6)")
    method.add_argument("--no-alignment", action="store_true", help="drop L_F and the alignment containers (Table 6)")
    args = parser.parse_args(argv)
    args.models = args.models.split(",") if isinstance(args.models, str) else args.models
    if args.models is not None and len(args.models) != 2:
        parser.error(f"AMLN trains two peers: --models takes two architectures a,b, got {','.join(args.models)}")
    return args


# ==== the method ====
def outcome_loss(logits, peer_logits, targets, temperature=3.0, direction="peer_self"):
    """Eq. 4-8 for network j: L_C = CE(z_j, y) (eq. 5) and T^2 L_KL with rho = softmax(z / T) (eq. 6-7),
    both in fp32 and averaged over the batch. Returns (ce, T^2 * kl); the peer's logits are detached.

    direction "peer_self": KL(rho_peer || rho_j), DML's direction (the default); "self_peer":
    KL(rho_j || rho_peer), eq. 7 as printed. The KL is summed over classes.
    """
    logits = logits.float()
    log_rho = F.log_softmax(logits / temperature, dim=1)
    log_rho_peer = F.log_softmax(peer_logits.detach().float() / temperature, dim=1)
    if direction == "peer_self":
        kl = F.kl_div(log_rho, log_rho_peer, reduction="batchmean", log_target=True)
    else:
        kl = F.kl_div(log_rho_peer, log_rho, reduction="batchmean", log_target=True)
    return F.cross_entropy(logits, targets), kl * temperature**2  # T^2 keeps the gradient scale of CE (eq. 8)


def adversarial_loss(disc_logits, ids, form="ce"):
    """One player's side of eq. 1: the sum over discriminator outputs (one [n, 2] tensor of logits per
    D_j^b) of a loss that is small when D answers the network ids `ids` (an int for every sample, or a
    tensor [n]). The networks pass their peer's id (fool D_j^b), the discriminators the true ids. In fp32.

    form "ce": cross-entropy, the log form of GANs (non-saturating on the networks' side);
    "probability": mean(1 - P_D(ids)), eq. 1 as printed, where D is the probability of an id.
    """
    total = 0
    for logits in disc_logits:
        logits = logits.float()
        target = torch.full((len(logits),), ids, device=logits.device) if isinstance(ids, int) else ids
        if form == "ce":
            total = total + F.cross_entropy(logits, target)
        else:
            total = total + (1 - F.softmax(logits, dim=1).gather(1, target[:, None])).mean()
    return total


def discriminator_loss(stage_logits, ids, form="ce"):
    """Eq. 1's max over D: every D_j^b classifies both networks' stage-b features by network id.
    `stage_logits[b][j]`: D_j^b's logits. Returns (the summed loss, each D's accuracy as [stage][network])."""
    loss = adversarial_loss([logits for pair in stage_logits for logits in pair], ids, form)
    accuracies = [[(logits.argmax(1) == ids).float().mean() for logits in pair] for pair in stage_logits]
    return loss, accuracies


def alignment_loss(aligned, peer_final):
    """Eq. 2: L_F^j = sum_b d(C_j^b(f_j^b), f_peer^B) in fp32, the peer detached. choice: d = the mean squared
    error over the batch and C*H*W (the paper says "L2": a per-sample sum of squares is this times C*H*W)."""
    target = peer_final.detach().float()
    return sum(F.mse_loss(features.float(), target) for features in aligned)


class Discriminator(torch.nn.Module):
    """D_j^b (section 3.2): sigma, a 1x1 conv reducing the channels (eq. 1), then "three convolution
    layers with ReLU, the last with two neurons" (the network id). choice (widths, kernels and pooling
    are unstated): sigma halves the channels, the convs are 3x3 at that width, and global average
    pooling turns the last one's two maps into two logits."""

    def __init__(self, channels):
        super().__init__()
        width = max(1, channels // 2)
        self.sigma = torch.nn.Conv2d(channels, width, 1)
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(width, 2, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def forward(self, features):
        return self.layers(self.sigma(features))


class Discriminators(torch.nn.Module):
    """Every D_j^b, as stages[b][j]. One call classifies one batch per stage with both discriminators
    of that stage, so the discriminators' step is one forward and one backward."""

    def __init__(self, channels_per_stage):
        super().__init__()
        pairs = (torch.nn.ModuleList(Discriminator(c) for _ in range(2)) for c in channels_per_stage)
        self.stages = torch.nn.ModuleList(pairs)

    def forward(self, stage_inputs):
        return [[disc(features) for disc in pair] for pair, features in zip(self.stages, stage_inputs)]


class AlignmentContainer(torch.nn.Module):
    """C_j^b (eq. 2): a depthwise 3x3 conv whose stride takes f_j^b to the peer's final spatial size,
    then a pointwise conv to the peer's final channels. Shapes are (channels, height, width)."""

    def __init__(self, own_shape, peer_final_shape):
        super().__init__()
        channels, size, target_size = own_shape[0], own_shape[1:], tuple(peer_final_shape[1:])
        stride = tuple(max(1, s // t) for s, t in zip(size, target_size))
        self.depthwise = torch.nn.Conv2d(channels, channels, 3, stride, padding=1, groups=channels)
        self.pointwise = torch.nn.Conv2d(channels, peer_final_shape[0], 1)
        self.target_size = target_size

    def forward(self, features):
        # choice: in fp32 under any autocast, so that L_F, a difference between the networks, is not bf16 rounding
        # (a depthwise and a pointwise conv: cheap next to the networks)
        with torch.autocast(features.device.type, enabled=False):
            features = self.depthwise(features.float())
            if tuple(features.shape[2:]) != self.target_size:  # choice: no integer stride fits (14 -> 5): pool the rest
                features = F.adaptive_avg_pool2d(features, self.target_size)
            return self.pointwise(features)


class PeerBlocks(torch.nn.Module):
    """Network j's block-wise extras, trained with network j: per stage an adapter to the discriminators'
    input (empty, i.e. identity, when both peers' stage outputs have one shape) and C_j^b.
    forward(stage features) -> (adapted features, aligned features); either list is empty when off."""

    def __init__(self, adapters, containers):
        super().__init__()
        self.adapters, self.containers = torch.nn.ModuleList(adapters), torch.nn.ModuleList(containers)

    def forward(self, features):
        return [a(f) for a, f in zip(self.adapters, features)], [c(f) for c, f in zip(self.containers, features)]


def discriminator_adapter(own_shape, common_shape):
    """choice (mixed pairs, unstated in the paper): one sigma sees both networks' features, so where the
    stage-b outputs differ, the wider network's pass through a 1x1 conv to the narrower's channels
    (trained by that network, as part of the generator; a discriminator-trained projection per
    network would let D win by the projections alone) and the larger map is average-pooled."""
    layers = []
    if own_shape[0] != common_shape[0]:
        layers.append(torch.nn.Conv2d(own_shape[0], common_shape[0], 1))
    if own_shape[1:] != common_shape[1:]:
        layers.append(torch.nn.AdaptiveAvgPool2d(common_shape[1:]))
    return torch.nn.Sequential(*layers)


def build_block_modules(shapes, adversarial=True, alignment=True):
    """The block-wise modules (section 3.2) for two peers whose stage outputs have `shapes[j][b]` =
    (channels, height, width). Returns (Discriminators or None, [PeerBlocks of peer 1, of peer 2])."""
    common = [tuple(min(a, b) for a, b in zip(first, second)) for first, second in zip(*shapes)]
    discriminators = Discriminators([shape[0] for shape in common]) if adversarial else None
    adapters = [[discriminator_adapter(own, target) for own, target in zip(shapes[j], common)] if adversarial else []
                for j in range(2)]
    containers = [[AlignmentContainer(own, shapes[1 - j][-1]) for own in shapes[j]] if alignment else []
                  for j in range(2)]
    return discriminators, [PeerBlocks(adapters[j], containers[j]) for j in range(2)]


@torch.no_grad()
def stage_shapes(network, image_size):
    """(channels, height, width) of each stage output at `image_size`, from a dummy forward in eval mode
    (so no BN running statistic moves). ValueError for networks AMLN cannot pair stage by stage."""
    was_training = network.training
    network.eval()
    logits, features = network(torch.zeros(2, 3, image_size, image_size), return_features=True)
    network.train(was_training)
    if isinstance(logits, (list, tuple)) or any(not torch.is_tensor(f) or f.dim() != 4 for f in features):
        raise ValueError("AMLN needs single-exit convolutional backbones (4-d stage outputs): not MSDNet or ViT")
    return [tuple(f.shape[1:]) for f in features]


def amln_step(nets, blocks, discriminators, optimizers, images, labels, args, scaler, autocast):
    """One AMLN iteration on a batch, top to bottom: both networks' forward, the discriminators' step
    (eq. 1's max over D), then Algorithm 1: L_{S_1} (eq. 9) and S_1's update, L_{S_2} from S_1's
    updated prediction and S_2's update.

    nets, blocks: the two networks and their PeerBlocks (adapters to sigma's input, containers C_j^b);
    discriminators: the Discriminators, or None with --no-adversarial; any of them may come wrapped
    for DDP. optimizers: "peer1" and "peer2" (a network with its blocks each) and "disc". Networks
    are 0 and 1 here, so the paper's peer 3 - j is 1 - j. Returns the logged terms as 0-d tensors.
    """
    # Algorithm 1 steps 1 and 4: each network's stage features f_j^b and logits z_j. S_2 does not change before
    # step 6, so this one forward of S_2 gives S_1's targets (step 2) and, graph kept, S_2's own loss (step 5)
    with autocast():
        outputs = [net(images, return_features=True) for net in nets]
        adapted, aligned = zip(*(block(features) for block, (_, features) in zip(blocks, outputs)))
    logits, finals = [z for z, _ in outputs], [features[-1] for _, features in outputs]  # z_j and f_j^B
    terms = {}

    if discriminators is not None:
        # eq. 1, max over D. Algorithm 1 schedules no discriminator step; choice: one per iteration, before the
        # networks' updates (the usual alternation of GANs). Every D_j^b classifies both networks' stage-b features,
        # detached, by network id (0: S_1, 1: S_2)
        batch = len(images)
        ids = torch.arange(2, device=images.device).repeat_interleave(batch, output_size=2 * batch)  # no sync
        with autocast():
            stage_logits = discriminators([torch.cat([one.detach(), two.detach()]) for one, two in zip(*adapted)])
        terms["d_loss"], accuracies = discriminator_loss(stage_logits, ids, args.adversarial_loss)
        backward_step(terms["d_loss"], scaler, optimizers["disc"])
        for b, pair in enumerate(accuracies):
            terms.update({f"d_acc_peer{j + 1}_stage{b + 1}": accuracy for j, accuracy in enumerate(pair)})
        # eq. 1, min over f: S_j plays against its updated D_j^b, called with detached parameters so that the
        # networks' loss trains no discriminator. frozen[j][b] = (D_j^b, its detached parameters); the raw modules,
        # as a DDP wrapper is for the discriminators' own step
        stages = getattr(discriminators, "module", discriminators).stages
        frozen = [[(pair[j], {key: p.detach() for key, p in pair[j].named_parameters()}) for pair in stages]
                  for j in range(2)]

    total = 0
    for j, peer in ((0, 1), (1, 0)):  # Algorithm 1 steps 2-3 (S_1), then 5-6 (S_2); peer = the paper's 3 - j
        name = f"peer{j + 1}"
        if j == 1 and args.sequential and (not args.no_kl or aligned[1]):
            # step 4: S_2 learns from S_1's updated prediction and final features. choice: one forward of the updated
            # S_1 without gradient, its BN layers normalising with the batch's statistics as in training but leaving
            # their running statistics alone: they saw this batch in step 1 (a plain train-mode re-forward would
            # count it twice; eval mode would give another prediction than training's)
            norms = [m for m in nets[0].modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            for norm in norms:
                norm.track_running_stats = False
            with torch.no_grad(), autocast():
                logits[0], features = nets[0](images, return_features=True)
            for norm in norms:
                norm.track_running_stats = True
            finals[0] = features[-1]
        ce, kl = outcome_loss(logits[j], logits[peer], labels, args.temperature, args.kl_direction)  # eq. 4-7
        terms[f"ce_{name}"], loss = ce, ce
        if not args.no_kl:
            terms[f"kl_{name}"] = kl
            loss = loss + kl  # eq. 8: L_C + T^2 L_KL (outcome_loss applies the T^2)
        if discriminators is not None:  # eq. 1, the networks' side: D_j^b should take S_j's features for the peer's
            with autocast():
                disc_logits = [torch.func.functional_call(disc, params, (features,))
                               for (disc, params), features in zip(frozen[j], adapted[j])]
            terms[f"adv_{name}"] = adversarial_loss(disc_logits, peer, args.adversarial_loss)
            loss = loss + terms[f"adv_{name}"]
        if aligned[j]:  # eq. 2: C_j^b(f_j^b) against the peer's final features, detached
            terms[f"align_{name}"] = alignment_loss(aligned[j], finals[peer])
            loss = loss + args.beta * terms[f"align_{name}"]  # eq. 3 and 9: L_S = L_C + T^2 L_KL + L_D + beta L_F
        if args.sequential:  # Algorithm 1 step 3 / 6: update S_j (with its blocks) alone
            backward_step(loss, scaler, optimizers[name])
            loss = loss.detach()
        total = total + loss
    if not args.sequential:  # --no-sequential: both updates from the one forward (the peer terms are detached)
        backward_step(total, scaler, optimizers["peer1"], optimizers["peer2"])
    return {"loss": total, **terms}


def build_networks(args, num_classes, image_size):
    """The networks this method trains and evaluates, by name (analysis.py rebuilds runs with it)."""
    architectures = args.models or [args.model] * 2
    peers = {f"peer{k + 1}": build_model(name, num_classes, image_size) for k, name in enumerate(architectures)}
    stage_counts = [len(getattr(net, "stages", [])) for net in peers.values()]
    if stage_counts[0] != stage_counts[1]:
        raise ValueError(f"AMLN pairs the peers stage by stage (section 3.1), but {architectures[0]} has "
                         f"{stage_counts[0]} stages and {architectures[1]} has {stage_counts[1]}; choose two "
                         "architectures with the same number of stages")
    return peers


DEPLOYED = "peer1"  # each peer is deployed alone; the first is reported


# ==== scaffolding helpers: identical in every method file ====
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json", "holdout.json")  # an --out-dir with one holds a run
JOB_FLAGS = ("resume", "overwrite", "stop_after", "device", "data_dir", "compile", "channels_last")  # not the run's
RESUMABLE = ("epochs", "eval_every", *JOB_FLAGS)  # the flags a --resume may change


def lr_factor(step, steps_per_epoch, args):
    """Learning-rate multiplier at optimizer step `step`: linear warm-up, then cosine to 0 at the
    last step, or x gamma at each milestone epoch."""
    warmup_steps = args.warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if args.schedule == "multistep":
        return args.gamma ** sum(step >= m * steps_per_epoch for m in args.milestones)
    progress = (step - warmup_steps) / max(1, args.epochs * steps_per_epoch - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params, args, lr=None):
    settings = dict(lr=args.lr if lr is None else lr, weight_decay=args.weight_decay)
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=args.momentum, nesterov=args.nesterov, **settings)
    return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[args.optimizer](params, **settings)


def fail(message, code=1):
    """Stop with one line on stderr naming the script and what was wrong (never a traceback): the
    message's first line (torch's errors run to many)."""
    sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {str(message).partition(chr(10))[0]}\n")
    sys.exit(code)


def backward_step(loss, scaler, *optimizers):
    """Clear the gradients, backpropagate the (scaled) loss and step every optimizer; with fp16 the
    GradScaler skips the step when a gradient overflowed."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()


@torch.no_grad()
def evaluate(predict, loader, autocast, distributed):
    """Top-1, top-2, top-5 accuracy and NLL of every output of `predict` (name -> logits) over a loader; and the
    means of a method's own metrics when it sets `predict.metrics(outputs, labels)` (name -> sum over the batch)."""
    sums, extra_sums = {}, {}
    metrics = getattr(predict, "metrics", lambda outputs, labels: {})  # the hook: e.g. css.py's branch diversity
    for images, labels in loader:
        with autocast():
            outputs = predict(images)
        for name, logits in outputs.items():
            logits = logits.float()
            # hits[k]: images whose label is among the top k + 1 (cumsum of the one-hot rank of the label)
            hits = (logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]).cumsum(1).sum(0)
            # sums stay on the device (torch.full, unlike torch.tensor, copies nothing from the host): no sync per batch
            batch = torch.stack([hits[0], hits[1], hits[-1], F.cross_entropy(logits, labels, reduction="sum"),
                                 torch.full((), len(labels), device=labels.device)]).double()
            sums[name] = sums[name] + batch if name in sums else batch
        for name, value in metrics(outputs, labels).items():
            extra_sums[name] = extra_sums.get(name, 0) + value.double()
    results, extras = {}, {}
    for name, total in sums.items():
        if distributed:
            dist.all_reduce(total)
        *sums_, count = total.tolist()
        results[name] = {key: value / count for key, value in zip(("top1", "top2", "top5", "nll"), sums_)}
    for name, total in extra_sums.items():
        if distributed:
            dist.all_reduce(total)
        extras[name] = total.item() / count
    return results, extras


def average_buffers(modules):
    """Under torchrun each rank's BatchNorm tracked the statistics of its own batches: average them, so that
    every rank evaluates and rank 0 saves the same networks."""
    for module in modules:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.AVG)


def default_out_dir(args):
    """runs/<method>__<architectures>__<dataset>__<seed>__<time>, naming every architecture trained as the
    method's flags give them (--model, or --models, --twin-model, --net2-model, ...)."""
    flags = {k: v for k, v in vars(args).items() if v and (k in ("model", "models") or k.endswith("_model"))}
    architectures = "-".join(dict.fromkeys(flags.pop("models", None) or flags.values()))
    dataset = Path(args.dataset.split(":")[-1]).stem
    return Path("runs") / f"{METHOD}__{architectures}__{dataset}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"


def find_checkpoint(path):
    path = Path(path)
    checkpoint = path / "checkpoint.pt" if path.is_dir() else path
    if not checkpoint.is_file():
        fail(f"no checkpoint at {checkpoint} (give a run folder or a checkpoint.pt)")
    return checkpoint


def load_checkpoint(path):
    """This method's checkpoint at `path` (a run folder or its checkpoint.pt), or one line saying what is wrong."""
    path = find_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - empty, truncated or not a checkpoint: torch raises many types
        fail(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})")
    if not isinstance(checkpoint, dict) or not {"method", "epoch", "args", "networks"} <= checkpoint.keys():
        fail(f"{path} is not a checkpoint written by these scripts")
    if checkpoint["method"] != METHOD:
        fail(f"{path} is a {checkpoint['method']} run: resume it with {checkpoint['method']}.py")
    return path, checkpoint


def save_atomic(obj, path):
    """Write to a temporary file and rename, so a kill mid-write never leaves a broken file."""
    tmp = Path(str(path) + ".tmp")
    if isinstance(obj, str):
        tmp.write_text(obj)
    elif isinstance(obj, dict) and path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=2))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    numpy_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def format_metrics(record):
    losses = " ".join(f"{k} {v:.4f}" for k, v in record["losses"].items())
    accuracy = " ".join(f"{k} {v['top1']:.4f}" for k, v in record.get("test", {}).items()) or "-"
    eta = time.strftime("%H:%M:%S", time.gmtime(record["eta_s"]))
    return (f"epoch {record['epoch']}/{record['epochs']} | lr {record['lr']:.4g} | {losses} | "
            f"top1 {accuracy} | {record['images_per_s']:.0f} img/s | eta {eta}")


def main(args):
    # ==== setup: distributed, device, seed, precision (identical in every method file) ====
    distributed = "LOCAL_RANK" in os.environ  # launched by torchrun (one process too: DDP and NCCL run)
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    is_main = rank == 0
    given = vars(args).pop("given", [])
    if args.batch_size % world_size:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes (use a multiple)")
    if args.resume:  # continue with the run's saved arguments; only RESUMABLE flags may differ
        checkpoint_path, resumed = load_checkpoint(args.resume)
        saved = resumed["args"]
        differ = {k: f"--{k.replace('_', '-')} {getattr(args, k)} (run: {saved.get(k)})" for k in given
                  if getattr(args, k) != saved.get(k)}
        if conflicts := [text for k, text in differ.items() if k not in RESUMABLE]:
            fail(f"--resume keeps the run's arguments, but {', '.join(conflicts)}: start a new run to change them")
        changes = [k for k in differ if k not in JOB_FLAGS]
        args = argparse.Namespace(**{**saved, **{k: getattr(args, k) for k in (*JOB_FLAGS, *changes)},
                                     "out_dir": str(checkpoint_path.parent)})
        if args.epochs < resumed["epoch"]:
            fail(f"--epochs {args.epochs}: the run has already trained {resumed['epoch']} epochs")
        if resumed["epoch"] == args.epochs and (checkpoint_path.parent / "summary.json").exists():
            print(f"{METHOD}: the run in {checkpoint_path.parent} is complete ({args.epochs} epochs); nothing to do")
            return
        if is_main and changes:
            print(f"{METHOD}: resuming with {', '.join(differ[k] for k in changes)}"
                  + ("; the learning-rate schedule now spans the new --epochs" if "epochs" in changes else ""))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if distributed and args.device == "cuda" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": torch.float32}[args.amp]
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp != "off")
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    try:
        data = build_data(args.dataset, args.data_dir, args.batch_size // world_size, device, subset=args.subset,
                          augment=args.augment, seed=args.seed, rank=rank, world_size=world_size, holdout=args.holdout)
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        networks = build_networks(args, data.num_classes, data.image_size)
    except (ValueError, OSError) as error:
        fail(f"{error}")
    sizes = [len(loader.images if hasattr(loader, "images") else loader.dataset) for loader in (data.train, data.test)]
    if is_main and args.subset and args.subset > min(sizes):
        print(f"{METHOD}: --subset {args.subset} is more than the data holds: using {sizes[0]} training and {sizes[1]} "
              "test images")
    if len(data.train) == 0:  # the last incomplete batch is dropped
        fail(f"--batch-size {args.batch_size} is larger than the training set ({sizes[0]} images)")
    random.seed(args.seed + rank)  # from here on each rank draws its own random numbers
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    out_dir = Path(args.out_dir or default_out_dir(args))
    args.out_dir = str(out_dir)
    if not args.resume and not args.overwrite and any((out_dir / name).exists() for name in RUN_FILES):
        fail(f"{out_dir} already holds a run: continue it with --resume {out_dir}, or replace it with --overwrite")

    # ==== the method's networks, optimizers and frozen parts ====
    frozen = set()
    try:
        shapes = [stage_shapes(net, data.image_size) for net in networks.values()]
    except ValueError as error:
        fail(f"{error}")
    discriminators, blocks = build_block_modules(shapes, not args.no_adversarial, not args.no_alignment)
    # each peer's optimizer owns its network and its block-wise extras (adapters, alignment containers)
    optimizers = {name: make_optimizer([*net.parameters(), *blocks[j].parameters()], args)
                  for j, (name, net) in enumerate(networks.items())}
    extra_modules = {f"{name}_blocks": blocks[j] for j, name in enumerate(networks)}
    if discriminators is not None:  # eq. 1's max over D: the discriminators (sigma included) have their own optimizer
        optimizers["disc"] = make_optimizer(discriminators.parameters(), args, lr=args.disc_lr)
        extra_modules["discriminators"] = discriminators
    # choice: "disc" follows the main schedule, so the two players' step sizes keep their ratio; a constant
    # lr would let the discriminators outrun networks whose lr anneals to 0 (saturated D, no useful signal)
    constant_lr = set()

    # ==== device placement, compile, DDP, schedule, resume (identical in every method file) ====
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    for module in [*networks.values(), *extra_modules.values()]:
        module.to(device, memory_format=memory_format)

    def ddp(module):  # under torchrun every trainable module (network, head, discriminator) all-reduces its gradients
        if not (distributed and any(p.requires_grad for p in module.parameters())):
            return module
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    train_nets = {name: ddp(torch.compile(net) if args.compile else net) for name, net in networks.items()}
    train_extra = {name: ddp(module) for name, module in extra_modules.items()}  # noqa: F841 - for the method's step
    steps_per_epoch = len(data.train)
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps_per_epoch, args))
                  for name, opt in optimizers.items() if name not in constant_lr}
    start_epoch, train_time, last_eval, best = 0, 0.0, {}, {}
    if args.resume:
        try:
            for name, net in networks.items():
                net.load_state_dict(resumed["networks"][name])
            for name, module in extra_modules.items():
                module.load_state_dict(resumed["extra"][name])
            for name, opt in optimizers.items():
                opt.load_state_dict(resumed["optimizers"][name])
            for name, sched in schedulers.items():
                sched.load_state_dict(resumed["schedulers"][name])
            scaler.load_state_dict(resumed["scaler"])
            set_rng_state(resumed["rng"])
            start_epoch, train_time = resumed["epoch"], resumed["train_time_s"]
            last_eval, best = resumed["last_eval"], resumed["best"]
        except (KeyError, ValueError, RuntimeError) as error:
            fail(f"{checkpoint_path} does not fit the networks its arguments build ({type(error).__name__}: {error})")
    writer = None
    if is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            fail(f"cannot create the output folder {out_dir}: {error.strerror}")
        if args.overwrite:
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
        if args.holdout and not args.resume:  # which training images this run never trained on
            save_atomic({"indices": data.holdout_indices}, out_dir / "holdout.json")
        metrics_path = out_dir / "metrics.jsonl"
        if args.resume and metrics_path.exists():  # drop lines past the checkpoint (a kill between the two writes)
            lines = metrics_path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if line.endswith("\n") and json.loads(line)["epoch"] <= start_epoch]
            if kept != lines:
                save_atomic("".join(kept), metrics_path)
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(out_dir)
        except ImportError:  # tensorboard is optional
            pass
        params = ", ".join(f"{name} {sum(p.numel() for p in n.parameters()):,} params" for name, n in networks.items())
        print(f"{METHOD}: {params} | {data.num_classes} classes | {steps_per_epoch} steps/epoch | "
              f"{device} x{world_size} | {args.amp} | -> {out_dir}"
              + (f" | resumed at epoch {start_epoch}" if args.resume else ""))

    # ==== the method's training step and evaluation outputs ====

    def train_step(images, labels, epoch):
        """One AMLN iteration (amln_step: eq. 1-9 in the order of Algorithm 1); returns the logged loss terms."""
        peers = [train_nets["peer1"], train_nets["peer2"]]
        peer_blocks = [train_extra["peer1_blocks"], train_extra["peer2_blocks"]]
        discriminators = train_extra.get("discriminators")
        return amln_step(peers, peer_blocks, discriminators, optimizers, images, labels, args, scaler,
                         autocast)

    def predict(images):
        logits = {name: net(images) for name, net in networks.items()}
        # choice: the ensemble (not in the paper) averages the peers' logits, as in every script here
        return {**logits, "ensemble": torch.stack(list(logits.values())).mean(0)}

    # ==== training loop, logging, checkpoints (identical in every method file) ====
    last_epoch = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start_epoch, last_epoch):
        for name, net in networks.items():
            net.train(name not in frozen)
        data.train.set_epoch(epoch)
        loss_sums, finite_steps = None, torch.zeros((), dtype=torch.long, device=device)
        epoch_start = time.perf_counter()
        for step, (images, labels) in enumerate(data.train):
            images = images.contiguous(memory_format=memory_format)
            terms = train_step(images, labels, epoch)
            for scheduler in schedulers.values():
                scheduler.step()  # per iteration: the lr follows lr_factor step by step
            # the loss terms stay on the device as one running sum, read once per epoch: no host sync per step
            values = torch.stack([value.detach().float() for value in terms.values()])
            loss_sums = values if loss_sums is None else loss_sums + values
            # a sum stays non-finite once a term was, so this counts the steps before the first bad one
            finite_steps += loss_sums.isfinite().all()
            # one sync per 50 steps
            if (step % 50 == 49 or step == steps_per_epoch - 1) and finite_steps.item() <= step:
                bad_terms = ", ".join(name for name, finite in zip(terms, loss_sums.isfinite().tolist()) if not finite)
                fail(f"non-finite loss ({bad_terms}) at epoch {epoch + 1}, step {finite_steps.item() + 1}; lower --lr "
                     f"or the method's loss weight; the last checkpoint in {out_dir} is intact", code=3)
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - epoch_start
        train_time += epoch_time
        losses = loss_sums / steps_per_epoch
        if distributed:
            dist.all_reduce(losses, op=dist.ReduceOp.AVG)
            average_buffers([*networks.values(), *extra_modules.values()])
        record = {"epoch": epoch + 1, "epochs": args.epochs,
                  "lr": next(iter(optimizers.values())).param_groups[0]["lr"],
                  "losses": dict(zip(terms, losses.tolist())),
                  "images_per_s": steps_per_epoch * args.batch_size / epoch_time,
                  "eta_s": epoch_time * (args.epochs - epoch - 1)}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            for net in networks.values():
                net.eval()
            scores, extras = evaluate(predict, data.test, autocast, distributed)
            names = [name for name in networks if name in scores]  # the cohort's networks among the outputs
            for name, score in scores.items():
                if score["top1"] > best.get(name, {"top1": -1.0})["top1"]:
                    best[name] = {"top1": score["top1"], "epoch": epoch + 1}
            mean = {key: sum(scores[name][key] for name in names) / len(names) for key in scores[names[0]]}
            # the best epoch of each output is chosen by looking at the test set: an optimistic number
            last_eval = {"test": scores, "networks_mean": mean, "best": {"selected_on": "test", "outputs": dict(best)},
                         **({"method_metrics": extras} if extras else {})}
            record.update(last_eval)
        if is_main:
            print(format_metrics(record), flush=True)
            with open(out_dir / "metrics.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            if writer:
                for name, value in record["losses"].items():
                    writer.add_scalar(f"loss/{name}", value, epoch + 1)
                for name, metrics in record.get("test", {}).items():
                    writer.add_scalar(f"test_top1/{name}", metrics["top1"], epoch + 1)
            save_atomic({"method": METHOD, "epoch": epoch + 1, "args": vars(args), "deployed": DEPLOYED,
                         "num_classes": data.num_classes, "image_size": data.image_size,
                         "networks": {name: net.state_dict() for name, net in networks.items()},
                         "extra": {name: module.state_dict() for name, module in extra_modules.items()},
                         "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                         "schedulers": {name: sched.state_dict() for name, sched in schedulers.items()},
                         "scaler": scaler.state_dict(), "rng": rng_state(), "train_time_s": train_time,
                         "last_eval": last_eval, "best": best}, out_dir / "checkpoint.pt")
    if is_main and last_epoch == args.epochs:  # the headline is the final epoch; the rest of last_eval beside it
        outputs = dict(last_eval["test"])
        ensemble = outputs.pop("ensemble", None)
        deployed = last_eval["test"][DEPLOYED]
        save_atomic({"format_version": 2, "method": METHOD, "deployed_network": DEPLOYED, "deployed": deployed,
                     "networks": outputs, "ensemble": ensemble, **{k: v for k, v in last_eval.items() if k != "test"},
                     "epochs": args.epochs, "args": vars(args), "train_time_s": train_time}, out_dir / "summary.json")
        print(f"{METHOD}: deployed {DEPLOYED} top-1 {deployed['top1']:.4f} -> {out_dir / 'summary.json'}")
    if writer:
        writer.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
