"""Deep Mutual Learning (DML): Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018 (arXiv:1706.00384).

A cohort of K students learns together: each minimises its own cross-entropy plus the KL
divergence from every peer's predicted distribution to its own, so the students teach each
other without a pre-trained teacher. Every student is deployed alone; `--kl-weight 0` trains
them independently.

    L_k = CE(p_k, y) + 1/(K-1) * sum_{l != k} KL(p_l || p_k)

(DML section 2.1 for K = 2, as Vandersmissen et al., ICLR 2025, print it in their eqs. 2-3; section 2.3
averages over the K-1 peers.) `--temperature T` softens both distributions and scales the KL by T^2.

Reproduce the ResNet32 pair on CIFAR-100 in AMLN's Table 2(b) (Zhang, Lu, Gong, Luo & Liu, ECCV 2020):
"Avg", the mean of the two students' test top-1 (seeds and final/best epoch not stated): DML 70.98%,
trained alone ("vanilla") 69.71%. The defaults are AMLN's CIFAR protocol (its section 4.2).
    python dml.py                  # summary.json: "networks_mean" (final epoch)
    python dml.py --kl-weight 0    # trained alone
DML's own CIFAR-100 protocol (its section 3.1: Nesterov SGD, lr 0.1, batch 64, x0.1 every 60 epochs,
200 epochs; weight decay from its reference, Zagoruyko & Komodakis 2016: 5e-4):
    python dml.py --batch-size 64 --milestones 60 120 180 --epochs 200 --weight-decay 5e-4
TNA's DML comparison (Vandersmissen et al. Table 2: MobileNetV2 / CIFAR-100, lr 0.05: 78.08 +- 0.34%):
    python dml.py --model mobilenetv2 --no-detach --batch-size 256 --lr 0.05 --epochs 200 --schedule cosine \\
        --weight-decay 5e-4 --no-nesterov

Paper vs code:
- DML writes CE and KL as sums over the N images (section 2.1; so does Vandersmissen et al.'s eq. 3); here
  both are batch means (`batchmean`, as the TNA authors' code), which keeps their ratio.
- Algorithm 1 updates the students one after another, recomputing predictions in between. The default
  updates all of them from one forward each (the same loss terms with peers one update older), as the
  TNA authors' DML; `--sequential` is Algorithm 1: student k steps on its peers' latest predictions,
  and its own is recomputed for the students after it with BatchNorm running statistics frozen, so each
  student's statistics see each batch once.
- In Algorithm 1 the peers' predictions are constants (student k's gradient only); the TNA authors' DML
  lets each KL reach both networks: `--no-detach`.
- DML pads its random crops by reflection; data.py pads with zeros (no flag).
- `--temperature` is not in DML (T = 1, the default).
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

METHOD = "dml"


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
    # this script's defaults: the CIFAR protocol of AMLN (Zhang et al., ECCV 2020, section 4.2), under which
    # its Table 2(b) prints DML's ResNet32 pair; AMLN gives no epoch count: choice: 600, three lr steps of 200
    # epochs (the lr drops every 200 epochs and its Fig. 3(b) plots test error beyond epoch 400)
    parser.set_defaults(model="resnet32", batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                        schedule="multistep", milestones=[200, 400], gamma=0.1, epochs=600, warmup_epochs=0)
    method = parser.add_argument_group("DML (Zhang et al., CVPR 2018)")
    method.add_argument("--num-students", type=positive_int, default=2,
                        help="cohort size K (ignored when --models is given)")
    method.add_argument("--models", default=None,
                        help="comma-separated architectures, one per student (a mixed cohort); overrides --model")
    method.add_argument("--temperature", type=positive_float, default=1.0,
                        help="softmax temperature of the KL term (its value is scaled by T^2); DML has none (1)")
    method.add_argument("--kl-weight", type=nonnegative_float, default=1.0,
                        help="weight of the mutual KL term; 0 = trained alone")
    method.add_argument("--sequential", action="store_true",
                        help="Algorithm 1: the students step one after another, each on its peers' latest predictions")
    method.add_argument("--no-detach", action="store_true",
                        help="let the KL's gradient reach the peer too (the TNA authors' DML); not with --sequential")
    args = parser.parse_args(argv)
    args.models = args.models.split(",") if isinstance(args.models, str) else args.models
    if args.models is not None and len(args.models) < 2 or args.models is None and args.num_students < 2:
        parser.error("DML needs a cohort of at least 2 students (--num-students K or --models a,b)")
    if args.sequential and args.no_detach:  # Algorithm 1 steps one student at a time on fixed peer predictions
        parser.error("--no-detach needs the simultaneous update: drop --sequential (Algorithm 1 keeps the peers fixed)")
    return args


# ==== the method ====
def dml_loss(logits_list, targets, temperature=1.0, kl_weight=1.0, detach=True):
    """One loss per student (section 2.3 of Zhang et al.): CE_k + kl_weight/(K-1) * sum_{l != k} T^2 KL(p_l || p_k).

    KL is summed over classes, averaged over the batch. With `detach` the peers are constants, so
    loss k trains only student k (Algorithm 1); without, the KL also pulls each peer p_l towards
    p_k (the TNA authors' DML). Returns (losses, cross_entropies, kls), three lists of K scalars,
    computed in fp32 whatever the logits' dtype (a bf16 softmax rounds away small peer differences).
    """
    log_probs = [F.log_softmax(logits.float(), dim=1) for logits in logits_list]
    soft_log_probs = log_probs if temperature == 1 else [F.log_softmax(z.float() / temperature, 1) for z in logits_list]
    losses, cross_entropies, kls = [], [], []
    for k in range(len(logits_list)):
        peers = [lp.detach() if detach else lp for j, lp in enumerate(soft_log_probs) if j != k]
        # the mean over the K-1 peers, times T^2, which keeps the gradient scale independent of T (Hinton et al. 2015)
        kl = sum(F.kl_div(soft_log_probs[k], peer, reduction="batchmean", log_target=True) for peer in peers)
        kl = kl * temperature**2 / len(peers)
        ce = F.nll_loss(log_probs[k], targets)  # the cross-entropy, from the log-probabilities already at hand
        losses.append(ce + kl_weight * kl)
        cross_entropies.append(ce)
        kls.append(kl)
    return losses, cross_entropies, kls


def forward_with_frozen_statistics(network, images):
    """`network(images)` in its current mode, but BatchNorm leaves its running statistics (and
    num_batches_tracked) as they are: in train mode it still normalises with the batch's statistics."""
    norms = [m for m in network.modules() if getattr(m, "track_running_stats", False)]
    for norm in norms:
        norm.track_running_stats = False  # train mode then normalises by batch statistics and updates nothing
    try:
        return network(images)
    finally:
        for norm in norms:
            norm.track_running_stats = True


def mutual_learning_step(students, optimizers, images, labels, args, autocast, scaler, bare_students=None):
    """One DML step on a batch: every student (name -> network, with its optimizer in `optimizers`)
    steps once. Returns (losses, cross_entropies, kls), one entry per student.

    Every student runs exactly one forward with gradients per step, so its BatchNorm running
    statistics see each batch once. By default all students step on these forwards at once.
    `args.sequential` follows Algorithm 1 of Zhang et al. (2018): student k steps on its peers'
    latest predictions, so student k+1 learns from student k's prediction after k's update.
    `bare_students` are the same networks without DDP/compile wrappers (for the no-grad re-forward).
    """
    names = list(students)
    bare_students = bare_students or students
    with autocast():
        logits = [students[name](images) for name in names]
    if not args.sequential:  # choice: one simultaneous update from one forward per student (the TNA authors' DML)
        losses, cross_entropies, kls = dml_loss(logits, labels, args.temperature, args.kl_weight, not args.no_detach)
        backward_step(sum(losses), scaler, *optimizers.values())
        return losses, cross_entropies, kls
    latest = [student_logits.detach() for student_logits in logits]  # every student's latest prediction on this batch
    losses, cross_entropies, kls = [], [], []
    for k, name in enumerate(names):
        # students k, k+1, ... have not stepped yet, so logits[k] is student k's forward with its current weights
        terms = dml_loss(latest[:k] + [logits[k]] + latest[k + 1:], labels, args.temperature, args.kl_weight)
        loss, cross_entropy, kl = (term[k] for term in terms)
        backward_step(loss, scaler, optimizers[name])
        losses.append(loss)
        cross_entropies.append(cross_entropy)
        kls.append(kl)
        if k + 1 < len(names):
            # choice: Algorithm 1 recomputes student k's prediction on the same batch after its update, as in
            # training (train mode, batch statistics) but with BN running statistics frozen: they already saw it
            with torch.no_grad(), autocast():
                latest[k] = forward_with_frozen_statistics(bare_students[name], images)
    return losses, cross_entropies, kls


def build_networks(args, num_classes, image_size):
    """The networks this method trains and evaluates, by name (analysis.py rebuilds runs with it)."""
    architectures = args.models or [args.model] * args.num_students
    return {f"student{k + 1}": build_model(name, num_classes, image_size) for k, name in enumerate(architectures)}


DEPLOYED = "student1"  # each student is deployed alone; the first is reported


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
    optimizers = {name: make_optimizer(net.parameters(), args) for name, net in networks.items()}
    extra_modules = {}  # trainable parts that are not networks (heads, discriminators): none here
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
        """One DML step on a batch; returns the loss terms as tensors (logged per epoch)."""
        losses, cross_entropies, kls = mutual_learning_step(train_nets, optimizers, images, labels, args, autocast,
                                                            scaler, bare_students=networks)
        terms = {}
        for k, name in enumerate(networks):
            terms.update({f"ce_{name}": cross_entropies[k], f"kl_{name}": kls[k]})
        return {"loss": sum(losses), **terms}

    def predict(images):
        logits = {name: net(images) for name, net in networks.items()}
        return {**logits, "ensemble": torch.stack(list(logits.values())).mean(0)}  # logit averaging (section 4.2)

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
