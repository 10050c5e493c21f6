"""benchmarks/cuda_check.py keeps working between GPU loans: its whole sequence runs tiny on a CPU (--device cpu
--quick), and the parts that only act on CUDA (the GradScaler's skipped step, the deterministic mode, the throughput
summary) are checked here on their own."""
import re
import subprocess
import sys

import torch

from benchmarks.cuda_check import OverflowingScaler, deterministic, summarize_throughput

from conftest import REPO

CHECKS = ["env", "tna", "dml", "sila", "fdl", "amln", "css", "sila-msdnet", "fp16", "channels-last", "resume",
          "torchrun", "compile", "resume-deterministic", "throughput"]
VERDICT = re.compile(r"^(PASS|FAIL|SKIP) ([\w-]+): (.*)$", re.MULTILINE)




def run_check(out, *args):
    command = [sys.executable, str(REPO / "benchmarks" / "cuda_check.py"), "--device", "cpu", "--quick",
               "--out", str(out), "--dataset", "sample", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_quick_cpu_run_passes_every_check_with_one_line_each_and_keeps_the_log(tmp_path):
    result = run_check(tmp_path / "out")
    verdicts = {name: (status, detail) for status, name, detail in VERDICT.findall(result.stdout)}
    assert list(verdicts) == CHECKS, result.stdout + result.stderr
    failed = {name: detail for name, (status, detail) in verdicts.items() if status != "PASS"}
    assert not failed, failed
    for name in ("tna", "sila-msdnet", "torchrun"):
        assert "not checked: --quick" in verdicts[name][1] and "losses finite over 2 epochs" in verdicts[name][1]
    assert "final metrics equal" in verdicts["resume"][1] and "SIGKILL in epoch 2" in verdicts["resume"][1]
    deterministic = verdicts["resume-deterministic"][1]
    assert "final metrics equal" in deterministic and "cost:" in deterministic
    assert "2 ranks (gloo)" in verdicts["torchrun"][1]
    passed = sum(status == "PASS" for status, _ in verdicts.values())
    closing = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"{passed} passed, {len(CHECKS) - passed} failed in \d+ s", closing), closing
    assert result.returncode == (0 if passed == len(CHECKS) else 1)
    log = (tmp_path / "out" / "cuda_check.log").read_text()
    assert all(f"{status} {name}: {detail}" in log for name, (status, detail) in verdicts.items())
    assert closing in log and "# machine: " in log
    assert "---- tna: python tna.py --model convnet" in log and "epoch 2/2" in log  # each run's own output


def test_budget_skips_what_would_not_fit(tmp_path):
    result = run_check(tmp_path / "out", "--budget-s", "1")
    verdicts = VERDICT.findall(result.stdout)
    assert [name for _, name, _ in verdicts] == CHECKS
    assert verdicts[0][0] == "PASS" and all(status == "SKIP" for status, _, _ in verdicts[1:])
    assert all(re.match(r"needs about \d+ s, -?\d+ s of --budget-s 1 left", detail) for _, _, detail in verdicts[1:])
    assert result.stdout.strip().splitlines()[-1].startswith("1 passed, 0 failed, 14 skipped")
    assert result.returncode == 0


def test_overflowing_scaler_skips_the_poisoned_step_and_halves_the_scale():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with OverflowingScaler(inject_at=2) as report:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for _ in range(3):
            optimizer.zero_grad()
            scaler.scale(model(torch.randn(8, 4)).square().mean()).backward()
            scaler.step(optimizer)
            scaler.update()
    assert torch.amp.GradScaler is not type(scaler)  # restored after the run
    assert report["injected"] == {"update": 2, "params_unchanged": True}
    assert report["scale"] == [2.0**10, 2.0**9] and report["skips"] == 0


def test_deterministic_mode_holds_cudnn_benchmark_off_and_is_undone():
    assert not torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    with deterministic():
        assert torch.are_deterministic_algorithms_enabled()
        torch.backends.cudnn.benchmark = True  # what every script does at its start
        assert torch.backends.cudnn.benchmark is False
    assert not torch.are_deterministic_algorithms_enabled()
    torch.backends.cudnn.benchmark = not benchmark
    assert torch.backends.cudnn.benchmark is (not benchmark)
    torch.backends.cudnn.benchmark = benchmark


def test_throughput_summary_names_each_ratio_and_any_error():
    rows = [{"method": "tna", "model": "convnet", "ratio": 1.02}, {"method": "fdl", "model": "convnet", "ratio": 3.4}]
    targets = {"tna convnet step <= 1.10x floor": True, "device loader >= 10x the DataLoader": False}
    passed, detail = summarize_throughput({"methods": rows, "targets": targets}, ["convnet"])
    assert passed and detail == "convnet: step over the floor tna/convnet 1.02x, fdl/convnet 3.40x; 1 of 2 targets met"
    passed, detail = summarize_throughput({"methods": [*rows, {"method": "css", "model": "convnet",
                                                                "error": "CUDA out of memory"}],
                                           "targets": targets}, ["convnet"])
    assert not passed and detail == "css/convnet: CUDA out of memory"
