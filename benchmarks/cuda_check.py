"""CUDA check: one prepared command that runs every script on a GPU and says, check by check, what works there.

    python benchmarks/cuda_check.py --out OUT                        # a GPU: the full sequence, under 8 minutes
    python benchmarks/cuda_check.py --device cpu --quick --out OUT   # the same sequence, tiny, on a CPU (the test)

It prints the machine (GPU name and memory, driver, torch, CUDA, cuDNN), then one line per check, `PASS name: detail`,
`FAIL name: reason` or `SKIP name: why`, and a closing `N passed, M failed` (`, K skipped`); the whole output, each
run's own output included, is kept in OUT/cuda_check.log, the runs in OUT/runs/. Exit status 0 when nothing failed.
Every run uses the script's own defaults except: 2 epochs, batch 128 (--quick: 32, on the first 512 training and 512
test images), no lr warm-up (CSS's 5 warm-up epochs would leave 2 epochs at a fraction of the lr), one evaluation at
the end, `--model` (default resnet20; --quick: convnet, and wrn_16_1 for CSS, see QUICK_MODELS).

The checks, in order of importance (what does not fit `--budget-s` is skipped):
- env: the device and the versions; CUDA must be available when --device asks for it.
- tna, dml, sila, fdl, amln, css: each script 2 short epochs in bf16 (fdl with --pretrain-epochs 0, so its four
  sub-steps run from the first step); sila-msdnet: sila.py once more on msdnet5 (Dynamic SiLa over its 5 exits).
  Each must exit 0, log finite losses every epoch and reach a deployed top-1 above 1.5 x chance (0.15 on CIFAR-10),
  which the line states. On the 2-core CPU, full-size resnet20 runs of amln, css and fdl reached 0.26, 0.33 and
  0.34. --quick's 32 steps reach 0.10 to 0.23 on the shipped sample, within the noise of its 200 test images, so
  --quick reports top-1 without a threshold (the suite's learning tests check that training learns).
- fp16: tna.py in --amp fp16 with the GradScaler, whose third update gets an infinite gradient on purpose: the check
  asserts that the scaler skipped that step (the parameters are unchanged by it) and halved its scale, then that the
  run went on as above. Until the scripts allow fp16 on a CPU (GradScaler("cpu")), `--device cpu` FAILs here with the
  script's own reason. A CPU without fp16 kernels runs fp16 about 14x slower than bf16 (1 s a convnet step of 32
  images here), so --quick on a CPU gives fp16 only 8 steps of 8 images and does not check its accuracy.
- channels-last: dml.py --channels-last; compile: tna.py --compile (--quick compiles with the aot_eager backend:
  Dynamo and AOTAutograd trace the same graphs, but inductor's C++ code generation would take minutes on 2 cores).
- resume: dml.py run again, SIGKILLed as soon as its first checkpoint is written, then `--resume`d; its final metrics
  are compared with the dml check's uninterrupted run. On a CPU they must be equal. On CUDA they differ by the
  non-deterministic kernels (cuDNN's benchmark-chosen algorithms, atomics in some backward kernels): the difference is
  reported and must stay within 0.05 top-1. resume-deterministic makes it exact: the same, straight and killed,
  under torch.use_deterministic_algorithms(True) (warn_only: an op without a deterministic kernel is named in the
  line), CUBLAS_WORKSPACE_CONFIG=:4096:8 and cudnn.benchmark held off; its metrics must be equal, and its line
  gives the cost: the speed of the deterministic uninterrupted run against the default one.
- torchrun: `python -m torch.distributed.run --standalone --nproc_per_node=N tna.py ...` with N = the number of GPUs
  (2 processes on gloo with --device cpu). A script started by torchrun runs distributed even as one process, so
  one GPU exercises the process group, NCCL and DDP too.
- throughput: benchmarks/throughput.py on the device with as many of convnet, resnet20 and resnet18 as fit the time
  left, its table printed as the benchmark prints it; --quick: one of its measurements (tests/test_benchmark.py runs
  the whole benchmark; here its floors and variants would add four processes).

How long it takes, and `--budget-s` (default 450 s: under 8 minutes with the margin of one check). Every check has an
estimate, printed in its line beside the measured time, and a check is skipped when the time used plus its estimate
would pass the budget. An estimate is a fixed cost plus training steps times a step time:
- fixed costs: a fresh Python process with torch (3 s on a CPU; 10 s on a GPU machine, CUDA context and cuDNN
  autotuning included); --compile: 90 s on a GPU (inductor, two networks forward and backward), 15 s for aot_eager
  on a CPU.
- step time on a CPU: the batch over the images/s that benchmarks/throughput.py measured for that method and backbone
  on the 2-core development CPU in bf16 (README, "Speed"; other backbones use resnet20's figures).
- step time on a GPU: these small networks leave a data-centre GPU waiting on the host, so a step costs its tensor
  operations, each one kernel launch of about 8 us of host time (eager PyTorch): the operations of one bare network
  step, counted with the benchmark's OpCounter (convnet 107, resnet20 517, msdnet5 1911), times the method's
  networks and its ops ratio from the same benchmark (e.g. fdl 3.6). resnet20's device work, 16 GMAC per step of 128
  images forward and backward, takes about 2 ms at 10 TMAC/s, less than its 8 ms of launches.
The estimates are then corrected by what the run measures: each is scaled by the median ratio of measured to
estimated time of the checks done so far (kept within 0.5-4x), so a slower or faster machine skips the right checks.
By these estimates the full sequence spends about 4 minutes before the throughput benchmark (compile's 90 s the
largest), which then gets one model (about 150 s) or two.

Script checks run one after another in a worker process (one torch import for all), which is replaced by a fresh one
after a crash or a CUDA error, so one failure does not spoil the next check; the killed run, torchrun and the
throughput benchmark start their own processes, as a user would.
"""
import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import queue
import re
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10_small.npz"
SCRIPTS = ("tna", "dml", "sila", "fdl", "amln", "css")
RESULT_MARK = "@@cuda_check_result "  # the worker's result lines on its stdout; anything else is logged
# cuBLAS reads it once, before its first use, so the worker (which also runs deterministic jobs) always has it
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")}
CUDA_ERROR = re.compile(r"CUDA error|device-side assert|CUBLAS_STATUS|CUDNN_STATUS|cudaError|illegal memory access")

