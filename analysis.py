"""Analyses of trained runs: the figures and tables of the papers that look inside the networks.

Every subcommand reads the `checkpoint.pt` (or, for `curves`, the `metrics.jsonl`) a method script
wrote into its run folder, rebuilds the networks with that script's own `build_networks`, prints a
table, and writes it as CSV beside a figure (PNG, when matplotlib is installed) into the first run
folder, named by what it compares: `analysis_<subcommand>__<what>.{csv,png}`, or `--out PATH`.
A file that is already there is replaced, and the output says so.

    subcommand              what it computes                                           reproduces
    cka                     linear CKA between two networks, per residual block (or    TNA Table 5
                            stage) and at the logits, mean ± std over pairs of runs
    probes RUN...           linear probes on every frozen, average-pooled block        TNA Fig. 2 (appendix A.3)
    corruption RUN...       accuracy per corruption and severity (CIFAR-10/100-C,
                            Tiny-ImageNet-C)                                           TNA Table 6
    ensemble RUN...         accuracy of logit-averaged networks (of each run, or
                            across runs with --across-runs)                            TNA Table 3
    noise RUN...            change of training NLL under Gaussian weight noise         SiLa Fig. 7b, AMLN Fig. 3c
    diversity RUN           mean pairwise Euclidean distance of the softmax outputs
                            of networks, branches (CSS) or exits (MSDNet)              CSS Fig. 3
    msdnet RUN              anytime accuracy per exit vs MACs; budgeted batch curve    SiLa Fig. 4-5 (MSDNet's protocol)
    embed RUN               2-D t-SNE (scikit-learn) or PCA of the penultimate
                            features, by class, CSS branches marked                    SiLa Fig. 6, CSS Fig. 2
    gradcam RUN             Grad-CAM of the last stage on a few test images            AMLN Fig. 4
    curves RUN_OR_DIR...    training curves from metrics.jsonl, seeds as bands         TNA Fig. 3, SiLa Fig. 3, 7a,
                                                                                       AMLN Fig. 3a-b, CSS Fig. 3

Runs of one configuration: wherever a subcommand takes several runs (RUN...), a folder holding run
folders stands for all of them, and runs whose saved arguments differ only in the seed (and in
where they were written) form one group, reported as mean ± sample std over its runs (n given).
The data default to the run's own (`--dataset`, `--data-dir`, `--subset` override them; `--subset
0` means all images), never augmented. Networks stay on `--device` and every pass is minibatched,
so a 10,000-image test set with large feature maps fits in memory. `--networks a,b` picks networks
by name (default: the deployed one, or all where the analysis compares them).

    python analysis.py cka --runs-a runs/tna --networks base,twin --label "Base vs Twin" \\
                           --runs-a runs/dml --networks student1,student2 --label "DML A vs DML B"
"""
import argparse
import contextlib
import copy
import csv
import hashlib
import importlib
import itertools
import json
import math
import os
import re
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import CORRUPTIONS, build_data, corruption_sets, loader_size, normalize, rows_in_order

PROG = "analysis.py"
# choice: saved arguments that do not change what a run learns; runs differing only in these are seeds of one
# configuration (where the run lives, how it was launched, how often it was evaluated, how it was split into jobs)
NOT_CONFIGURATION = {"seed", "out_dir", "resume", "overwrite", "data_dir", "device", "stop_after", "compile",
                     "channels_last", "eval_every", "num_workers"}
# bookkeeping entries of a metrics.jsonl record, not training curves; `best` is a running maximum chosen on the test set
NOT_CURVES = ("epoch", "epochs", "eta_s", "images_per_s", "best/*")
DEFAULT_CURVES = ("lr", "losses/*", "test/*/top1", "networks_mean/top1")


def fail(message):
    """One line on stderr and exit status 1, no traceback (a user's mistake, not a bug)."""
    sys.exit(f"{PROG}: error: {message}")


