"""One job over several processes (DESIGN section 6): the process group, who is who, and the collectives
that make N processes with a global batch ``B`` train as one process with batch ``B``.

Launch::

    python -m torch.distributed.run --standalone --nproc_per_node N -m distill train SPEC --out RUN

``torchrun`` gives each process ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address;
:func:`setup` joins the group (NCCL on GPUs, gloo on the CPU). Without those variables (a plain
``python -m distill train``) nothing is initialised and every helper here is the one-process identity, so the
training code has one path.

**Loss scale.** A loss that is a mean over the batch (GFL's QFL over the positives, GIoU/DFL over the sum
of the positives' quality weights, every distillation term over its region) must divide by the *global*
count, or each rank would normalise by its own share and a rank with one positive would weigh as much as
one with fifty. The gradients are then averaged over the ranks (``average_gradients``, as DDP does), which
divides by ``N``; so rank ``r`` computes ``N * local_sum_r / global_count`` (:func:`mean_denominator`
returns ``global_count / N``, as mmdetection's ``reduce_mean``), and the average of the ranks' gradients is
the gradient of ``sum_r local_sum_r / global_count``: the one-process loss of the global batch. A term that
is a plain per-rank mean (FitNets' MSE) averages to the global mean as the ranks hold equal shares.

**Gradients.** The criterion calls ``model.features`` and ``model.bbox_head``, not ``model.forward``, and
trainable parameters also live outside the model (FitNets' adapters; CrossKD's path runs through frozen
teacher layers). ``DistributedDataParallel`` only synchronises what runs through its own ``forward``, so
its hooks would miss all of that; we all-reduce the gradients of every trained parameter after
``backward`` instead (:func:`average_gradients`, one flat buffer per dtype). That gives up DDP's overlap of
communication with the backward pass, and nothing else.

**Collective order.** Every rank must call the collectives here in the same order and the same number of
times: never behind a data-dependent branch (a region that is empty on one rank still all-reduces its
denominator). A rank that dies makes the others fail fast in their next collective (the connection
closes) and ``torchrun`` then stops the group; a rank that hangs (stuck I/O, a stopped process) is
caught by the group's collective timeout, ``LDD_DDP_TIMEOUT_S`` (default 1800 s: it must cover rank 0's
pre-training diagnostics, during which the others wait at a barrier).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distill.lifetime import die_with_parent

TIMEOUT_ENV = "LDD_DDP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0


class GroupLost(RuntimeError):
    """A collective failed: another rank died or hung. No verdict on the job (``python -m distill`` exits 1
    without ``error.json``, so the worker tries the attempt again, from the last checkpoint)."""


@contextmanager
def _collective() -> Iterator[None]:
    try:
        yield
    except RuntimeError as e:  # gloo reports a dead peer as a plain RuntimeError, NCCL as DistBackendError
        raise GroupLost(f"{type(e).__name__}: {e}") from e


def launched() -> bool:
    """Whether this process is one of several ``torchrun`` started (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | None = None) -> torch.device:
    """Join the process group ``torchrun`` describes and return this rank's device.

    ``device``: None picks ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU; ``"cuda"`` means this
    rank's GPU. The backend follows the device: NCCL on GPUs, gloo on the CPU. The rank also dies with its
    ``torchrun`` agent (see :mod:`distill.lifetime`). Without ``torchrun`` only the device is chosen.
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if launched() else torch.cuda.current_device())
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"this job runs {os.environ.get('WORLD_SIZE', 1)} processes (schedule.gpus), one per GPU, "
            f"but this machine shows {torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES)"
        )
    if not launched() or dist.is_initialized():
        return dev
    die_with_parent()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group(
        "nccl" if dev.type == "cuda" else "gloo", timeout=timeout, device_id=dev if dev.type == "cuda" else None
    )
    return dev


def teardown() -> None:
    """Leave the process group (a no-op when none was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, progress, logs, the model and its metrics."""
    return rank() == 0


def local_batch(global_batch: int) -> int:
    """This process's share of the global batch (``ScheduleSpec.batch_size``); ValueError when it does not
    split evenly (the spec checks ``gpus``, but ``torchrun`` may have been started with another count)."""
    if global_batch % world():
        raise ValueError(f"batch_size {global_batch} does not split evenly over {world()} processes")
    return global_batch // world()


def barrier() -> None:
    if world() > 1:
        with _collective():
            dist.barrier()


def mean_denominator(local: Tensor, floor: float) -> Tensor:
    """The divisor of a loss that is a mean over the global batch, for this rank's share of it.

    ``local``: this rank's count or weight sum (0-d). One process: ``local.clamp(min=floor)`` (gradient kept,
    as before). ``N`` processes: ``max(sum of the ranks' values, floor) / N`` (detached: a collective carries
    no gradient; every denominator in use is a count or a detached weight), so that the ranks' gradients,
    averaged, are those of the one-process loss (see the module's docstring).
    """
    if world() == 1:
        return local.clamp(min=floor)
    total = local.detach().clone().float()
    with _collective():
        dist.all_reduce(total)
    return total.clamp(min=floor) / world()


def global_sum(values: Tensor) -> Tensor:
    """The sum over the ranks of ``values``, differentiable: its backward sums the ranks' gradients
    (``torch.distributed.nn``), so a statistic of the global batch (CrossKD's alignment moments) trains each
    rank's share of the batch exactly as one process with the whole batch would, once the gradients are
    averaged (:func:`average_gradients`). One process: ``values`` itself."""
    if world() == 1:
        return values
    from torch.distributed.nn.functional import all_reduce

    with _collective():
        return all_reduce(values)


def all_mean(values: Tensor) -> Tensor:
    """The mean over the ranks of ``values`` (any shape; detached). With every loss term in the scale above,
    the mean of the ranks' terms is the term of the global batch (what progress reports)."""
    values = values.detach().clone()
    if world() > 1:
        with _collective():
            dist.all_reduce(values)
        values /= world()
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank: every rank takes the same decision (stop after this step)."""
    if world() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    with _collective():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over the ranks, one all-reduce per dtype and device.

    A parameter without a gradient joins with zeros and leaves with the mean (so every rank sends buffers of
    the same size; with GFL every trained parameter gets a gradient at every step anyway).
    """
    n = world()
    if n == 1:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for ps in groups.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
        with _collective():
            dist.all_reduce(flat)
        flat /= n
        offset = 0
        for p in ps:
            k = p.numel()
            mean = flat[offset : offset + k].view_as(p)
            if p.grad is None:
                p.grad = mean.clone()
            else:
                p.grad.copy_(mean)
            offset += k


def broadcast_state(*modules: nn.Module | None) -> None:
    """Copy rank 0's parameters and buffers of ``modules`` (None: skipped) to every rank, so that all ranks
    start from the same weights whatever each one initialised or loaded."""
    if world() == 1:
        return
    with torch.no_grad(), _collective():
        for module in modules:
            if module is not None:
                for t in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(t.data, src=0)
