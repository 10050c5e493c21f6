"""CSS: Channel Self-Supervision for Online Knowledge Distillation (Fan, Cheng, Wang, Yang, Deng, Liu, Deng and
Liu, arXiv:2203.11660, 2022).

Two networks, each a shared stem and m branches that own a copy of the last stage and a K*m-way head, learn from
each other. Branch j sees the shared feature map F with its own region zeroed (sample diversity), learns the
joint label y*m + j of the K*m classes (class, branch) (target diversity), and distils with branch j of the other
network (network diversity). One training step (`train_step`; the objective term by term in `css_loss`):

    z_j     = head_j(stage_j(A_j * F)), branch j's K*m joint logits; A_j zeroes its region   (eq. 1)
    CE_net  = (1/m) sum_j CE(z_j, y*m + j): the CE of the joint softmax of eq. 2, as in eq. 5
    alpha_1 = CE_net1 / CE_net2,  alpha_2 = 1 / alpha_1: the worse network learns more         (eq. 5)
    KD_net1 = T^2 (1/m) sum_j KL(softmax(z2_j / T) || softmax(z1_j / T)) on all K*m logits, T = 3  (eq. 7)
    L       = CE_net1 + CE_net2 + alpha_1 KD_net1 + alpha_2 KD_net2                            (eq. 6-7)
    inference: P_i = (1/m) sum_j z_j[i*m + j], softmax over the K classes                      (eq. 3-4)

Network 1's P is deployed; network 2, the two-network ensemble (mean of both P) and each branch are reported.
Defaults: the authors' code's protocol (the paper defers it to its supplementary material; see parse_args).

Reproduce Table 1's ResNet-110 / CIFAR-100 row (paper: "Ours" 80.71 +- 0.17, "Ensemble" 81.56 +- 0.34):
    python css.py --dataset cifar100 --model resnet110_bottleneck --no-detach
"Ours" is the mean of the two networks (Table 4's 110/110 row: 80.65 and 80.76) and, as the authors' train.py
prints it, each network's best test-epoch top-1 (selected on the test set); mean +- std over runs, their number
not stated. Compare the mean over seeds of net1's and net2's `best` top-1 in summary.json, and the ensemble's
best epoch with "Ensemble"; `deployed` (net1 at the last epoch) is this repository's headline.
Other rows, the flags added to that command:
    Table 1 baseline 76.21: --single-network --branches 1 --no-mask;  WRN20-8 81.12 / 81.40: --model wide_resnet20_8
    Table 2 (branches of both networks ensembled: `ensemble`): 2x2 81.27 --branches 2;  2x3 81.56 (as above)
    Table 4: --net2-model resnet56_bottleneck (net1 80.29, net2 78.70, ensemble 80.54)
    Table 5, all branches ensembled (net1's P for A-B, `ensemble` for C-D; backbone 76.21 as in Table 1):
      A 79.88 --single-network --branches 4 --no-joint-labels;  B 80.15 --single-network --branches 4
      C 80.97 --branches 2 --fixed-weights;  D 81.27 --branches 2

Paper vs code: (the paper says / the code does / why / the flag for the printed reading)
- Masks: "randomly discard" (section 3.1), "stochastically masks" (section 1) / a fixed region per branch, in
  training and at test / the authors' code; eq. 3-4 and the joint labels need each branch's mask known / none.
- Mask size: "discard a quarter of the information in each channel" / an h/4 x w/4 square, 1/16 of the map /
  the authors' code (`len = h // 4`) / none.
- Fourth mask: silent (non-overlapping masks) / branch 4 zeroes a one-pixel column of h/4 pixels, branches 5
  and above nothing / the authors' code (`mask[0:len, w - len]`), on which Table 5 A-B (4 branches) ran /
  `--mask-layout grid`: an h/4 square of a 4x4 grid for every branch (the top-right corner for branch 4).
- Sums over branches: eq. 5-7 sum over the m branches / CE and KD are averaged (alpha is unchanged, L is 1/m of
  the sum) / the authors' code / none.
- KL order: eq. 7 writes KL(logits_net1, logits_net2) in network 1's term / KL(P_net2 || P_net1): the peer is
  the target / the authors' code, F.kl_div(log P_net1, P_net2), whose argument order the notation follows / none.
- Gradients: silent / the peer's probabilities and the alphas are detached (choice: a target and a weight are
  not learning signals; through alpha_1, minimising alpha_1 KD_net1 pushes CE_net2 up) / the authors' code
  detaches nothing, and the printed numbers come from it / `--no-detach`, used in every command above.
- Warm-up: silent / lr rises linearly per step to 0.1 over 5 epochs (mean 0.05) / the schedule all six scripts
  share; the authors' code holds 0.1 * E / 5 through each epoch E = 1..5 (mean 0.06) / none.
- ResNet-110: He et al. (2016), whose CIFAR ResNet-110 has 54 basic blocks (1.7M parameters) / 36 bottleneck
  blocks, also 110 layers (1.17M) / the authors' code (from ONE's and OKDDip's) trains ResNet(Bottleneck,
  [12, 12, 12]), so the printed numbers are that network's / `--model resnet110` (likewise ResNet-56).
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

METHOD = "css"


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
    # The protocol of the authors' code (train.py; the paper defers it to its supplementary material): ResNet-110,
    # 300 epochs, batch 128, SGD momentum 0.9, weight decay 5e-4, lr 0.1 warmed up over 5 epochs and x0.1 at the
    # start of (1-based) epochs 150 and 225, which is after 149 and 224 finished epochs: --milestones counts
    # finished epochs (the paper's section 4.2 also sees its diversity drop "at the 150th epoch").
    parser.set_defaults(model="resnet110_bottleneck", epochs=300, batch_size=128, lr=0.1, momentum=0.9,
                        weight_decay=5e-4, warmup_epochs=5, schedule="multistep", milestones=[149, 224], gamma=0.1)
    method = parser.add_argument_group("CSS (Fan et al. 2022, arXiv:2203.11660)")
    method.add_argument("--branches", type=positive_int, default=3,
                        help="branches m per network (section 4.1: m = 3); each owns a copy of the last stage")
    method.add_argument("--net2-model", default=None, help="architecture of network 2 (default: --model; Table 4)")
    method.add_argument("--temperature", type=positive_float, default=3.0,
                        help="distillation temperature T (eq. 7; T = 3 after ONE)")
    method.add_argument("--mask-layout", default="authors", choices=MASK_LAYOUTS,
                        help="authors: the authors' code's masks (branch 4 a one-pixel column, branches 5+ unmasked); "
                             "grid: an h/4 x w/4 square of a 4x4 grid for every branch")
    method.add_argument("--no-mask", action="store_true",
                        help="no feature masks before the branches (Table 5: without SD)")
    method.add_argument("--no-joint-labels", action="store_true",
                        help="K-way branch heads on plain labels; inference = mean of branch logits "
                             "(Table 5: without TD)")
    method.add_argument("--single-network", action="store_true",
                        help="one network, CE only, no distillation (Table 5: without ND)")
    method.add_argument("--fixed-weights", action="store_true",
                        help="alpha_1 = alpha_2 = 1 instead of the CE ratios of eq. 5 (Table 5: without DW)")
    method.add_argument("--no-detach", action="store_true",
                        help="let gradients flow through the peer targets and the alphas, as the authors' code does")
    args = parser.parse_args(argv)
    if args.branches < 1:
        parser.error(f"--branches must be >= 1, got {args.branches}")
    if args.branches > len(MASK_GRID_CELLS) and args.mask_layout == "grid" and not args.no_mask:
        parser.error(f"--branches {args.branches}: --mask-layout grid has {len(MASK_GRID_CELLS)} squares, so at most "
                     f"{len(MASK_GRID_CELLS)} branches (or use --mask-layout authors, or --no-mask)")
    if args.single_network and args.net2_model:
        parser.error("--net2-model needs two networks (drop --single-network)")
    return args


# ==== the method ====
# Sample diversity (section 3.1, eq. 1): branch j zeroes one region of the shared feature map, the same
# region in every channel, in training and at test. Layout "grid": an h/4 x w/4 square of a 4x4 grid, the
# four corners first in the authors' order (top-left, bottom-right, bottom-left, top-right), then the other
# squares row by row (16 at most). Layout "authors" (the default) is the authors' code (PumpkinsLemon/CSS,
# resnet_css.py `transform`) exactly: the same first three squares, but branch 4 zeroes a one-pixel column
# (`mask[0:len, w - len] = 0`, a missing colon) and branches 5 and above are not masked at all.
MASK_LAYOUTS = ("authors", "grid")
CORNER_CELLS = [(0, 0), (3, 3), (3, 0), (0, 3)]
MASK_GRID_CELLS = CORNER_CELLS + [(row, column) for row in range(4) for column in range(4)
                                  if (row, column) not in CORNER_CELLS]


def mask_region(branch, height, width, layout="authors"):
    """(rows, columns) slices that branch j (0-based) zeroes, or None for an unmasked branch.

    Squares have side h // 4 (w // 4 across) and lie flush with the edges; when h or w is not a
    multiple of 4 the grid's inner rows are spread evenly (choice: corners stay corners)."""
    side_h, side_w = height // 4, width // 4
    if layout == "authors" and branch >= 3:
        return (slice(0, side_h), slice(width - side_w, width - side_w + 1)) if branch == 3 else None
    row, column = MASK_GRID_CELLS[branch]
    top, left = row * (height - side_h) // 3, column * (width - side_w) // 3
    return slice(top, top + side_h), slice(left, left + side_w)


