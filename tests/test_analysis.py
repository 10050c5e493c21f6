"""analysis.py: linear CKA as Kornblith et al. define it (and its minibatch estimator), MSDNet's
budgeted batch thresholds on a case worked by hand, and every subcommand end to end on a tiny run."""
import csv
import json
import math
import sys

import numpy as np
import pytest
import torch

from analysis import MinibatchCKA, branch_outputs, budgeted_batch_curve, exit_thresholds, linear_cka, main
from conftest import CIFAR10_SAMPLE, REPO, TINY_RUN, require_cifar10_sample, run_script


# ---- linear CKA ----
def cka_by_the_formula(x, y):
    """Kornblith et al. 2019, eq. 1-4: HSIC(K, L) = tr(KHLH) / (n-1)^2 with linear kernels and the
    centring matrix H = I - 11'/n; CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = x.shape[0]
    centring = torch.eye(n, dtype=torch.float64) - 1.0 / n
    gram_x, gram_y = x.double() @ x.double().T, y.double() @ y.double().T

    def hsic(k, l):
        return torch.trace(k @ centring @ l @ centring) / (n - 1) ** 2

    return (hsic(gram_x, gram_y) / torch.sqrt(hsic(gram_x, gram_x) * hsic(gram_y, gram_y))).item()


def random_features(n=200, dims=(20, 30), seed=0):
    generator = torch.Generator().manual_seed(seed)
    normal = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731 (float64: exact invariances)
    shared = normal(n, 5)  # both representations see the same 5 factors, plus noise
    return [shared @ normal(5, d) + normal(n, d) for d in dims]


def random_rotation(d, seed=1):
    return torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


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
    stretch = torch.diag(torch.logspace(-2, 2, 20, dtype=torch.float64)) @ random_rotation(20)  # invertible, condition number 1e4
    assert abs(linear_cka(x @ stretch, y) - linear_cka(x, y)) > 0.05


@pytest.mark.parametrize("batch_size", [100, 500])
def test_minibatch_cka_agrees_with_the_full_computation(batch_size):
    """Both estimate the same population CKA from 4,000 samples of 20- and 30-dim features. The full
    (plain, biased) estimator is biased upward by about d/n (here < 0.01: it gives ~0.005 for independent
    features), the minibatch average of unbiased HSICs is not; their difference measured over 5 seeds
    and batch sizes 100-500 stays below 0.003, so 0.01 leaves room without hiding a real error (a wrong
    centring or normalisation moves the value by 0.1 or more)."""
    x, y = random_features(n=4000)
    estimator = MinibatchCKA()
    for x_batch, y_batch in zip(x.split(batch_size), y.split(batch_size)):
        estimator.update(x_batch, y_batch)
    assert estimator.value() == pytest.approx(linear_cka(x, y), abs=0.01)
    identical = MinibatchCKA()
    for x_batch in x.split(batch_size):
        identical.update(x_batch, x_batch)
    assert identical.value() == pytest.approx(1.0, abs=1e-12)


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
    assert exit_thresholds(VAL_PROBS, (shares / shares.sum()).tolist()).tolist() == pytest.approx([threshold, -math.inf])
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


# ---- every subcommand end to end, on a tiny TNA run ----
@pytest.fixture(scope="module")
def tna_run(tmp_path_factory):
    require_cifar10_sample()
    out = tmp_path_factory.mktemp("analysis") / "tna_run"
    result = run_script("tna.py", *TINY_RUN, "--dataset", CIFAR10_SAMPLE, "--out-dir", out)
    assert result.returncode == 0, result.stderr
    return out


def read_csv(path):
    with open(path) as file:
        return list(csv.DictReader(file))


def run_analysis(run_dir, name, *args, env=None):
    """Run a subcommand as a user would; check the table, the CSV and the figure (or the note that
    matplotlib is missing); return the CSV rows."""
    result = run_script("analysis.py", name, *args, env=env)
    assert result.returncode == 0, result.stderr
    assert f"analysis_{name}.csv" in result.stdout
    figure = run_dir / f"analysis_{name}.png"
    assert figure.exists() or "matplotlib is not installed" in result.stdout
    return read_csv(run_dir / f"analysis_{name}.csv")


def test_cka_subcommand(tna_run):
    rows = run_analysis(tna_run, "cka", tna_run, tna_run)
    assert [row["layer"] for row in rows] == ["stage 1", "stage 2", "logits"]  # the ConvNet has 2 stages
    assert rows[0]["network_a"].endswith(":base") and rows[0]["network_b"].endswith(":twin")
    assert all(0 <= float(row["cka"]) <= 1 for row in rows)


def test_probes_subcommand(tna_run):
    rows = run_analysis(tna_run, "probes", tna_run, "--epochs", "2")
    assert [row["probe_at"] for row in rows] == ["stage 1", "stage 2", "own head"]
    assert [row["features"] for row in rows[:2]] == ["32", "64"]  # pooled channels of the two stages
    assert all(0 <= float(row["test_top1"]) <= 1 for row in rows)


def test_corruption_subcommand_on_a_cifar_c_folder(tna_run, tmp_path):
    """An 'identity' corruption (the clean test images at every severity) must score exactly the clean
    accuracy on the same images: the corrupted images are normalised as the run's own data."""
    with np.load(CIFAR10_SAMPLE) as data:
        images, labels = data["x_test"][:40], data["y_test"][:40]
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 40, images.shape), 0, 255).astype(np.uint8)
    np.save(tmp_path / "identity.npy", np.concatenate([images] * 5))
    np.save(tmp_path / "gaussian_noise.npy", np.concatenate([noisy] * 5))
    np.save(tmp_path / "labels.npy", np.concatenate([labels] * 5))
    rows = run_analysis(tna_run, "corruption", tna_run, "--corrupt-dir", tmp_path, "--subset", "40")
    by_key = {(row["corruption"], row["severity"]): float(row["top1_base"]) for row in rows}
    assert len(rows) == 1 + 2 * 5 + 2 + 1  # clean, 2 corruptions x 5 severities, their means, the average
    assert all(by_key[("identity", str(severity))] == by_key[("none", "-")] for severity in range(1, 6))
    assert by_key[("average", "mean")] == pytest.approx((by_key[("identity", "mean")] + by_key[("gaussian_noise", "mean")]) / 2)


