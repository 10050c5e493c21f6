"""Feature Difference Loss (FDL) ensembles: B. Das, S. Dutta Roy, "Knowledge Diversification in Ensembles
of Identical Neural Networks", BMVC 2022 (poster "Identical Neural Networks"); the training details are
those of the authors' code, github.com/bishshoy/FDL.

N identical networks, independently initialised, are trained side by side while a feature difference
loss pushes the outputs of their convolutions apart, so the pool learns N different feature sets instead
of one; a learned ensemble head combines their logits and is deployed. The poster numbers no equation;
for networks N1, N2 whose D recorded layers give feature tensors F_d (B x C x H x W):

    L_d^{N1,N2} = (1/BCHW) sum_{b,c,h,w} (F_d^{N1}(b,c,h,w) - F_d^{N2}(b,c,h,w))^2   ("Feature Difference Losses")
    L_FDL^{N1,N2} = (1/D) sum_d L_d^{N1,N2}
    S^{N1,N2} = (L_1 - L_2)^2,  L_i the cross-entropy L_X(y_hat_i, y) of network i   ("Similarity loss")
    N_E* = argmin_W -L_FDL + k S + k1 L_X(y_hat_1, y) + k2 L_X(y_hat_2, y)           (the overall criterion)

The criterion is split into phases ("Phased training") so that no weight k is needed: after
`--pretrain-epochs` of plain CE, every batch runs four sub-steps, each with a fresh forward and its own
optimizer, in this order (train_step reads them top to bottom):
  1. L_X for every network                                      optimizer "main" (the common schedule)
  2. S for one pair, a random one when N > 2; all N forwarded    "similarity" (the main settings and lr)
  3. -L_FDL averaged over all pairs, on every conv output before its BN (1x1 projection shortcuts excepted)
                                                                 "fdl" (constant --fdl-lr, momentum 0.85, Nesterov)
  4. L_X(head(concat(z_1, ..., z_N)), y), bases frozen (eval mode, no gradient), head Linear(N*C -> C)
                                                                 "head" (constant --head-lr)
-L_FDL is unbounded below (scaling a conv raises the difference), hence its tiny constant lr. Each epoch
logs "fdl" and "feature_diff" (the mean squared feature difference on the CE forward, also with --no-fdl:
the poster's plot (c)). Each base and the bases' mean logits ("ensemble") are reported beside the head.

Reproduce the poster's VGG-16 (2x) CIFAR-100 row (the defaults are the authors' setting for it: batch 128,
SGD lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4, FDL lr 1e-5, head lr 0.1, 1 pretrain epoch):
    python fdl.py                              # poster: FDL (2x) 77.02% top-1
    python fdl.py --no-fdl --no-similarity     # independent networks: VGG-16 (1x) 74.61% per base, RIE (2x) 76.95%
The poster prints one top-1 per row, the head's (RIE: an ensemble of independently trained networks, here
"ensemble"); the authors' code prints the maximum over the epochs of an open-ended run (seeds not stated).
summary.json's `deployed` is the head's final top-1 and `best` its best epoch (selected on the test set, as
theirs). CIFAR-10 (FDL 94.93%): `--dataset cifar10`. 3x, 4x ensembles: `--num-nets 3` or `4`; CIFAR
ResNets: `--model resnet56`; the FDL and head lrs and the pretrain epochs then follow the authors' scripts
(authors_lrs, and 2 pretrain epochs for VGG-16 x4).

Paper vs code:
- Schedule: the authors set the CE and similarity lr to 1e-5 + 0.1 exp(-0.03 t) in joint epoch t (2e-5 after
  t = 220) and run open-ended; the code anneals by cosine over --epochs (250, choice: about where their lr
  reaches its floor). No flag gives the exponential.
- One criterion (weights k, k1, k2) in the poster; four sub-steps with their own optimizers in the authors'
  code (the poster's "Phased training"): the code follows the authors.
- Layers of L_FDL: not stated in the poster. The authors record every conv output before its BN (VGG-16: 13)
  and, in their ResNets, the graph nodes named "conv" (no projection shortcut): the code does the same.
- VGG-16: the authors' is torchvision's vgg16_bn features (five max-pools) and one linear layer; models.py's
  vgg16 is the CIFAR distillation zoo's (RepDistiller: global average pooling in place of the fifth max-pool),
  same parameters and the same 13 convs. No flag.
- The authors' CIFAR ResNets have parameter-free shortcuts and run a second forward to read the features
  (their BN statistics move twice per sub-step); models.py's have 1x1 projection shortcuts (left out of
  L_FDL), and one forward reads both.
- Unused parameters: the authors' torch 1.x zero_grad left zero gradients, so the similarity and FDL
  optimizers applied momentum and weight decay to every parameter at every step; the code gives the unused
  parts zero-weight terms, with the same effect.
- The random pair (N > 2): np.random per batch in the authors' code; here a generator seeded by (seed, step),
  the same on every rank and after --resume.
- Reported number: the authors' best epoch; here the final epoch, with the best beside it.
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

METHOD = "fdl"


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
    # the authors' code for the poster's main experiment, VGG-16 x2 on CIFAR-100 (bishshoy/FDL, vgg_cifar100_expt.py):
    # SGD momentum 0.9, Nesterov, weight decay 5e-4, batch 128, lr 0.1. choice: 250 epochs (their runs are open-ended,
    # their lr reaches its floor after epoch 220 and their single-network baseline trains 250)
    parser.set_defaults(model="vgg16", dataset="cifar100", epochs=250, batch_size=128, lr=0.1, momentum=0.9,
                        weight_decay=5e-4, nesterov=True)
    method = parser.add_argument_group("FDL (Das & Dutta Roy, BMVC 2022; authors' code bishshoy/FDL)")
    method.add_argument("--num-nets", type=positive_int, default=2,
                        help="number N of identical networks in the pool (2 to 4)")
    method.add_argument("--pretrain-epochs", type=nonnegative_int, default=None,
                        help="epochs of plain CE per network before the four sub-steps start (default: %(default)s = "
                             "the authors', 2 for VGG x4, else 1)")
    method.add_argument("--fdl-lr", type=positive_float, default=None,
                        help="constant lr of the feature difference step (default: %(default)s = the authors' for the "
                             "model, N and class count, see authors_lrs; VGG-16 x2: 1e-5)")
    method.add_argument("--head-lr", type=positive_float, default=None,
                        help="constant lr of the ensemble head (default: %(default)s = the authors', see authors_lrs; "
                             "VGG-16 x2: 0.1)")
    method.add_argument("--no-fdl", action="store_true", help="skip the feature difference step (ablation)")
    method.add_argument("--no-similarity", action="store_true", help="skip the similarity step (ablation)")
    args = parser.parse_args(argv)
    if not 2 <= args.num_nets <= 4:
        parser.error(f"--num-nets must be 2, 3 or 4 (the poster's 2x-4x ensembles), got {args.num_nets}")
    if args.pretrain_epochs is None:  # authors: vgg_net_expt_x4.py pretrains each network 2 epochs, the others 1
        args.pretrain_epochs = 2 if args.model.startswith("vgg") and args.num_nets == 4 else 1
    if not 0 <= args.pretrain_epochs < args.epochs:
        parser.error(f"--pretrain-epochs must be >= 0 and below --epochs ({args.epochs}) so the head gets trained, "
                     f"got {args.pretrain_epochs}")
    if args.model.startswith("msdnet"):
        parser.error(f"FDL needs single-exit networks; --model {args.model} has one output per exit")
    return args


# ==== the method ====
def feature_difference_loss(features_a, features_b):
    """-L_FDL^{a,b} (poster, "Feature Difference Losses"): minus the mean over the D recorded layers of
    L_d^{a,b} = (1/BCHW) sum_{b,c,h,w} (F_d^a - F_d^b)^2. Computed in fp32, summed layer by layer (no
    stacked copy of the features)."""
    total = 0.0
    for feature_a, feature_b in zip(features_a, features_b, strict=True):
        total = total + F.mse_loss(feature_a.float(), feature_b.float())
    return -total / len(features_a)


def all_pairs_feature_difference_loss(features):
    """Sub-step 3: feature_difference_loss averaged over every pair of networks (authors' code for
    N = 3: (L^{1,2} + L^{2,3} + L^{3,1}) / 3). `features`: one list of layer outputs per network."""
    pairs = [(i, j) for i in range(len(features)) for j in range(i + 1, len(features))]
    return sum(feature_difference_loss(features[i], features[j]) for i, j in pairs) / len(pairs)


def similarity_loss(ce_a, ce_b):
    """S^{a,b} = (L_a - L_b)^2 (poster, "Similarity loss"): the squared difference of two networks'
    batch-mean cross-entropies; nothing is detached, so it reaches both (authors' MSELoss(L_1, L_2))."""
    return (ce_a - ce_b) ** 2


def is_projection_shortcut(name):
    """A residual block's 1x1 projection shortcut: models.py (like torchvision) names it `downsample` or `shortcut`."""
    return any(part in ("downsample", "shortcut") for part in name.split("."))


class ConvOutputRecorder:
    """Forward hooks on the Conv2d layers of a network: while `record` runs, each conv's output (before
    its BatchNorm) is collected, in execution order. Recorded: every conv except the 1x1 projection
    shortcuts of residual blocks, as the authors' code: their VGG features are the 13 conv outputs and
    their ResNet features the graph nodes named "conv" (stem and residual branches; their CIFAR ResNets
    have parameter-free shortcuts, and a torchvision `downsample` node is not named "conv"). The hooks
    stay registered (no re-registration per step) and do nothing in any other forward."""

    def __init__(self, network):
        self.outputs = None  # a list only while recording
        # a conv whose next layer works in place (ConvNet's ReLU(inplace=True)) would change the recorded tensor
        overwritten = set()
        for module in network.modules():
            layers = list(module.children()) if isinstance(module, torch.nn.Sequential) else []
            overwritten.update(layer for layer, following in zip(layers, layers[1:])
                               if isinstance(layer, torch.nn.Conv2d) and getattr(following, "inplace", False))
        for name, module in network.named_modules():
            if isinstance(module, torch.nn.Conv2d) and not is_projection_shortcut(name):
                module.register_forward_hook(self._record_copy if module in overwritten else self._record)

    def _record(self, module, inputs, output):
        if self.outputs is not None:
            self.outputs.append(output)  # the tensor autograd keeps for the BN backward anyway: no extra memory

    def _record_copy(self, module, inputs, output):
        if self.outputs is not None:
            self.outputs.append(output.clone())

    def record(self, network, images):
        """`network(images)` (the raw network or its DDP/compiled wrapper) -> (logits, [recorded conv outputs])."""
        self.outputs = []
        try:
            return network(images), self.outputs
        finally:
            self.outputs = None


class EnsembleHead(torch.nn.Linear):
    """The ensemble head: Linear(N*C -> C) over the bases' concatenated logits (the authors' Conv1d(N*C, C, 1),
    the same map). Run in fp32 even under autocast, as the classifiers: a bf16 input would round the logits."""

    def forward(self, logits):
        with torch.autocast(logits.device.type, enabled=False):
            return super().forward(logits.float())


def frozen_base_logits(bases, images):
    """Sub-step 4's input: the bases' logits concatenated [B, N*C], each base in eval mode and without
    gradient (authors' EnsembleNet), so the head step changes no base; the bases' modes are restored."""
    modes = [base.training for base in bases]
    with torch.no_grad():
        for base in bases:
            base.eval()
        logits = torch.cat([base(images) for base in bases], dim=1)
    for base, mode in zip(bases, modes):
        base.train(mode)
    return logits


def authors_lrs(model, num_nets, num_classes):
    """(FDL lr, head lr), both constant, as the authors' scripts set them (bishshoy/FDL): VGG-16 x2 1e-5 and 0.1
    on CIFAR-10 and CIFAR-100 alike; VGG-16 x3 1e-5 (CIFAR-100) or 1e-4 (CIFAR-10) and 0.1; VGG-16 x4 1e-4 and
    0.01; CIFAR ResNets x2-x4 1e-5 (CIFAR-100) or 1e-4 (CIFAR-10) and 0.01. choice: any other backbone takes
    the ResNets' values, and any dataset other than a 10-class one CIFAR-100's."""
    ten_classes = num_classes == 10
    if model.startswith("vgg"):
        return (1e-4 if num_nets == 4 or (num_nets == 3 and ten_classes) else 1e-5), (0.01 if num_nets == 4 else 0.1)
    return (1e-4 if ten_classes else 1e-5), 0.01


def build_networks(args, num_classes, image_size):
    """The networks this method trains and evaluates, by name (analysis.py rebuilds runs with it)."""
    return {f"base{k + 1}": build_model(args.model, num_classes, image_size) for k in range(args.num_nets)}


DEPLOYED = "head"  # the ensemble head over the bases' logits ("FDL Ensemble architecture")


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
    names = list(networks)
    recorders = {name: ConvOutputRecorder(net) for name, net in networks.items()}
    head = EnsembleHead(len(names) * data.num_classes, data.num_classes).to(device)
    bases = [p for net in networks.values() for p in net.parameters()]
    fdl_lr, head_lr = authors_lrs(args.model, len(names), data.num_classes)
    args.fdl_lr = fdl_lr if args.fdl_lr is None else args.fdl_lr  # resolved here and saved with the run's arguments
    args.head_lr = head_lr if args.head_lr is None else args.head_lr
    # choice: one "main" optimizer for the CE sub-step of all bases; SGD (and AdamW) act per parameter and each
    # CE reaches only its own network, so it steps exactly like the authors' one SGD per network
    optimizers = {"main": make_optimizer(bases, args),
                  "similarity": make_optimizer(bases, args),  # authors: own SGD, the CE ones' settings and lr
                  "fdl": torch.optim.SGD(bases, lr=args.fdl_lr, momentum=0.85, nesterov=True,
                                         weight_decay=args.weight_decay),
                  # choice: the head follows the common SGD flags (authors: momentum 0.9, Nesterov, wd 5e-4)
                  "head": torch.optim.SGD(head.parameters(), lr=args.head_lr, momentum=args.momentum,
                                          weight_decay=args.weight_decay, nesterov=args.nesterov)}
    extra_modules = {"head": head}
    # authors: the fdl and head lrs are not scheduled; "similarity" copies the main lr when it steps (below), so no
    # scheduler steps it during the pretrain epochs, before its first optimizer step
    constant_lr = {"similarity", "fdl", "head"}

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
        """One FDL batch: the poster's criterion -L_FDL + k S + k1 L_X + k2 L_X, split into the authors' four
        sub-steps ("Phased training"), each with a fresh forward and its own optimizer; during the pretrain
        epochs only the first. Returns the loss terms as tensors (logged per epoch)."""
        joint = epoch >= args.pretrain_epochs
        not_run = torch.zeros((), device=device)

        # 1. L_X(y_hat_i, y) for every network i (optimizer "main": the common schedule). The conv outputs of
        #    this forward also measure the feature difference, without gradient (the poster's plot (c))
        with autocast():
            outputs = [recorders[name].record(train_nets[name], images) for name in names]
        ces = [F.cross_entropy(logits.float(), labels) for logits, _ in outputs]
        with torch.no_grad():
            feature_diff = -all_pairs_feature_difference_loss([features for _, features in outputs])
        del outputs  # the recorded features are not kept past the backward
        backward_step(sum(ces), scaler, optimizers["main"])

        # 2. S^{i,j} = (L_i - L_j)^2 for one pair, a random one when N > 2 (optimizer "similarity", the main lr).
        #    As in the authors' code all N networks run forward (each BN sees the batch as often as in theirs);
        #    the others enter with weight 0: their gradients are zeros, not None, so DDP finds every parameter
        #    used and the optimizer applies momentum and weight decay to them as the authors' (torch 1.x zero_grad)
        # the pair is seeded by (seed, optimizer steps so far): the same on every rank and after a resume, no tensor
        i, j = sorted(random.Random((args.seed << 32) + schedulers["main"].last_epoch).sample(range(len(names)), 2))
        if joint and not args.no_similarity:
            with autocast():
                all_logits = [train_nets[name](images) for name in names]
            similarity = similarity_loss(F.cross_entropy(all_logits[i].float(), labels),
                                         F.cross_entropy(all_logits[j].float(), labels))
            others = sum(logits.float().sum() for k, logits in enumerate(all_logits) if k not in (i, j)) * 0.0
            optimizers["similarity"].param_groups[0]["lr"] = optimizers["main"].param_groups[0]["lr"]
            backward_step(similarity + others, scaler, optimizers["similarity"])
            del all_logits
        else:  # logged all the same, from sub-step 1's cross-entropies
            similarity = similarity_loss(ces[i], ces[j]).detach()

        # 3. -L_FDL, averaged over all pairs, minimised: it pushes every recorded conv output apart (optimizer "fdl":
        #    constant tiny lr, momentum 0.85, Nesterov). The layers after the last conv enter with weight 0, for
        #    DDP and for this optimizer's weight decay, as in the authors' code
        fdl = not_run
        if joint and not args.no_fdl:
            with autocast():
                outputs = [recorders[name].record(train_nets[name], images) for name in names]
            fdl = all_pairs_feature_difference_loss([features for _, features in outputs])
            after_last_conv = sum(logits.float().sum() for logits, _ in outputs) * 0.0
            backward_step(fdl + after_last_conv, scaler, optimizers["fdl"])
            del outputs

        # 4. L_X(head(concat(z_1, ..., z_N)), y): the ensemble head on the frozen bases' logits (eval mode, no
        #    gradient; optimizer "head", constant lr)
        head_ce = not_run
        if joint:
            with autocast():
                head_logits = train_extra["head"](frozen_base_logits(list(networks.values()), images))
                head_ce = F.cross_entropy(head_logits, labels)
            backward_step(head_ce, scaler, optimizers["head"])
        return {**{f"ce_{name}": ce for name, ce in zip(names, ces)}, "similarity": similarity, "fdl": fdl,
                "feature_diff": feature_diff, "head_ce": head_ce}

    def predict(images):
        logits = {name: net(images) for name, net in networks.items()}
        # choice: the bases' mean logits ("ensemble") are reported beside the head, for comparison (RIE)
        return {"head": head(torch.cat(list(logits.values()), dim=1)), **logits,
                "ensemble": torch.stack(list(logits.values())).mean(0)}

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
