"""Throughput benchmark: every method's training step against its floor, the data path, memory,
and the effect of --channels-last / --compile. A benchmark, not a test: it prints ratios measured
in one run on the machine it runs on.

The floor of a method is the cost of training its networks alone: the same number of bare
single-network steps (forward, cross-entropy, backward, SGD step) of the same backbone, batch,
precision and data loader. TNA, DML (K=2) and SiLa should stay within 1.10x of two networks'
floor; FDL, AMLN and CSS do inherent extra work, so their ratio comes with torch.profiler's top
operators (from a separate profiled run) to show where the time goes.

What each column means:
- ratio: a method's step time over n floor steps (n = its networks), both the median step time
  over the epochs after a warm-up epoch. Steps are timed where the loader hands out each batch
  (CUDA events on a GPU: device time, no host sync). The floor is measured before and after a
  backbone's methods; their mean is used, and their drift is printed as the noise of the run.
- ops ratio: tensor operations per step (views excluded) over n floor steps, counted by a torch
  dispatch mode: free of timing noise, and the step time's lower bound where a small network
  leaves a GPU waiting on the host (each operation is a kernel launch).
- memory: CUDA max allocated, or the process's peak RSS on a CPU (each measurement runs in a
  fresh process).
- host syncs (CUDA only): operations that make the host wait for the device, counted per epoch
  by the script line that calls them (torch.cuda.set_sync_debug_mode). Expected: the divergence
  check's read every 50 steps (and at an epoch's last step), the epoch's one read of the summed
  losses, and the checkpoint's copy to the host at the epoch's end; none per step.
- data: the device-resident loader alone against torchvision's DataLoader (RandomCrop(32, 4) +
  flip + ToTensor + Normalize, 0 and min(8, CPUs) persistent workers, delivered to the device),
  and the loader's share of a bare step of the first backbone.

Usage:

    python benchmarks/throughput.py                                   # CPU defaults, < 5 minutes on 2 cores
    python benchmarks/throughput.py --models convnet,resnet20,resnet18 --steps 50 --repeats 5 --compile   # a GPU
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10_small.npz"
METHODS = ("tna", "dml", "sila", "fdl", "amln", "css")
NETWORKS_PER_METHOD = {"tna": 2, "dml": 2, "sila": 2, "fdl": 2, "amln": 2, "css": 2}
TARGET_RATIO = {"tna": 1.10, "dml": 1.10, "sila": 1.10}  # the others do inherent extra work
METHOD_FLAGS = {"fdl": ["--pretrain-epochs", "0"]}  # measure FDL's full four sub-steps


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated method scripts to measure")
    parser.add_argument("--models", default="convnet,resnet20", help="comma-separated backbones")
    parser.add_argument("--dataset", default=str(DEFAULT_DATA),
                        help="any dataset data.py accepts (in-memory ones measure the device loader)")
    parser.add_argument("--data-dir", default="./data", help="for named datasets")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch")
    parser.add_argument("--steps", type=int, default=6,
                        help="training steps per epoch (each epoch times steps - 1 of them)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measured epochs after one warm-up epoch (the median step is reported)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"], help="precision of every measurement")
    parser.add_argument("--compile", action="store_true", help="also measure --compile (slow to compile on CPU)")
    parser.add_argument("--profile", default="fdl,amln,css", help="methods whose top operators are printed")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "throughput.json"), help="JSON results")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement as JSON
    return parser.parse_args()


# ---- workers: one measurement each, in their own process ----
def match_backend_flags(device):
    """The CUDA backend settings every method script makes, so the floor runs under the same ones."""
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


class SyncCounter:
    """On CUDA, counts the operations that make the host wait for the device (torch's sync debug
    mode warns at each), by the line of the method script that called them. Elsewhere a no-op:
    a CPU has nothing to wait for."""

    def __init__(self, device):
        import torch

        self.enabled = device in ("auto", "cuda") and torch.cuda.is_available()
        self.lines = {}

    def __enter__(self):
        import warnings

        import torch

        if self.enabled:
            self._catcher = warnings.catch_warnings(record=True)
            self._records = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        import torch

        if self.enabled:
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(*exc)
            for record in self._records:
                if "synchroniz" in str(record.message):
                    where = f"{Path(record.filename).name}:{record.lineno}"
                    self.lines[where] = self.lines.get(where, 0) + 1

    def per_epoch(self, epochs):
        """{script:line: syncs per epoch}, most frequent first; None where nothing was counted."""
        if not self.enabled:
            return None
        return {where: count / epochs for where, count in sorted(self.lines.items(), key=lambda item: -item[1])}


def peak_memory_mb(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def median_after_warmup(values):
    return statistics.median(values[1:] if len(values) > 1 else values)


class TimedLoader:
    """A train loader that stamps the moment it hands out each batch, so the gap between two stamps
    of one epoch is one whole training step (the step, its bookkeeping, the next batch). On CUDA the
    stamps are CUDA events: device time, read after the run, with no host sync in between."""

    def __init__(self, loader, device):
        import torch

        self.loader, self.epochs = loader, []  # one list of stamps per epoch
        self.stamp = (lambda: torch.cuda.Event(enable_timing=True)) if device.type == "cuda" else None

    def __getattr__(self, name):  # set_epoch, num_samples, ...
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        stamps = []
        self.epochs.append(stamps)
        for batch in self.loader:
            if self.stamp:
                stamps.append(self.stamp())
                stamps[-1].record()
            else:
                stamps.append(time.perf_counter())
            yield batch

    def step_seconds(self, warmup_epochs=1):
        """The step times of every epoch after the warm-up ones (an epoch's last step has no end stamp)."""
        import torch

        if self.stamp:
            torch.cuda.synchronize()
        gap = (lambda a, b: a.elapsed_time(b) / 1000) if self.stamp else (lambda a, b: b - a)
        return [gap(a, b) for stamps in self.epochs[warmup_epochs:] for a, b in zip(stamps, stamps[1:])]


class OpCounter:
    """Counts the tensor operations that compute (each one kernel launch or more on a GPU; views
    and profiler marks are free and not counted): a noise-free measure of the per-step work a
    method adds, which decides its speed where small networks leave a GPU waiting on the host."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.count += func.namespace == "aten" and not func.is_view
                return func(*args, **(kwargs or {}))

        self.count, self.mode = 0, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def ops_per_step(train_one_epoch):
    """Operations per training step: an epoch of 4 steps minus one of 2 (setup cancels), halved."""
    counts = []
    for steps in (2, 4):
        with OpCounter() as counter:
            train_one_epoch(steps)
        counts.append(counter.count)
    return (counts[1] - counts[0]) / 2


def run_method(job):
    """Train `job["method"]` through its own main() for warm-up + repeats epochs, no evaluation;
    its loader is wrapped in a TimedLoader, so every step is timed."""
    import importlib

    import torch

    module = importlib.import_module(job["method"])
    device = torch.device("cuda" if job["device"] in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    timed = []

    def build_timed_data(*args, **kwargs):
        data = build_data(*args, **kwargs)
        data.train = TimedLoader(data.train, device)
        timed.append(data.train)
        return data

    build_data, module.build_data = module.build_data, build_timed_data

    def train(epochs, steps, out_dir):
        # --stop-after epochs with --epochs epochs+1: the evaluation after the last epoch never runs
        argv = ["--model", job["model"], "--dataset", job["dataset"], "--data-dir", job["data_dir"],
                "--subset", str(steps * job["batch_size"]), "--batch-size", str(job["batch_size"]),
                "--epochs", str(epochs + 1), "--stop-after", str(epochs), "--eval-every", str(10**6),
                "--amp", job["amp"], "--device", job["device"], "--out-dir", str(out_dir), *job["flags"],
                *METHOD_FLAGS.get(job["method"], [])]
        module.main(module.parse_args(argv))

    epochs = job["repeats"] + 1
    with tempfile.TemporaryDirectory() as out_dir:
        profiler, sync_counter = None, SyncCounter(job["device"])
        if job.get("profile"):
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities)
            profiler.__enter__()
        with sync_counter:
            train(epochs, job["steps"], out_dir)
        if profiler:
            profiler.__exit__(None, None, None)
            sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            return {"top_ops": profiler.key_averages().table(sort_by=sort_key, row_limit=12)}
        step_seconds = statistics.median(timed[0].step_seconds())
        # (compiled graphs are not dispatched op by op, so they are not counted)
        one_epoch = lambda steps: train(1, steps, Path(out_dir) / f"ops{steps}")
        operations = None if "--compile" in job["flags"] else ops_per_step(one_epoch)
    return {"images_per_s": job["batch_size"] / step_seconds, "peak_memory_mb": peak_memory_mb(device),
            "ops_per_step": operations, "syncs_per_epoch": sync_counter.per_epoch(epochs)}


def run_floor(job):
    """Bare single-network training on the same loader, batch and precision: the floor."""
    import torch
    import torch.nn.functional as F

    from data import build_data
    from models import build_model

    device = torch.device("cuda" if job["device"] in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    match_backend_flags(device)
    torch.manual_seed(0)
    loader = lambda steps: build_data(job["dataset"], job["data_dir"], job["batch_size"], device,  # noqa: E731
                                      subset=steps * job["batch_size"])
    data = loader(job["steps"])
    train_loader = TimedLoader(data.train, device)
    model = build_model(job["model"], data.num_classes, data.image_size).to(device)
    memory_format = torch.channels_last if "--channels-last" in job["flags"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    trained = torch.compile(model) if "--compile" in job["flags"] else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": torch.float32}[job["amp"]]
    scaler = torch.amp.GradScaler(device.type, enabled=job["amp"] == "fp16")

    def train_epoch(batches):
        for images, labels in batches:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=job["amp"] != "off"):
                loss = F.cross_entropy(trained(images.contiguous(memory_format=memory_format)), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    loader_rates = []
    for epoch in range(job["repeats"] + 1):
        train_loader.set_epoch(epoch)
        train_epoch(train_loader)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()  # the loader alone, same epoch: its share of a training step
        for images, labels in train_loader.loader:
            pass
        if device.type == "cuda":
            torch.cuda.synchronize()
        loader_rates.append(train_loader.num_samples / (time.perf_counter() - start))
    one_epoch = lambda steps: train_epoch(loader(steps).train)
    return {"images_per_s": job["batch_size"] / statistics.median(train_loader.step_seconds()),
            "loader_images_per_s": median_after_warmup(loader_rates), "peak_memory_mb": peak_memory_mb(device),
            "ops_per_step": None if "--compile" in job["flags"] else ops_per_step(one_epoch)}


def run_dataloader_baseline(job):
    """torchvision's DataLoader with RandomCrop(32, padding=4) + flip + Normalize on the same images."""
    import numpy as np
    import torch
    import torchvision.transforms as T

    arrays = np.load(job["dataset"])
    images, labels = arrays["x_train"][: job["steps"] * job["batch_size"] * 4], arrays["y_train"]
    transform = T.Compose([T.ToPILImage(), T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    dataset = [(image, int(label)) for image, label in zip(images, labels)]

    class Transformed(torch.utils.data.Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, index):
            return transform(dataset[index][0]), dataset[index][1]

    device = torch.device(job["device"])
    loader = torch.utils.data.DataLoader(Transformed(), batch_size=job["batch_size"], shuffle=True, drop_last=True,
                                         num_workers=job["workers"], persistent_workers=job["workers"] > 0,
                                         pin_memory=device.type == "cuda")
    rates = []
    for _ in range(job["repeats"] + 1):
        start = time.perf_counter()
        for batch_images, batch_labels in loader:  # delivered to the training device, as the device loader's are
            batch_images = batch_images.to(device, non_blocking=True)
            batch_labels = batch_labels.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(loader) * job["batch_size"] / (time.perf_counter() - start))
    return {"images_per_s": median_after_warmup(rates)}


WORKERS = {"method": run_method, "floor": run_floor, "dataloader": run_dataloader_baseline}


def measure(job):
    """Run one job in a fresh process (clean peak memory, no state shared between measurements)."""
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    args = parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(WORKERS[job["kind"]](job)))
        return
    import torch

    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    machine = f"{device_name}, {os.cpu_count()} cores, torch {torch.__version__}"
    base = {"dataset": args.dataset, "data_dir": args.data_dir, "batch_size": args.batch_size, "steps": args.steps,
            "repeats": args.repeats, "device": device, "amp": args.amp, "flags": []}
    results = {"machine": machine, "settings": vars(args), "methods": [], "data": {}, "formats": []}
    started = time.perf_counter()
    print(f"# {machine}; batch {args.batch_size}, {args.amp}, {args.steps} steps x {args.repeats} epochs after warm-up")

    # ---- methods against their floor ----
    print(f"{'method':6} {'model':10} {'img/s':>9} {'floor img/s':>11} {'ratio':>6} {'target':>6} {'ops/step':>9} "
          f"{'ops ratio':>9} {'mem MB':>8} {'floor MB':>8}")
    floors = {}
    for model in args.models.split(","):
        # the floor before and after the model's methods: their mean is the reference, their spread the noise
        before = measure({**base, "kind": "floor", "model": model})
        runs = {}
        for method in args.methods.split(","):
            runs[method] = measure({**base, "kind": "method", "method": method, "model": model})
            if method in args.profile.split(","):  # a run of its own: the profiler's overhead stays out of the timing
                profiled = measure({**base, "kind": "method", "method": method, "model": model,
                                    "repeats": 1, "profile": True})
                runs[method]["top_ops"] = profiled.get("top_ops") or profiled.get("error")
        after = measure({**base, "kind": "floor", "model": model})
        floor = floors[model] = before if "error" in before or "error" in after else {
            **before, "images_per_s": (before["images_per_s"] + after["images_per_s"]) / 2,
            "drift": after["images_per_s"] / before["images_per_s"] - 1}
        for method, run in runs.items():
            row = {"method": method, "model": model, **run, "floor": floor}
            if "error" in run or "error" in floor:
                print(f"{method:6} {model:10} error: {run.get('error') or floor.get('error')}")
            else:
                networks = NETWORKS_PER_METHOD[method]
                # step time over the floor of all the method's networks: (1 / ips) / (n / floor_ips)
                row["ratio"] = floor["images_per_s"] / (networks * run["images_per_s"])
                row["ops_ratio"] = run["ops_per_step"] / (networks * floor["ops_per_step"])
                target = TARGET_RATIO.get(method)
                print(f"{method:6} {model:10} {run['images_per_s']:9.0f} {floor['images_per_s']:11.0f} "
                      f"{row['ratio']:6.2f} {target or '-':>6} {run['ops_per_step']:9.0f} {row['ops_ratio']:9.2f} "
                      f"{run['peak_memory_mb']:8.0f} {floor['peak_memory_mb']:8.0f}")
            results["methods"].append(row)
        if "drift" in floor:
            print(f"#  {model} floor drift over its methods' runs {100 * floor['drift']:+.1f}% "
                  "(the noise of these ratios)")
    if any(row.get("syncs_per_epoch") is not None for row in results["methods"]):
        print(f"\n# host-device synchronisations per epoch of {args.steps} steps (CUDA sync debug mode), "
              "by calling line")
        for row in results["methods"]:
            syncs = row.get("syncs_per_epoch") or {}
            lines = ", ".join(f"{where} x{count:g}" for where, count in syncs.items()) or "none"
            print(f"{row['method']:6} {row['model']:10} {lines}")
    for row in results["methods"]:
        if row.get("top_ops"):
            print(f"\n# where the time goes: {row['method']} / {row['model']} (torch.profiler, self time)\n"
                  f"{row['top_ops']}")

    # ---- the data path ----
    if args.dataset.endswith(".npz"):
        loader = floors[args.models.split(",")[0]]
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        worker_counts = sorted({0, min(8, cpus)})
        baselines = {workers: measure({**base, "kind": "dataloader", "workers": workers}) for workers in worker_counts}
        measured = {workers: run["images_per_s"] for workers, run in baselines.items() if "error" not in run}
        if measured and "error" not in loader:
            fastest = max(measured, key=measured.get)  # the target holds against the DataLoader's best
            results["data"] = {"device_loader_images_per_s": loader["loader_images_per_s"],
                               "dataloader_images_per_s_by_workers": measured, "dataloader_workers": fastest,
                               "speedup": loader["loader_images_per_s"] / measured[fastest],
                               "loader_share_of_step": loader["images_per_s"] / loader["loader_images_per_s"]}
            d = results["data"]
            dataloader = ", ".join(f"{rate:.0f} img/s with {workers} workers" for workers, rate in measured.items())
            print(f"\n# data: device loader {d['device_loader_images_per_s']:.0f} img/s; "
                  f"torchvision DataLoader {dataloader}: {d['speedup']:.1f}x its best (target >= 10x on CPU); "
                  f"loader share of a {args.models.split(',')[0]} step "
                  f"{100 * d['loader_share_of_step']:.1f}% (target < 5%)")
        else:
            error = next((run["error"] for run in baselines.values() if "error" in run), loader.get("error"))
            print(f"\n# data: {error}")

    # ---- memory format and compilation (TNA, first backbone) ----
    variants = [["--channels-last"]] + ([["--compile"]] if args.compile else [])
    model = args.models.split(",")[0]
    reference = next((r for r in results["methods"]
                      if r["method"] == "tna" and r["model"] == model and "ratio" in r), None)
    for flags in variants:
        run = measure({**base, "flags": flags, "kind": "method", "method": "tna", "model": model})
        if "error" in run or reference is None:
            print(f"# tna {model} {' '.join(flags)}: {run.get('error', 'no reference run')}")
            continue
        speedup = run["images_per_s"] / reference["images_per_s"]
        results["formats"].append({"flags": flags, "images_per_s": run["images_per_s"], "speedup": speedup})
        print(f"# tna {model} {' '.join(flags)}: {run['images_per_s']:.0f} img/s, {speedup:.2f}x the default")

    # ---- the targets, met or not, in one place ----
    checks = {f"{row['method']} {row['model']} step <= {TARGET_RATIO[row['method']]:.2f}x floor":
              row["ratio"] <= TARGET_RATIO[row["method"]]
              for row in results["methods"] if row["method"] in TARGET_RATIO and "ratio" in row}
    if results["data"]:
        speedup_check = "device loader >= 10x the DataLoader" + (" (CPU target)" if device == "cuda" else "")
        checks[speedup_check] = results["data"]["speedup"] >= 10
        checks["device loader < 5% of a step"] = results["data"]["loader_share_of_step"] < 0.05
    results["targets"] = checks
    print("\n# targets: " + "; ".join(f"{name}: {'met' if met else 'MISSED'}" for name, met in checks.items()))
    results["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n# {results['seconds']:.0f} s; written to {args.out}")


if __name__ == "__main__":
    main()