def warn(message):
    print(f"{PROG}: warning: {message}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of the whole usage block
        fail(f"{message} (see --help)")


# ==== linear CKA (Kornblith et al. 2019) and its minibatch estimator (Nguyen et al. 2021) ====
def linear_cka(x, y):
    """Linear CKA between feature matrices x [n, ...] and y [n, ...] (trailing dims flattened):
    ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) with column-centred X_c, Y_c, which equals
    HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for the linear kernels K = XX^T, L = YY^T (their eq. 2-4).
    Computed in float64, in feature space or with n x n Gram matrices, whichever is smaller."""
    x = x.flatten(1).double()
    y = y.flatten(1).double()
    x = x - x.mean(0)
    y = y - y.mean(0)
    if x.shape[0] <= max(x.shape[1], y.shape[1]):
        gram_x, gram_y = x @ x.T, y @ y.T  # centred features give centred Gram matrices
        cross, norm_x, norm_y = (gram_x * gram_y).sum(), gram_x.norm(), gram_y.norm()
    else:
        cross, norm_x, norm_y = (y.T @ x).square().sum(), (x.T @ x).norm(), (y.T @ y).norm()
    return (cross / (norm_x * norm_y)).item()


def gram(features):
    """The linear kernel XX^T of a batch's features [n, ...] (flattened), in float64."""
    x = features.flatten(1).double()
    return x @ x.T


def unbiased_hsic(gram_k, gram_l):
    """Song et al. 2012's unbiased HSIC estimator of two n x n Gram matrices (n > 3):
    [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)), K~, L~ with zero diagonals."""
    n = gram_k.shape[0]
    gram_k = gram_k.clone().fill_diagonal_(0)
    gram_l = gram_l.clone().fill_diagonal_(0)
    trace_term = (gram_k * gram_l).sum()  # tr(K~L~) for symmetric matrices
    sums_term = gram_k.sum() * gram_l.sum() / ((n - 1) * (n - 2))
    cross_term = 2.0 / (n - 2) * (gram_k.sum(0) @ gram_l.sum(0))
    return (trace_term + sums_term - cross_term) / (n * (n - 3))


class MinibatchCKA:
    """Minibatch CKA (Nguyen et al. 2021, arXiv:2010.15327, sec. 3.1): the unbiased HSIC of each
    minibatch, averaged over minibatches of ONE size, then CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K)
    * mean HSIC(L, L)). Only one batch's n x n Gram matrices are ever held, so 10,000 images with large
    feature maps fit in memory; feed it the batches of shuffled_batches (equal sizes, seeded order)."""

    def __init__(self):
        self.hsic_sums = None
        self.batches = 0

    def update(self, x, y):
        self.update_grams(gram(x), gram(y))

    def update_grams(self, gram_x, gram_y):
        if gram_x.shape[0] <= 3:
            raise ValueError("the unbiased HSIC needs batches of more than 3 samples")
        hsics = torch.stack([unbiased_hsic(gram_x, gram_y), unbiased_hsic(gram_x, gram_x),
                             unbiased_hsic(gram_y, gram_y)])
        self.hsic_sums = hsics if self.hsic_sums is None else self.hsic_sums + hsics
        self.batches += 1

    def value(self):
        if self.batches == 0:
            raise ValueError("minibatch CKA needs at least one batch")
        cross, self_x, self_y = self.hsic_sums.tolist()
        return cross / math.sqrt(self_x * self_y)


def shuffled_batches(count, batch_size, passes=1, seed=0):
    """Rows of `passes` seeded permutations of range(count), each cut into batches of exactly
    min(batch_size, count) rows: Nguyen et al. average the HSIC of equal minibatches drawn without
    replacement. The rows that would make a short last batch sit out that pass (a short batch would
    weigh as much as a full one); a new pass draws a new permutation, so they fall elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, count)
    batches = []
    for _ in range(passes):
        permutation = torch.randperm(count, generator=generator)
        batches += list(permutation[: count - count % size].split(size))
    return batches


# ==== MSDNet budgeted batch classification (Huang et al. 2018; their dynamic evaluation code) ====
def exit_thresholds(val_probs, exit_shares):
    """Per-exit max-softmax thresholds on the validation split, as the MSDNet reference code's
    `dynamic_eval_find_threshold`: exits in order; at exit k the not-yet-exited samples are ranked by
    confidence and the threshold is the confidence of the floor(n * share_k)-th of them, so that many
    exit there. If the share rounds to 0 samples (or fewer remain), nothing exits at k (threshold +inf,
    as the reference's 1e8). The last exit takes everything left (threshold -inf)."""
    num_exits, num_samples = val_probs.shape[:2]
    confidence = val_probs.max(dim=2).values
    exited = torch.zeros(num_samples, dtype=torch.bool)
    thresholds = torch.full((num_exits,), math.inf)
    for k in range(num_exits - 1):
        planned = math.floor(num_samples * exit_shares[k])
        remaining = confidence[k][~exited].sort(descending=True).values
        if 1 <= planned <= len(remaining):
            thresholds[k] = remaining[planned - 1]
        exited |= confidence[k] >= thresholds[k]
    thresholds[-1] = -math.inf
    return thresholds


def budgeted_batch_curve(val_probs, test_probs, test_targets, exit_macs):
    """(mean MACs per image, accuracy) on the test split for p = 1..39 (MSDNet's budgeted batch
    classification): q = p/20, exit k gets a share of samples proportional to q^k, k = 0..exits-1;
    thresholds set on the validation split (exit_thresholds); each test sample leaves at the first
    exit whose max softmax reaches its threshold and costs that exit's cumulative MACs.
    val_probs, test_probs: softmax outputs [exits, n, K]; exit_macs: cumulative MACs per exit."""
    val_probs, test_probs = torch.as_tensor(val_probs).float().cpu(), torch.as_tensor(test_probs).float().cpu()
    test_targets = torch.as_tensor(test_targets).cpu()
    num_exits = val_probs.shape[0]
    macs = torch.as_tensor(exit_macs, dtype=torch.float64)
    confidence, predictions = test_probs.max(dim=2)
    curve = []
    for p in range(1, 40):
        shares = (p / 20) ** torch.arange(num_exits, dtype=torch.float64)
        thresholds = exit_thresholds(val_probs, (shares / shares.sum()).tolist())
        leaves = confidence >= thresholds[:, None]  # [exits, n]; the last row is all True
        exit_index = leaves.int().argmax(0)  # the first exit that lets the sample leave
        correct = predictions.gather(0, exit_index[None]).squeeze(0) == test_targets
        curve.append((macs[exit_index].mean().item(), correct.float().mean().item()))
    return curve


# ==== runs: finding them, their configurations, groups of seeds, pairs ====
def find_runs(paths, marker="checkpoint.pt"):
    """Run folders (holding `marker`) from arguments that are run folders, their checkpoint.pt, or folders
    whose sub-folders are runs (sorted by name); each once, in the order given."""
    found = []
    for path in map(Path, paths):
        if path.is_file() and path.name == marker:
            path = path.parent
        if (path / marker).is_file():
            runs = [path]
        else:
            runs = sorted(child for child in path.iterdir() if (child / marker).is_file()) if path.is_dir() else []
        if not runs:
            fail(f"no {marker} in {path} nor in its sub-folders (give run folders written by a method script, "
                 f"e.g. tna.py)")
        found += [run.resolve() for run in runs if run.resolve() not in found]
    return found


def saved_run(run_dir):
    """(method, saved arguments) of a run: from summary.json when it finished, else from its checkpoint
    (memory-mapped: the weights are not read); (its folder's name, {}) when it has neither yet."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        saved = json.loads(summary.read_text())
    elif (run_dir / "checkpoint.pt").is_file():
        saved = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True, mmap=True)
    else:
        return run_dir.name, {}
    return saved.get("method", run_dir.name), saved.get("args", {})


def configuration(method, args):
    return (method, *sorted((key, json.dumps(value, sort_keys=True, default=str))
                            for key, value in args.items() if key not in NOT_CONFIGURATION))


def group_by_configuration(runs):
    """[(label, [run, ...])] for runs given as (item, method, args): runs whose arguments differ only in
    NOT_CONFIGURATION (the seed, where they were written) form one group, in the order first seen. A label
    is the method and the arguments that tell its group from the others (the model when there is one group)."""
    groups = {}
    for item, method, args in runs:
        groups.setdefault(configuration(method, args), []).append(item)
    settings = {config: dict(config[1:]) for config in groups}
    labels = []
    for config, setting in settings.items():
        if len(groups) == 1:
            keys = ["model"] if "model" in setting else []
        else:  # what tells it from the other groups of its method (the method tells it from the rest)
            same_method = [other for other_config, other in settings.items() if other_config[0] == config[0]]
            keys = sorted(key for key in setting if all(key in other for other in same_method)
                          and len({other[key] for other in same_method}) > 1)
        label = " ".join([config[0], *(f"{key}={json.loads(setting[key])}" for key in keys)])
        labels.append(label if label not in labels else f"{label} #{len(labels) + 1}")
    return list(zip(labels, groups.values()))


def describe(paths):
    """A short name for runs given on the command line: the folder's name, or their common folder's."""
    paths = [Path(path).resolve() for path in paths]
    return paths[0].name if len(paths) == 1 else Path(os.path.commonpath(paths)).name


def pair_runs(sides, by="seed"):
    """Tuples of runs, one from each side (a side: its runs as (run, seed)), compared or combined: one tuple
    when every side is one run; by seed when every side holds the same distinct seeds (unless by="order");
    else in the order given when the sides are equally long."""
    if all(len(side) == 1 for side in sides):
        return [tuple(side[0][0] for side in sides)]
    seeds = [[seed for _, seed in side] for side in sides]
    if by == "seed" and all(len(set(side)) == len(side) and set(side) == set(seeds[0]) for side in seeds):
        by_seed = [dict((seed, run) for run, seed in side) for side in sides]
        return [tuple(side[seed] for side in by_seed) for seed in sorted(seeds[0])]
    if len({len(side) for side in sides}) == 1:
        return list(zip(*([run for run, _ in side] for side in sides)))
    fail("cannot pair the runs: " + " vs ".join(f"{len(side)} runs (seeds {', '.join(map(str, s))})"
                                                for side, s in zip(sides, seeds))
         + "; give as many runs on each side, or runs with the same seeds")


# ==== loading a run, its data and its networks ====
class LogitsHead(nn.Module):
    """A learned head over the concatenated logits of a run's networks: FDL's deployed ensemble head
    Linear(N*C -> C), which the script saves among its `extra` modules, not its networks."""

    def __init__(self, networks, head):
        super().__init__()
        self.networks, self.head = nn.ModuleList(networks), head

    def forward(self, images):
        return self.head(torch.cat([final_logits(network(images)) for network in self.networks], 1))


@dataclass
class Run:
    directory: Path
    checkpoint: dict
    networks: dict  # name -> network on the device, eval mode, frozen
    backbones: list = field(default_factory=list)  # the image networks build_networks made (not a head over them)

    @property
    def deployed(self):
        return self.checkpoint["deployed"]

    @property
    def args(self):
        return self.checkpoint["args"]

    @property
    def staged(self):
        """The network an analysis of stages looks at by default: the deployed one, or the first backbone."""
        return self.deployed if self.deployed in self.backbones else self.backbones[0]


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        fail(f"--device {name}: {error}")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        fail(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return device


def load_run(path, device):
    """A run folder (or its checkpoint.pt) -> Run, networks rebuilt by the method's own build_networks;
    a deployed head over the networks' logits (FDL) is rebuilt from the checkpoint's extra modules."""
    path = Path(path)
    checkpoint_path = path / "checkpoint.pt" if path.is_dir() else path
    if not checkpoint_path.is_file():
        fail(f"no checkpoint.pt in {path} (give a run folder written by a method script, e.g. tna.py)")
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: any unpickling error means the same to the user
        fail(f"{checkpoint_path} is not a readable checkpoint: {str(error).splitlines()[0]}")
    if not {"method", "args", "networks", "num_classes", "image_size", "deployed"} <= set(checkpoint):
        fail(f"{checkpoint_path} is not a method script's checkpoint (no method, args, networks, ...)")
    try:
        module = importlib.import_module(checkpoint["method"])
    except ImportError as error:
        fail(f"{checkpoint_path} was written by {checkpoint['method']}.py, which cannot be imported here: {error}")
    networks = module.build_networks(argparse.Namespace(**checkpoint["args"]), checkpoint["num_classes"],
                                     checkpoint["image_size"])
    backbones, deployed, extra = list(networks), checkpoint["deployed"], checkpoint.get("extra", {})
    states = dict(checkpoint["networks"])
    if deployed not in networks and "weight" in extra.get(deployed, {}):  # FDL: the head over the bases' logits
        weight = extra[deployed]["weight"]
        networks[deployed] = LogitsHead(list(networks.values()), nn.Linear(weight.shape[1], weight.shape[0]))
        states[deployed] = {f"head.{key}": value for key, value in extra[deployed].items()}
    elif deployed not in networks:
        fail(f"{checkpoint_path}: the deployed network {deployed!r} is neither a network nor a saved head")
    for name, network in networks.items():
        try:  # a head's own networks are loaded under their names already
            network.load_state_dict(states[name], strict=not isinstance(network, LogitsHead))
        except RuntimeError as error:  # the method's code changed since the run was saved
            fail(f"{checkpoint_path}: network {name} no longer matches {checkpoint['method']}.py: "
                 f"{str(error).splitlines()[0]}")
        network.to(device).eval().requires_grad_(False)
    return Run(checkpoint_path.parent, checkpoint, networks, backbones)


class Runs(dict):
    """Runs by folder, each loaded once per command."""

    def __init__(self, device):
        super().__init__()
        self.device = device

    def __missing__(self, directory):
        self[directory] = run = load_run(directory, self.device)
        return run

    def grouped(self, paths):
        """[(label, [Run, ...])]: the runs under `paths`, grouped by configuration."""
        runs = [self[directory] for directory in find_runs(paths)]
        return group_by_configuration([(run, run.checkpoint["method"], run.args) for run in runs])

    def side(self, paths):
        """The runs under `paths` as (Run, seed), for pair_runs."""
        return [(self[directory], self[directory].args.get("seed")) for directory in find_runs(paths)]


def select_networks(run, requested, default):
    """name -> network for a comma-separated --networks (or `default`, a list of names)."""
    names = requested.split(",") if requested else default
    for name in names:
        if name not in run.networks:
            fail(f"no network {name!r} in {run.directory}; available: {', '.join(run.networks)}")
    return {name: run.networks[name] for name in names}


def one_run(args, default=lambda run: run.backbones):
    """(run, its chosen networks, its data) for the subcommands that look at one run; the networks are
    --networks or default(run), the image networks of the run unless said otherwise."""
    run = load_run(args.run, args.device)
    return run, select_networks(run, args.networks, default(run)), load_data(run, args)


def networks_of_run(run, networks):
    return f"{run.directory.name}: {', '.join(networks)}"


def resolve_subset(run, args):
    """--subset N, else the run's own; 0 means every image."""
    return run.args.get("subset") if args.subset is None else (args.subset or None)


def load_data(run, args, cache={}):  # noqa: B006 - the last dataset loaded, reused while runs share it
    """The run's dataset (overridable), not augmented, on the device, with the run's --holdout split off
    the training set as in training (data.holdout; its rows drawn from the run's seed)."""
    dataset = args.dataset or run.args["dataset"]
    holdout = (run.args.get("holdout") or 0) if dataset == run.args["dataset"] else 0
    seed = run.args.get("seed", 0) if holdout else 0
    key = (dataset, args.data_dir or run.args["data_dir"], resolve_subset(run, args), holdout, seed, args.batch_size,
           str(args.device))
    if key not in cache:
        cache.clear()  # one dataset on the device at a time
        options = dict(subset=key[2], augment="none", seed=seed, **({"holdout": holdout} if holdout else {}))
        try:
            cache[key] = build_data(dataset, key[1], args.batch_size, args.device, **options)
        except (ValueError, FileNotFoundError) as error:
            fail(str(error))
    return fitting(run, cache[key])


def fitting(run, data):
    """data, checked to have the image size the run was trained on (runs compared on one run's data)."""
    if data.image_size != run.checkpoint["image_size"]:
        fail(f"{run.directory} was trained on {run.checkpoint['image_size']}-pixel images, the data has "
             f"{data.image_size}")
    return data


# ==== forward passes ====
def final_logits(output):
    """A network's prediction: its logits, or an MSDNet's last exit (the whole network)."""
    return output[-1] if isinstance(output, (list, tuple)) else output


def pooled(feature):
    """A block's output as one vector per image: global average pooling over space [B, C, H, W], or
    over the tokens of a ViT stage [B, tokens, width] (TNA appendix A.3: one value per channel)."""
    if feature.dim() == 4:
        return feature.mean(dim=(2, 3))
    return feature.mean(1) if feature.dim() == 3 else feature


def stage_modules(name, network):
    """A network's stages in order: a backbone's `stages`; for a CSS network its shared stages and branch 1's
    last stage (the stage outputs its return_features gives)."""
    if hasattr(network, "branch_stages"):
        return [*network.shared_stages, network.branch_stages[0]]
    if not hasattr(network, "stages"):
        fail(f"network {name} ({type(network).__name__}) has no stages to look into (FDL's head is a linear layer over "
             f"the bases' logits): choose a base with --networks")
    return list(network.stages)


def computes(module):
    return any(isinstance(layer, (nn.Conv2d, nn.Linear, nn.MultiheadAttention)) for layer in module.modules())


def layer_taps(name, network, level):
    """[(layer label, module whose output is that layer)] at the end of every stage, or of every block: a
    stage's children, a block starting at each child with a conv or linear layer (a residual block, a
    conv) and taking in the parameter-free children after it (ReLU, pooling; a pre-activation network's
    final BN + ReLU), so the last block of a stage ends where the stage does. ResNet-18: blocks 1-8."""
    stages = stage_modules(name, network)
    if level == "stage":
        return [(f"stage {k + 1}", stage) for k, stage in enumerate(stages)]
    ends = []
    for stage in stages:
        children = list(stage.children())
        starts = [index for index, child in enumerate(children) if index and computes(child)]
        ends += [children[index - 1] for index in starts] + [children[-1] if children else stage]
    return [(f"block {k + 1}", module) for k, module in enumerate(ends)]


@contextlib.contextmanager
def captured(taps, transform):
    """While open, every forward through a tap module stores transform(its output) under the tap's key in
    the yielded dict (a multi-scale MSDNet output: its coarsest scale, as its return_features)."""
    store = {}

    def hook(key):
        def keep(module, inputs, output):
            store[key] = transform(output[-1] if isinstance(output, (list, tuple)) else output)
        return keep

    handles = [module.register_forward_hook(hook(key)) for key, module in taps]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def concatenate_batches(batches, per_batch):
    """Run per_batch(images, labels) -> {key: tensor} over every batch and concatenate each key along
    the batch dimension (the tensors stay on the device)."""
    parts = {}
    for images, labels in batches:
        for key, value in per_batch(images, labels).items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


@torch.no_grad()
def evaluate(predict, batches):
    """Top-1 and NLL of every output of predict(images) -> {name: logits} over the batches."""
    def correct_and_nll(images, labels):  # per image, so the means weigh every image once
        return {name: torch.stack([(logits.argmax(1) == labels).double(),
                                   F.cross_entropy(logits.double(), labels, reduction="none")], 1)
                for name, logits in predict(images).items()}

    per_image = concatenate_batches(batches, correct_and_nll)
    return {name: dict(zip(("top1", "nll"), values.mean(0).tolist())) for name, values in per_image.items()}


def logits_of(networks):
    """predict(images) -> {name: final logits} of the given networks."""
    return lambda images: {name: final_logits(network(images)) for name, network in networks.items()}


# ==== numbers over runs: a table of cells ====
def mean_std(values):
    """(mean, sample std; None for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def cell_text(values, digits):
    """mean ± std with `digits` decimals (in scientific notation for a mean too small for them)."""
    mean, std = mean_std(values)
    style = "e" if 0 < abs(mean) < 10 ** -digits else "f"
    places = 2 if style == "e" else digits
    return f"{mean:.{places}{style}}" + (f" ± {std:.{places}{style}}" if std is not None else "")


def as_fields(row):
    return row if isinstance(row, tuple) else (row,)


class Table(dict):
    """(row, column) -> the values of one number over runs. Printed as a grid of mean ± std (rows x
    columns, as the papers' tables), written as long CSV rows: the row's fields, the column, n, mean,
    std and the values run by run."""

    def add(self, row, column, value):
        self.setdefault((row, column), []).append(value)

    @classmethod
    def of(cls, columns, values):
        """A table from {row: [value of each entry]} and the entries' columns (a column repeats for the runs
        of one configuration, whose values it collects)."""
        table = cls()
        for row, row_values in values.items():
            for column, value in zip(columns, row_values):
                table.add(row, column, float(value))
        return table

    @property
    def rows(self):
        return list(dict.fromkeys(row for row, _ in self))

    @property
    def columns(self):
        return list(dict.fromkeys(column for _, column in self))

    def restricted(self, rows):
        return Table({(row, column): self[row, column] for row in rows for column in self.columns
                      if (row, column) in self})

    def series(self, column, rows=None):
        """(rows, means, stds) of one column over `rows` (default: every row it has); the std of one value is
        nan, which draws no error bar and no band."""
        rows = [row for row in (rows or self.rows) if (row, column) in self]
        stats = [mean_std(self[row, column]) for row in rows]
        return rows, [mean for mean, _ in stats], [math.nan if std is None else std for _, std in stats]

    def printed(self, row_header, digits):
        """(header, rows) of the grid; digits: decimals, or a function of the row giving them."""
        places = digits if callable(digits) else lambda row: digits
        grid = [[*as_fields(row), *(cell_text(self[row, column], places(row)) if (row, column) in self else "-"
                                    for column in self.columns)] for row in self.rows]
        return [*row_header, *self.columns], grid

    def long(self, row_header, value):
        header = [*row_header, "output", "n", f"{value}_mean", f"{value}_std", f"{value}_per_run"]
        rows = []
        for (row, column), values in self.items():
            mean, std = mean_std(values)
            rows.append([*as_fields(row), column, len(values), mean, "" if std is None else std,
                         " ".join(f"{value:.6g}" for value in values)])
        return header, rows


# ==== reporting: table on stdout, CSV, optional figure ====
def slug(parts):
    """A file-name part naming what an analysis compares; a long one is cut and keeps a hash of the whole."""
    text = "__".join(re.sub(r"[^A-Za-z0-9.=+]+", "-", str(part)).strip("-") for part in parts)
    return text if len(text) <= 90 else f"{text[:80]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def output_base(args, run_dir, *parts):
    """--out PATH (without .csv/.png), else <first run>/analysis_<subcommand>__<what it compares>."""
    if args.out:
        base = Path(args.out)
        base = base.with_suffix("") if base.suffix in (".csv", ".png", ".npz") else base
        base.parent.mkdir(parents=True, exist_ok=True)
        return base
    return Path(run_dir) / f"analysis_{args.command}__{slug(parts)}"


def named(base, extension):
    """base + extension (a name such as 'tna alpha=0.005' has a dot that is not an extension)."""
    return base.with_name(base.name + extension)


def announce(path, existed):
    print(f"-> {path}" + (" (replaced the earlier file of that name)" if existed else ""))


def format_cell(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_table(header, rows):
    cells = [[format_cell(value) for value in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for index, row in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def MaxNLocator(**options):  # noqa: N802 - matplotlib's class, imported only when a figure is drawn
    from matplotlib.ticker import MaxNLocator as locator
    return locator(**options)


def report(base, header, rows, draw, printed=None):
    """Print the table (or `printed` = (header, rows), e.g. a grid of mean ± std), write base.csv and,
    with matplotlib, draw(plt) -> figure into base.png."""
    print_table(*(printed or (header, rows)))
    csv_path, png_path = named(base, ".csv"), named(base, ".png")
    existed = csv_path.exists()
    with open(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    announce(csv_path, existed)
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: no figure (pip install matplotlib for one)")
        return
    figure = draw(plt)
    existed = png_path.exists()
    figure.savefig(png_path, dpi=150, bbox_inches="tight")
    plt.close(figure)
    announce(png_path, existed)


def titled(figure, title, names=()):
    """The figure's title: the analysis and the runs, wrapped to its width."""
    text = title + (": " + "; ".join(names) if names else "")
    figure.suptitle("\n".join(textwrap.wrap(text, 100)), fontsize=10)


def legend_outside(axis):
    """The legend to the right of the axes, clear of the data."""
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False, fontsize=8)


def named_ticks(axis, names):
    """Evenly spaced named positions (blocks, corruptions, networks), rotated when many."""
    axis.set_xticks(range(len(names)), [str(name) for name in names], rotation=45 if len(names) > 5 else 0,
                    ha="right" if len(names) > 5 else "center")


def plot_table(axis, table, xlabel, ylabel, numeric_x=False, band=False):
    """One line per column of `table` over its rows, the mean with error bars (or a band) of ± std over
    runs; named rows (blocks, corruptions) at evenly spaced positions."""
    rows, columns = table.rows, table.columns
    for index, column in enumerate(columns):
        present, means, stds = table.series(column)
        dodge = 0 if numeric_x or band else 0.25 * (index - (len(columns) - 1) / 2) / max(1, len(columns) - 1)
        xs = present if numeric_x else [rows.index(row) + dodge for row in present]  # error bars side by side
        if band:
            line, = axis.plot(xs, means, marker="o", markersize=3, label=column)
            axis.fill_between(xs, np.subtract(means, stds), np.add(means, stds), color=line.get_color(), alpha=0.2,
                              linewidth=0)
        else:
            axis.errorbar(xs, means, yerr=stds, marker="o", markersize=4, capsize=3, label=column)
    if not numeric_x:
        named_ticks(axis, rows)
    axis.set(xlabel=xlabel, ylabel=ylabel)
    axis.grid(alpha=0.3)
    legend_outside(axis)


def bar_table(axis, table, ylabel):
    """Grouped bars: one group per row, one bar per column, error bars of ± std over runs."""
    width = 0.8 / len(table.columns)
    for index, column in enumerate(table.columns):
        rows, means, stds = table.series(column)
        positions = [table.rows.index(row) + (index - (len(table.columns) - 1) / 2) * width for row in rows]
        axis.bar(positions, means, width, yerr=stds, capsize=2, label=column)
    named_ticks(axis, [as_fields(row)[0] for row in table.rows])
    axis.set(ylabel=ylabel)
    axis.grid(axis="y", alpha=0.3)
    legend_outside(axis)


def new_figure(plt, width, height=3.8, **options):
    return plt.subplots(figsize=(width, height), layout="constrained", **options)


def group_names(groups):
    return [f"{label} (n={len(members)})" for label, members in groups]


# ==== the analyses ====
class ComparisonOption(argparse.Action):
    """cka's --runs-a opens a comparison; --runs-b, --networks, --label and --pair-by after it belong to
    that comparison (given before any --runs-a: to the one of the positional runs)."""

    def __call__(self, parser, namespace, values, option_string=None):
        comparisons = namespace.comparisons = list(namespace.comparisons or [])
        if self.dest == "runs_a" or not comparisons:
            comparisons.append({})
        if self.dest in comparisons[-1]:
            parser.error(f"{option_string} given twice for one comparison; start the next one with --runs-a")
        comparisons[-1][self.dest] = values


def cka_comparisons(args, runs):
    """[(label, [(run_a, network_a, run_b, network_b), ...])] for every comparison on the command line."""
    comparisons = [dict(comparison) for comparison in args.comparisons or []]
    if args.runs:
        if len(args.runs) > 2 or (comparisons and {"runs_a", "runs_b"} & set(comparisons[0])):
            fail("give the first comparison as RUN_A [RUN_B] or with --runs-a/--runs-b, not both")
        first = (comparisons[:1] or [{}])[0]
        comparisons[:1] = [{**first, "runs_a": args.runs[:1], "runs_b": args.runs[1:] or args.runs}]
    if not comparisons or any("runs_a" not in comparison for comparison in comparisons):
        fail("cka needs runs: RUN_A [RUN_B], or --runs-a A0 A1 ... [--runs-b B0 B1 ...]")
    resolved = []
    for comparison in comparisons:
        paths_a, paths_b = comparison["runs_a"], comparison.get("runs_b") or comparison["runs_a"]
        names = comparison["networks"].split(",") if "networks" in comparison else None
        if names is not None and len(names) != 2:
            fail(f"--networks takes two names (one per side), got {comparison['networks']!r}")
        pairs = []
        for run_a, run_b in pair_runs([runs.side(paths_a), runs.side(paths_b)], comparison.get("pair_by", "seed")):
            if names:
                name_a, name_b = names
            elif run_a is run_b:
                name_a, name_b = (run_a.backbones * 2)[:2]  # a run with itself: its first two networks
            else:
                name_a, name_b = run_a.staged, run_b.staged
            select_networks(run_a, name_a, None)
            select_networks(run_b, name_b, None)
            pairs.append((run_a, name_a, run_b, name_b))
        default = f"{describe(paths_a)}:{pairs[0][1]} vs {describe(paths_b)}:{pairs[0][3]}"
        resolved.append((comparison.get("label", default), pairs))
    return resolved


@torch.no_grad()
def pair_cka(run_a, name_a, run_b, name_b, data, args):
    """{layer: CKA} between two networks over the test set, at every block (or stage) and the logits: the
    minibatch estimator over seeded shuffled batches of one size, Gram matrices taken as the layers run."""
    fitting(run_a, data), fitting(run_b, data)
    network_a, network_b = run_a.networks[name_a], run_b.networks[name_b]
    taps_a, taps_b = layer_taps(name_a, network_a, args.level), layer_taps(name_b, network_b, args.level)
    if len(taps_a) != len(taps_b):
        fail(f"{run_a.directory.name}:{name_a} has {len(taps_a)} {args.level}s, {run_b.directory.name}:{name_b} "
             f"{len(taps_b)}: CKA compares {args.level} k with {args.level} k (try --level stage)")
    layers = [label for label, _ in taps_a] + ["logits"]
    estimators = {layer: MinibatchCKA() for layer in layers}
    taps = [(("a", label), module) for label, module in taps_a] + [(("b", label), module) for label, module in taps_b]
    with captured(taps, gram) as grams:  # a batch's Gram matrices are kept, not its (large) feature maps
        for rows in shuffled_batches(loader_size(data.test), args.batch_size, args.passes, args.seed):
            for images, _ in rows_in_order(data.test, len(rows), rows):
                grams["a", "logits"] = gram(final_logits(network_a(images)))
                grams["b", "logits"] = gram(final_logits(network_b(images)))
                for layer in layers:
                    estimators[layer].update_grams(grams["a", layer], grams["b", layer])
    return {layer: estimator.value() for layer, estimator in estimators.items()}


def cka_command(args):
    """TNA Table 5: linear CKA at the end of every residual block (--level block; or stage) and at the
    logits (the paper's "FC"), over the first run's test set; each comparison (a column) is the mean ±
    std over its pairs of runs. Minibatch CKA (Nguyen et al. 2021) over seeded shuffled batches of
    --batch-size images."""
    if args.batch_size < 4:
        fail(f"--batch-size {args.batch_size}: the unbiased HSIC of minibatch CKA needs batches of at least 4 images")
    runs = Runs(args.device)
    comparisons = cka_comparisons(args, runs)
    first = comparisons[0][1][0][0]
    if loader_size(load_data(first, args).test) < 4:
        fail(f"CKA needs at least 4 test images; {first.directory} has {loader_size(load_data(first, args).test)}")
    table = Table()
    for label, pairs in comparisons:
        for run_a, name_a, run_b, name_b in pairs:
            for layer, value in pair_cka(run_a, name_a, run_b, name_b, load_data(first, args), args).items():
                table.add(layer, label, value)
    counts = ", ".join(f"{label}: {len(pairs)}" for label, pairs in comparisons)
    size = min(args.batch_size, loader_size(load_data(first, args).test))
    print(f"linear CKA (minibatch: {size} test images per batch, {args.passes} shuffled pass(es), "
          f"seed {args.seed}), mean ± std over the pairs of runs ({counts})")

    def draw(plt):
        figure, axis = new_figure(plt, 8)
        plot_table(axis, table, f"{args.level} ('logits': the last layer's output)", "linear CKA")
        titled(figure, "Feature similarity (TNA Table 5)",
               [f"{label} (n={len(pairs)})" for label, pairs in comparisons])
        return figure

    header, rows = table.long(["layer"], "cka")
    report(output_base(args, first.directory, args.level, *(label for label, _ in comparisons)), header, rows, draw,
           printed=table.printed(["layer"], 4))


def train_probe(features, labels, num_classes, args):
    """Linear probe (TNA appendix A.3): SGD with lr --lr (0.01) for --epochs (10) on cross-entropy over
    minibatches of --batch-size, momentum 0.9, no weight decay (choice: the appendix gives only lr and
    epochs). Its initialisation (PyTorch's default U(+-1/sqrt(fan_in))) and batch order are drawn from a
    generator seeded by --seed, so each probe is reproducible on its own."""
    generator = torch.Generator().manual_seed(args.seed)
    probe = torch.nn.utils.skip_init(nn.Linear, features.shape[1], num_classes)  # no draw from the global RNG
    with torch.no_grad():
        for parameter in probe.parameters():
            parameter.uniform_(-features.shape[1] ** -0.5, features.shape[1] ** -0.5, generator=generator)
    probe.to(features.device)
    optimizer = torch.optim.SGD(probe.parameters(), lr=args.lr, momentum=0.9)
    for _ in range(args.epochs):
        for rows in torch.randperm(len(features), generator=generator).to(features.device).split(args.batch_size):
            loss = F.cross_entropy(probe(features[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return probe


def grouped_networks(runs, args, default):
    """[(column, run, network name, network, runs in its group)] for the runs of args.runs grouped by
    configuration: each run's --networks (or default(run)); a column is a configuration and a network name.
    Also the groups."""
    groups = runs.grouped(args.runs)
    chosen = [(f"{label}: {name}", run, name, network, len(members)) for label, members in groups for run in members
              for name, network in select_networks(run, args.networks, default(run)).items()]
    return chosen, groups


def probes_command(args):
    """TNA Fig. 2, appendix A.3: a linear classifier on every frozen block's (or stage's) average-pooled
    output, trained on the whole training set, its test accuracy beside the network's own head; runs
    of one configuration give mean ± std."""
    chosen, groups = grouped_networks(Runs(args.device), args, lambda run: [run.staged])
    table = Table()
    for column, run, name, network, _ in chosen:
        data = load_data(run, args)
        taps = layer_taps(name, network, args.level)
        with captured(taps, pooled) as outputs:  # pooled once: the features are frozen (choice: not augmented)
            def features(images, labels):
                network(images)
                return {"labels": labels, **outputs}

            train = concatenate_batches(rows_in_order(data.train, args.batch_size), features)
            test = concatenate_batches(data.test, features)
        for layer, _ in taps:
            probe = train_probe(train[layer], train["labels"], data.num_classes, args)
            with torch.no_grad():
                table.add(layer, column, 100 * (probe(test[layer]).argmax(1) == test["labels"]).double().mean().item())
        table.add("own head", column, 100 * evaluate(logits_of({name: network}), data.test)[name]["top1"])

    def draw(plt):
        figure, axis = new_figure(plt, 8)
        plot_table(axis, table, f"probe after {args.level} ('own head': the network's classifier)",
                   "test top-1 accuracy (%)")
        titled(figure, "Linear probes (TNA Fig. 2)", group_names(groups))
        return figure

    header, rows = table.long(["probe_at"], "test_top1_percent")
    report(output_base(args, chosen[0][1].directory, args.level, *table.columns), header, rows, draw,
           printed=table.printed(["probe at"], 2))


def channel_stats(data, device):
    """The dataset's per-channel mean and std as [1, C, 1, 1] tensors on the device."""
    return [torch.tensor(values, device=device).view(1, -1, 1, 1) for values in (data.mean, data.std)]


def uint8_batches(images, labels, data, batch_size, device):
    """Batches of CPU uint8 images, moved to the device and normalised by the run's dataset mean/std."""
    mean, std = channel_stats(data, device)
    for batch_images, batch_labels in zip(images.split(batch_size), labels.split(batch_size)):
        yield normalize(batch_images.to(device), mean, std), batch_labels.to(device)


def corruption_command(args):
    """TNA Table 6: accuracy on every corruption and severity, its mean over the severities, the clean
    accuracy and the average over the corruptions (each run's, then mean ± std over the runs of one
    configuration)."""
    chosen, groups = grouped_networks(Runs(args.device), args, lambda run: [run.deployed])
    first = chosen[0][1]
    if len({run.args["dataset"] for _, run, *_ in chosen}) > 1:
        fail("corruption compares runs trained on one dataset; these used "
             + ", ".join(sorted({run.args["dataset"] for _, run, *_ in chosen})))
    data = load_data(first, args)
    for _, run, *_ in chosen:
        fitting(run, data)
    predict = lambda images: {index: final_logits(entry[3](images)) for index, entry in enumerate(chosen)}  # noqa: E731
    accuracy = {}  # (corruption, severity) -> [top-1 of each chosen network]
    try:
        for corruption, severity, images, labels in corruption_sets(args.corrupt_dir, resolve_subset(first, args),
                                                                    data.num_classes):
            if images.shape[-1] != data.image_size:
                fail(f"{corruption} images are {images.shape[-1]} pixels wide, the run's are {data.image_size}")
            batches = uint8_batches(images, labels, data, args.batch_size, args.device)
            accuracy[corruption, severity] = [100 * metrics["top1"] for metrics in evaluate(predict, batches).values()]
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    corruptions = list(dict.fromkeys(corruption for corruption, _ in accuracy))
    severities = sorted({severity for _, severity in accuracy})
    per_corruption = {corruption: np.mean([accuracy[corruption, severity] for severity in severities], 0)
                      for corruption in corruptions}  # TNA Table 6: the mean over the severities
    rows = {("clean", "-"): [100 * metrics["top1"] for metrics in evaluate(predict, data.test).values()],
            **{(corruption, str(severity)): values for (corruption, severity), values in accuracy.items()},
            **{(corruption, "mean"): values for corruption, values in per_corruption.items()},
            ("average", "mean"): np.mean(list(per_corruption.values()), 0)}
    columns = [column for column, *_ in chosen]
    table = Table.of(columns, rows)
    missing, extra = sorted(set(CORRUPTIONS) - set(corruptions)), sorted(set(corruptions) - set(CORRUPTIONS))
    if missing or extra:
        print(f"note: the average is over the {len(corruptions)} corruptions found; the papers average the "
              f"{len(CORRUPTIONS)} benchmark ones" + (f"; missing here: {', '.join(missing)}" if missing else "")
              + (f"; not among them: {', '.join(extra)}" if extra else ""))
    summary = table.restricted([("clean", "-"), *((corruption, "mean") for corruption in corruptions),
                                ("average", "mean")])
    # accuracy against severity (0: the clean images), averaged over the corruptions run by run
    mean_over_corruptions = {severity: np.mean([accuracy[corruption, severity] for corruption in corruptions], 0)
                             for severity in severities}
    by_severity = Table.of(columns, {0: rows[("clean", "-")], **mean_over_corruptions})

    def draw(plt):
        figure, (bars, curve) = new_figure(plt, 13, 4.2, ncols=2, width_ratios=[max(2.0, len(summary.rows) / 5), 1])
        bar_table(bars, summary, "test top-1 accuracy (%)")
        bars.set_title("each corruption: mean over its severities", fontsize=9)
        bars.get_legend().remove()
        plot_table(curve, by_severity, "corruption severity (0: clean images)", "test top-1 accuracy (%)",
                   numeric_x=True, band=True)
        curve.set_title("mean over the corruptions", fontsize=9)
        curve.set_xticks([0, *severities])
        titled(figure, f"Corruption robustness (TNA Table 6), {Path(args.corrupt_dir).name}", group_names(groups))
        return figure

    header, csv_rows = table.long(["corruption", "severity"], "test_top1_percent")
    report(output_base(args, first.directory, Path(args.corrupt_dir).name, *table.columns), header, csv_rows, draw,
           printed=summary.printed(["corruption", "severity"], 2))


def ensemble_command(args):
    """TNA Table 3: each network alone and the ensemble by logit averaging (section 4.2), top-1 (%) and
    NLL. Default: the networks of each run (all of them, a deployed head such as FDL's reported beside,
    not averaged), mean ± std over the runs of one configuration. --across-runs: one network of each
    argument (a run, or a folder of seeds paired by seed), the ensemble of them."""
    runs = Runs(args.device)
    ensembles = []  # (column, {name: averaged network}, {name: network reported beside}, the runs)
    if args.across_runs:
        if len(args.runs) < 2:
            fail("--across-runs ensembles the networks of several runs: give two or more runs (or folders of seeds)")
        for members in pair_runs([runs.side([path]) for path in args.runs]):
            averaged = {f"{describe([path])}:{name}": network for path, run in zip(args.runs, members)
                        for name, network in select_networks(run, args.networks, [run.deployed]).items()}
            ensembles.append(("across runs", averaged, {}, members))
        names = [f"{describe([path])} (n={len(ensembles)})" for path in args.runs]
    else:
        groups = runs.grouped(args.runs)
        for label, members in groups:
            for run in members:
                beside = {} if args.networks else {name: run.networks[name] for name in run.networks
                                                   if name not in run.backbones}
                ensembles.append((label, select_networks(run, args.networks, run.backbones), beside, [run]))
        names = group_names(groups)
    first = ensembles[0][3][0]
    table = Table()
    for column, averaged, beside, members in ensembles:
        def predict(images):
            logits = logits_of({**averaged, **beside})(images)
            return {**logits, "ensemble": torch.stack([logits[name] for name in averaged]).mean(0)}

        data = load_data(members[0], args)  # an ensemble across runs is scored on its first run's data
        for run in members[1:]:
            fitting(run, data)
        for name, metrics in evaluate(predict, data.test).items():
            table.add((name, "top-1 (%)"), column, 100 * metrics["top1"])
            table.add((name, "NLL"), column, metrics["nll"])
    table = table.restricted(sorted(table.rows, key=lambda row: row[0] == "ensemble"))  # the members, then the ensemble

    def draw(plt):
        accuracy = table.restricted([row for row in table.rows if row[1] == "top-1 (%)"])
        figure, axis = new_figure(plt, max(5.0, 0.7 * len(accuracy.rows) * len(accuracy.columns) + 3))
        bar_table(axis, accuracy, "test top-1 accuracy (%)")
        lowest = min(min(values) for values in accuracy.values())
        axis.set_ylim(max(0.0, lowest - 10), None)  # the differences, not the distance from 0, are the result
        titled(figure, "Logit-averaging ensemble (TNA Table 3)", names)
        return figure

    header, rows = table.long(["network", "metric"], "value")
    parts = ["across"] * args.across_runs + list(dict.fromkeys(row[0] for row in table.rows))
    report(output_base(args, first.directory, *parts), header, rows, draw,
           printed=table.printed(["network", "metric"], lambda row: 2 if row[1] == "top-1 (%)" else 4))


def noise_command(args):
    """SiLa Fig. 7b / AMLN Fig. 3c: training NLL before and after adding N(0, sigma^2) to every parameter
    (choice: BatchNorm running statistics are buffers, not weights, and stay), averaged over --repeats
    draws; a flatter minimum shows a smaller increase. Mean ± std over the runs of one configuration (a
    configuration of one run: over its draws)."""
    chosen, groups = grouped_networks(Runs(args.device), args, lambda run: [run.deployed])
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    table, clean_nll = Table(), Table()
    for column, run, name, network, group_size in chosen:
        data = load_data(run, args)

        def training_nll(candidate):
            batches = rows_in_order(data.train, args.batch_size)
            return evaluate(logits_of({"network": candidate}), batches)["network"]["nll"]

        clean = training_nll(network)
        clean_nll.add("clean", column, clean)
        for sigma in args.sigmas:
            changes = []
            for _ in range(args.repeats):
                noisy = copy.deepcopy(network)
                with torch.no_grad():
                    for parameter in noisy.parameters():
                        noise = torch.randn(parameter.shape, generator=generator, device=parameter.device)
                        parameter.add_(noise, alpha=sigma)
                changes.append(training_nll(noisy) - clean)
            for change in changes if group_size == 1 else [statistics.fmean(changes)]:
                table.add(sigma, column, change)
    print("training NLL change, mean ± std over the runs of a configuration (one run: over its noise draws); "
          "clean training NLL (nats): " + ", ".join(f"{column} {cell_text(values, 4)}"
                                                  for (_, column), values in clean_nll.items()))

    def draw(plt):
        figure, axis = new_figure(plt, 7.5)
        plot_table(axis, table, "std of the Gaussian weight noise, sigma", "increase of training NLL (nats)",
                   numeric_x=True, band=True)
        if min(args.sigmas) > 0:
            axis.set_xscale("log")
        titled(figure, "Weight noise (SiLa Fig. 7b, AMLN Fig. 3c)", group_names(groups))
        return figure

    header, rows = table.long(["sigma"], "nll_change")
    report(output_base(args, chosen[0][1].directory, *table.columns), header, rows, draw,
           printed=table.printed(["sigma"], 4))


def branch_outputs(network, images):
    """The separate predictions inside one network, each [B, K]: CSS's branches (its
    forward(x, return_branches=True) and branch_prediction), an MSDNet's exits, else the network's logits."""
    if hasattr(network, "branch_prediction"):
        return [network.branch_prediction(logits, j) for j, logits in enumerate(network(images, return_branches=True))]
    output = network(images)
    return list(output) if isinstance(output, (list, tuple)) else [output]


def diversity_kinds(key_a, key_b):
    """The diversities of CSS Fig. 3 that a pair of outputs (network, "final" or branch number) counts in,
    its own first: between the networks' predictions; between the branches (or exits) of one network
    (branch diversity); between branches of two networks, corresponding ones (mutual diversity) or
    not, and all of those together.
    A network's prediction against a branch counts in none: it aggregates its branches."""
    (net_a, part_a), (net_b, part_b) = key_a, key_b
    if part_a == part_b == "final":
        return ["between networks"]
    if "final" in (part_a, part_b):
        return []
    if net_a == net_b:
        return [f"within {net_a}"]
    return ["corresponding branches" if part_a == part_b else "other branch pairs across networks",
            "all branch pairs across networks"]


def output_label(network, part):
    return network if part == "final" else f"{network}/{part}"


def diversity_command(args):
    """CSS Fig. 3: mean over test images of ||softmax_a - softmax_b||_2 for pairs of outputs: between the
    networks' final predictions, between the branches (or exits) of one network, and between the
    branches of different networks, corresponding ones (CSS's mutual diversity) and all pairs."""
    run, networks, data = one_run(args)

    def softmax_outputs(images, labels):
        outputs = {}
        for name, network in networks.items():
            outputs[(name, "final")] = F.softmax(final_logits(network(images)).float(), 1)
            branches = branch_outputs(network, images)
            if len(branches) > 1:
                outputs.update({(name, j + 1): F.softmax(logits.float(), 1) for j, logits in enumerate(branches)})
        return outputs

    probs = concatenate_batches(data.test, softmax_outputs)
    rows, distances = [], {}
    for key_a, key_b in itertools.combinations(probs, 2):
        kinds = diversity_kinds(key_a, key_b)
        if kinds:
            distance = (probs[key_a] - probs[key_b]).norm(dim=1).mean().item()
            rows.append([output_label(*key_a), output_label(*key_b), kinds[0], distance])
            for kind in kinds:
                distances.setdefault(kind, []).append(distance)
    if not rows:
        fail(f"diversity needs two networks, or a network with branches or exits; {run.directory} has "
             f"{', '.join(networks)}")
    rows += [["mean", "", kind, statistics.fmean(values)] for kind, values in distances.items()]

    def draw(plt):
        figure, axis = new_figure(plt, max(5.0, 1.4 * len(distances) + 1))
        for position, values in enumerate(distances.values()):
            axis.bar(position, statistics.fmean(values), 0.6, color="tab:blue", alpha=0.6)
            axis.plot([position] * len(values), values, "o", color="black", markersize=3)
        named_ticks(axis, list(distances))
        axis.tick_params(axis="x", labelrotation=20)
        axis.set(ylabel="mean Euclidean distance of softmax\n(bar: mean; dots: pairs of outputs)")
        axis.grid(axis="y", alpha=0.3)
        titled(figure, "Diversity (CSS Fig. 3)", [networks_of_run(run, networks)])
        return figure

    report(output_base(args, run.directory, *networks), ["output_a", "output_b", "kind", "distance"], rows, draw)


def msdnet_command(args):
    """SiLa Fig. 4-5 (MSDNet): anytime prediction = accuracy of every exit against its cumulative MACs;
    budgeted batch classification = budgeted_batch_curve with thresholds fitted on the run's hold-out
    (trained with --holdout N: data.holdout, <run>/holdout.json), as MSDNet holds 5,000 training images
    out; --fit-on train fits them on the last --val-size training images, which the network has seen."""
    run, networks, data = one_run(args, lambda run: [name for name in run.networks
                                                     if hasattr(run.networks[name], "exit_macs")])
    if not networks or not all(hasattr(network, "exit_macs") for network in networks.values()):
        fail(f"msdnet needs MSDNet networks (multi-exit, with exit_macs); {run.directory} has "
             + ", ".join(f"{name} ({type(network).__name__})" for name, network in run.networks.items()))
    if args.fit_on == "holdout":
        saved = run.directory / "holdout.json"
        if not saved.is_file() or getattr(data, "holdout", None) is None:
            fail(f"{run.directory} has no hold-out ({saved.name}): train with --holdout N (MSDNet holds 5,000 CIFAR "
                 f"training images out) or fit the thresholds on training images with --fit-on train")
        if list(data.holdout_indices) != json.loads(saved.read_text())["indices"]:
            fail(f"the hold-out drawn now differs from {saved}: analyse with the run's own --dataset and --subset")
        fitting = data.holdout
    else:
        count = loader_size(data.train)
        if not 4 <= args.val_size < count:
            fail(f"--val-size {args.val_size} must be at least 4 and below the {count} training images")
        warn(f"thresholds fitted on {args.val_size} training images the network was trained on: they are optimistic "
             f"(train with --holdout N and leave out --fit-on train for a true hold-out)")
        fitting = rows_in_order(data.train, args.batch_size, range(count - args.val_size, count))

    def exit_probs(images, labels):
        return {"labels": labels, **{name: torch.stack([F.softmax(logits.float(), 1) for logits in network(images)], 1)
                                     for name, network in networks.items()}}

    val = concatenate_batches(fitting, exit_probs)
    test = concatenate_batches(data.test, exit_probs)
    rows = []
    for name, network in networks.items():
        macs = network.exit_macs
        val_probs, test_probs = val[name].transpose(0, 1).cpu(), test[name].transpose(0, 1).cpu()
        exit_accuracy = (test_probs.argmax(2) == test["labels"].cpu()).float().mean(1).tolist()
        rows += [[name, "anytime", f"exit {k + 1}", macs[k] / 1e6, 100 * accuracy]
                 for k, accuracy in enumerate(exit_accuracy)]
        curve = budgeted_batch_curve(val_probs, test_probs, test["labels"], macs)
        rows += [[name, "budgeted", f"p={p}", mean_macs / 1e6, 100 * accuracy]
                 for p, (mean_macs, accuracy) in enumerate(curve, start=1)]

    def draw(plt):
        figure, axes = new_figure(plt, 12, ncols=2)
        panels = (("anytime", "Anytime prediction (SiLa Fig. 5)", "MACs to reach the exit (millions)"),
                  ("budgeted", "Budgeted batch classification (SiLa Fig. 4)", "average MACs per test image (millions)"))
        for axis, (kind, title, xlabel) in zip(axes, panels):
            for name in networks:
                points = [row for row in rows if row[0] == name and row[1] == kind]
                axis.plot([row[3] for row in points], [row[4] for row in points],
                          marker="o" if kind == "anytime" else None, markersize=4, label=name)
            axis.set(xlabel=xlabel, ylabel="test top-1 accuracy (%)")
            axis.set_title(title, fontsize=9)
            axis.grid(alpha=0.3)
        legend_outside(axes[1])
        fitted = "the run's hold-out" if args.fit_on == "holdout" else f"{args.val_size} training images"
        titled(figure, f"MSDNet exits (thresholds fitted on {fitted})",
               [networks_of_run(run, networks)])
        return figure

    report(output_base(args, run.directory, args.fit_on, *networks),
           ["network", "evaluation", "point", "mmacs_per_image", "test_top1_percent"], rows, draw)


def final_linears(network):
    """The last classification layer(s), whose input is the penultimate feature vector: CSS's
    branch heads all together (its Fig. 2 shows each class split into one cluster per branch),
    an MSDNet's last exit, a backbone's head.fc, else the last nn.Linear of the network."""
    if hasattr(network, "heads"):
        return [head.fc for head in network.heads]
    if hasattr(network, "classifiers"):
        return [network.classifiers[-1].linear]
    if hasattr(network, "head") and hasattr(network.head, "fc"):
        return [network.head.fc]
    return [[module for module in network.modules() if isinstance(module, nn.Linear)][-1]]


def pca_2d(features):
    """Projections on the first two principal components and the share of variance each explains."""
    centred = features.double() - features.double().mean(0)
    _, singular_values, right_vectors = torch.linalg.svd(centred, full_matrices=False)
    explained = singular_values.square() / singular_values.square().sum()
    return (centred @ right_vectors[:2].T).float(), explained[:2].tolist()


def projection_method(requested):
    """t-SNE when asked or (auto) when scikit-learn, an optional dependency, is installed; else PCA."""
    if requested == "pca":
        return "pca"
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        if requested == "tsne":
            fail("--projection tsne needs scikit-learn (pip install scikit-learn); --projection pca needs nothing")
        print("scikit-learn is not installed: PCA instead of t-SNE (pip install scikit-learn for t-SNE)")
        return "pca"
    return "tsne"


def project_2d(features, method, seed):
    """(2-D points, the projection in words): t-SNE (van der Maaten & Hinton 2008; scikit-learn's, as SiLa
    Fig. 6 and CSS Fig. 2 use; perplexity 30, PCA initialisation, seeded) or PCA."""
    if method == "tsne":
        from sklearn.manifold import TSNE
        perplexity = min(30.0, (len(features) - 1) / 3)
        tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
        points = tsne.fit_transform(features.double().cpu().numpy())
        return torch.as_tensor(points).float(), f"t-SNE (scikit-learn, perplexity {perplexity:g})"
    points, explained = pca_2d(features)
    return points.cpu(), f"PCA ({100 * explained[0]:.0f}% and {100 * explained[1]:.0f}% of the variance)"


def embed_command(args):
    """SiLa Fig. 6 / CSS Fig. 2: the penultimate features (the input of the last linear layer; of every
    branch for CSS, marked by branch) of the first --images test images, projected to 2-D by t-SNE
    when scikit-learn is installed (optional), else by PCA (--projection chooses); the figure says which.
    PCA shows a 2-D feature layer (SiLa's MNIST net) as it is, up to a rotation."""
    method = projection_method(args.projection)
    run, networks, data = one_run(args)
    features_of = {}
    def keep(key):
        def hook(module, inputs):
            features_of[key] = inputs[0].flatten(1)
        return hook

    hooks = [linear.register_forward_pre_hook(keep((name, branch)))
             for name, network in networks.items() for branch, linear in enumerate(final_linears(network))]

    def penultimate(images, labels):
        features_of.clear()
        for network in networks.values():
            network(images)
        return {"labels": labels, **features_of}

    count = min(args.images, loader_size(data.test))
    try:
        features = concatenate_batches(rows_in_order(data.test, args.batch_size, range(count)), penultimate)
    finally:
        for hook in hooks:
            hook.remove()
    labels = features.pop("labels").cpu()
    rows, summary, projections = [], [], {}
    for name in networks:
        branches = [key for key in features if key[0] == name]
        points, description = project_2d(torch.cat([features[key] for key in branches]), method, args.seed)  # one map
        projections[name] = (points.numpy(), description, len(branches))
        summary.append([name, len(branches), count, features[branches[0]].shape[1], description])
        for (_, branch), branch_points in zip(branches, points.split(count)):
            rows += [[name, branch + 1, index, label, data.class_names[label], *point]
                     for index, (label, point) in enumerate(zip(labels.tolist(), branch_points.tolist()))]

    def draw(plt):
        figure, axes = new_figure(plt, 4.6 * len(networks) + 1.8, 4.6, ncols=len(networks), squeeze=False)
        markers = "o^sDvP*X"
        few = data.num_classes <= 20  # few enough classes for a qualitative palette and a legend naming them
        palette = plt.get_cmap("tab10" if data.num_classes <= 10 else "tab20" if few else "nipy_spectral")

        def colour(label):
            return palette(label if few else label / (data.num_classes - 1))

        most_branches = max(branches for _, _, branches in projections.values())
        for axis, name in zip(axes[0], networks):
            points, description, branches = projections[name]
            for branch, branch_points in enumerate(np.split(points, branches)):
                axis.scatter(*branch_points.T, s=6, c=[colour(label) for label in labels.tolist()],
                             marker=markers[branch % len(markers)], linewidths=0)
            axis.set(xlabel="dimension 1", ylabel="dimension 2", xticks=[], yticks=[])
            axis.set_title(f"{name}: {description}", fontsize=8)
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=colour(label), label=class_name)
                   for label, class_name in enumerate(data.class_names)] if data.num_classes <= 20 else []
        if most_branches > 1:
            handles += [plt.Line2D([], [], marker=markers[branch % len(markers)], linestyle="", color="black",
                                   markerfacecolor="none", label=f"branch {branch + 1}")
                        for branch in range(most_branches)]
        if handles:
            axes[0][-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False, fontsize=7)
        titled(figure, "Penultimate features by class (SiLa Fig. 6, CSS Fig. 2)",
               [networks_of_run(run, networks)])
        return figure

    report(output_base(args, run.directory, method, *networks),
           ["network", "branch", "image", "label", "class", "x", "y"], rows, draw,
           printed=(["network", "branches", "images", "feature_dim", "projection"], summary))


def grad_cam(network, images):
    """Grad-CAM (Selvaraju et al. 2017) on the last stage's output A: weights = spatial mean of
    d(score of the predicted class)/dA per channel; map = ReLU(sum_c weight_c A_c), upsampled to the
    image and scaled to [0, 1] per image. Returns (maps [B, H, W], predicted classes, their probabilities).
    The last stage is the network's own return_features convention: an MSDNet's last block, a CSS
    network's branch 1 (its gradient still comes from the aggregated prediction)."""
    with torch.enable_grad():
        inputs = images.clone().requires_grad_(True)  # the weights are frozen: the graph starts at the input
        logits, features = network(inputs, return_features=True)
        logits, target_layer = final_logits(logits), features[-1]
        if target_layer.dim() != 4:
            fail(f"Grad-CAM needs a convolutional last stage ([B, C, H, W]); this network's is "
                 f"{list(target_layer.shape)}")
        predicted = logits.argmax(1)
        score = logits.gather(1, predicted[:, None]).sum()  # images do not interact in eval mode
        gradients = torch.autograd.grad(score, target_layer)[0]
    maps = F.relu((gradients.mean(dim=(2, 3), keepdim=True) * target_layer).sum(1, keepdim=True)).detach()
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    maps = maps / maps.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    return maps, predicted, F.softmax(logits.detach().float(), 1).max(1).values


def gradcam_command(args):
    """AMLN Fig. 4: Grad-CAM heatmaps of the first --images test images for every network, with the
    predicted class and its probability; the maps are also saved beside the CSV as .npz."""
    run, networks, data = one_run(args)
    for name, network in networks.items():
        stage_modules(name, network)  # a network without stages (FDL's head) has no feature map to explain
    count = min(args.images, loader_size(data.test))
    images, labels = next(rows_in_order(data.test, count, range(count)))
    rows, maps = [], {}
    for name, network in networks.items():
        maps[name], predicted, probability = grad_cam(network, images)
        rows += [[index, data.class_names[label], name, data.class_names[guess], confidence]
                 for index, (label, guess, confidence) in enumerate(zip(labels.tolist(), predicted.tolist(),
                                                                        probability.tolist()))]
    mean, std = channel_stats(data, images.device)
    pictures = (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def draw(plt):
        figure, axes = new_figure(plt, 1.5 * len(pictures) + 1, 1.7 * (1 + len(networks)) + 0.6,
                                  nrows=1 + len(networks), ncols=len(pictures), squeeze=False)
        for column, picture in enumerate(pictures):
            axes[0][column].imshow(picture)
            axes[0][column].set_title(data.class_names[labels[column]], fontsize=7)
            for row_index, name in enumerate(networks, start=1):
                axes[row_index][column].imshow(picture)
                heat = axes[row_index][column].imshow(maps[name][column].cpu().numpy(), cmap="jet", alpha=0.5,
                                                      vmin=0, vmax=1)
                guess, confidence = next((r[3], r[4]) for r in rows if r[0] == column and r[2] == name)
                axes[row_index][column].set_title(f"{guess} ({confidence:.2f})", fontsize=7)
        for axis in axes.flat:
            axis.set(xticks=[], yticks=[])
        if networks:
            figure.colorbar(heat, ax=axes[1:, -1], shrink=0.8, label="Grad-CAM (1: the image's maximum)")
        axes[0][0].set_ylabel("image\n(true class)", fontsize=7)
        for row_index, name in enumerate(networks, start=1):
            axes[row_index][0].set_ylabel(f"{name}\n(predicted, p)", fontsize=7)
        titled(figure, "Grad-CAM of the last stage (AMLN Fig. 4)", [networks_of_run(run, networks)])
        return figure

    base = output_base(args, run.directory, *networks)
    report(base, ["image", "true_class", "network", "predicted_class", "probability"], rows, draw)
    existed = named(base, ".npz").exists()
    np.savez(named(base, ".npz"), images=pictures, labels=labels.cpu().numpy(),
             **{f"gradcam_{name}": heatmaps.cpu().numpy() for name, heatmaps in maps.items()})
    announce(named(base, ".npz"), existed)


def flatten_numbers(record, prefix=""):
    """("a/b", number) for every finite number in a nested metrics record (lists and text left out)."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from flatten_numbers(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield f"{prefix}{key}", value


def read_curves(run_dir):
    """{series: {epoch: value}} of a run's metrics.jsonl: every number of every record (loss terms, lr,
    test metrics per network, anything a method logs per evaluation) but bookkeeping (NOT_CURVES).
    A last line cut short (a run being written) is skipped."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    curves = {}
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            fail(f"{path}, line {number}, is not a JSON record (one record per epoch, as the method scripts write)")
        if not isinstance(record, dict) or "epoch" not in record:
            fail(f"{path}, line {number}: expected a record with an 'epoch', as the method scripts write")
        for key, value in flatten_numbers(record):
            if not any(fnmatch(key, pattern) for pattern in NOT_CURVES):
                curves.setdefault(key, {})[record["epoch"]] = value
    return curves


def chosen_series(every, patterns):
    """The series to draw, in the order of the patterns that pick them; by default (patterns None) the
    DEFAULT_CURVES first, then any other series but test top-2/top-5/NLL and the networks' means."""
    if patterns is None:
        hidden = ("test/*/top2", "test/*/top5", "test/*/nll", "networks_mean/*")
        every = [series for series in every
                 if series in DEFAULT_CURVES or not any(fnmatch(series, pattern) for pattern in hidden)]
        patterns = [*DEFAULT_CURVES, "*"]
    return list(dict.fromkeys(series for pattern in patterns for series in every if fnmatch(series, pattern)))


def curves_command(args):
    """TNA Fig. 3, SiLa Fig. 3 and 7a, AMLN Fig. 3a-b, CSS Fig. 3 (diversity per epoch, where the run
    logs it): the per-epoch series of metrics.jsonl, one panel per series, a thin line per run and, for
    the runs of one configuration (seeds), their mean with a band of ± std. --series picks series by
    name or pattern (default: the learning rate, the loss terms, test top-1 per network, and any other
    series but test top-2/top-5/NLL); the CSV holds every series."""
    run_dirs = find_runs(args.runs, marker="metrics.jsonl")
    curves = {run_dir: read_curves(run_dir) for run_dir in run_dirs}
    groups = group_by_configuration([(run_dir, *saved_run(run_dir)) for run_dir in run_dirs])
    table, last = Table(), Table()  # (series, epoch) -> values over a group's runs; the final epoch's
    for label, members in groups:
        for run_dir in members:
            for series, values in curves[run_dir].items():
                for epoch, value in values.items():
                    table.add((series, epoch), label, value)
                last.add(series, label, values[max(values)])
    every = list(dict.fromkeys(series for series, _ in table.rows))
    shown = chosen_series(every, args.series)
    if not shown:
        fail(f"no series matches {' '.join(args.series)}; the runs log: {', '.join(every)}")
    print("final epoch, mean ± std over the runs of each configuration:")
    header, rows = table.long(["series", "epoch"], "value")
    report(output_base(args, run_dirs[0], *(label for label, _ in groups), *(args.series or [])), header, rows,
           lambda plt: curves_figure(plt, groups, curves, shown), printed=last.restricted(shown).printed(["series"], 4))


def axis_unit(series):
    """A curve's y-axis label with its unit where it has one."""
    name = series.split("/")[-1]
    if name in ("top1", "top2", "top5"):
        return f"{name} accuracy (fraction)"
    if name == "nll" or name.startswith(("ce", "kl")):
        return f"{name} (nats)"
    return "learning rate" if name == "lr" else name


def curves_figure(plt, groups, curves, shown):
    """One panel per series: a thin line per run in its group's colour and, for a group of two or more
    runs, their mean with a band of ± std (at the epochs every run of the group has)."""
    columns = min(3, len(shown))
    figure, axes = new_figure(plt, 4.2 * columns + 2.5, 2.9 * math.ceil(len(shown) / columns) + 0.6,
                              nrows=math.ceil(len(shown) / columns), ncols=columns, squeeze=False)
    colours = plt.get_cmap("tab10")
    members_of_all = [run_dir for _, members in groups for run_dir in members]
    for axis, series in zip(axes.flat, shown):
        for index, (label, members) in enumerate(groups):
            runs = [curves[run_dir].get(series, {}) for run_dir in members]
            for run_dir, values in zip(members, runs):
                if values:
                    axis.plot(sorted(values), [values[epoch] for epoch in sorted(values)], color=colours(index % 10),
                              linewidth=0.8, alpha=0.6, marker="o", markersize=3, gid=f"run:{run_dir.name}")
            common = sorted(set.intersection(*(set(values) for values in runs)))
            if len(members) > 1 and common:
                stacked = np.array([[values[epoch] for epoch in common] for values in runs])
                mean, std = stacked.mean(0), stacked.std(0, ddof=1)
                axis.plot(common, mean, color=colours(index % 10), linewidth=2, gid=f"mean:{label}")
                axis.fill_between(common, mean - std, mean + std, color=colours(index % 10), alpha=0.2, linewidth=0,
                                  gid=f"band:{label}")
        axis.set(xlabel="epoch", ylabel=axis_unit(series))
        axis.set_title(series, fontsize=9)
        epochs = sorted({epoch for run_dir in members_of_all for epoch in curves[run_dir].get(series, {})})
        if len(epochs) <= 10:  # every epoch a tick; one epoch in the middle of the axis
            axis.set_xticks(epochs)
            if len(epochs) == 1:
                axis.set_xlim(epochs[0] - 1, epochs[0] + 1)
        else:
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(shown):]:
        axis.set_visible(False)
    handles = [plt.Line2D([], [], color=colours(index % 10), linewidth=2, label=name)
               for index, name in enumerate(group_names(groups))]
    figure.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=8,
                  title="thin: each run\nthick and band: mean ± std", title_fontsize=8)
    titled(figure, "Training curves", [label for label, _ in groups])
    return figure