def mask_features(features, branch, layout="authors"):
    """F_j = A_j * F (eq. 1): branch j's region zeroed in every channel of a [B, C, H, W] map."""
    region = mask_region(branch, features.shape[-2], features.shape[-1], layout)
    if region is None:
        return features
    mask = torch.ones(features.shape[-2:], device=features.device, dtype=features.dtype)
    mask[region] = 0
    return features * mask


def joint_labels(targets, branch, num_branches):
    """Target diversity (section 3.2): branch j learns the joint label y*m + j of K*m classes."""
    return targets * num_branches + branch


def branch_class_logits(logits, branch, num_branches):
    """Branch j's K-way logits: its joint logits z_j[i*m + j] for the classes i = 0..K-1 (eq. 4)."""
    return logits[:, branch::num_branches]


def aggregate_logits(branch_logits, num_branches):
    """Aggregated inference (eq. 3-4): P_i = (1/m) sum_j z_j[i*m + j]; list of [B, K*m] -> [B, K]."""
    return torch.stack([branch_class_logits(logits, j, num_branches)
                        for j, logits in enumerate(branch_logits)]).mean(0)


def branch_cross_entropy(branch_logits, targets, joint=True):
    """CE of one network (eq. 2, 5), averaged over its branches (authors' code); fp32.
    joint=False: every branch on the plain labels (Table 5 without TD)."""
    num_branches = len(branch_logits)
    return sum(F.cross_entropy(logits.float(), joint_labels(targets, j, num_branches) if joint else targets)
               for j, logits in enumerate(branch_logits)) / num_branches


