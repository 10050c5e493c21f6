"""Siamese Labels Auxiliary Learning (SiLa): W. Gan, Z. Liu, C. L. P. Chen, T. Zhang, "Siamese Labels
Auxiliary Learning", arXiv:2103.00200, 2021.

C networks (two by default) are trained through one softmax over their concatenated logits, the "siamese
labels": network c's block of N logits is scored with the true class shifted into that block, and since
all blocks share the softmax, every term also pushes on the other networks' logits. At test time the
coupling is removed: each network predicts with its own N logits, and net1 is deployed.

    z_bar = concat(F_1(x), ..., F_C(x))                     (C*N logits)                      (eq. 9)
    L_c = (1/K) sum_i L_cross(z_bar_i, y_i + (c-1)N)         L_cross: eq. 2 over C*N classes   (eq. 8)
    L_sila = sum_c beta_c L_c                                beta_c = 1 (`--betas`)            (eq. 10)
    Theta_c <- Theta_c - gamma_t dL_sila/dTheta_c            every network, one step           (eq. 6-7)
    Dynamic SiLa: one MSDNet's C exits f_1..f_C as the blocks of z_bar, L_msd_sila = sum_c beta_c L_c  (eq. 11)

L_sila equals sum(beta) times one soft-label cross-entropy over the C*N classes with mass beta_c / sum(beta)
on class y of block c; there is no per-network CE unless `--plus-ce`. `--dml` adds Deep Mutual Learning's
KL(p_peer || p_self) for each network (SiLa+DML, Table 1's best rows); `--no-sila` trains each network on
its own CE (IND). With `--model msdnet*` ONE MSDNet is trained with its exits concatenated; every exit is
reported ("exit1".."exitC"), net1 is the whole network (its last exit), and `--no-sila` is MSDNet's own
training, the sum of the exits' CEs.

Reproduce Table 1, ResNet-18 + ResNet-18, CIFAR-100 (the defaults are section 4.1's setting: 260 epochs,
batch 128, lr 0.1, MultiStep at 30, 55, 80, 105, 135, 160, 180, 200, 220, 240):
    python sila.py                              # paper: SiLa, net1 77.85% top-1
Table 1 prints each network's top-1 at the end of training (net1, and net2 where the row lists it), its best
epoch (BEST: 78.08% here), top-5 and NLL, each "averaged over multiple experiments" (how many is not said).
summary.json's `deployed` is net1's final top-1, `best` the best epoch (selected on the test set, as BEST);
average several `--seed` runs. Other rows, same command plus:
    --no-sila                  IND 76.45% (one network; here net1 and net2 are two independent ones)
    --dml                      SiLa+DML 78.13% (net2 78.03%)
    --no-sila --dml            DML 77.07% (net2 77.46%)
    --models mobilenet,resnet18                  SiLa, mixed pair: 69.17% / 77.20%
Table 3 (AutoAugment) prints top-1 with top-2 (CIFAR-10) or top-5 (CIFAR-100), which every epoch line and
summary.json carry: `--augment autoaugment --model resnet34` gives its SiLa row, net1 80.60% on CIFAR-100.
Dynamic SiLa on MSDNet, CIFAR-100 (section 4.2; the results are curves only, Fig. 4-5):
    python sila.py --model msdnet10 --epochs 300 --batch-size 64 --weight-decay 1e-4 \\
        --milestones 150 225 --gamma 0.1 --holdout 5000
    ... --no-sila                                # the MSDNet baseline
    python analysis.py msdnet RUN                # anytime (Fig. 5) and budgeted batch (Fig. 4) accuracy
`--holdout 5000` keeps 5,000 class-stratified training images out of training (MSDNet's protocol) and records
them (holdout.json); analysis.py fits the budgeted-batch confidence thresholds on exactly those images, never
on images the network trained on. MSDNet's budgeted-batch CIFAR network: `--model msdnet5_lingrow`.

Paper vs code:
- MultiStep factor: not stated. Code: x0.5 at each milestone (0.1 -> 9.8e-5 at epoch 240); PyTorch's default
  x0.1 would leave the lr at 1e-5 from epoch 105 and 1e-11 at 240, so seven milestones could change nothing
  (section 4.2, meaning x0.1, says "divided by 10"). PyTorch's default factor: `--gamma 0.1`.
- Momentum, weight decay, Nesterov: not stated. Code: 0.9, 5e-4, off (the values of the CIFAR distillation
  benchmarks, RepDistiller); MSDNet runs: weight decay 1e-4 (MSDNet's code, kalviny/MSDNet-PyTorch).
- Section 4.2's milestones "150 and 255": read as 150 and 225, where MSDNet's code divides (at 50% and 75% of
  its 300 epochs), as 255 looks like a transposition. Printed: `--milestones 150 255`.
- Algorithm 1 (eq. 6-7) writes Theta + gamma dL/dTheta; the code descends the loss (the sign is a typo).
- Eq. 8-10 are written for C = 2; the code takes any C (`--models a,b,c`), as eq. 11 does for exits.
- MSDNet size: not stated. Code: MSDNet's anytime CIFAR network (10 blocks, step 2, base 4: `msdnet10`).
- SiLa+DML: the combined loss is not written. Code: L_sila + sum_k KL(p_peer || p_self) for network k (T = 1,
  weight 1, peers detached, averaged over the batch), every network stepping on one forward.
- Table 1's data augmentation is not stated. Code: random crop with 4-pixel padding + horizontal flip.
- `--plus-ce` and unequal `--betas` are extensions (off); "ensemble" (the mean of the networks' logits) is
  reported for information: the paper deploys one network.
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

METHOD = "sila"


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
    # SiLa section 4.1 (Table 1, CIFAR-100): 260 epochs, SGD, batch 128, lr 0.1, MultiStep at ten milestones.
    # choice: x0.5 at each milestone. The paper names no factor; PyTorch's default 0.1 would take the lr to 1e-5 at
    # epoch 105 and to 1e-11 at 240, below the fp32 resolution of the weights, so the last milestones could change
    # nothing; x0.5 makes each milestone a step and ends at 0.1 / 2^10 = 9.8e-5 (section 4.2, where the paper means
    # x0.1, says "divided by 10"). `--gamma 0.1` gives PyTorch's default. Momentum and weight decay are not stated
    # either: choice, the CIFAR values of the knowledge-distillation benchmarks (RepDistiller): 0.9 and 5e-4.
    parser.set_defaults(model="resnet18", dataset="cifar100", epochs=260, batch_size=128, lr=0.1, momentum=0.9,
                        weight_decay=5e-4, nesterov=False, schedule="multistep",
                        milestones=[30, 55, 80, 105, 135, 160, 180, 200, 220, 240], gamma=0.5)
    method = parser.add_argument_group("SiLa (Gan et al. 2021, arXiv:2103.00200)")
    method.add_argument("--models", default=None,
                        help="comma-separated architectures, one per network (a mixed group, e.g. mobilenet,resnet18); "
                             "default: two of --model")
    method.add_argument("--betas", type=nonnegative_float, nargs="+", default=None,
                        help="weight beta_c of each network's (or MSDNet exit's) term, eq. 10-11; default: all 1")
    method.add_argument("--plus-ce", action="store_true",
                        help="add each network's own cross-entropy on its N logits to the SiLa loss")
    method.add_argument("--dml", action="store_true",
                        help="SiLa+DML: add KL(p_peer || p_self) per network, peers detached, T = 1 (Table 1)")
    method.add_argument("--no-sila", action="store_true",
                        help="each network (MSDNet: each exit) on its own CE: the independent / MSDNet baseline")
    args = parser.parse_args(argv)
    args.models = args.models.split(",") if isinstance(args.models, str) else args.models
    if args.models is not None and len(args.models) < 2:
        parser.error("SiLa needs at least 2 networks: --models a,b (or --model msdnet* for one network's exits)")
    if args.models is not None and any(name.startswith("msdnet") for name in [args.model, *args.models]):
        parser.error("an MSDNet is trained alone (dynamic SiLa concatenates its exits): "
                     "give --model msdnet* without --models")
    architectures = args.models or [args.model] * 2
    # an MSDNet's exits are counted once it is built
    if args.betas is not None and not is_dynamic(args) and len(args.betas) != len(architectures):
        parser.error(f"--betas has {len(args.betas)} values but there are {len(architectures)} networks "
                     f"({', '.join(architectures)})")
    if args.betas is not None and sum(args.betas) <= 0:  # each beta >= 0 is checked by its type
        parser.error(f"--betas must not be all 0, got {args.betas}")
    if args.no_sila and args.plus_ce:
        parser.error("--plus-ce adds the per-network CE to SiLa; with --no-sila that CE is already the whole loss")
    return args


# ==== the method ====
def sila_loss(logits_list, targets, betas):
    """Eq. 8-10 (eq. 11 for a network's exits): sum_c beta_c * CE(z_bar, y + (c-1)*N), where
    z_bar = concat(z_1, ..., z_C) are the siamese labels (eq. 9). A scalar, in fp32.

    One log-softmax over the C*N logits serves every term: term c reads its log-probability at
    class y of block c. Gradient w.r.t. z_bar: (sum(beta) * softmax(z_bar) - sum_c beta_c
    onehot(y + (c-1)*N)) / B, so each term reaches every network's logits.
    """
    if len(betas) != len(logits_list):
        raise ValueError(f"{len(betas)} betas for {len(logits_list)} logit tensors")
    num_classes = logits_list[0].shape[1]
    log_probs = F.log_softmax(torch.cat([logits.float() for logits in logits_list], dim=1), dim=1)
    return sum(beta * F.nll_loss(log_probs, targets + c * num_classes) for c, beta in enumerate(betas))


def mutual_kl(logits_list):
    """DML's term for each network k (Zhang et al. 2018, added in SiLa+DML, Table 1):
    1/(C-1) * sum_{l != k} KL(p_l || p_k), summed over classes, averaged over the batch, T = 1.
    Peers are detached, so term k trains only network k. Returns a list of C scalars, in fp32."""
    log_probs = [F.log_softmax(logits.float(), dim=1) for logits in logits_list]
    kls = []
    for k, own in enumerate(log_probs):
        peers = [peer.detach() for j, peer in enumerate(log_probs) if j != k]
        kls.append(sum(F.kl_div(own, peer, reduction="batchmean", log_target=True) for peer in peers) / len(peers))
    return kls


def is_dynamic(args):
    """Dynamic SiLa (section 3.3): one MSDNet whose exits are concatenated."""
    return args.models is None and args.model.startswith("msdnet")


def build_networks(args, num_classes, image_size):
    """The networks this method trains and evaluates, by name (analysis.py rebuilds runs with it).
    Dynamic SiLa: the one MSDNet is net1 (its forward gives the list of its exits' logits)."""
    if is_dynamic(args):
        return {"net1": build_model(args.model, num_classes, image_size)}
    architectures = args.models or [args.model] * 2
    return {f"net{k + 1}": build_model(name, num_classes, image_size) for k, name in enumerate(architectures)}


DEPLOYED = "net1"  # each network predicts alone at test time (section 3.2); MSDNet: the whole network, its last exit


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
    dynamic = is_dynamic(args)
    # the C members whose logits are concatenated: the networks, or the MSDNet's exits (one per block)
    members = [f"exit{k + 1}" for k in range(len(networks["net1"].stages))] if dynamic else list(networks)
    betas = args.betas or [1.0] * len(members)
    if len(betas) != len(members):  # the networks' count was checked in parse_args; the exits' needs the MSDNet
        fail(f"--betas has {len(betas)} values but there are {len(members)} exits in {args.model}")
    # eq. 6-7: one loss, one optimizer step of every network
    optimizers = {"main": make_optimizer([p for net in networks.values() for p in net.parameters()], args)}
    extra_modules = {}  # trainable parts that are not networks: none (the SiLa module is a concatenation)
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
        """One step of Algorithm 1: the siamese labels (eq. 9), L_sila (eq. 10; eq. 11 on the exits) and one
        gradient step of every network on it (eq. 6-7). Returns the loss terms as tensors (logged per epoch)."""
        with autocast():
            outputs = [train_nets[name](images) for name in networks]
        logits = outputs[0] if dynamic else outputs  # z_1..z_C: the networks' logits, or the MSDNet's exits
        # each member's own CE on its N logits (fp32): the whole loss of IND / MSDNet (--no-sila), added by
        # --plus-ce, always logged. choice: the betas weigh these terms too
        cross_entropies = [F.cross_entropy(member.float(), labels) for member in logits]
        own_ce = sum(beta * ce for beta, ce in zip(betas, cross_entropies))
        terms = {}
        if args.no_sila:
            loss = own_ce
        else:
            terms["sila"] = sila_loss(logits, labels, betas)  # eq. 8-10: one softmax over the C*N siamese labels
            loss = terms["sila"] + own_ce if args.plus_ce else terms["sila"]
        kls = mutual_kl(logits) if args.dml else []  # SiLa+DML: each network's DML term, peers detached
        loss = loss + sum(kls)
        backward_step(loss, scaler, optimizers["main"])  # eq. 6-7: one loss, one step of every network
        return {"loss": loss, **terms, **{f"ce_{name}": ce for name, ce in zip(members, cross_entropies)},
                **{f"kl_{name}": kl for name, kl in zip(members, kls)}}

    def predict(images):  # test time: no coupling, each network (exit) on its own N logits
        if dynamic:
            exits = networks["net1"](images)
            return {**dict(zip(members, exits)), "net1": exits[-1]}
        logits = {name: net(images) for name, net in networks.items()}
        # choice: the networks' mean logits, reported for information (the paper deploys one network)
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