# ---- what the estimates are made of (see the docstring) ----
CPU_IMAGES_PER_S = {  # benchmarks/throughput.py on the 2-core development CPU, bf16, batch 128 (README, "Speed")
    "convnet": {"floor": 4534, "tna": 2375, "dml": 2330, "sila": 2393, "fdl": 623, "amln": 1156, "css": 1280},
    "resnet20": {"floor": 1357, "tna": 660, "dml": 667, "sila": 653, "fdl": 197, "amln": 284, "css": 463},
}
FLOOR_OPS = {"convnet": 107, "resnet20": 517, "msdnet5": 1911}  # one bare training step, the benchmark's OpCounter
OPS_RATIO = {"tna": 1.0, "dml": 1.05, "sila": 1.02, "fdl": 3.6, "amln": 2.8, "css": 2.3}  # of 2 networks (README)
SECONDS_PER_OP_GPU = 8e-6
QUICK_SUBSET, QUICK_BATCH = 512, 32  # --quick: the first 512 training and 512 test images, 32 steps in 2 epochs
THRESHOLD = 1.5  # a run must reach a deployed top-1 above THRESHOLD x chance
QUICK_FP16_STEPS = 8  # --quick on a CPU: fp16 runs 2 epochs of 4 steps of 8 images, accuracy not checked
# --quick: CSS's joint labels first learn which branch (mask) an image went through, then its class; a convnet without
# BN does not get to the class within 32 steps (top-1 at chance), a WRN-16-1 does (about 0.2)
QUICK_MODELS = {"css": "wrn_16_1"}
PROCESS_S = {"cpu": 3.0, "cuda": 10.0}
COMPILE_S = {"cpu": 15.0, "cuda": 90.0, "cpu-inductor": 120.0}  # --quick compiles with aot_eager on a CPU


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="where the scripts run")
    parser.add_argument("--quick", action="store_true", help="the same sequence, tiny (512 images, convnet)")
    parser.add_argument("--out", default="cuda_check_out", help="folder for cuda_check.log and the runs")
    parser.add_argument("--dataset", default=None,
                        help=f"any dataset the scripts accept; default {SMALL_CIFAR10} if present, else 'sample' "
                             "(the repository's shipped sample)")
    parser.add_argument("--data-dir", default="./data", help="for named datasets")
    parser.add_argument("--model", default=None,
                        help="backbone of the script checks (default resnet20; --quick: convnet)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip the checks that would not fit this time")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: script jobs from stdin
    args = parser.parse_args(argv)
    if args.dataset is None:
        args.dataset = str(SMALL_CIFAR10) if SMALL_CIFAR10.exists() else "sample"
    args.model = args.model or ("convnet" if args.quick else "resnet20")
    return args


