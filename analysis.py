"""Analyses of trained runs: the figures and tables of the papers that look inside the networks.

Every subcommand reads the `checkpoint.pt` a method script wrote into its run folder, rebuilds the
networks with that script's own `build_networks`, prints a table, writes it as
`<run>/analysis_<subcommand>.csv` and, when matplotlib is installed (optional), a figure
`<run>/analysis_<subcommand>.png` like the paper's.

    subcommand        what it computes                                              reproduces
    cka RUN_A RUN_B   linear CKA between two networks' stage outputs and logits    TNA Table 5
    probes RUN        linear probes on every frozen, average-pooled stage output   TNA Fig. 2 (appendix A.3)
    corruption RUN    accuracy per corruption and severity (CIFAR-10/100-C and
                      TinyImageNet-C)                                               TNA Table 6
    ensemble RUN...   accuracy of logit-averaged networks of one or several runs   TNA Table 3
    noise RUN...      change of training NLL under Gaussian weight noise           SiLa Fig. 7b, AMLN Fig. 3c
    diversity RUN     mean pairwise Euclidean distance of the softmax outputs of
                      networks, branches (CSS) or exits (MSDNet)                    CSS Fig. 3
    msdnet RUN        anytime accuracy per exit vs MACs; budgeted batch curve      SiLa Fig. 4-5 (MSDNet's protocol)
    embed RUN         2-D PCA of the penultimate features, coloured by class       SiLa Fig. 6, CSS Fig. 2 (t-SNE there)
                      (a 2-D feature layer, as SiLa's MNIST net, is shown as is, up to a rotation)
    gradcam RUN       Grad-CAM of the last stage's output on a few test images     AMLN Fig. 4

The data default to the run's own (`--dataset`, `--data-dir`, `--subset` override them; `--subset 0`
means all images), never augmented. Networks stay on `--device` and every pass is minibatched,
so a 10,000-image test set with large feature maps fits in memory. `--networks a,b` picks
networks by name (default: the deployed one, or all where the analysis compares them).
Example: python analysis.py cka runs/tna_run runs/tna_run --networks base,twin
"""
import argparse
import copy
import csv
import importlib
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import build_data, normalize, subset_rows

PROG = "analysis.py"
CORRUPTION_SEVERITIES = 5  # CIFAR-10-C / CIFAR-100-C / TinyImageNet-C (Hendrycks & Dietterich 2019)


def fail(message):
    """One line on stderr and exit status 1, no traceback (a user's mistake, not a bug)."""
    sys.exit(f"{PROG}: error: {message}")


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
    """Minibatch CKA (Nguyen et al. 2021, eq. 3): the unbiased HSIC of each minibatch, averaged over
    minibatches, then CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K) * mean HSIC(L, L)). Only one
    batch's Gram matrices are ever held, so 10,000 images with large feature maps fit in memory;
    being unbiased, the average does not depend on the batch size the way the plain estimator would."""

    def __init__(self):
        self.hsic_sums = None
        self.batches = 0

    def update(self, x, y):
        if x.shape[0] <= 3:  # the unbiased estimator divides by n - 3
            return
        x, y = x.flatten(1).double(), y.flatten(1).double()
        gram_x, gram_y = x @ x.T, y @ y.T
        hsics = torch.stack([unbiased_hsic(gram_x, gram_y), unbiased_hsic(gram_x, gram_x), unbiased_hsic(gram_y, gram_y)])
        self.hsic_sums = hsics if self.hsic_sums is None else self.hsic_sums + hsics
        self.batches += 1

    def value(self):
        if self.batches == 0:
            raise ValueError("minibatch CKA needs at least one batch of more than 3 samples")
        cross, self_x, self_y = self.hsic_sums.tolist()
        return cross / math.sqrt(self_x * self_y)


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


# ==== loading a run, its data and its networks ====
@dataclass
class Run:
    directory: Path
    checkpoint: dict
    networks: dict  # name -> network on the device, eval mode, frozen

    @property
    def deployed(self):
        return self.checkpoint["deployed"]


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
    """A run folder (or its checkpoint.pt) -> Run, networks rebuilt by the method's own build_networks."""
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
    networks = module.build_networks(argparse.Namespace(**checkpoint["args"]), checkpoint["num_classes"], checkpoint["image_size"])
    for name, network in networks.items():
        try:
            network.load_state_dict(checkpoint["networks"][name])
        except RuntimeError as error:  # the method's code changed since the run was saved
            fail(f"{checkpoint_path}: network {name} no longer matches {checkpoint['method']}.py: {str(error).splitlines()[0]}")
        network.to(device).eval().requires_grad_(False)
    return Run(checkpoint_path.parent, checkpoint, networks)