def distillation_loss(self_branch_logits, peer_branch_logits, temperature=3.0, detach_peer=True):
    """One network's KD term of eq. 7: T^2 * (1/m) sum_j KL(softmax(z_peer_j / T) || softmax(z_self_j / T)).

    Branch j learns from the peer's branch j (same mask, same joint labels) on all K*m logits; KL is
    summed over classes and averaged over the batch; averaged over branches (authors' code). fp32. The peer
    is detached by default (choice: it is the target); detach_peer=False: the authors' code."""
    total = 0.0
    for self_logits, peer_logits in zip(self_branch_logits, peer_branch_logits):
        peer_log_probs = F.log_softmax(peer_logits.float() / temperature, dim=1)
        self_log_probs = F.log_softmax(self_logits.float() / temperature, dim=1)
        peer_log_probs = peer_log_probs.detach() if detach_peer else peer_log_probs
        total = total + F.kl_div(self_log_probs, peer_log_probs, reduction="batchmean", log_target=True)
    return temperature**2 * total / len(self_branch_logits)


def dynamic_weights(ce_net1, ce_net2, detach=True):
    """Eq. 5: alpha_1 = CE_net1 / CE_net2 weighs network 1's KD term, alpha_2 = 1 / alpha_1: the
    network with the higher loss learns more from its peer. Detached by default (choice: a weight is not a
    learning signal, and through it minimising alpha_1 KD_net1 pushes CE_net2 up); detach=False: the authors'
    code."""
    alpha_1 = ce_net1 / ce_net2
    alpha_1 = alpha_1.detach() if detach else alpha_1
    return alpha_1, 1 / alpha_1


