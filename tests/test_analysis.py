"""analysis.py: linear CKA as Kornblith et al. define it and Nguyen et al.'s minibatch estimator, block
taps, seeded probes, grouping runs by configuration, MSDNet's budgeted thresholds on a case worked by
hand, the corruption readers' faults, and every subcommand end to end on a tiny run of each method."""
import csv
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import analysis
from analysis import (
    MinibatchCKA,
    branch_outputs,
    budgeted_batch_curve,
    exit_thresholds,
    gram,
    group_by_configuration,
    layer_taps,
    linear_cka,
    main,
    pair_runs,
    shuffled_batches,
    train_probe,
    unbiased_hsic,
)
from conftest import CIFAR10_SAMPLE, TINY_RUN, require_cifar10_sample, run_script
from data import corruption_sets
from models import build_model


# ---- linear CKA ----
def cka_by_the_formula(x, y):
    """Kornblith et al. 2019, eq. 1-4: HSIC(K, L) = tr(KHLH) / (n-1)^2 with linear kernels and the
    centring matrix H = I - 11'/n; CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = x.shape[0]
    centring = torch.eye(n, dtype=torch.float64) - 1.0 / n
    gram_x, gram_y = x.double() @ x.double().T, y.double() @ y.double().T

    def hsic(kernel_a, kernel_b):
        return torch.trace(kernel_a @ centring @ kernel_b @ centring) / (n - 1) ** 2

    return (hsic(gram_x, gram_y) / torch.sqrt(hsic(gram_x, gram_x) * hsic(gram_y, gram_y))).item()


def random_features(n=200, dims=(20, 30), seed=0):
    generator = torch.Generator().manual_seed(seed)
    def normal(*shape):  # float64: exact invariances
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    shared = normal(n, 5)  # both representations see the same 5 factors, plus noise
    return [shared @ normal(5, d) + normal(n, d) for d in dims]


def random_rotation(d, seed=1):
    return torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def minibatch_cka(x, y, batch_size, seed=0, passes=1):
    estimator = MinibatchCKA()
    for rows in shuffled_batches(len(x), batch_size, passes, seed):
        estimator.update(x[rows], y[rows])
    return estimator.value()


def test_cka_of_identical_inputs_is_one():
    x, _ = random_features()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x.view(200, 4, 5), x) == pytest.approx(1.0, abs=1e-12)  # trailing dims are flattened


@pytest.mark.parametrize("n", [200, 10])  # the feature-space path (n > d) and the Gram path (n < d)
def test_cka_matches_the_hsic_formula(n):
    x, y = random_features(n=n)
    assert linear_cka(x, y) == pytest.approx(cka_by_the_formula(x, y), rel=1e-10)


def test_cka_is_invariant_to_rotation_and_isotropic_scaling():
    x, y = random_features()
    reference = linear_cka(x, y)
    assert linear_cka(x @ random_rotation(20), y) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(x, 3.7 * y @ random_rotation(30)) == pytest.approx(reference, rel=1e-10)


def test_cka_is_not_invariant_to_an_arbitrary_invertible_map():
    x, y = random_features()
    stretch = torch.diag(torch.logspace(-2, 2, 20, dtype=torch.float64)) @ random_rotation(20)  # condition number 1e4
    assert abs(linear_cka(x @ stretch, y) - linear_cka(x, y)) > 0.05


def test_unbiased_hsic_is_the_u_statistic_of_song_et_al():
    """Song et al. 2012 (Theorem 2): the unbiased HSIC is the mean over distinct 4-tuples (i, j, q, r) of
    h = 1/24 sum over their orderings (t, u, v, w) of k_tu l_tu + k_tu l_vw - 2 k_tu l_tv."""
    x, y = random_features(n=7, dims=(3, 4))
    k, l_ = gram(x), gram(y)
    terms = [k[t, u] * l_[t, u] + k[t, u] * l_[v, w] - 2 * k[t, u] * l_[t, v]
             for t, u, v, w in itertools.permutations(range(7), 4)]  # every ordering of every distinct 4-tuple
    assert unbiased_hsic(k, l_).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-10)


def test_minibatch_cka_equals_the_full_batch_cka_where_they_must_agree():
    x, y = random_features(n=400)
    # a rotated and scaled copy: CKA is exactly 1 for the exact full-batch value and for every minibatch
    same = 2.5 * x @ random_rotation(20)
    assert linear_cka(x, same) == pytest.approx(1.0, abs=1e-12)
    assert minibatch_cka(x, same, batch_size=64) == pytest.approx(1.0, abs=1e-12)
    # one batch of all n images: the unbiased full-batch CKA, which converges to the same value as the exact one
    # (their gap is the plain estimator's O(d/n) bias)
    one_batch = minibatch_cka(x, y, batch_size=400)
    full = MinibatchCKA()
    full.update(x, y)
    assert one_batch == pytest.approx(full.value(), rel=1e-12)


@pytest.mark.parametrize("batch_size", [100, 256])
def test_minibatch_cka_agrees_with_the_full_computation(batch_size):
    """Both estimate the same population CKA from 4,000 samples of 20- and 30-dim features. The full
    (plain, biased) estimator is biased upward by about d/n (here < 0.01: it gives ~0.005 for independent
    features), the minibatch average of unbiased HSICs is not; their difference measured over 5 seeds
    and batch sizes 100-500 stays below 0.003, so 0.01 leaves room without hiding a real error (a wrong
    centring or normalisation moves the value by 0.1 or more)."""
    x, y = random_features(n=4000)
    assert minibatch_cka(x, y, batch_size) == pytest.approx(linear_cka(x, y), abs=0.01)


def test_minibatch_batches_are_seeded_shuffles_of_one_size():
    """Nguyen et al.: equal minibatches drawn without replacement; 1,000 images in batches of 256 give 3
    batches per pass (232 images sit that pass out) instead of a 232-image batch weighed like a full one."""
    batches = shuffled_batches(1000, 256, passes=2, seed=3)
    assert len(batches) == 6 and all(len(rows) == 256 for rows in batches)
    for one_pass in (batches[:3], batches[3:]):
        assert len(torch.cat(one_pass).unique()) == 768  # without replacement within a pass
    assert not torch.equal(torch.cat(batches[:3]), torch.arange(768))  # shuffled, not in file order
    assert all(torch.equal(a, b) for a, b in zip(batches, shuffled_batches(1000, 256, passes=2, seed=3)))
    assert not torch.equal(batches[0], shuffled_batches(1000, 256, seed=4)[0])
    assert [len(rows) for rows in shuffled_batches(100, 256)] == [100]  # fewer images than a batch: one batch of all


# ---- blocks and stages ----
@torch.no_grad()
def stage_outputs_at_taps(network, level, images):
    taps = layer_taps("net", network, level)
    with analysis.captured(taps, lambda output: output) as outputs:
        logits, features = network(images, return_features=True)
    return [label for label, _ in taps], outputs, features


def test_block_taps_are_tna_blocks_1_to_8_of_resnet18_and_end_where_stages_end():
    network = build_model("resnet18", 10, 32).eval()
    labels, outputs, features = stage_outputs_at_taps(network, "block", torch.randn(2, 3, 32, 32))
    assert labels == [f"block {k}" for k in range(1, 9)]  # TNA Table 5: Blocks 1-8 (two BasicBlocks per stage)
    assert [outputs[f"block {k}"].shape[1] for k in range(1, 9)] == [64, 64, 128, 128, 256, 256, 512, 512]
    for stage, block in enumerate((2, 4, 6, 8)):  # a stage's last block is the stage's output
        assert torch.equal(outputs[f"block {block}"], features[stage])
    assert [label for label, _ in layer_taps("net", network, "stage")] == ["stage 1", "stage 2", "stage 3", "stage 4"]


@pytest.mark.parametrize("model,blocks", [("convnet", 4), ("resnet20", 9), ("wrn_16_2", 6)])
def test_block_taps_of_other_backbones(model, blocks):
    """ConvNet: a block is a conv and its ReLU (and pool); a pre-activation WRN's final BN + ReLU belong to
    its last block, so that block still ends where the stage does."""
    network = build_model(model, 10, 32).eval()
    labels, outputs, features = stage_outputs_at_taps(network, "block", torch.randn(2, 3, 32, 32))
    assert len(labels) == blocks
    assert torch.equal(outputs[labels[-1]], features[-1])


def test_block_taps_of_a_css_network_follow_branch_one():
    css = pytest.importorskip("css")
    network = css.build_networks(css.parse_args(["--model", "resnet20", "--branches", "2"]), 10, 32)["net1"].eval()
    labels, outputs, features = stage_outputs_at_taps(network, "block", torch.randn(2, 3, 32, 32))
    assert len(labels) == 9 and torch.equal(outputs["block 9"], features[-1])  # branch 1's last stage


# ---- probes ----
def test_probes_are_seeded_and_leave_the_global_generator_alone():
    features, labels = torch.randn(64, 8), torch.randint(0, 3, (64,))
    settings = lambda seed: type("Args", (), {"seed": seed, "lr": 0.01, "epochs": 2, "batch_size": 16})  # noqa: E731
    state = torch.get_rng_state()
    first, again, other = (train_probe(features, labels, 3, settings(seed)) for seed in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.weight, again.weight) and not torch.equal(first.weight, other.weight)


# ---- runs: configurations and pairs ----
def test_runs_differing_only_in_seed_form_one_group():
    tna = {"model": "resnet18", "alpha": 0.005, "seed": 0, "out_dir": "a"}
    runs = [("a", "tna", tna), ("b", "tna", {**tna, "seed": 1, "out_dir": "b"}),
            ("c", "tna", {**tna, "alpha": 0.0}), ("d", "dml", {"model": "resnet18", "seed": 0})]
    groups = group_by_configuration(runs)
    assert [members for _, members in groups] == [["a", "b"], ["c"], ["d"]]
    assert [label for label, _ in groups] == ["tna alpha=0.005", "tna alpha=0.0", "dml"]  # what tells them apart
    assert group_by_configuration(runs[:2]) == [("tna model=resnet18", ["a", "b"])]


def test_runs_are_paired_by_seed_else_in_order():
    assert pair_runs([[("a1", 1), ("a0", 0)], [("b0", 0), ("b1", 1)]]) == [("a0", "b0"), ("a1", "b1")]
    assert pair_runs([[("a", 0), ("b", 1)], [("c", 5), ("d", 6)]]) == [("a", "c"), ("b", "d")]
    assert pair_runs([[("a0", 0), ("a1", 1)], [("b1", 1), ("b0", 0)]], by="order") == [("a0", "b1"), ("a1", "b0")]
    with pytest.raises(SystemExit, match="cannot pair the runs"):
        pair_runs([[("a", 0), ("b", 1)], [("c", 5)]])


# ---- MSDNet budgeted batch classification ----
# Two exits, two classes. Validation max-softmax at exit 1: 0.9, 0.8, 0.6, 0.55.
VAL_PROBS = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]],
                          [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]])
# Test: exit 1 confidences 0.95, 0.7, 0.85 (predicting 0, 1, 1); exit 2 predicts 1, 1, 0.
TEST_PROBS = torch.tensor([[[0.95, 0.05], [0.3, 0.7], [0.15, 0.85]],
                           [[0.4, 0.6], [0.1, 0.9], [0.8, 0.2]]])
TEST_TARGETS = torch.tensor([0, 0, 1])
EXIT_MACS = [10, 30]


@pytest.mark.parametrize("p,threshold,mean_macs,accuracy", [
    # q = 1: shares 1/2, 1/2 -> floor(4 * 0.5) = 2 validation samples leave at exit 1: threshold 0.8;
    # test samples 1 and 3 leave there (both right), sample 2 goes on (exit 2 is wrong)
    (20, 0.8, (10 + 30 + 10) / 3, 2 / 3),
    # q = 0.05: share 1/1.05 -> floor(3.81) = 3 leave: threshold 0.6; every test sample leaves at exit 1
    (1, 0.6, 10, 2 / 3),
    # q = 1.95: share 1/2.95 -> floor(1.36) = 1 leaves: threshold 0.9; samples 2 and 3 go on, both wrong there
    (39, 0.9, (10 + 30 + 30) / 3, 1 / 3),
])
def test_budgeted_batch_curve_by_hand(p, threshold, mean_macs, accuracy):
    shares = torch.tensor([1.0, p / 20])
    thresholds = exit_thresholds(VAL_PROBS, (shares / shares.sum()).tolist())
    assert thresholds.tolist() == pytest.approx([threshold, -math.inf])
    curve = budgeted_batch_curve(VAL_PROBS, TEST_PROBS, TEST_TARGETS, EXIT_MACS)
    assert len(curve) == 39
    assert curve[p - 1] == pytest.approx((mean_macs, accuracy))


def test_thresholds_rank_only_samples_that_have_not_exited():
    # exit 2's most confident sample (0.99) already left at exit 1, so 2 of the other 3 leave at 0.65, not 0.7
    confidences = torch.tensor([[0.9, 0.8, 0.6, 0.55], [0.99, 0.5, 0.7, 0.65], [0.5, 0.5, 0.5, 0.5]])
    probs = torch.stack([confidences, 1 - confidences], dim=2)
    assert exit_thresholds(probs, [0.25, 0.5, 0.25]).tolist() == pytest.approx([0.9, 0.65, -math.inf])
    # a share that rounds to no sample lets nobody leave (the reference code's threshold 1e8)
    assert exit_thresholds(probs[[0, 2]], [0.1, 0.9])[0].item() == math.inf


# ---- branches ----
def test_diversity_reaches_the_branches_of_a_css_network():
    css = pytest.importorskip("css")
    networks = css.build_networks(css.parse_args(["--model", "convnet", "--branches", "3"]), 10, 32)
    branches = branch_outputs(networks["net1"].eval(), torch.randn(2, 3, 32, 32))
    assert len(branches) == 3 and all(logits.shape == (2, 10) for logits in branches)


# ---- the in-order reader the analyses use (data.py) ----
def test_rows_in_order_reads_every_training_image_unaugmented_in_the_order_asked(tmp_path):
    """Training NLL and probe features need every training image once, unaugmented, the last batch kept;
    minibatch CKA and hold-out rows need rows in a given order. Both loader kinds, through data.py."""
    from PIL import Image

    from data import build_data, rows_in_order
    data = build_data("fake", batch_size=100, subset=250, augment="standard")  # the training loader augments
    images, labels = map(torch.cat, zip(*rows_in_order(data.train, 100)))
    assert len(images) == 250 and [len(batch) for batch, _ in rows_in_order(data.train, 100)] == [100, 100, 50]
    picked, picked_labels = map(torch.cat, zip(*rows_in_order(data.train, 3, [7, 2, 249])))
    assert torch.equal(picked, images[[7, 2, 249]]) and torch.equal(picked_labels, labels[[7, 2, 249]])
    assert torch.equal(images, next(rows_in_order(data.train, 250))[0])  # not augmented: the same every time
    for split in ("train", "val"):  # an image-folder dataset (80 px: read through a DataLoader, test transform)
        for label in range(2):
            (tmp_path / split / f"class{label}").mkdir(parents=True)
            for index in range(3):
                colour = (40 * index, 100 * label, 0)
                Image.new("RGB", (80, 80), colour).save(tmp_path / split / f"class{label}" / f"{index}.JPEG")
    folder = build_data(f"folder:{tmp_path}", batch_size=2, augment="none", num_workers=0)
    train, train_labels = map(torch.cat, zip(*rows_in_order(folder.train, 4)))
    test, test_labels = map(torch.cat, zip(*folder.test))  # the same files in val/: the test loader's order
    assert train_labels.tolist() == [0, 0, 0, 1, 1, 1] and torch.equal(train, test)
    last_first, _ = map(torch.cat, zip(*rows_in_order(folder.train, 4, [5, 0])))
    assert torch.equal(last_first, train[[5, 0]])


# ---- corruption benchmarks: layouts and their faults ----
def cifar_c(folder, corruptions=("fog",), images=8, labels=None, size=32):
    folder.mkdir(exist_ok=True)
    for name in corruptions:
        np.save(folder / f"{name}.npy", np.zeros((5 * images, size, size, 3), np.uint8))
    np.save(folder / "labels.npy", np.arange(5 * images) % 10 if labels is None else labels)
    return folder


def tinyimagenet_c(folder, severities=range(1, 6), classes=("n01", "n02"), empty=()):
    from PIL import Image
    for severity in severities:
        for wnid in classes:
            (folder / "fog" / str(severity) / wnid).mkdir(parents=True)
            if wnid not in empty:
                Image.new("RGB", (64, 64)).save(folder / "fog" / str(severity) / wnid / "a.JPEG")
    return folder


def test_corruption_sets_read_both_layouts(tmp_path):
    sets = list(corruption_sets(cifar_c(tmp_path / "c", ("fog", "snow")), subset=4))
    assert [(name, severity) for name, severity, _, _ in sets] == [(name, s) for name in ("fog", "snow")
                                                                   for s in range(1, 6)]
    assert sets[0][2].shape == (4, 3, 32, 32) and sets[1][3].tolist() == [8, 9, 0, 1]  # severity 2's labels
    sets = list(corruption_sets(tinyimagenet_c(tmp_path / "t"), num_classes=2))
    assert len(sets) == 5 and sets[0][2].shape == (2, 3, 64, 64) and sets[0][3].tolist() == [0, 1]


@pytest.mark.parametrize("fault,messages", [
    ("labels", ["labels.npy holds (7,) labels", "need 8 (one per image) or 40"]),
    ("empty", ["holds neither <corruption>.npy with labels.npy", "nor <corruption>/<severity>/<wnid>/*.JPEG"]),
    ("no labels", ["no labels.npy in"]),
    ("uneven", ["different numbers of images per severity", "fog.npy 8", "snow.npy 4"]),
    ("truncated", ["snow.npy is not a readable .npy array"]),
    ("class range", ["labels span 0..9, expected 0..4"]),
    ("missing severity", ["lacks severity folder(s) 4, 5"]),
    ("empty class", ["has empty class folders (n02)"]),
    ("other classes", ["has 2 class folders, the run has 200 classes"]),
])
def test_corruption_folder_faults_name_the_file_and_what_was_expected(fault, messages, tmp_path):
    folder = tmp_path / "c"
    num_classes = {"class range": 5, "other classes": 200}.get(fault, 10)
    if fault == "labels":
        cifar_c(folder, labels=np.zeros(7, np.int64))
    elif fault == "empty":
        folder.mkdir()
    elif fault == "no labels":
        cifar_c(folder)
        (folder / "labels.npy").unlink()
    elif fault == "uneven":
        cifar_c(folder)
        np.save(folder / "snow.npy", np.zeros((20, 32, 32, 3), np.uint8))
    elif fault == "truncated":
        cifar_c(folder)
        (folder / "snow.npy").write_bytes(b"\x93NUMPY")
    elif fault == "class range":
        cifar_c(folder)
    else:
        tinyimagenet_c(folder, severities=range(1, 4) if fault == "missing severity" else range(1, 6),
                       empty=("n02",) if fault == "empty class" else ())
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        corruption_sets(folder, num_classes=num_classes)
    assert all(message in str(error.value) for message in messages), str(error.value)
    assert "\n" not in str(error.value)


# ---- every subcommand end to end, on a tiny run of each method ----
TINY = [*TINY_RUN, "--subset", "128"]  # 2 steps of 64; the analyses then see the run's 128 test images
METHODS = {"tna": ["tna.py"], "dml": ["dml.py"], "sila": ["sila.py"], "fdl": ["fdl.py", "--pretrain-epochs", "0"],
           "amln": ["amln.py"], "css": ["css.py"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """train(name, script, *args) -> run folder: each tiny run trained once for the whole module."""
    require_cifar10_sample()
    root, trained = tmp_path_factory.mktemp("runs"), {}

    def train(name, script, *args):
        if name not in trained:
            result = run_script(script, *TINY, "--dataset", CIFAR10_SAMPLE, "--out-dir", root / name, *args)
            assert result.returncode == 0, result.stderr
            trained[name] = root / name
        return trained[name]

    return train


@pytest.fixture(scope="module")
def seeds(runs):
    """Two seeds of one TNA configuration, 2 epochs each, in one folder (a group of runs)."""
    return [runs(f"tna_seeds/s{seed}", "tna.py", "--epochs", "2", "--seed", str(seed)) for seed in (0, 1)]


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory):
    """A CIFAR-10-C-like folder over the runs' 128 test images: 'identity' (the clean images at every
    severity) and Gaussian noise growing with the severity."""
    require_cifar10_sample()
    folder = tmp_path_factory.mktemp("cifar10c")
    with np.load(CIFAR10_SAMPLE) as data:
        images, labels = data["x_test"][:128], data["y_test"][:128]
    noise = np.random.default_rng(0).normal(0, 1, images.shape)
    np.save(folder / "identity.npy", np.concatenate([images] * 5))
    np.save(folder / "gaussian_noise.npy", np.concatenate([np.clip(images + 15 * s * noise, 0, 255).astype(np.uint8)
                                                           for s in range(1, 6)]))
    np.save(folder / "labels.npy", np.concatenate([labels] * 5))
    return folder


def read_csv(path):
    with open(path) as file:
        return list(csv.DictReader(file))


def analyse(*argv):
    """Run a subcommand as a user would; check it wrote its CSV and its figure (or said matplotlib is
    missing); return (CSV rows, {suffix: path}, stdout)."""
    result = run_script("analysis.py", *argv)
    assert result.returncode == 0, result.stderr
    written = {Path(line[3:].split(" (replaced")[0]).suffix: Path(line[3:].split(" (replaced")[0])
               for line in result.stdout.splitlines() if line.startswith("-> ")}
    assert written[".csv"].exists()
    assert written.get(".png", Path("missing")).exists() or "matplotlib is not installed" in result.stdout
    return read_csv(written[".csv"]), written, result.stdout


SUBCOMMANDS = {"cka": [], "probes": ["--epochs", "2"], "corruption": ["--corrupt-dir", "{corrupt}"], "ensemble": [],
               "noise": ["--sigmas", "0.01", "0.05", "--repeats", "1"], "diversity": [], "embed": [],
               "gradcam": ["--images", "3"], "curves": []}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_subcommand_analyses_every_method(method, subcommand, runs, corrupt_dir):
    run = runs(method, *METHODS[method])
    options = [option.format(corrupt=corrupt_dir) for option in SUBCOMMANDS[subcommand]]
    rows, _, _ = analyse(subcommand, run, *options)
    assert rows


def test_fdl_run_is_analysed_with_its_deployed_head(runs):
    """FDL deploys its ensemble head (saved among the checkpoint's extra modules, not its networks): it is
    rebuilt, scores what training reported, and is the default network of the deployed-network analyses."""
    run = runs("fdl", *METHODS["fdl"])
    rows, _, _ = analyse("ensemble", run)
    top1 = {row["network"]: float(row["value_mean"]) for row in rows if row["metric"] == "top-1 (%)"}
    summary = json.loads((run / "summary.json").read_text())
    assert top1["head"] == pytest.approx(100 * summary["deployed"]["top1"], abs=1e-9)
    assert top1["ensemble"] == pytest.approx(100 * summary["ensemble"]["top1"], abs=1e-9)  # the bases' average
    rows, _, _ = analyse("noise", run, "--sigmas", "0", "--repeats", "1")
    assert rows[0]["output"].endswith(": head") and float(rows[0]["nll_change_mean"]) == 0.0


def test_ensemble_of_a_run_equals_what_training_reported(runs):
    run = runs("tna", *METHODS["tna"])
    rows, _, _ = analyse("ensemble", run)
    top1 = {row["network"]: float(row["value_mean"]) for row in rows if row["metric"] == "top-1 (%)"}
    assert list(top1) == ["base", "twin", "ensemble"]
    summary = json.loads((run / "summary.json").read_text())  # evaluated in fp32 too (--amp off)
    assert top1["base"] == pytest.approx(100 * summary["networks"]["base"]["top1"], abs=1e-9)
    assert top1["ensemble"] == pytest.approx(100 * summary["ensemble"]["top1"], abs=1e-9)


def per_cell(rows, row_field, value):
    return {(row[row_field], row["output"]): (float(row[f"{value}_mean"]), row[f"{value}_std"], int(row["n"]),
                                              [float(v) for v in row[f"{value}_per_run"].split()]) for row in rows}


def test_cka_table_5_layout_mean_and_std_over_pairs_of_runs(seeds):
    """Blocks x comparisons, each cell the mean ± sample std over the pairs, equal to the pairs' own CKAs."""
    rows, _, stdout = analyse("cka", "--runs-a", seeds[0].parent, "--networks", "base,twin", "--label", "Base vs Twin",
                              "--runs-a", seeds[0].parent, "--runs-b", *reversed(seeds), "--networks", "base,base",
                              "--label", "Base vs Base")
    cells = per_cell(rows, "layer", "cka")
    assert [row["layer"] for row in rows[:5]] == ["block 1", "block 2", "block 3", "block 4", "logits"]
    assert "Base vs Twin" in stdout.splitlines()[1] and " ± " in stdout  # the printed grid, one column each
    singles = [per_cell(analyse("cka", seed, "--networks", "base,twin")[0], "layer", "cka") for seed in seeds]
    for layer in ("block 1", "logits"):
        mean, std, n, values = cells[layer, "Base vs Twin"]
        pairs = [next(value for (row, _), value in single.items() if row == layer)[0] for single in singles]
        assert n == 2 and values == pytest.approx(pairs, abs=1e-5)
        assert mean == pytest.approx(np.mean(pairs), abs=1e-5)
        assert float(std) == pytest.approx(np.std(pairs, ddof=1), abs=1e-5)  # the sample std over the pairs
        assert cells[layer, "Base vs Base"][0] == pytest.approx(1.0)  # paired by seed, not in the order given


def test_cka_stage_level_and_a_two_run_comparison(runs, seeds):
    rows, _, _ = analyse("cka", seeds[0], seeds[1], "--level", "stage")
    assert [row["layer"] for row in rows] == ["stage 1", "stage 2", "logits"]
    assert rows[0]["output"] == "s0:base vs s1:base"  # two runs: each one's deployed network


def test_probes_over_a_group_of_seeds(seeds, runs):
    rows, _, _ = analyse("probes", seeds[0].parent, runs("dml", *METHODS["dml"]), "--epochs", "2")
    cells = per_cell(rows, "probe_at", "test_top1_percent")
    layers = [layer for layer, output in cells if output.startswith("tna")]
    assert layers == ["block 1", "block 2", "block 3", "block 4", "own head"]
    assert {n for _, _, n, _ in cells.values()} == {1, 2}  # two TNA seeds, one DML run
    again, _, _ = analyse("probes", seeds[0].parent, runs("dml", *METHODS["dml"]), "--epochs", "2")
    assert again == rows  # --seed fixes the probes' initialisation and order


def test_noise_and_corruption_over_a_group_of_seeds(seeds, corrupt_dir):
    rows, _, _ = analyse("noise", seeds[0].parent, "--sigmas", "0", "0.05", "--repeats", "2")
    assert [(row["sigma"], row["n"]) for row in rows] == [("0.0", "2"), ("0.05", "2")]  # the two seeds
    assert float(rows[0]["nll_change_mean"]) == 0.0 and float(rows[1]["nll_change_mean"]) != 0.0
    rows, _, _ = analyse("corruption", seeds[0].parent, "--corrupt-dir", corrupt_dir)
    cells = per_cell(rows, "corruption", "test_top1_percent")
    by_key = {(row["corruption"], row["severity"]): [float(v) for v in row["test_top1_percent_per_run"].split()]
              for row in rows}
    # the identity corruption scores the clean accuracy: the images are normalised as the run's own
    assert all(by_key["identity", str(severity)] == by_key["clean", "-"] for severity in range(1, 6))
    average = np.mean([by_key["identity", "mean"], by_key["gaussian_noise", "mean"]], 0)
    assert by_key["average", "mean"] == pytest.approx(average, abs=1e-3)  # the CSV keeps 6 significant digits
    assert cells["clean", "tna model=convnet: base"][2] == 2


def test_ensemble_across_runs_pairs_seeds(seeds):
    rows, written, _ = analyse("ensemble", "--across-runs", seeds[0], seeds[1])
    assert [row["network"] for row in rows if row["metric"] == "NLL"] == ["s0:base", "s1:base", "ensemble"]
    assert "across" in written[".csv"].name


def test_curves_draw_a_line_per_run_and_a_band_per_group(seeds, runs):
    """analysis.py curves: every per-epoch series; a group of seeds gets a mean ± std band."""
    plt = pytest.importorskip("matplotlib.pyplot")
    single = runs("dml", *METHODS["dml"])
    rows, written, _ = analyse("curves", seeds[0].parent, single)
    series = {row["series"] for row in rows}
    assert {"lr", "losses/match", "test/base/top1", "test/student1/top1"} <= series
    two_seeds = [row for row in rows if row["series"] == "test/base/top1"]
    assert [(row["epoch"], row["n"]) for row in two_seeds] == [("1", "2"), ("2", "2")]
    run_dirs = [seed.resolve() for seed in seeds] + [single.resolve()]
    groups = group_by_configuration([(run_dir, *analysis.saved_run(run_dir)) for run_dir in run_dirs])
    curves = {run_dir: analysis.read_curves(run_dir) for run_dir in run_dirs}
    figure = analysis.curves_figure(plt, groups, curves, ["test/ensemble/top1"])
    axis = figure.axes[0]
    run_lines = sorted(line.get_gid() for line in axis.lines if line.get_gid().startswith("run:"))
    assert run_lines == ["run:dml", "run:s0", "run:s1"]
    assert [band.get_gid() for band in axis.collections] == [f"band:{groups[0][0]}"]  # the group of two seeds only
    plt.close(figure)


def test_curves_draw_any_series_a_run_logs(tmp_path):
    """A series the method logs per evaluation (e.g. CSS's branch diversity) is drawn like the others."""
    run = tmp_path / "run"
    run.mkdir()
    records = [{"epoch": epoch, "lr": 0.1, "losses": {"ce": 2.0 / epoch}, "eta_s": 3.0,
                "diversity": {"net1": {"branches": 0.1 * epoch}}, "test": {"net1": {"top1": 0.1 * epoch, "top5": 0.5}}}
               for epoch in (1, 2, 3)]
    lines = [*map(json.dumps, records), '{"epoch": 4, "lr']  # the last line is being written
    (run / "metrics.jsonl").write_text("\n".join(lines))
    rows, _, stdout = analyse("curves", run)
    assert {row["series"] for row in rows} == {"lr", "losses/ce", "diversity/net1/branches", "test/net1/top1",
                                               "test/net1/top5"}
    assert "diversity/net1/branches" in stdout and "test/net1/top5" not in stdout  # drawn; top-5 only in the CSV


def test_outputs_are_named_by_what_they_compare_and_never_silently_replaced(runs, tmp_path):
    run = runs("tna", *METHODS["tna"])
    _, first, _ = analyse("cka", run, "--networks", "base,twin")
    _, second, _ = analyse("cka", run, "--networks", "twin,base")
    assert first[".csv"] != second[".csv"] and first[".csv"].exists() and first[".csv"].parent == run
    _, again, stdout = analyse("cka", run, "--networks", "base,twin")
    assert again[".csv"] == first[".csv"] and "(replaced the earlier file of that name)" in stdout
    _, chosen, _ = analyse("diversity", run, "--out", tmp_path / "mine.csv")
    assert chosen[".csv"] == tmp_path / "mine.csv" and chosen[".png"] == tmp_path / "mine.png"
    _, dotted, _ = analyse("cka", run, "--networks", "base,twin", "--label", "alpha=0.005 vs 0.0")
    assert dotted[".csv"].name == "analysis_cka__block__alpha=0.005-vs-0.0.csv"  # a dot in a name is no extension


def test_embed_uses_tsne_when_installed_and_says_so_else_pca(runs, monkeypatch):
    run = runs("css", *METHODS["css"])
    rows, written, stdout = analyse("embed", run, "--images", "40", "--networks", "net1")
    assert {row["branch"] for row in rows} == {"1", "2", "3"} and len(rows) == 3 * 40  # each CSS branch marked
    projection = "tsne" if has_sklearn() else "pca"
    assert ("t-SNE" if has_sklearn() else "PCA") in stdout and f"__{projection}__" in written[".csv"].name
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    _, written, stdout = analyse("embed", run, "--images", "40", "--networks", "net1")
    assert "PCA instead of t-SNE" in stdout and "__pca__" in written[".csv"].name


def has_sklearn():
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        return False
    return True


def test_diversity_includes_the_cross_network_branch_pairs(runs):
    rows, _, _ = analyse("diversity", runs("css", *METHODS["css"]))
    means = {row["kind"]: float(row["distance"]) for row in rows if row["output_a"] == "mean"}
    assert set(means) == {"between networks", "within net1", "within net2", "corresponding branches",
                          "other branch pairs across networks", "all branch pairs across networks"}
    pairs = [row for row in rows if row["output_a"] != "mean" and row["kind"] in ("corresponding branches",
                                                                                 "other branch pairs across networks")]
    assert len(pairs) == 9  # 3 x 3 branch pairs between net1 and net2
    average = np.mean([float(row["distance"]) for row in pairs])
    assert means["all branch pairs across networks"] == pytest.approx(average)


def test_gradcam_maps(runs):
    rows, written, _ = analyse("gradcam", runs("tna", *METHODS["tna"]), "--images", "3")
    assert len(rows) == 2 * 3
    maps = np.load(written[".csv"].with_suffix(".npz"))
    assert maps["gradcam_base"].shape == (3, 32, 32)
    assert maps["gradcam_base"].min() >= 0 and maps["gradcam_base"].max() <= 1


def test_figure_is_optional(runs, monkeypatch, capsys):
    """Without matplotlib the table and CSV are written and a one-line note replaces the figure."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    main(["ensemble", str(runs("tna", *METHODS["tna"])), "--out", str(runs("tna", *METHODS["tna"]) / "no_figure")])
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert (runs("tna", *METHODS["tna"]) / "no_figure.csv").exists()


# ---- MSDNet: anytime and budgeted evaluation, thresholds on the hold-out ----
MSDNET = ["--model", "msdnet5", "--subset", "128"]


def test_msdnet_fits_thresholds_on_training_images_only_when_asked(runs, capsys):
    run = runs("sila_msdnet", "sila.py", *MSDNET)
    with pytest.raises(SystemExit) as exit_info:
        main(["msdnet", str(run)])
    error = str(exit_info.value.code)
    assert "has no hold-out (holdout.json)" in error and "--fit-on train" in error and "\n" not in error
    result = run_script("analysis.py", "msdnet", run, "--fit-on", "train", "--val-size", "32")
    assert result.returncode == 0 and "warning: thresholds fitted on 32 training images" in result.stderr
    rows = read_csv(next(run.glob("analysis_msdnet__train*.csv")))
    anytime = [float(row["mmacs_per_image"]) for row in rows if row["evaluation"] == "anytime"]
    budgeted = [float(row["mmacs_per_image"]) for row in rows if row["evaluation"] == "budgeted"]
    assert len(anytime) == 5 and anytime == sorted(anytime)  # cumulative MACs grow exit by exit
    assert len(budgeted) == 39 and all(anytime[0] <= macs <= anytime[-1] for macs in budgeted)


def test_msdnet_fits_thresholds_on_the_runs_holdout(runs):
    sila = pytest.importorskip("sila")
    try:
        sila.parse_args([*MSDNET, "--holdout", "32"])
    except SystemExit:
        pytest.skip("--holdout N (the scaffold's common flag) is not on this branch yet")
    run = runs("sila_msdnet_holdout", "sila.py", *MSDNET, "--holdout", "32")
    assert len(json.loads((run / "holdout.json").read_text())["indices"]) == 32
    rows, written, _ = analyse("msdnet", run)
    assert "__holdout__" in written[".csv"].name and len(rows) == 5 + 39


# ---- bad input: one line, no traceback ----
@pytest.mark.parametrize("argv,messages", [
    (["ensemble", "{tmp}"], ["no checkpoint.pt in", "nor in its sub-folders"]),
    (["noise", "{run}", "--networks", "student7"], ["no network 'student7' in", "available: base, twin"]),
    (["corruption", "{run}", "--corrupt-dir", "{tmp}"], ["no labels.npy in"]),
    (["corruption", "{run}", "--corrupt-dir", "{tmp}/labels"], ["labels.npy holds (3,) labels", "need 2"]),
    (["cka", "{run}", "--networks", "base"], ["--networks takes two names"]),
    (["cka", "--runs-a", "{fdl}", "{run}", "--runs-b", "{run}"], ["cannot pair the runs"]),
    (["cka", "{run}", "--runs-a", "{run}"], ["not both"]),
    (["probes", "{fdl}", "--networks", "head"], ["network head (LogitsHead) has no stages"]),
    (["curves", "{tmp}"], ["no metrics.jsonl in"]),
])
def test_bad_input_gives_one_line_error(argv, messages, runs, tmp_path):
    (tmp_path / "fog.npy").write_bytes(b"")  # a CIFAR-C folder that lacks labels.npy
    cifar_c(tmp_path / "labels", images=2, labels=np.zeros(3, np.int64))
    values = {"run": runs("tna", *METHODS["tna"]), "tmp": tmp_path, "fdl": runs("fdl", *METHODS["fdl"])}
    argv = [arg.format(**values) for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = str(exit_info.value.code)
    assert error.startswith("analysis.py: error: ") and "\n" not in error
    assert all(message in error for message in messages), error