# ================================================================ the worker: script jobs in one process
class OverflowingScaler:
    """Makes torch.amp.GradScaler, for one run, a scaler that gives the optimizer step of its `inject_at`-th update an
    infinite gradient and records what it did with it: whether that step left the parameters unchanged (skipped), the
    scale before and after, and how many other steps it skipped on its own (a scale that went down)."""

    def __init__(self, inject_at):
        import torch

        self.original, self.report = torch.amp.GradScaler, {"skips": 0}
        record, target = self.report, inject_at - 1  # updates are counted from 0

        class Scaler(self.original):
            updates = 0

            def step(self, optimizer, *args, **kwargs):
                if not self.is_enabled() or self.updates != target or "injected" in record:
                    return super().step(optimizer, *args, **kwargs)
                params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                before = [p.detach().clone() for p in params]
                params[0].grad.view(-1)[0] = float("inf")
                result = super().step(optimizer, *args, **kwargs)
                record["injected"] = {"update": inject_at,
                                      "params_unchanged": all(torch.equal(a, p) for a, p in zip(before, params))}
                return result

            def update(self, new_scale=None):
                before = self.get_scale() if self.is_enabled() else None
                super().update(new_scale)
                if before is not None:
                    after = self.get_scale()
                    if self.updates == target:
                        record["scale"] = [before, after]
                    elif after < before:
                        record["skips"] += 1
                self.updates += 1

        self.scaler = Scaler

    def __enter__(self):
        import torch

        torch.amp.GradScaler = self.scaler
        return self.report

    def __exit__(self, *exc):
        import torch

        torch.amp.GradScaler = self.original


@contextlib.contextmanager
def compile_backend(backend):
    """torch.compile with another backend for one run (None: unchanged)."""
    import torch

    original = torch.compile
    if backend:
        torch.compile = lambda model, **kwargs: original(model, **{**kwargs, "backend": backend})
    try:
        yield
    finally:
        torch.compile = original


@contextlib.contextmanager
def deterministic(enabled=True):
    """torch.use_deterministic_algorithms(True) (warn_only: an op without a deterministic kernel is named in the
    output, not fatal) with cudnn.benchmark held off (the scripts turn it on; timing-based choices could differ between
    processes). cuBLAS also needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before its first use."""
    import torch

    if not enabled:
        yield
        return
    cudnn_type = type(torch.backends.cudnn)
    original = cudnn_type.__dict__["benchmark"]
    torch.backends.cudnn.benchmark = False
    cudnn_type.benchmark = property(lambda self: False, lambda self, value: None)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        cudnn_type.benchmark = original