def css_loss(branch_logits_1, branch_logits_2, targets, temperature=3.0, joint=True, fixed_weights=False,
             detach=True):
    """The objective of eq. 6-7 from two networks' lists of per-branch logits, term by term, in fp32.
    With branch_logits_2 None, network 1's CE alone (Table 5 A-B). Returns (total, dict of the terms)."""
    ce_1 = branch_cross_entropy(branch_logits_1, targets, joint)  # eq. 2 and 5: each branch on its joint labels
    if branch_logits_2 is None:
        return ce_1, {"ce_net1": ce_1}
    ce_2 = branch_cross_entropy(branch_logits_2, targets, joint)
    if fixed_weights:  # Table 5 C: both distillation terms weighted 1
        alpha_1, alpha_2 = torch.ones_like(ce_1), torch.ones_like(ce_2)
    else:  # eq. 5: the network with the larger CE learns more from its peer
        alpha_1, alpha_2 = dynamic_weights(ce_1, ce_2, detach)
    # eq. 7: branch j of each network learns from branch j of the other (same mask, same joint labels)
    kd_1 = distillation_loss(branch_logits_1, branch_logits_2, temperature, detach_peer=detach)
    kd_2 = distillation_loss(branch_logits_2, branch_logits_1, temperature, detach_peer=detach)
    total = ce_1 + ce_2 + alpha_1 * kd_1 + alpha_2 * kd_2  # eq. 6
    return total, {"ce_net1": ce_1, "ce_net2": ce_2, "kd_net1": kd_1, "kd_net2": kd_2,
                   "alpha_net1": alpha_1, "alpha_net2": alpha_2}


def shared_features(stem, shared_stages, x):
    """Outputs of the shared stages; the last one is the feature map the branches mask."""
    features = []
    x = stem(x)
    for stage in shared_stages:
        x = stage(x)
        features.append(x)
    return features



@torch.no_grad()
def check_branchable(backbone, use_mask, image_size):
    """Fail at build time, with the reason, for a backbone CSS cannot split into a shared part and
    branched last stages, or whose shared feature map cannot be masked (not [B, C, H, W], H or W < 4)."""
    if not all(hasattr(backbone, part) for part in ("stem", "stages", "head")) or len(backbone.stages) < 2:
        raise ValueError(f"CSS needs a backbone of a stem, at least 2 stages and one head to branch its last "
                         f"stage; {type(backbone).__name__} is not one (a multi-exit MSDNet cannot be split this way)")
    if not use_mask:
        return
    was_training = backbone.training
    backbone.eval()  # no running-statistics update
    shared = shared_features(backbone.stem, backbone.stages[:-1], torch.zeros(1, 3, image_size, image_size))[-1]
    backbone.train(was_training)
    if shared.dim() != 4 or min(shared.shape[-2:]) < 4:
        raise ValueError(f"CSS masks a square of the feature map entering the last stage, which needs shape "
                         f"[B, C, H, W] with H, W >= 4; this backbone gives {list(shared.shape)} (try --no-mask)")


class MultiBranchNet(torch.nn.Module):
    """A network of CSS (Fig. 1): the shared stem and stages, then m branches, each a (masked)
    copy of the last stage and a head with K*m outputs (K with joint_labels=False).

    `backbones`: one freshly built backbone per branch (models.build_model with K*m classes); the
    first gives the shared part, each gives its branch's last stage and head, so the branches start
    independently initialised, as the authors build each branch's layer anew. forward(x) gives the
    aggregated [B, K] logits (eq. 3-4; the plain mean of the branch logits without joint labels);
    forward(x, return_branches=True) the list of per-branch logits; forward(x,
    return_features=True) (aggregated logits, stage outputs) where the last stage's entry is branch
    1's output (choice: it corresponds to network 2's branch 1, like the KD pairs)."""

    def __init__(self, backbones, num_classes, mask_layout="authors", joint_labels=True, image_size=32):
        super().__init__()
        first = backbones[0]
        check_branchable(first, mask_layout is not None, image_size)
        self.num_branches, self.num_classes = len(backbones), num_classes
        self.mask_layout, self.joint_labels = mask_layout, joint_labels
        head_outputs = num_classes * self.num_branches if joint_labels else num_classes
        if first.head.fc.out_features != head_outputs:
            raise ValueError(f"branch heads have {first.head.fc.out_features} outputs, CSS needs {head_outputs}")
        self.stem, self.shared_stages = first.stem, first.stages[:-1]
        self.branch_stages = torch.nn.ModuleList(backbone.stages[-1] for backbone in backbones)
        self.heads = torch.nn.ModuleList(backbone.head for backbone in backbones)
        self.stage_channels, self.feature_dim = list(first.stage_channels), first.feature_dim

    def shared_forward(self, x):
        return shared_features(self.stem, self.shared_stages, x)

    def aggregate(self, branch_logits):
        if self.joint_labels:
            return aggregate_logits(branch_logits, self.num_branches)
        return torch.stack(branch_logits).mean(0)

    def branch_prediction(self, logits, branch):
        """Branch j alone as a K-way classifier (its accuracy is logged)."""
        return branch_class_logits(logits, branch, self.num_branches) if self.joint_labels else logits

    def forward(self, x, return_features=False, return_branches=False):
        features = self.shared_forward(x)
        branch_logits, branch_outputs = [], []
        for j, (stage, head) in enumerate(zip(self.branch_stages, self.heads)):
            output = stage(mask_features(features[-1], j, self.mask_layout) if self.mask_layout else features[-1])
            branch_outputs.append(output)
            branch_logits.append(head(output))  # models.Head: fp32 logits under autocast
        if return_branches:
            return branch_logits
        logits = self.aggregate(branch_logits)
        return (logits, features + branch_outputs[:1]) if return_features else logits