# ==== command line ====
def parse_args(argv=None):
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name, function, help_text, runs_help, networks_help, several=False):
        """A subcommand with its run argument(s) and the options every analysis shares."""
        sub = commands.add_parser(name, help=help_text, description=function.__doc__)
        sub.set_defaults(function=function)
        if runs_help:
            sub.add_argument("runs" if several else "run", nargs="+" if several else None, help=runs_help)
        if networks_help:
            sub.add_argument("--networks", default=None, help=networks_help)
        sub.add_argument("--out", default=None, metavar="PATH",
                         help="write PATH.csv and PATH.png (default: into the first run folder, named by what is "
                              "compared)")
        if name == "curves":  # reads metrics.jsonl only: no data, device or seed
            return sub
        sub.add_argument("--dataset", default=None, help="dataset (default: the run's own)")
        sub.add_argument("--data-dir", default=None, help="where the dataset lives (default: the run's own)")
        sub.add_argument("--subset", type=int, default=None,
                         help="first N train and N test images (default: the run's own; 0 = all)")
        sub.add_argument("--device", default="auto", help="auto (cuda if present, default), cpu, cuda or cuda:N")
        sub.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default %(default)s)")
        sub.add_argument("--seed", type=int, default=0, help="seed of the analysis' random draws (default %(default)s)")
        return sub

    one_run = "run folder (holding checkpoint.pt) written by a method script"
    runs_of = "run folders, or folders holding run folders; runs differing only in the seed are averaged"
    cka = command("cka", cka_command, "linear CKA per block between two networks (TNA Table 5)", None, None)
    cka.set_defaults(comparisons=None)
    cka.add_argument("runs", nargs="*", metavar="RUN",
                     help="RUN_A [RUN_B]: one comparison (one run: two of its networks)")
    comparison = cka.add_argument_group("comparisons (repeat --runs-a ... for more columns of the table)")
    comparison.add_argument("--runs-a", nargs="+", action=ComparisonOption, metavar="RUN",
                            help="runs of side A (or a folder of them), paired with side B by seed (else in order)")
    comparison.add_argument("--runs-b", nargs="+", action=ComparisonOption, metavar="RUN",
                            help="runs of side B (default: side A's)")
    comparison.add_argument("--networks", action=ComparisonOption, metavar="NAME_A,NAME_B",
                            help="a network of side A's runs and one of side B's (default: the first two networks "
                                 "of a run compared with itself, else each run's deployed one)")
    comparison.add_argument("--label", action=ComparisonOption,
                            help="the comparison's column title, e.g. 'Base vs Twin'")
    comparison.add_argument("--pair-by", choices=["seed", "order"], action=ComparisonOption,
                            help="pair side A's runs with side B's by seed (default) or in the order given (e.g. "
                                 "networks of different seeds: seed 0 with 1, 1 with 0)")
    cka.add_argument("--level", choices=["block", "stage"], default="block",
                     help="CKA at the end of every residual block (TNA Table 5, default) or of every stage")
    cka.add_argument("--passes", type=int, default=1,
                     help="passes over the test set, each a new shuffle (default %(default)s)")
    probes = command("probes", probes_command, "linear probe accuracy per block (TNA Fig. 2)", runs_of,
                     "comma-separated networks to probe (default: the deployed one)", several=True)
    probes.add_argument("--level", choices=["block", "stage"], default="block",
                        help="a probe after every block (default) or stage")
    probes.add_argument("--epochs", type=int, default=10, help="probe training epochs (appendix A.3: %(default)s)")
    probes.add_argument("--lr", type=float, default=0.01, help="probe learning rate (appendix A.3: %(default)s)")
    corruption = command("corruption", corruption_command, "accuracy per corruption and severity (TNA Table 6)",
                         runs_of, "comma-separated networks (default: the deployed one)", several=True)
    corruption.add_argument("--corrupt-dir", required=True,
                            help="CIFAR-10-C/100-C folder (<name>.npy, labels.npy) or Tiny-ImageNet-C folder")
    ensemble = command("ensemble", ensemble_command, "accuracy of logit-averaged networks (TNA Table 3)", runs_of,
                       "comma-separated networks (default: all of a run; with --across-runs each run's deployed one)",
                       several=True)
    ensemble.add_argument("--across-runs", action="store_true",
                          help="ensemble one network of each argument (a run or a folder of seeds), paired by seed")
    noise = command("noise", noise_command, "training NLL change under Gaussian weight noise (SiLa Fig. 7b, AMLN "
                    "Fig. 3c)", runs_of + " (e.g. independent, DML, SiLa: a line each)",
                    "comma-separated networks taken from every run (default: each run's deployed one)", several=True)
    noise.add_argument("--sigmas", type=float, nargs="+", default=[0.001, 0.005, 0.01],
                       help="standard deviations of the weight noise (default %(default)s)")
    noise.add_argument("--repeats", type=int, default=3, help="noise draws per sigma, averaged (default %(default)s)")
    command("diversity", diversity_command, "mean pairwise distance of softmax outputs (CSS Fig. 3)", one_run,
            "comma-separated networks (default: all)")
    msdnet = command("msdnet", msdnet_command, "anytime and budgeted batch evaluation of MSDNet exits (SiLa Fig. 4-5)",
                     one_run, "comma-separated MSDNet networks (default: every MSDNet of the run)")
    msdnet.add_argument("--fit-on", choices=["holdout", "train"], default="holdout",
                        help="fit the exit thresholds on the run's hold-out (default) or on training images, which "
                             "the network has seen (optimistic)")
    msdnet.add_argument("--val-size", type=int, default=5000,
                        help="--fit-on train: the last N training images (default %(default)s)")
    embed = command("embed", embed_command, "2-D t-SNE or PCA of penultimate features (SiLa Fig. 6, CSS Fig. 2)",
                    one_run, "comma-separated networks (default: all)")
    embed.add_argument("--projection", choices=["auto", "tsne", "pca"], default="auto",
                       help="auto: t-SNE when scikit-learn is installed, else PCA (default)")
    embed.add_argument("--images", type=int, default=2000,
                       help="the first N test images (default %(default)s; t-SNE's time grows as N log N)")
    gradcam = command("gradcam", gradcam_command, "Grad-CAM heatmaps of a few test images (AMLN Fig. 4)", one_run,
                      "comma-separated networks (default: all)")
    gradcam.add_argument("--images", type=int, default=8, help="the first N test images (default %(default)s)")
    curves = command("curves", curves_command, "training curves from metrics.jsonl, seeds as mean ± std bands",
                     "run folders (holding metrics.jsonl), or folders holding them", None, several=True)
    curves.add_argument("--series", nargs="+", default=None, metavar="PATTERN",
                        help="series to draw, by name or pattern, e.g. 'test/*/top1' losses/match lr (default: lr, "
                             "losses, test top-1 and any other series)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "images", "repeats", "epochs", "passes"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if hasattr(args, "device"):
        args.device = resolve_device(args.device)
    return args


def main(argv=None):
    args = parse_args(argv)
    args.function(args)


if __name__ == "__main__":
    main()