def select_networks(run, requested, default):
    """name -> network for a comma-separated --networks (or `default`, a list of names)."""
    names = requested.split(",") if requested else default
    for name in names:
        if name not in run.networks:
            fail(f"no network {name!r} in {run.directory}; available: {', '.join(run.networks)}")
    return {name: run.networks[name] for name in names}


def resolve_subset(run, args):
    """--subset N, else the run's own; 0 means every image."""
    return run.checkpoint["args"].get("subset") if args.subset is None else (args.subset or None)


def load_data(run, args):
    """The run's dataset (overridable), not augmented, on the device."""
    run_args = run.checkpoint["args"]
    try:
        return build_data(args.dataset or run_args["dataset"], args.data_dir or run_args["data_dir"], args.batch_size,
                          args.device, subset=resolve_subset(run, args), augment="none", seed=0)
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))


def train_batches(data, batch_size, rows=None):
    """Training images (all, or `rows`) in file order, unaugmented, none dropped, as (images, labels)
    on the device. The training loader shuffles and drops the last batch, which NLL and probe
    features should not: the device-resident path indexes its uint8 tensor directly, the folder path
    reads its (deterministic, augment none) dataset in order."""
    loader = data.train
    if hasattr(loader, "images"):  # device-resident datasets
        rows = torch.arange(len(loader.images)) if rows is None else torch.as_tensor(rows)
        for batch_rows in rows.to(loader.images.device).split(batch_size):
            yield normalize(loader.images[batch_rows], loader.mean, loader.std), loader.labels[batch_rows]
        return
    dataset = loader.dataset if rows is None else torch.utils.data.Subset(loader.dataset, rows.tolist())
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size, num_workers=loader.loader.num_workers):
        yield normalize(images.to(loader.device), loader.mean, loader.std), labels.to(loader.device)


def final_logits(output):
    """A network's prediction: its logits, or an MSDNet's last exit (the whole network)."""
    return output[-1] if isinstance(output, (list, tuple)) else output


def pooled(feature):
    """A stage output as one vector per image: global average pooling over space [B, C, H, W], or
    over the tokens of a ViT stage [B, tokens, width]."""
    if feature.dim() == 4:
        return feature.mean(dim=(2, 3))
    return feature.mean(1) if feature.dim() == 3 else feature


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
        return {name: torch.stack([(logits.argmax(1) == labels).double(), F.cross_entropy(logits.double(), labels, reduction="none")], 1)
                for name, logits in predict(images).items()}

    per_image = concatenate_batches(batches, correct_and_nll)
    return {name: dict(zip(("top1", "nll"), values.mean(0).tolist())) for name, values in per_image.items()}


def logits_of(networks):
    """predict(images) -> {name: final logits} of the given networks."""
    return lambda images: {name: final_logits(network(images)) for name, network in networks.items()}


def members_of_runs(paths, requested, device, default_all_for_one_run):
    """{label: network} over several runs: --networks in each (each must have them), else each run's
    deployed network (every network when a single run is given and default_all_for_one_run).
    Labels are the network names for one run, run-folder:name for several. Returns (first run, members)."""
    runs = [load_run(path, device) for path in paths]
    members = {}
    for run in runs:
        default = list(run.networks) if default_all_for_one_run and len(runs) == 1 else [run.deployed]
        for name, network in select_networks(run, requested, default).items():
            members[name if len(runs) == 1 else f"{run.directory.name}:{name}"] = network
    if len({run.checkpoint["num_classes"] for run in runs}) > 1:
        fail("the runs have different numbers of classes: " + ", ".join(f"{r.directory} {r.checkpoint['num_classes']}" for r in runs))
    return runs[0], members