def test_ensemble_subcommand(tna_run):
    rows = run_analysis(tna_run, "ensemble", tna_run)
    assert [row["network"] for row in rows] == ["base", "twin", "ensemble"]
    trained = json.loads((tna_run / "summary.json").read_text())  # evaluated in fp32 too (--amp off)
    assert float(rows[0]["test_top1"]) == pytest.approx(trained["networks"]["base"]["top1"], abs=1e-9)
    assert float(rows[2]["test_top1"]) == pytest.approx(trained["ensemble"]["top1"], abs=1e-9)


def test_noise_subcommand(tna_run):
    rows = run_analysis(tna_run, "noise", tna_run, "--sigmas", "0", "0.05", "--repeats", "2")
    assert [float(row["sigma"]) for row in rows] == [0.0, 0.05]
    assert float(rows[0]["nll_change_mean"]) == 0.0  # no noise, no change
    assert float(rows[1]["nll_change_mean"]) != 0.0


def test_diversity_subcommand(tna_run):
    rows = run_analysis(tna_run, "diversity", tna_run)
    assert rows[0]["output_a"] == "base" and rows[0]["output_b"] == "twin" and rows[0]["kind"] == "between networks"
    assert 0 < float(rows[0]["distance"]) <= math.sqrt(2)  # two probability vectors are at most sqrt(2) apart


def test_embed_subcommand(tna_run):
    rows = run_analysis(tna_run, "embed", tna_run)
    assert len(rows) == 2 * 256  # both networks, every test image of the tiny run
    assert all(math.isfinite(float(row["pc1"])) and math.isfinite(float(row["pc2"])) for row in rows)


def test_gradcam_subcommand(tna_run):
    rows = run_analysis(tna_run, "gradcam", tna_run, "--images", "3")
    assert len(rows) == 2 * 3
    maps = np.load(tna_run / "analysis_gradcam.npz")
    assert maps["gradcam_base"].shape == (3, 32, 32)
    assert maps["gradcam_base"].min() >= 0 and maps["gradcam_base"].max() <= 1


def test_figure_is_optional(tna_run, monkeypatch, capsys):
    """Without matplotlib the table and CSV are written and a one-line note replaces the figure."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    (tna_run / "analysis_ensemble.csv").unlink(missing_ok=True)
    main(["ensemble", str(tna_run)])
    assert "matplotlib is not installed" in capsys.readouterr().out and (tna_run / "analysis_ensemble.csv").exists()


def test_msdnet_subcommand(tmp_path):
    """Anytime and budgeted evaluation of a Dynamic SiLa run on MSDNet (SiLa Fig. 4-5)."""
    if not (REPO / "sila.py").exists():
        pytest.skip("sila.py not written yet: the msdnet analysis is tested on a Dynamic SiLa / msdnet5 run")
    from models import MODEL_NAMES
    if "msdnet5" not in MODEL_NAMES:
        pytest.skip("models.py does not build msdnet5 yet")
    require_cifar10_sample()
    out = tmp_path / "sila_msdnet"
    trained = run_script("sila.py", *TINY_RUN, "--model", "msdnet5", "--subset", "128", "--dataset", CIFAR10_SAMPLE, "--out-dir", out)
    assert trained.returncode == 0, trained.stderr
    rows = run_analysis(out, "msdnet", out, "--val-size", "32")
    anytime = [float(row["mmacs_per_image"]) for row in rows if row["evaluation"] == "anytime"]
    budgeted = [float(row["mmacs_per_image"]) for row in rows if row["evaluation"] == "budgeted"]
    assert len(anytime) == 5 and anytime == sorted(anytime)  # cumulative MACs grow exit by exit
    assert len(budgeted) == 39 and all(anytime[0] <= macs <= anytime[-1] for macs in budgeted)


# ---- bad input: one line, no traceback ----
@pytest.mark.parametrize("argv,messages", [
    (["ensemble", "{tmp}"], ["no checkpoint.pt in"]),
    (["noise", "{run}", "--networks", "student7"], ["no network 'student7' in", "available: base, twin"]),
    (["corruption", "{run}", "--corrupt-dir", "{tmp}"], ["no labels.npy in"]),
])
def test_bad_input_gives_one_line_error(argv, messages, tna_run, tmp_path):
    (tmp_path / "fog.npy").write_bytes(b"")  # a CIFAR-C folder that lacks labels.npy
    argv = [arg.format(run=tna_run, tmp=tmp_path) for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = str(exit_info.value.code)
    assert error.startswith("analysis.py: error: ") and "\n" not in error
    assert all(message in error for message in messages), error
