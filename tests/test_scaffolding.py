"""The training scaffolding every method file shares: no host read-back of device values per step
(on CUDA each one stalls the launch queue), and a diverging run stops at once with exit 3 and an
intact checkpoint (SPEC section 1)."""
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import METHOD_FLAGS, METHOD_SCRIPTS, TINY_RUN, run_script


class HostReadbacks(TorchDispatchMode):
    """Counts the operations that copy a device value to the host (or need its value to size their
    output): on CUDA each is a synchronisation. `Tensor.tolist` bypasses the dispatcher, so it is
    counted by wrapping it."""
    READBACK_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim"}

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        original_tolist = torch.Tensor.tolist

        def counted_tolist(tensor):
            self.count += 1
            return original_tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)  # e.g. "aten._local_scalar_dense"
        boolean_index = name == "aten.index" and any(  # x[mask]: the mask's count sizes the output
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1])
        self.count += name in self.READBACK_OPS or boolean_index
        return func(*args, **(kwargs or {}))


def readbacks_of_one_epoch(script, steps, tmp_path, monkeypatch):
    batch = 32
    args = [*TINY_RUN, "--dataset", "fake", "--batch-size", batch, "--subset", steps * batch,
            "--out-dir", tmp_path / f"{steps}_steps", *METHOD_FLAGS.get(script, [])]
    with monkeypatch.context() as patch, HostReadbacks(patch) as counter:
        result = run_script(script, *args)
    assert result.returncode == 0, result.stderr
    return counter.count


@pytest.mark.parametrize("script", METHOD_SCRIPTS)
def test_host_readbacks_do_not_grow_with_the_steps_of_an_epoch(script, tmp_path, monkeypatch):
    """Losses accumulate on the device and are read once per epoch; the divergence check reads one
    value every 50 steps. So an epoch of 2 steps and one of 5 read the device back equally often."""
    short = readbacks_of_one_epoch(script, 2, tmp_path, monkeypatch)
    long = readbacks_of_one_epoch(script, 5, tmp_path, monkeypatch)
    assert short == long, f"{script}: {short} host read-backs in a 2-step epoch, {long} in a 5-step one"
    assert short > 0  # the counter sees the per-epoch reads (it is not blind)


def test_divergence_exits_3_naming_term_epoch_and_step_and_keeps_the_checkpoint(tmp_path):
    """Epoch 1 trains normally (matching off before --late-matching 1); in epoch 2 alpha = 1e38 sends
    the weights to infinity within two steps."""
    out = tmp_path / "run"
    result = run_script("tna.py", *TINY_RUN, "--dataset", "fake", "--subset", "128", "--epochs", "2",
                        "--alpha", "1e38", "--late-matching", "1", "--out-dir", out)
    assert result.returncode == 3, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    bad = re.search(r"non-finite loss \(([a-z_, ]+)\) at epoch (\d+), step (\d+)", message)
    assert bad and "match" in bad[1].split(", ") and bad[2] == "2" and int(bad[3]) <= 2, message
    assert "lower --lr" in message and str(out) in message
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and not (out / "summary.json").exists()
    assert all(torch.isfinite(value).all() for value in checkpoint["networks"]["base"].values() if value.is_floating_point())
