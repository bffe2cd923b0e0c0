"""Data-parallel training under ``torchrun``: the process group and the few collectives fit needs.

``torchrun --nproc_per_node N -m vprompt train …`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`init_distributed` joins them in one process group
(gloo on CPU, nccl on CUDA with device ``cuda:LOCAL_RANK``). Without ``torchrun`` (or with one
process) nothing here does anything: every helper answers for a world of one.

How :func:`~vprompt.engine.fit.fit` trains with N ranks (single-process runs are unchanged):

- Every rank draws the same shuffled order (same seeded generator) and cuts it into the same
  global batches of ``optim.batch_size`` images as one process would; rank r keeps its
  contiguous slice of every global batch (:func:`shard`; sizes differ by at most one).
- Each rank's loss is its share of the global mean loss (cross-entropy summed over its images
  / global batch size, auxiliary terms weighted by its share of the images), so the SUM of the
  ranks' gradients (:func:`all_reduce_gradients`, only the trainable prompt parameters) is the
  single-process gradient up to float summation order, and every rank takes the same step.
- Lifecycle hooks run on every rank with the same seeds and data; rank 0's prompt is then
  broadcast (:func:`broadcast_prompt`) so the ranks can never drift apart.
- Rank 0 alone validates (the result is broadcast) and writes checkpoints, metrics, packs and
  plots; every rank reads the same checkpoint to resume.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from vprompt.errors import ConfigError
from vprompt.methods.base import PromptMethod

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return all(name in os.environ for name in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(
    device: str | torch.device = "auto", *, timeout_s: float = 1800.0
) -> torch.device:
    """Join ``torchrun``'s process group (once) and return this rank's device.

    Args:
        device: The device asked for: ``auto`` or ``cuda`` become ``cuda:LOCAL_RANK`` (nccl)
            when CUDA is available, ``cpu`` (or ``auto`` without CUDA) keeps the CPU (gloo).
            Outside ``torchrun`` it is returned as given.
        timeout_s: How long a collective may wait for the slowest rank (rank 0 validates and
            writes while the others wait).

    Raises:
        ConfigError: A CUDA device was asked for where there is none, or a specific
            ``cuda:K`` that is not this rank's ``cuda:LOCAL_RANK``.
    """
    if not launched():
        auto = str(device) == "auto"
        return (
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
            if auto
            else torch.device(device)
        )
    local = int(os.environ["LOCAL_RANK"])
    asked = str(device)
    cuda = asked.startswith("cuda") or (asked == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"device {asked!r}: CUDA is not available on this machine")
        if asked not in ("auto", "cuda", f"cuda:{local}"):
            raise ConfigError(
                f"device {asked!r}: under torchrun each rank uses cuda:LOCAL_RANK; pass "
                "--device cuda (or auto)"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if cuda else None,
        )
    return dev


@contextlib.contextmanager
def process_group(device: str | torch.device = "auto") -> Iterator[str | torch.device]:
    """Within: ``torchrun``'s process group (when launched by it), left at the end; yields
    this rank's device (see :func:`init_distributed`), or ``device`` unchanged outside it."""
    if not launched():
        yield device
        return
    dev = init_distributed(device)
    try:
        yield dev
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def world_size() -> int:
    """Processes training together (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a world of one)."""
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. filling a shared cache), then the others do."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard(total: int) -> slice:
    """This rank's contiguous slice of a global batch of ``total`` items.

    The first ``total % world`` ranks take one item more, so sizes differ by at most one; a
    rank's slice is empty when the batch has fewer items than there are ranks.
    """
    world, me = world_size(), rank()
    base, extra = divmod(total, world)
    start = me * base + min(me, extra)
    return slice(start, start + base + (1 if me < extra else 0))


def all_reduce_gradients(params: Sequence[nn.Parameter], stats: torch.Tensor) -> torch.Tensor:
    """Sum ``params``' gradients and ``stats`` (a few step statistics) over the ranks, in one
    all-reduce; returns the summed ``stats``.

    A parameter without a gradient on some ranks (e.g. a rank with no images in the last
    batch) counts as zeros there; one without a gradient on every rank keeps ``grad = None``,
    so the optimizer skips it exactly as a single process would.
    """
    if world_size() == 1:
        return stats
    device = params[0].device if params else stats.device
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    parts = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
        for p in params
    ]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
    flat = torch.cat([*parts, has_grad, stats.to(device=device, dtype=dtype).reshape(-1)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        summed = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
        p.grad = summed.clone() if p.grad is None else p.grad.copy_(summed)
    counts = flat[offset : offset + len(params)].tolist()
    for p, count in zip(params, counts, strict=True):
        if count == 0:
            p.grad = None
    offset += len(params)
    return flat[offset:].to(stats.dtype).view_as(stats)


def broadcast_floats(values: Sequence[float] | None, count: int) -> list[float]:
    """Rank 0's ``values`` (``count`` numbers) on every rank; other ranks pass None."""
    if world_size() == 1:
        assert values is not None
        return list(values)
    buf = torch.zeros(count, dtype=torch.float64, device=_collective_device())
    if is_main():
        assert values is not None
        buf.copy_(torch.tensor(list(values), dtype=torch.float64))
    dist.broadcast(buf, src=0)
    return [float(v) for v in buf.tolist()]


def broadcast_prompt(method: PromptMethod) -> None:
    """Load rank 0's prompt tensors into every rank's ``method`` (no-op in a world of one)."""
    if world_size() == 1:
        return
    device = _collective_device()
    state = {}
    for key, value in sorted(method.prompt_state().items()):
        buf = value.to(device, torch.uint8 if value.dtype == torch.bool else value.dtype)
        buf = buf.contiguous().clone()
        dist.broadcast(buf, src=0)
        state[key] = buf.to("cpu", value.dtype)
    if not is_main():
        method.load_prompt_state(state)


def check_data_parallel(method: PromptMethod) -> None:
    """Refuse, with one line, what data-parallel training cannot reproduce exactly.

    Supported: the plain loss (cross-entropy of the logits) plus ``aux_loss`` terms that are
    per-image means over the batch or do not depend on the batch (prompt regularisers,
    distillation), with or without labels, on pixels or cached features. Refused: methods
    that shape their own gradient (``custom_backward``: the shaping is not linear in the
    per-rank gradients) and prompts with batch statistics (BatchNorm outside the backbone).

    Raises:
        ConfigError: The method is one of the refused kinds and the world has several ranks.
    """
    if world_size() == 1:
        return
    if method.capabilities.custom_backward:
        raise ConfigError(
            f"{method.name} shapes its own gradients (custom_backward), which data-parallel "
            "training cannot reproduce; run it in one process (without torchrun)"
        )
    frozen = (
        {id(m) for m in method.backbone.modules()}
        if isinstance(method.backbone, nn.Module)
        else set()
    )
    for name, module in method.named_modules():
        if id(module) not in frozen and isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(
                f"{method.name}: its prompt module {name!r} uses batch statistics "
                f"({type(module).__name__}), which differ per rank; run it in one process "
                "(without torchrun)"
            )


def _collective_device() -> torch.device:
    # nccl moves only CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
