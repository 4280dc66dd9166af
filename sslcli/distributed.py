"""Every use of :mod:`torch.distributed` in sslcli lives here.

Each function works unchanged in a single process (no process group): rank 0, world size 1,
gathers return their input.  Under ``torchrun`` the process group is set up by
:func:`init_from_env` from the usual ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables.
"""

from __future__ import annotations

import datetime
import functools
import os
import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

Result = TypeVar("Result")
Command = TypeVar("Command", bound=Callable[..., Any])


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def launched_world_size() -> int:
    """The world size torchrun launched (``WORLD_SIZE``), known before the process group is joined."""
    return int(os.environ.get("WORLD_SIZE", 1))


def launched_rank() -> int:
    """This process's global rank as torchrun launched it (``RANK``), known without a process group."""
    return int(os.environ.get("RANK", 0))


def first_rank_only(name: str) -> Callable[[Command], Command]:
    """Decorates a single-device command (``name``, e.g. ``"sslcli export"``): under torchrun global rank 0
    runs it and every other rank returns at once, exit code 0, having read no argument and touched no file.

    No process group is joined and nobody waits in a collective: torchrun itself waits for rank 0 before it
    exits, so a job script's next step still starts after the work, and a long job (converting a large image
    folder) cannot hit a collective's timeout.  In a single process the command just runs.
    """

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            if launched_rank() != 0:
                return None
            if launched_world_size() > 1:
                from sslcli.engine.metrics import info  # here: sslcli.engine.metrics imports this module

                info(f"{name} runs on one device: rank 0 of {launched_world_size()} does the work, the other "
                     "ranks exit")
            return command(*args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate


def collective_device() -> torch.device:
    """Where tensors must live for a collective: the current GPU under nccl, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(device: torch.device) -> bool:
    """Joins the process group when launched by torchrun; returns whether it did.

    gloo for CPU runs, nccl for CUDA.  A single-process launch is left untouched.
    """
    if launched_world_size() <= 1 or is_initialized():
        return is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return True


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for the local slice.

    The sum matters: each rank's loss depends on every rank's embeddings, so the gradient of
    the total loss w.r.t. the local slice is the all-reduced sum of the per-rank gradients
    (lightly's early GatherLayer returned only the local one, silently shrinking it).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` from all ranks along dim 0, differentiable w.r.t. the local ``x``."""
    if not is_initialized() or world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` from all ranks along dim 0 (same shape on every rank), detached."""
    if not is_initialized() or world_size() == 1:
        return x.detach()
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather_no_grad` but ranks may hold different numbers of rows."""
    if not is_initialized() or world_size() == 1:
        return x.detach()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = gather_no_grad(n).tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    rows = gather_no_grad(padded)
    return torch.cat([rows[i * max(sizes) : i * max(sizes) + s] for i, s in enumerate(sizes)])


def gather_objects(obj: Result) -> list[Result]:
    """Every rank's picklable ``obj`` (small ones: captions, names), in rank order; ``[obj]`` in one process."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a new tensor; the input is not modified)."""
    if not is_initialized() or world_size() == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out)
    return out / world_size()


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(x)
    return x


def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_initialized() and world_size() > 1:
        dist.broadcast(x, src)
    return x


def broadcast_object(obj: Result, src: int = 0) -> Result:
    """Sends a picklable object from ``src`` to all ranks (run metadata and results, not bulk tensors)."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src, device=collective_device())
    return box[0]


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (so that all ranks take the same branch)."""
    if not is_initialized() or world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _picklable(obj: object) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - anything pickle raises means "send something else"
        return False
    return True


def on_main(work: Callable[[], Result]) -> Result:
    """Runs ``work`` on rank 0 only and returns its result on every rank; the others wait for it.

    Writing files, printing tables and fitting on gathered data happen once.  An exception on rank 0 is
    raised on every rank, so no rank waits forever for a result that will not come.
    """
    if not is_initialized() or world_size() == 1:
        return work()
    outcome: tuple[bool, object] = (True, None)
    if is_main():
        try:
            outcome = (True, work())
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            outcome = (False, err if _picklable(err) else RuntimeError(f"{type(err).__name__}: {err}"))
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel when a process group exists, else the module itself."""
    if not is_initialized() or world_size() == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def convert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """SyncBN across ranks (SimCLR's global-batch BN); a no-op in one process.

    timm's converter, not torch's: torch turns timm's ``BatchNormAct2d`` (RegNet, EfficientNet, ...) into a
    plain ``SyncBatchNorm`` and so drops the activation fused into it; timm's makes it ``SyncBatchNormAct``.
    """
    if not is_initialized() or world_size() == 1:
        return module
    from timm.layers import convert_sync_batchnorm  # here: the CLI starts without importing timm

    return convert_sync_batchnorm(module)