def build_networks(args, num_classes, image_size):
    """The networks this method trains and evaluates, by name (analysis.py rebuilds runs with it)."""
    head_outputs = num_classes * args.branches if not args.no_joint_labels else num_classes
    architectures = {"net1": args.model}
    if not args.single_network:
        architectures["net2"] = args.net2_model or args.model
    networks = {}
    for name, architecture in architectures.items():
        first = build_model(architecture, head_outputs, image_size)
        check_branchable(first, not args.no_mask, image_size)  # before building the other branches
        backbones = [first] + [build_model(architecture, head_outputs, image_size) for _ in range(args.branches - 1)]
        # runs saved before --mask-layout existed had the grid's squares
        mask_layout = None if args.no_mask else getattr(args, "mask_layout", "grid")
        networks[name] = MultiBranchNet(backbones, num_classes, mask_layout, not args.no_joint_labels, image_size)
    return networks


DEPLOYED = "net1"  # network 1's aggregated prediction (eq. 3-4)


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
    # one SGD over both networks: the authors' two optimizers have the same settings and step on the same loss
    optimizers = {"main": make_optimizer([p for net in networks.values() for p in net.parameters()], args)}
    extra_modules = {}  # trainable parts that are not networks: none here (the heads belong to the branches)
    constant_lr = set()  # optimizers that do not follow the main schedule: none here

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
        """One CSS step on a batch: each network forwards once, every branch masking the shared map and
        scoring the K*m joint classes (eq. 1-2, MultiBranchNet.forward); css_loss gives eq. 5-7 in fp32
        (CE per network, alpha_1 = CE_1 / CE_2, the KL of each branch pair both ways); both networks step."""
        with autocast():
            branch_logits = {name: net(images, return_branches=True) for name, net in train_nets.items()}
        loss, terms = css_loss(branch_logits["net1"], branch_logits.get("net2"), labels, args.temperature,
                               joint=not args.no_joint_labels, fixed_weights=args.fixed_weights,
                               detach=not args.no_detach)
        backward_step(loss, scaler, optimizers["main"])
        return {"loss": loss, **terms}

    def predict(images):
        outputs, aggregated = {}, []
        for name, net in networks.items():
            branch_logits = net(images, return_branches=True)
            aggregated.append(net.aggregate(branch_logits))
            outputs[name] = aggregated[-1]
            outputs.update({f"{name}_branch{j + 1}": net.branch_prediction(logits, j)
                            for j, logits in enumerate(branch_logits)})
        if len(aggregated) > 1:
            outputs["ensemble"] = torch.stack(aggregated).mean(0)  # the two networks' ensemble: mean of both P (4.1)
        return outputs

    def branch_diversity(outputs, labels):
        """Fig. 3 (section 4.2): the Euclidean distance between two branches' softmax outputs, averaged over the
        pairs of branches within each network and over the pairs across the two networks (the measure of
        `analysis.py diversity`); summed over the batch (evaluate averages it)."""
        probs = {name: [F.softmax(outputs[f"{name}_branch{j + 1}"].float(), 1) for j in range(args.branches)]
                 for name in networks}

        def distance(pairs):
            return torch.stack([(a - b).norm(dim=1) for a, b in pairs]).mean(0).sum()

        diversity = {f"diversity_{name}": distance([(p[i], p[j]) for i in range(len(p)) for j in range(i)])
                     for name, p in probs.items() if len(p) > 1}
        if len(probs) == 2:
            diversity["diversity_between"] = distance([(a, b) for a in probs["net1"] for b in probs["net2"]])
        return diversity

    predict.metrics = branch_diversity  # the scaffolding's evaluate() logs these with each evaluation

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