def run_job(job):
    """One script run in this process, as `python SCRIPT.py ARGV` would run it; its output goes to job["log"]."""
    import gc

    import torch

    started, report = time.perf_counter(), None
    with open(job["log"], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        saved_argv, sys.argv = sys.argv, [str(REPO / f"{job['script']}.py"), *job["argv"]]
        try:
            module = importlib.import_module(job["script"])
            scaler = OverflowingScaler(job["inject_overflow_at"]) if job.get("inject_overflow_at") else None
            with compile_backend(job.get("compile_backend")), deterministic(job.get("deterministic", False)), \
                    (scaler or contextlib.nullcontext()) as report:
                module.main(module.parse_args(job["argv"]))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
        except Exception:  # noqa: BLE001 - reported as the check's failure, the next check still runs
            traceback.print_exc()
            code = 1
        finally:
            sys.argv = saved_argv
    if job.get("compile_backend") is not None or "--compile" in job["argv"]:
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    tail = Path(job["log"]).read_text().strip().splitlines()
    return {"name": job["name"], "code": code, "seconds": time.perf_counter() - started,
            "error": tail[-1] if code and tail else None, "scaler": report}


def worker_main():
    """Read one job per line on stdin, run it, answer one result line; exit after a CUDA error (a fresh process
    takes the next job: a CUDA error can leave this one's context unusable)."""
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    for line in sys.stdin:
        result = run_job(json.loads(line))
        print(RESULT_MARK + json.dumps(result), flush=True)
        if result["code"] and CUDA_ERROR.search(Path(json.loads(line)["log"]).read_text()):
            sys.exit(70)


def summarize_throughput(results, models):
    """(passed, detail) of benchmarks/throughput.py's JSON: every measurement ran; each method's step over its floor."""
    errors = [f"{r['method']}/{r['model']}: {r['error']}" for r in results["methods"] if "error" in r]
    if errors:
        return False, "; ".join(errors)
    ratios = ", ".join(f"{r['method']}/{r['model']} {r['ratio']:.2f}x" for r in results["methods"])
    met = sum(results["targets"].values())
    return True, f"{', '.join(models)}: step over the floor {ratios}; {met} of {len(results['targets'])} targets met"


# ================================================================ the checker
class Checker:
    def __init__(self, args):
        self.args, self.started = args, time.perf_counter()
        self.out = Path(args.out).resolve()
        self.runs = self.out / "runs"
        shutil.rmtree(self.runs, ignore_errors=True)
        self.runs.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / "cuda_check.log", "w")  # noqa: SIM115 - open for the whole check
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
        self.ratios = []  # measured / estimated seconds of the checks done
        self.worker, self.worker_lines = None, None

    # ---- output ----
    def say(self, line=""):
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def attach(self, title, text):
        """A run's own output: into the log file only."""
        self.log_file.write(f"---- {title} ----\n{text.rstrip()}\n---- end of {title} ----\n")
        self.log_file.flush()

    def result(self, status, name, detail, seconds=None, estimate=None):
        timing = f" ({seconds:.0f} s; estimated {estimate:.0f} s)" if seconds is not None else ""
        self.counts[status] += 1
        self.say(f"{status} {name}: {detail}{timing}")
        if seconds is not None and estimate:
            self.ratios.append(seconds / estimate)

    # ---- time ----
    def elapsed(self):
        return time.perf_counter() - self.started

    def scaled(self, estimate):
        factor = min(4.0, max(0.5, statistics.median(self.ratios))) if self.ratios else 1.0
        return estimate * factor

    def fits(self, name, estimate):
        needed = self.scaled(estimate)
        if self.elapsed() + needed > self.args.budget_s:
            self.result("SKIP", name, f"needs about {needed:.0f} s, {self.args.budget_s - self.elapsed():.0f} s of "
                                      f"--budget-s {self.args.budget_s:.0f} left")
            return False
        return True

    # ---- the worker ----
    def start_worker(self):
        self.worker = subprocess.Popen([sys.executable, __file__, "--worker"], cwd=REPO, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                       start_new_session=True, env={**os.environ, **DETERMINISTIC_ENV})
        self.worker_lines = queue.Queue()
        threading.Thread(target=lambda out, lines: [lines.put(line) for line in out] + [lines.put(None)],
                         args=(self.worker.stdout, self.worker_lines), daemon=True).start()

    def stop_worker(self):
        if self.worker is not None:
            with contextlib.suppress(OSError):
                self.worker.stdin.close()
            try:
                self.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, signal.SIGKILL)
                self.worker.wait()
        self.worker = None

    def in_worker(self, job, timeout):
        """Run a job in the worker (started if needed); its result, or a failure saying why there is none."""
        if self.worker is None or self.worker.poll() is not None:
            self.start_worker()
        try:
            self.worker.stdin.write(json.dumps(job) + "\n")
            self.worker.stdin.flush()
        except OSError:  # it was on its way out: a fresh one takes the job
            self.worker.wait()
            self.start_worker()
            self.worker.stdin.write(json.dumps(job) + "\n")
            self.worker.stdin.flush()
        deadline, other = time.perf_counter() + timeout, []
        while True:
            try:
                line = self.worker_lines.get(timeout=max(0.1, deadline - time.perf_counter()))
            except queue.Empty:
                os.killpg(self.worker.pid, signal.SIGKILL)
                self.worker.wait()
                self.worker = None
                return {"code": None, "error": f"no result within {timeout:.0f} s (the worker was killed)"}
            if line is None:  # the worker died
                code = self.worker.wait()
                self.worker = None
                return {"code": code, "error": f"the worker process died (exit status {code})"
                                               + (f": {other[-1].strip()}" if other else "")}
            if line.startswith(RESULT_MARK):
                if other:
                    self.attach(f"{job['name']}: worker output", "".join(other))
                result = json.loads(line[len(RESULT_MARK):])
                if result["code"] and CUDA_ERROR.search(Path(job["log"]).read_text()):
                    self.worker.wait(timeout=120)  # it exits after a CUDA error; the next job gets a fresh one
                    self.worker = None
                return result
            other.append(line)

    # ---- runs ----
    def common_argv(self, out_dir, epochs=2, amp="bf16", model=None):
        """The short recipe of every run: the script's own defaults but for the size, no warm-up (CSS warms up for 5
        epochs) and one evaluation, after the last epoch."""
        argv = ["--model", model or self.args.model, "--dataset", self.args.dataset, "--data-dir", self.args.data_dir,
                "--epochs", str(epochs), "--batch-size", str(QUICK_BATCH if self.args.quick else 128),
                "--warmup-epochs", "0", "--eval-every", str(epochs), "--amp", amp, "--device", self.device,
                "--seed", "0", "--out-dir", str(out_dir)]
        return argv + (["--subset", str(QUICK_SUBSET)] if self.args.quick else [])

    def steps_per_epoch(self):
        train, test, batch = (QUICK_SUBSET, QUICK_SUBSET, QUICK_BATCH) if self.args.quick else (5000, 1000, 128)
        return train // batch + test / batch / 3  # evaluation: a forward is about a third of a training step

    def estimate(self, script, epochs=2, model=None, processes=0, compile=False):
        """Seconds for `epochs` of `script` plus `processes` fresh Python processes (see the docstring)."""
        model = model or self.args.model
        if self.device == "cuda":
            networks = 1 if model.startswith("msdnet") else 2
            step = FLOOR_OPS.get(model, FLOOR_OPS["resnet20"]) * networks * OPS_RATIO[script] * SECONDS_PER_OP_GPU
        else:
            figures = CPU_IMAGES_PER_S.get(model, CPU_IMAGES_PER_S["resnet20"])
            step = (QUICK_BATCH if self.args.quick else 128) / figures[script]
            if model.startswith("msdnet"):  # one network of 1911 operations against resnet20's two of 517
                step = 128 / CPU_IMAGES_PER_S["resnet20"][script] * FLOOR_OPS["msdnet5"] / (2 * FLOOR_OPS["resnet20"])
        kind = "cuda" if self.device == "cuda" else "cpu"
        compile_kind = "cpu-inductor" if kind == "cpu" and not self.args.quick else kind
        fixed = processes * PROCESS_S[kind] + 1.0 + (COMPILE_S[compile_kind] if compile else 0.0)
        return fixed + epochs * self.steps_per_epoch() * step

    def verify_run(self, out_dir, epochs, code, error, accuracy=True):
        """(passed, detail) of a finished run: exit status 0, finite losses every epoch, deployed top-1 above
        THRESHOLD x chance (unless `accuracy` is False)."""
        if code != 0:
            return False, f"exit status {code}: {error or 'no output'}"
        import torch

        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        bad = [f"epoch {r['epoch']} {k}" for r in records for k, v in r["losses"].items() if not math.isfinite(v)]
        if len(records) < epochs or bad:
            return False, f"{len(records)} of {epochs} epochs logged" + (f"; non-finite {', '.join(bad)}" * bool(bad))
        summary = json.loads((out_dir / "summary.json").read_text())
        classes = torch.load(out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["num_classes"]
        threshold, top1 = THRESHOLD / classes, summary["deployed"]["top1"]
        speed = statistics.median(r["images_per_s"] for r in records)
        finite = f"losses finite over {len(records)} epochs, {speed:.0f} img/s"
        if not accuracy or self.args.quick:  # 32 steps (8 for fp16) learn too little for a reliable threshold
            steps = QUICK_FP16_STEPS if not accuracy else 2 * (QUICK_SUBSET // QUICK_BATCH)
            return True, f"top-1 {top1:.3f} (not checked: --quick, {steps} steps), {finite}"
        verdict = f"top-1 {top1:.3f} {'>' if top1 > threshold else '<='} {threshold:.3f} ({THRESHOLD} x chance)"
        return top1 > threshold, f"{verdict}, {finite}"

    def worker_run(self, name, script, argv, estimate, **options):
        """`python SCRIPT.py ARGV` in the worker; its output goes into the log. Returns the worker's result."""
        job = {"name": name, "script": script, "argv": list(argv), "log": str(self.runs / f"{name}.log"), **options}
        result = self.in_worker(job, timeout=max(120.0, 4 * self.scaled(estimate)))
        if Path(job["log"]).exists():
            self.attach(f"{name}: python {script}.py {' '.join(job['argv'])}", Path(job["log"]).read_text())
        return result

    def script_check(self, name, script, extra=(), model=None, compile_=False, inject_overflow_at=None, amp="bf16"):
        estimate = self.estimate(script, model=model, compile=compile_, processes=self.worker is None)
        # a CPU without fp16 kernels runs fp16 convolutions about 14x slower than bf16: --quick gives it 8 small steps
        tiny_fp16 = amp == "fp16" and self.args.quick and self.device == "cpu"
        if tiny_fp16:
            extra = [*extra, "--subset", "32", "--batch-size", "8"]  # the last occurrence of a flag counts
        if not self.fits(name, estimate):
            return
        out_dir = self.runs / name
        result = self.worker_run(name, script, [*self.common_argv(out_dir, amp=amp, model=model), *extra], estimate,
                                 compile_backend="aot_eager" if compile_ and self.args.quick else None,
                                 inject_overflow_at=inject_overflow_at)
        passed, detail = self.verify_run(out_dir, 2, result["code"], result.get("error"), accuracy=not tiny_fp16)
        if passed and inject_overflow_at:
            passed, detail = self.verify_skipped_step(result.get("scaler") or {}, detail)
        self.result("PASS" if passed else "FAIL", name, detail, result.get("seconds"), estimate)

    @staticmethod
    def verify_skipped_step(report, detail):
        injected, scale = report.get("injected"), report.get("scale")
        if not injected or not scale:
            return False, "the injected overflow never reached the GradScaler (no fp16 scaler step?)"
        skipped = injected["params_unchanged"] and scale[1] < scale[0]
        fate = "skipped" if injected["params_unchanged"] else "APPLIED"
        what = (f"step {injected['update']} with an infinite gradient {fate}, scale {scale[0]:g} -> {scale[1]:g}, "
                f"{report['skips']} other steps skipped by the scaler; ")
        return skipped, what + detail

    def subprocess_run(self, name, command, env=None, timeout=600):
        started = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                                  env={**os.environ, **(env or {})})
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:  # its output so far comes as bytes
            partial = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                              for part in (expired.stdout or "", expired.stderr or ""))
            code, output = None, f"{partial}\ntimed out after {timeout} s"
        self.attach(f"{name}: {' '.join(map(str, command))}", output)
        last = output.strip().splitlines()[-1] if output.strip() else None
        return code, last, time.perf_counter() - started, output

    # ---- kill and resume ----
    def killed_and_resumed(self, name, script, epochs, estimate, exact):
        """`script` for `epochs` straight (in the worker) and, in another folder, as a process of its own SIGKILLed as
        soon as its first checkpoint is written, then `--resume`d (in the worker); `exact`: all three deterministic.
        Returns (straight dir, resumed dir, error or None, where it was killed)."""
        straight, split = self.runs / f"{name}_straight", self.runs / f"{name}_killed"
        if not exact and epochs == 2 and (self.runs / script / "summary.json").exists():
            straight = self.runs / script  # the script's own check ran these very arguments
        else:
            result = self.worker_run(f"{name}_straight", script, self.common_argv(straight, epochs), estimate,
                                     deterministic=exact)
            if result["code"] != 0:
                return straight, split, f"the uninterrupted run: exit status {result['code']}: {result['error']}", None
        wrapper = [__file__, "--deterministic-run"] if exact else []
        command = [sys.executable, *wrapper, str(REPO / f"{script}.py"), *self.common_argv(split, epochs)]
        log_path = self.runs / f"{name}_killed.log"
        with open(log_path, "w") as log:
            run = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **(DETERMINISTIC_ENV if exact else {})})
            while run.poll() is None and not (split / "checkpoint.pt").exists():
                time.sleep(0.02)
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        self.attach(f"{name} killed: {' '.join(command)}", log_path.read_text())
        logged = len((split / "metrics.jsonl").read_text().splitlines()) if (split / "metrics.jsonl").exists() else 0
        if run.returncode != -signal.SIGKILL or (split / "summary.json").exists():
            return straight, split, f"the run ended (exit status {run.returncode}) before it could be killed", None
        killed_at = f"SIGKILL in epoch {logged + 1} of {epochs} after the checkpoint of epoch {logged}"
        result = self.worker_run(f"{name}_resumed", script, ["--resume", str(split)], estimate, deterministic=exact)
        if result["code"] != 0:
            return straight, split, f"--resume: exit status {result['code']}: {result['error']}", killed_at
        return straight, split, None, killed_at

    @staticmethod
    def metric_difference(straight, split):
        """(equal, largest top-1 difference, largest NLL difference) of two runs' final metrics."""
        a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, split))
        outputs = [(a["networks"][n], b["networks"][n]) for n in a["networks"]]
        outputs += [(a["ensemble"], b["ensemble"])] if a.get("ensemble") else []
        top1, nll = (max(abs(x[k] - y[k]) for x, y in outputs) for k in ("top1", "nll"))
        return a["networks"] == b["networks"] and a.get("ensemble") == b.get("ensemble"), top1, nll

    def resume_check(self, exact):
        """exact=False: the scripts as they are (on CUDA: report the difference); exact=True: deterministic."""
        epochs, name = 2, "resume-deterministic" if exact else "resume"
        # straight, killed after about one epoch (a process of its own), resumed for the other two
        estimate = self.estimate("dml", epochs=2 * epochs, processes=1 + (self.worker is None))
        if not self.fits(name, estimate):
            return
        started = time.perf_counter()
        straight, split, error, killed_at = self.killed_and_resumed(name, "dml", epochs, estimate, exact)
        seconds = time.perf_counter() - started
        if error:
            return self.result("FAIL", name, error, seconds, estimate)
        equal, top1, nll = self.metric_difference(straight, split)
        detail = f"dml, {killed_at}: final metrics " + ("equal to the uninterrupted run's" if equal else
                                                        f"differ from the uninterrupted run's by up to {top1:.4f} "
                                                        f"top-1 and {nll:.4f} NLL")
        if exact or self.device != "cuda":
            passed = equal
            detail += "" if equal else " (must be equal)"
        else:
            passed = top1 <= 0.05
            detail += "" if equal else " (CUDA's non-deterministic kernels; limit 0.05 top-1)"
        if exact:
            detail += self.deterministic_cost(straight)
        self.result("PASS" if passed else "FAIL", name, detail, seconds, estimate)

    def deterministic_cost(self, deterministic_run):
        """The speed of the deterministic uninterrupted run against the default one, and the ops it warned about."""
        def speed(run):
            return statistics.median(json.loads(line)["images_per_s"]
                                     for line in (run / "metrics.jsonl").read_text().splitlines())

        cost = ""
        default_run = self.runs / "dml"
        if (default_run / "metrics.jsonl").exists():
            default, exact = speed(default_run), speed(deterministic_run)
            cost = f"; cost: {exact:.0f} img/s against {default:.0f} without ({exact / default - 1:+.0%})"
        log = (self.out / "cuda_check.log").read_text()
        ops = sorted(set(re.findall(r"(\w+) does not have a deterministic implementation", log)))
        return cost + (f"; ops without a deterministic kernel: {', '.join(ops)}" if ops else "")

    # ---- torchrun ----
    def torchrun_check(self):
        import torch

        name = "torchrun"
        ranks = torch.cuda.device_count() if self.device == "cuda" else 2
        estimate = self.estimate("tna", processes=1 + ranks)
        if not self.fits(name, estimate):
            return
        out_dir = self.runs / name
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   str(REPO / "tna.py"), *self.common_argv(out_dir)]
        env = {"OMP_NUM_THREADS": "1"} if self.device != "cuda" else {}
        code, last, seconds, _ = self.subprocess_run(name, command, env)
        passed, detail = self.verify_run(out_dir, 2, code, last)
        backend = "nccl" if self.device == "cuda" else "gloo"
        where = f"{ranks} rank{'s' * (ranks > 1)} ({backend})"
        self.result("PASS" if passed else "FAIL", name, f"tna, {where}; {detail}", seconds, estimate)

    # ---- throughput ----
    def throughput_check(self):
        """benchmarks/throughput.py with as many models as fit the time left; --quick: one of its measurements (its
        own test runs the whole benchmark; here a process each for floors and variants would double the check)."""
        name, kind = "throughput", "cuda" if self.device == "cuda" else "cpu"
        benchmark = [sys.executable, str(REPO / "benchmarks" / "throughput.py")]
        if self.args.quick:
            job = {"kind": "method", "method": "tna", "model": self.args.model, "dataset": self.args.dataset,
                   "data_dir": self.args.data_dir, "batch_size": QUICK_BATCH, "steps": 3, "repeats": 1,
                   "device": self.device, "amp": "bf16", "flags": []}
            estimate = PROCESS_S[kind] + self.estimate("tna", epochs=2)
            if not self.fits(name, estimate):
                return
            code, last, seconds, output = self.subprocess_run(name, [*benchmark, "--worker", json.dumps(job)])
            measured = json.loads(last) if code == 0 else {}
            passed = measured.get("images_per_s", 0) > 0 and measured.get("ops_per_step", 0) > 0
            detail = f"exit status {code}: {last}"
            if passed:
                detail = (f"one measurement (--quick): tna {self.args.model} {measured['images_per_s']:.0f} img/s, "
                          f"{measured['ops_per_step']:.0f} operations per step")
            return self.result("PASS" if passed else "FAIL", name, detail, seconds, estimate)
        models, steps, repeats = ["convnet", "resnet20", "resnet18"], 20, 3
        methods, profile = SCRIPTS, ["fdl", "amln", "css"]

        def estimate(k):
            """k models: each a floor before and after, every method, the profiled runs, each a process training
            (repeats + 1) epochs of `steps` plus 6 counted steps; once: the DataLoader baselines, --channels-last."""
            processes = k * (2 + len(methods) + len(profile)) + (3 if self.args.dataset.endswith(".npz") else 1)
            steps_total = k * (2 + len(methods)) * ((repeats + 1) * steps + 6)
            step = (128 / CPU_IMAGES_PER_S["resnet20"]["tna"] if kind == "cpu"  # the benchmark's batch: 128
                    else 2 * FLOOR_OPS["resnet20"] * statistics.mean(OPS_RATIO.values()) * SECONDS_PER_OP_GPU)
            return (processes + 1) * PROCESS_S[kind] + steps_total * step

        left = self.args.budget_s - self.elapsed()
        fitting = [k for k in range(1, len(models) + 1) if self.scaled(estimate(k)) <= left]
        if not fitting:
            return self.fits(name, estimate(1))
        models = models[:max(fitting)]
        command = [*benchmark, "--methods", ",".join(methods), "--models", ",".join(models), "--steps", str(steps),
                   "--repeats", str(repeats), "--profile", ",".join(profile), "--dataset", self.args.dataset,
                   "--data-dir", self.args.data_dir, "--device", self.device, "--amp", "bf16",
                   "--out", str(self.out / "throughput.json")]
        code, last, seconds, output = self.subprocess_run(name, command, timeout=max(120, int(left)))
        self.say("\n".join(f"    {line}" for line in output.rstrip().splitlines() if not line.startswith("W")))
        if code != 0:
            return self.result("FAIL", name, f"exit status {code}: {last}", seconds, estimate(len(models)))
        passed, detail = summarize_throughput(json.loads((self.out / "throughput.json").read_text()), models)
        self.result("PASS" if passed else "FAIL", name, detail, seconds, estimate(len(models)))

    # ---- the sequence ----
    def environment(self):
        import torch

        cuda = torch.cuda.is_available()
        self.device = "cuda" if self.args.device == "cuda" or (self.args.device == "auto" and cuda) else "cpu"
        self.say(f"# cuda_check: {self.device}{' --quick' if self.args.quick else ''}, dataset {self.args.dataset}, "
                 f"model {self.args.model}, budget {self.args.budget_s:.0f} s, log {self.out / 'cuda_check.log'}")
        versions = f"torch {torch.__version__}, Python {platform.python_version()}"
        if cuda:
            props = torch.cuda.get_device_properties(0)
            driver = "unknown"
            with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
                smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=30, check=False)
                driver = smi.stdout.strip().splitlines()[0]
            machine = (f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                       f"driver {driver}, {versions}, CUDA {torch.version.cuda}, "
                       f"cuDNN {torch.backends.cudnn.version()}")
        else:
            machine = f"no CUDA device; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {versions}"
        self.say(f"# machine: {machine}")
        if self.device == "cuda" and not cuda:
            return self.result("FAIL", "env", f"--device cuda but torch sees no CUDA device ({versions})")
        self.result("PASS", "env", machine)

    def run(self):
        self.environment()
        if self.counts["FAIL"]:
            return self.finish()
        for script in SCRIPTS:
            extra = ["--pretrain-epochs", "0"] if script == "fdl" else []  # its four sub-steps from the first step
            quick_model = QUICK_MODELS.get(script) if self.args.quick and self.args.model == "convnet" else None
            self.script_check(script, script, extra, model=quick_model)
        self.script_check("sila-msdnet", "sila", model="msdnet5")
        self.script_check("fp16", "tna", amp="fp16", inject_overflow_at=3)
        self.script_check("channels-last", "dml", ["--channels-last"])
        self.resume_check(exact=False)
        self.torchrun_check()
        self.script_check("compile", "tna", ["--compile"], compile_=True)
        self.resume_check(exact=True)
        self.stop_worker()
        self.throughput_check()
        return self.finish()

    def finish(self):
        self.stop_worker()
        skipped = f", {self.counts['SKIP']} skipped" if self.counts["SKIP"] else ""
        self.say(f"{self.counts['PASS']} passed, {self.counts['FAIL']} failed{skipped} in {self.elapsed():.0f} s")
        self.log_file.close()
        return 1 if self.counts["FAIL"] else 0


def main():
    if sys.argv[1:2] == ["--deterministic-run"]:  # internal: `--deterministic-run SCRIPT ARGS` (the killed run)
        sys.argv = sys.argv[2:]
        sys.path.insert(0, str(REPO))
        with deterministic():
            runpy.run_path(sys.argv[0], run_name="__main__")
        return
    args = parse_args()
    if args.worker:
        return worker_main()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sys.exit(Checker(args).run())


if __name__ == "__main__":
    main()