# ==== reporting: table on stdout, CSV, optional figure ====
def format_cell(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_table(header, rows):
    cells = [[format_cell(value) for value in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for index, row in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def report(run_dir, analysis, header, rows, draw, printed=None):
    """Print the table (or `printed` = (header, rows), a summary of a long table), write
    <run_dir>/analysis_<analysis>.csv and, with matplotlib, draw(plt) into analysis_<analysis>.png."""
    print_table(*(printed or (header, rows)))
    csv_path = run_dir / f"analysis_{analysis}.csv"
    with open(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    print(f"-> {csv_path}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib for one)")
        return
    figure = draw(plt)
    figure.tight_layout()
    figure.savefig(run_dir / f"analysis_{analysis}.png", dpi=150)
    plt.close(figure)
    print(f"-> {run_dir / f'analysis_{analysis}.png'}")


def line_plot(plt, series, xlabel, ylabel, title, logx=False):
    """One line per name in series {name: (xs, ys)}."""
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title, xscale="log" if logx else "linear")
    for name, (xs, ys) in series.items():
        if isinstance(xs[0], str):  # named positions (stage 1, ..., logits), evenly spaced
            axis.set_xticks(range(len(xs)), xs)
            xs = range(len(xs))
        axis.plot(xs, ys, marker="o", label=name)
    axis.legend()
    return figure


def bar_plot(plt, labels, values, ylabel, title):
    figure, axis = plt.subplots(figsize=(max(4, 0.9 * len(labels)), 3.5))
    axis.bar(labels, values)
    axis.set(ylabel=ylabel, title=title)
    axis.tick_params(axis="x", rotation=20)
    return figure


# ==== the analyses ====
def cka_command(args):
    """TNA Table 5: linear CKA at the end of every stage and at the logits, over RUN_A's test set
    (minibatch estimator of Nguyen et al. 2021, one --batch-size batch at a time)."""
    run_a = load_run(args.run_a, args.device)
    same_run = Path(args.run_b).resolve() == Path(args.run_a).resolve()
    run_b = run_a if same_run else load_run(args.run_b, args.device)
    names = args.networks.split(",") if args.networks else (list(run_a.networks)[:2] if same_run else [run_a.deployed, run_b.deployed])
    if len(names) != 2:
        fail(f"--networks takes two names (one per side), got {args.networks!r}")
    network_a, network_b = select_networks(run_a, names[0], None)[names[0]], select_networks(run_b, names[1], None)[names[1]]
    estimators = None
    with torch.no_grad():
        for images, _ in load_data(run_a, args).test:
            logits_a, features_a = network_a(images, return_features=True)
            logits_b, features_b = network_b(images, return_features=True)
            if len(features_a) != len(features_b):
                fail(f"{names[0]} has {len(features_a)} stages and {names[1]} {len(features_b)}: CKA compares stage k with stage k")
            pairs = [*zip(features_a, features_b), (final_logits(logits_a), final_logits(logits_b))]
            estimators = estimators or [MinibatchCKA() for _ in pairs]
            for estimator, (x, y) in zip(estimators, pairs):
                estimator.update(x, y)
    layers = [f"stage {k + 1}" for k in range(len(estimators) - 1)] + ["logits"]
    label_a = f"{run_a.directory.name}:{names[0]}"
    label_b = f"{run_b.directory.name}:{names[1]}"
    rows = [[layer, label_a, label_b, estimator.value()] for layer, estimator in zip(layers, estimators)]
    report(run_a.directory, "cka", ["layer", "network_a", "network_b", "cka"], rows,
           lambda plt: line_plot(plt, {f"{label_a} vs {label_b}": (layers, [row[3] for row in rows])},
                                 "layer", "linear CKA (minibatch)", "Feature similarity (TNA Table 5)"))


def probes_command(args):
    """TNA Fig. 2, appendix A.3: a linear classifier per frozen stage output after global average
    pooling, trained on the whole training set (10 epochs, lr 0.01), accuracy on the test set."""
    run = load_run(args.run, args.device)
    networks = select_networks(run, args.networks, [run.deployed])
    data = load_data(run, args)

    def stage_vectors(images, labels):  # pooled once: the features are frozen (choice: no augmentation)
        vectors = {"labels": labels}
        for name, network in networks.items():
            vectors.update({(name, k): pooled(feature) for k, feature in enumerate(network(images, return_features=True)[1])})
        return vectors

    train = concatenate_batches(train_batches(data, args.batch_size), stage_vectors)
    test = concatenate_batches(data.test, stage_vectors)
    own_heads = evaluate(logits_of(networks), data.test)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for name in networks:
        stages = [key[1] for key in train if isinstance(key, tuple) and key[0] == name]
        for stage in stages:
            probe = train_probe(train[(name, stage)], train["labels"], data.num_classes, args, generator)
            with torch.no_grad():
                accuracy = (probe(test[(name, stage)]).argmax(1) == test["labels"]).float().mean().item()
            rows.append([name, f"stage {stage + 1}", train[(name, stage)].shape[1], accuracy])
        rows.append([name, "own head", "-", own_heads[name]["top1"]])
    report(run.directory, "probes", ["network", "probe_at", "features", "test_top1"], rows,
           lambda plt: line_plot(plt, {name: ([r[1] for r in rows if r[0] == name and r[2] != "-"],
                                              [r[3] for r in rows if r[0] == name and r[2] != "-"]) for name in networks},
                                 "probe position", "test accuracy", "Linear probes (TNA Fig. 2)"))


def train_probe(features, labels, num_classes, args, generator):
    """Linear probe: SGD (momentum 0.9, no weight decay; choice: appendix A.3 gives only lr and
    epochs) on cross-entropy, minibatches of --batch-size in a fresh random order each epoch."""
    probe = nn.Linear(features.shape[1], num_classes).to(features.device)
    optimizer = torch.optim.SGD(probe.parameters(), lr=args.lr, momentum=0.9)
    for _ in range(args.epochs):
        for rows in torch.randperm(len(features), generator=generator).to(features.device).split(args.batch_size):
            loss = F.cross_entropy(probe(features[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return probe


def corruption_sets(folder, subset):
    """Yield (corruption, severity, uint8 images [n, 3, H, W] on the CPU, labels) from a CIFAR-10-C /
    CIFAR-100-C folder (<corruption>.npy: 5 severities x N images, NHWC, stacked; labels.npy) or a
    TinyImageNet-C folder (<corruption>/<severity>/<wnid>/*.JPEG; labels by sorted wnid, as data.py
    numbers TinyImageNet). `subset` keeps the first (CIFAR) or evenly spaced (class folders) images."""
    folder = Path(folder)
    if not folder.is_dir():
        fail(f"--corrupt-dir {folder} is not a folder")
    arrays = sorted(path for path in folder.glob("*.npy") if path.name != "labels.npy")
    if arrays or (folder / "labels.npy").exists():
        yield from cifar_c_sets(folder, arrays, subset)
        return
    corruptions = sorted(path for path in folder.iterdir() if path.is_dir() and (path / "1").is_dir())
    if not corruptions:
        fail(f"no labels.npy in {folder}, and no TinyImageNet-C layout (<corruption>/<severity>/<wnid>/*.JPEG) either")
    from torchvision.io import ImageReadMode, read_image
    for corruption in corruptions:
        for severity_folder in sorted(path for path in corruption.iterdir() if path.is_dir() and path.name.isdigit()):
            wnids = sorted(path.name for path in severity_folder.iterdir() if path.is_dir())
            files = [(image, label) for label, wnid in enumerate(wnids) for image in sorted((severity_folder / wnid).glob("*.JPEG"))]
            files = [files[row] for row in subset_rows(len(files), subset, grouped_by_class=True)]
            images = torch.stack([read_image(str(path), ImageReadMode.RGB) for path, _ in files])
            yield corruption.name, int(severity_folder.name), images, torch.tensor([label for _, label in files])


def cifar_c_sets(folder, arrays, subset):
    """corruption_sets for CIFAR-10-C / CIFAR-100-C: each array read memory-mapped, one severity at a time."""
    if not (folder / "labels.npy").exists():
        fail(f"no labels.npy in {folder} (CIFAR-10-C / CIFAR-100-C folders hold <corruption>.npy and labels.npy)")
    try:
        all_labels = np.load(folder / "labels.npy")
        for path in arrays:
            images = np.load(path, mmap_mode="r")
            if images.ndim != 4 or images.shape[-1] != 3 or len(images) % CORRUPTION_SEVERITIES:
                fail(f"{path}: expected {CORRUPTION_SEVERITIES} severities x N images of H x W x 3, got shape {images.shape}")
            per_severity = len(images) // CORRUPTION_SEVERITIES
            rows = subset_rows(per_severity, subset, grouped_by_class=False).numpy()
            for severity in range(CORRUPTION_SEVERITIES):
                rows_of_severity = slice(severity * per_severity, (severity + 1) * per_severity)
                block = images[rows_of_severity]
                # labels.npy as distributed repeats the N labels once per severity; N labels are accepted too
                labels = all_labels[rows_of_severity] if len(all_labels) == len(images) else all_labels
                nchw = torch.from_numpy(np.ascontiguousarray(block[rows])).permute(0, 3, 1, 2)
                yield path.stem, severity + 1, nchw, torch.as_tensor(labels[rows])
    except (ValueError, OSError) as error:  # not a .npy file, or a truncated one
        fail(f"{folder}: {error}")


def uint8_batches(images, labels, data, batch_size, device):
    """Batches of CPU uint8 images, moved to the device and normalised by the run's dataset mean/std."""
    for batch_images, batch_labels in zip(images.split(batch_size), labels.split(batch_size)):
        yield normalize(batch_images.to(device), data.test.mean, data.test.std), batch_labels.to(device)


def corruption_command(args):
    """TNA Table 6: accuracy on every corruption and severity, its mean over severities, and clean."""
    run = load_run(args.run, args.device)
    networks = select_networks(run, args.networks, [run.deployed])
    data = load_data(run, args)
    predict = logits_of(networks)
    rows = [["none", "-", *(metrics["top1"] for metrics in evaluate(predict, data.test).values())]]
    for corruption, severity, images, labels in corruption_sets(args.corrupt_dir, resolve_subset(run, args)):
        if images.shape[-1] != data.image_size:
            fail(f"{corruption} images are {images.shape[-1]} pixels wide, the run's are {data.image_size}")
        accuracies = evaluate(predict, uint8_batches(images, labels, data, args.batch_size, args.device))
        rows.append([corruption, severity, *(metrics["top1"] for metrics in accuracies.values())])
    corrupted = [row for row in rows if row[1] != "-"]
    for corruption in sorted({row[0] for row in corrupted}):  # Table 6 reports the mean over the severities
        rows.append([corruption, "mean", *np.mean([row[2:] for row in corrupted if row[0] == corruption], axis=0).tolist()])
    rows.append(["average", "mean", *np.mean([row[2:] for row in corrupted], axis=0).tolist()])

    def draw(plt):
        means = [row for row in rows if row[1] == "mean"]
        figure, axis = plt.subplots(figsize=(max(6, len(means) * 0.6), 3.5))
        width = 0.8 / len(networks)
        for index, name in enumerate(networks):
            axis.bar(np.arange(len(means)) + index * width, [row[2 + index] for row in means], width, label=name)
        axis.set_xticks(np.arange(len(means)) + 0.4 - width / 2, [row[0] for row in means], rotation=60, ha="right")
        axis.set(ylabel="accuracy (mean over severities)", title="Corruption robustness (TNA Table 6)")
        axis.legend()
        return figure

    report(run.directory, "corruption", ["corruption", "severity", *(f"top1_{name}" for name in networks)], rows, draw)


def ensemble_command(args):
    """TNA Table 3: each member alone and the ensemble by logit averaging (section 4.2)."""
    first, members = members_of_runs(args.runs, args.networks, args.device, default_all_for_one_run=True)
    member_logits = logits_of(members)

    def predict(images):
        logits = member_logits(images)
        return {**logits, "ensemble": torch.stack(list(logits.values())).mean(0)}

    results = evaluate(predict, load_data(first, args).test)
    rows = [[name, metrics["top1"], metrics["nll"]] for name, metrics in results.items()]
    report(first.directory, "ensemble", ["network", "test_top1", "test_nll"], rows,
           lambda plt: bar_plot(plt, list(results), [row[1] for row in rows], "test accuracy", "Logit-averaging ensemble (TNA Table 3)"))


def noise_command(args):
    """SiLa Fig. 7b / AMLN Fig. 3c: training NLL before and after adding N(0, sigma^2) to every
    parameter (choice: BatchNorm running statistics are buffers, not weights, and stay), averaged
    over --repeats draws; a flatter minimum shows a smaller increase."""
    first, members = members_of_runs(args.runs, args.networks, args.device, default_all_for_one_run=False)
    data = load_data(first, args)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)

    def training_nll(network):
        return evaluate(logits_of({"network": network}), train_batches(data, args.batch_size))["network"]["nll"]

    rows = []
    for label, network in members.items():
        clean = training_nll(network)
        for sigma in args.sigmas:
            changes = []
            for _ in range(args.repeats):
                noisy = copy.deepcopy(network)
                with torch.no_grad():
                    for parameter in noisy.parameters():
                        parameter.add_(torch.randn(parameter.shape, generator=generator, device=parameter.device), alpha=sigma)
                changes.append(training_nll(noisy) - clean)
            rows.append([label, sigma, clean, float(np.mean(changes)), float(np.std(changes))])
    report(first.directory, "noise", ["network", "sigma", "train_nll", "nll_change_mean", "nll_change_std"], rows,
           lambda plt: line_plot(plt, {label: ([r[1] for r in rows if r[0] == label], [r[3] for r in rows if r[0] == label])
                                       for label in members},
                                 "weight noise sigma", "training NLL change", "Weight noise (SiLa Fig. 7b, AMLN Fig. 3c)",
                                 logx=min(args.sigmas) > 0))


def branch_outputs(network, images):
    """The separate predictions inside one network, each [B, K]: CSS's branches (its
    forward(x, return_branches=True) and branch_prediction), an MSDNet's exits, else the network's logits."""
    if hasattr(network, "branch_prediction"):
        return [network.branch_prediction(logits, j) for j, logits in enumerate(network(images, return_branches=True))]
    output = network(images)
    return list(output) if isinstance(output, (list, tuple)) else [output]


def diversity_kind(key_a, key_b):
    """Which of CSS's diversities a pair of outputs (network, "final" or branch number) measures, or
    None for a pair it does not average: a network's prediction against its own or another network's
    branch (it aggregates its branches), and non-corresponding branches of two networks."""
    (net_a, part_a), (net_b, part_b) = key_a, key_b
    if part_a == part_b == "final":
        return "between networks"
    if "final" in (part_a, part_b):
        return None
    if net_a == net_b:
        return f"within {net_a}"
    return "corresponding branches" if part_a == part_b else None


def output_label(network, part):
    return network if part == "final" else f"{network}/{part}"


def diversity_command(args):
    """CSS Fig. 3: mean over test images of ||softmax_a - softmax_b||_2 for every pair of outputs:
    between the networks' final predictions, between the branches (or exits) of one network, and
    between corresponding branches of different networks (CSS's "mutual diversity")."""
    run = load_run(args.run, args.device)
    networks = select_networks(run, args.networks, list(run.networks))

    def softmax_outputs(images, labels):
        outputs = {}
        for name, network in networks.items():
            outputs[(name, "final")] = F.softmax(final_logits(network(images)).float(), 1)
            branches = branch_outputs(network, images)
            if len(branches) > 1:
                outputs.update({(name, j + 1): F.softmax(logits.float(), 1) for j, logits in enumerate(branches)})
        return outputs

    probs = concatenate_batches(load_data(run, args).test, softmax_outputs)
    rows = []
    for key_a, key_b in itertools.combinations(probs, 2):
        kind = diversity_kind(key_a, key_b)
        if kind:
            distance = (probs[key_a] - probs[key_b]).norm(dim=1).mean().item()
            rows.append([output_label(*key_a), output_label(*key_b), kind, distance])
    if not rows:
        fail(f"diversity needs two networks, or a network with branches or exits; {run.directory} has {', '.join(networks)}")
    kinds = sorted({row[2] for row in rows})
    rows += [["mean", "", kind, float(np.mean([row[3] for row in rows if row[2] == kind]))] for kind in kinds]

    report(run.directory, "diversity", ["output_a", "output_b", "kind", "distance"], rows,
           lambda plt: bar_plot(plt, kinds, [row[3] for row in rows[-len(kinds):]], "mean Euclidean distance of softmax",
                                "Diversity (CSS Fig. 3)"))


def msdnet_command(args):
    """SiLa Fig. 4-5 (MSDNet): anytime prediction = accuracy of every exit against its cumulative MACs;
    budgeted batch classification = budgeted_batch_curve, thresholds set on the last --val-size
    training images (unaugmented). MSDNet's code holds those 5,000 out of training; to do the same,
    train with --subset 45000 on CIFAR and analyse with --subset 0 (all 50,000: the last 5,000 unseen)."""
    run = load_run(args.run, args.device)
    networks = select_networks(run, args.networks, [name for name, network in run.networks.items() if hasattr(network, "exit_macs")])
    if not networks or not all(hasattr(network, "exit_macs") for network in networks.values()):
        fail(f"msdnet needs MSDNet networks (multi-exit, with exit_macs); {run.directory} has "
             + ", ".join(f"{name} ({type(network).__name__})" for name, network in run.networks.items()))
    data = load_data(run, args)
    num_train = len(data.train.images) if hasattr(data.train, "images") else len(data.train.dataset)
    if not 4 <= args.val_size < num_train:
        fail(f"--val-size {args.val_size} must be at least 4 and below the {num_train} training images")
    val_rows = torch.arange(num_train - args.val_size, num_train)

    def exit_probs(images, labels):
        return {"labels": labels, **{name: torch.stack([F.softmax(logits.float(), 1) for logits in network(images)], 1)
                                     for name, network in networks.items()}}

    val = concatenate_batches(train_batches(data, args.batch_size, val_rows), exit_probs)
    test = concatenate_batches(data.test, exit_probs)
    rows = []
    for name, network in networks.items():
        macs = network.exit_macs
        val_probs, test_probs = val[name].transpose(0, 1).cpu(), test[name].transpose(0, 1).cpu()
        exit_accuracy = (test_probs.argmax(2) == test["labels"].cpu()).float().mean(1).tolist()
        rows += [[name, "anytime", f"exit {k + 1}", macs[k] / 1e6, accuracy] for k, accuracy in enumerate(exit_accuracy)]
        curve = budgeted_batch_curve(val_probs, test_probs, test["labels"], macs)
        rows += [[name, "budgeted", f"p={p}", mean_macs / 1e6, accuracy] for p, (mean_macs, accuracy) in enumerate(curve, start=1)]

    def draw(plt):
        figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for axis, kind, title in zip(axes, ("anytime", "budgeted"), ("Anytime prediction (SiLa Fig. 5)", "Budgeted batch (SiLa Fig. 4)")):
            for name in networks:
                points = [row for row in rows if row[0] == name and row[1] == kind]
                axis.plot([row[3] for row in points], [row[4] for row in points], marker="o" if kind == "anytime" else None, label=name)
            axis.set(xlabel="MACs per image (millions)", ylabel="test accuracy", title=title)
            axis.legend()
        return figure

    report(run.directory, "msdnet", ["network", "evaluation", "point", "mmacs_per_image", "test_top1"], rows, draw)


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


def embed_command(args):
    """SiLa Fig. 6 / CSS Fig. 2: the penultimate features (the input of the last linear layer; of
    every branch for CSS) of the test images, projected to 2-D by PCA (choice: CSS uses t-SNE; PCA
    needs no extra package, is deterministic, and leaves a 2-D feature layer as SiLa plots it)."""
    run = load_run(args.run, args.device)
    networks = select_networks(run, args.networks, list(run.networks))
    data = load_data(run, args)
    captured = {}
    hooks = [linear.register_forward_pre_hook(lambda module, inputs, key=(name, branch): captured.__setitem__(key, inputs[0].flatten(1)))
             for name, network in networks.items() for branch, linear in enumerate(final_linears(network))]

    def penultimate(images, labels):
        captured.clear()
        for network in networks.values():
            network(images)
        return {"labels": labels, **captured}

    features = concatenate_batches(data.test, penultimate)
    for hook in hooks:
        hook.remove()
    labels = features.pop("labels").cpu()
    rows, summary, projections = [], [], {}
    for name in networks:
        branches = [key for key in features if key[0] == name]
        points, explained = pca_2d(torch.cat([features[key] for key in branches]))  # one projection for all branches
        projections[name] = (points.cpu().numpy(), labels.repeat(len(branches)).numpy())
        summary.append([name, len(branches), len(labels), features[branches[0]].shape[1], *explained])
        for (_, branch), branch_points in zip(branches, points.cpu().split(len(labels))):
            rows += [[name, branch + 1, index, label, data.class_names[label], *point]
                     for index, (label, point) in enumerate(zip(labels.tolist(), branch_points.tolist()))]

    def draw(plt):
        figure, axes = plt.subplots(1, len(networks), figsize=(4.5 * len(networks), 4), squeeze=False)
        for axis, name in zip(axes[0], networks):
            points, point_labels = projections[name]
            if data.num_classes <= 20:  # few enough classes to name them in a legend
                for label, class_name in enumerate(data.class_names):
                    axis.scatter(*points[point_labels == label].T, s=4, label=class_name, color=plt.get_cmap("tab20")(label))
                axis.legend(fontsize=6, markerscale=2)
            else:
                axis.scatter(*points.T, c=point_labels, cmap="nipy_spectral", s=4)
            axis.set(title=f"{name}: penultimate features, PCA", xlabel="PC 1", ylabel="PC 2")
        return figure

    report(run.directory, "embed", ["network", "branch", "image", "label", "class", "pc1", "pc2"], rows, draw,
           printed=(["network", "branches", "images", "feature_dim", "pc1_variance", "pc2_variance"], summary))


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
            fail(f"Grad-CAM needs a convolutional last stage ([B, C, H, W]); this network's is {list(target_layer.shape)}")
        predicted = logits.argmax(1)
        score = logits.gather(1, predicted[:, None]).sum()  # images do not interact in eval mode
        gradients = torch.autograd.grad(score, target_layer)[0]
    maps = F.relu((gradients.mean(dim=(2, 3), keepdim=True) * target_layer).sum(1, keepdim=True)).detach()
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    maps = maps / maps.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    return maps, predicted, F.softmax(logits.detach().float(), 1).max(1).values


def gradcam_command(args):
    """AMLN Fig. 4: Grad-CAM heatmaps of the first --images test images for every network, with the
    predicted class and its probability; the maps are also saved as analysis_gradcam.npz."""
    run = load_run(args.run, args.device)
    networks = select_networks(run, args.networks, list(run.networks))
    data = load_data(run, args)
    first_batches = itertools.islice(data.test, math.ceil(args.images / args.batch_size))
    images, labels = [torch.cat(parts)[: args.images] for parts in zip(*first_batches)]
    rows, maps = [], {}
    for name, network in networks.items():
        maps[name], predicted, probability = grad_cam(network, images)
        rows += [[index, data.class_names[label], name, data.class_names[guess], confidence]
                 for index, (label, guess, confidence) in enumerate(zip(labels.tolist(), predicted.tolist(), probability.tolist()))]
    pictures = (images * data.test.std + data.test.mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def draw(plt):
        rows_of_axes = 1 + len(networks)  # the images, then one row of heatmaps per network
        figure, axes = plt.subplots(rows_of_axes, len(pictures), figsize=(1.6 * len(pictures), 1.8 * rows_of_axes), squeeze=False)
        for column, picture in enumerate(pictures):
            axes[0][column].imshow(picture)
            axes[0][column].set_title(data.class_names[labels[column]], fontsize=7)
            for row_index, name in enumerate(networks, start=1):
                axes[row_index][column].imshow(picture)
                axes[row_index][column].imshow(maps[name][column].cpu().numpy(), cmap="jet", alpha=0.5)
                guess, confidence = next((r[3], r[4]) for r in rows if r[0] == column and r[2] == name)
                axes[row_index][column].set_title(f"{guess} ({confidence:.2f})", fontsize=7)
        for axis in axes.flat:
            axis.axis("off")
        for row_index, name in enumerate(networks, start=1):
            axes[row_index][0].text(-0.1, 0.5, name, transform=axes[row_index][0].transAxes, ha="right", va="center", fontsize=8)
        return figure

    report(run.directory, "gradcam", ["image", "true_class", "network", "predicted_class", "probability"], rows, draw)
    np.savez(run.directory / "analysis_gradcam.npz", images=pictures, labels=labels.cpu().numpy(),
             **{f"gradcam_{name}": heatmaps.cpu().numpy() for name, heatmaps in maps.items()})
    print(f"-> {run.directory / 'analysis_gradcam.npz'}")


# ==== command line ====
def parse_args(argv=None):
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name, function, help_text, runs_help, networks_help):
        """A subcommand with its run argument(s) and the options every analysis shares."""
        sub = commands.add_parser(name, help=help_text, description=function.__doc__)
        sub.set_defaults(function=function)
        if runs_help:
            sub.add_argument("runs", nargs="+", help=runs_help)
        elif name != "cka":
            sub.add_argument("run", help="run folder (holding checkpoint.pt) written by a method script")
        sub.add_argument("--networks", default=None, help=networks_help)
        sub.add_argument("--dataset", default=None, help="dataset (default: the run's own)")
        sub.add_argument("--data-dir", default=None, help="where the dataset lives (default: the run's own)")
        sub.add_argument("--subset", type=int, default=None, help="first N train and N test images (default: the run's own; 0 = all)")
        sub.add_argument("--device", default="auto", help="auto (cuda if present, default), cpu, cuda or cuda:N")
        sub.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default %(default)s)")
        return sub

    cka = command("cka", cka_command, "per-stage linear CKA between two networks (TNA Table 5)", None,
                  "NAME_A,NAME_B: a network of RUN_A and one of RUN_B (default: the first two networks of one run, "
                  "or each run's deployed network)")
    cka.add_argument("run_a", help="run folder of the first network")
    cka.add_argument("run_b", help="run folder of the second network (the same folder compares two networks of one run)")
    probes = command("probes", probes_command, "linear probe accuracy per stage (TNA Fig. 2)", None,
                     "comma-separated networks to probe (default: the deployed one)")
    probes.add_argument("--epochs", type=int, default=10, help="probe training epochs (default %(default)s, appendix A.3)")
    probes.add_argument("--lr", type=float, default=0.01, help="probe learning rate (default %(default)s, appendix A.3)")
    probes.add_argument("--seed", type=int, default=0, help="seed of the probes' initialisation and batch order (default %(default)s)")
    corruption = command("corruption", corruption_command, "accuracy per corruption and severity (TNA Table 6)", None,
                         "comma-separated networks (default: the deployed one)")
    corruption.add_argument("--corrupt-dir", required=True, help="CIFAR-10-C/100-C folder (<name>.npy, labels.npy) or TinyImageNet-C folder")
    command("ensemble", ensemble_command, "accuracy of logit-averaged networks (TNA Table 3)",
            "run folders; each contributes its deployed network (a single run: all its networks)",
            "comma-separated networks taken from every run")
    noise = command("noise", noise_command, "training NLL change under Gaussian weight noise (SiLa Fig. 7b, AMLN Fig. 3c)",
                    "run folders, compared on one plot (e.g. independent, DML, SiLa)",
                    "comma-separated networks taken from every run (default: each run's deployed one)")
    noise.add_argument("--sigmas", type=float, nargs="+", default=[0.001, 0.005, 0.01],
                       help="standard deviations of the weight noise (default %(default)s)")
    noise.add_argument("--repeats", type=int, default=3, help="noise draws per sigma, mean and std reported (default %(default)s)")
    noise.add_argument("--seed", type=int, default=0, help="seed of the noise (default %(default)s)")
    command("diversity", diversity_command, "mean pairwise distance of softmax outputs (CSS Fig. 3)", None,
            "comma-separated networks (default: all)")
    msdnet = command("msdnet", msdnet_command, "anytime and budgeted batch evaluation of MSDNet exits (SiLa Fig. 4-5)", None,
                     "comma-separated MSDNet networks (default: every MSDNet of the run)")
    msdnet.add_argument("--val-size", type=int, default=5000,
                        help="the last N training images are the validation split of the thresholds (default %(default)s)")
    command("embed", embed_command, "2-D PCA of penultimate features (SiLa Fig. 6, CSS Fig. 2)", None,
            "comma-separated networks (default: all)")
    gradcam = command("gradcam", gradcam_command, "Grad-CAM heatmaps of a few test images (AMLN Fig. 4)", None,
                      "comma-separated networks (default: all)")
    gradcam.add_argument("--images", type=int, default=8, help="how many test images, the first ones (default %(default)s)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "images", "repeats", "epochs"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    args.device = resolve_device(args.device)
    return args


def main(argv=None):
    args = parse_args(argv)
    args.function(args)


if __name__ == "__main__":
    main()
