"""The denoising loop needs the host only before its first step: nothing per step reads a device
value back (``.item()``, ``.tolist()``, tensor-as-bool → ``aten._local_scalar_dense``; data-
dependent shapes → ``aten.nonzero``) or moves host data to the device (``.to(device)``,
``torch.tensor``). On the CPU such a call costs nothing, so the test counts the calls and
checks that doubling the steps does not add any; on CUDA ``test_denoise_loop_runs_under_sync_
debug_error`` makes every sync an error."""

import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from bagel.config import GenerationParams
from bagel.engine import Engine
from bagel.loading import load_checkpoint
from bagel.requests import Request

HOST_OPS = ("aten._local_scalar_dense.default", "aten.nonzero.default")


class DeviceSyncs(TorchDispatchMode):
    """Counts the aten ops that make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_OPS:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


class HostTransfers(TorchFunctionMode):
    """Counts Python-level calls that bring host data to the device or device data to the host
    (invisible to the dispatcher on a CPU, where they are no-ops)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name == "to" and (kwargs.get("device") is not None
                             or any(isinstance(a, torch.device | str) for a in args[1:])):
            self.counts["Tensor.to(device)"] += 1
        elif name in ("cpu", "cuda", "item", "tolist", "tensor", "as_tensor", "from_numpy"):
            self.counts[name] += 1
        return func(*args, **kwargs)


def _count(engine: Engine, steps: int, taylorseer: bool) -> dict[str, int]:
    # cfg_interval switches guidance off half-way: both layouts of the loop are used
    params = GenerationParams(num_timesteps=steps, seed=4, cfg_interval=(0.5, 1.0), taylorseer=taylorseer)
    requests = [Request("generate", "a red bag", width=32, height=32, params=params),
                Request("generate", "a blue hat", width=32, height=32, params=params)]
    with DeviceSyncs() as syncs, HostTransfers() as transfers:
        engine.run(requests)
    return {**syncs.counts, **transfers.counts}


@pytest.fixture(scope="module")
def engine(golden_dir):
    return Engine(load_checkpoint(golden_dir, device="cpu", dtype=torch.float32))


@pytest.mark.parametrize("taylorseer", [False, True])
def test_denoise_loop_syncs_do_not_grow_with_the_number_of_steps(engine, taylorseer):
    short, long = _count(engine, 12, taylorseer), _count(engine, 24, taylorseer)
    assert long == short, f"per-step host work: {short} with 11 steps, {long} with 23"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("taylorseer", [False, True])
def test_denoise_loop_runs_under_sync_debug_error(golden_dir, taylorseer):
    """On CUDA every step after the first runs with ``set_sync_debug_mode("error")``."""
    engine = Engine(load_checkpoint(golden_dir, device="cuda", dtype=torch.bfloat16))
    seen = []

    def progress(index: int, step: int, total: int) -> None:
        # after the first step every sync is an error, until the last step (the picture is then
        # decoded and copied to the host, as it must be)
        torch.cuda.set_sync_debug_mode("error" if step < total else "default")
        seen.append(step)

    params = GenerationParams(num_timesteps=8, seed=4, cfg_interval=(0.5, 1.0), taylorseer=taylorseer)
    try:
        engine.run([Request("generate", "a red bag", width=64, height=64, params=params)], progress=progress)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert seen == list(range(1, 8))
