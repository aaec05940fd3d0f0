"""Data-parallel training under ``torch.distributed``, as launched by torchrun or accelerate.

Letters in shape comments: N examples (all ranks together), n this rank's examples, W ranks.

adaptbank brings no launcher of its own. A process started by ``torchrun`` (or ``accelerate launch``,
which sets the same variables) finds ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in its environment; :func:`current` then joins the default process group (gloo on CPU,
nccl on GPUs, one per ``LOCAL_RANK``), unless the caller joined one already, and returns the
:class:`Dist` that the training loop, the evaluation and the bank are handed explicitly.

**Same semantics as one process.** Every rank walks the same plan of global batches (same data, same
shuffle seed). A step's batch of M rows is cut into ``grad_accum`` consecutive micro-batches, and each
micro-batch into W consecutive shards, one per rank (:func:`step_parts`). Shard s of m_s rows scores its
mean loss L_s with weight ``w_s = W m_s / M``; DistributedDataParallel averages the gradients over the
ranks, and the micro-batches accumulate, so the update follows::

    grad = 1/W sum_ranks sum_micro w_s grad L_s = 1/M sum_{rows i of the step} grad loss_i

the gradient of the mean loss over the whole step batch, as in one process with ``batch_size *
grad_accum`` rows (up to the order of float additions). A shard left empty by a short last batch
scores its micro-batch's first row with weight 0, so that every rank joins the gradient all-reduce.

**Failures.** Work between two collectives runs inside :func:`together`: a rank whose work raises
still joins the closing agreement (an all-reduce of one flag per rank), so every rank learns of the
failure at the same point and raises (its own error, or :class:`RankFailure` naming the failed ranks).
A rank that dies outright (killed, out of memory) is caught by the launcher, which stops the others,
or by the process group's timeout (``ADAPTBANK_DIST_TIMEOUT`` seconds, default 600): nothing hangs.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

__all__ = ["Dist", "LOCAL", "RankFailure", "LAUNCH_VARS", "current", "timeout_seconds", "check_batch", "split",
           "own", "step_parts", "rank_seed", "together", "gather_rows", "sharded", "all_sum", "on_main", "synced",
           "Synced"]

T = TypeVar("T")

LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun and accelerate set in every process they start."""

DEFAULT_TIMEOUT = 600.0
"""Seconds a collective may wait for the other ranks (longer than the bank lock's default wait, 300 s,
which the commit may spend while the others wait)."""


class RankFailure(RuntimeError):
    """Another rank failed; this one stopped at the same point. Nothing was saved."""


@dataclass(frozen=True)
class Dist:
    """Where this process stands in a data-parallel run: rank, world size, and its device."""

    rank: int = 0
    world: int = 1
    """Number of processes (ranks); 1 is a plain one-process run."""
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    """Where this rank's model runs: the CPU (gloo) or ``cuda:LOCAL_RANK`` (nccl)."""

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes to the bank and prints."""
        return self.rank == 0


LOCAL = Dist()
"""One process: no process group, nothing to synchronise."""


def timeout_seconds() -> float:
    """``ADAPTBANK_DIST_TIMEOUT`` (seconds a collective waits for the others), default 600."""
    raw = os.environ.get("ADAPTBANK_DIST_TIMEOUT", str(DEFAULT_TIMEOUT))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"ADAPTBANK_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def _joined() -> Dist:
    backend = torch_dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", device.index or 0))
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), local, device)


def current() -> Dist:
    """This process's :class:`Dist`: the caller's process group when one is initialised; else, in a
    torchrun/accelerate launch with ``WORLD_SIZE`` > 1, the default group joined here (gloo on CPU, nccl
    when CUDA is available, with a timeout of :func:`timeout_seconds`) and left at exit; else :data:`LOCAL`."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return _joined()
    world = os.environ.get("WORLD_SIZE")
    if world is None or world.strip() == "1":
        return LOCAL
    missing = [v for v in LAUNCH_VARS if not os.environ.get(v)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} says this is a distributed launch, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not set; start it with torchrun or accelerate "
                         f"launch, which set all of {', '.join(LAUNCH_VARS)}")
    try:
        size, rank, local = int(world), int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except ValueError:
        raise ValueError("WORLD_SIZE, RANK and LOCAL_RANK must be integers, got "
                         f"{world!r}, {os.environ['RANK']!r}, {os.environ['LOCAL_RANK']!r}") from None
    if not (size > 1 and 0 <= rank < size and local >= 0):
        raise ValueError(f"need WORLD_SIZE > 1 and 0 <= RANK < WORLD_SIZE, got WORLD_SIZE={size}, RANK={rank}")
    if not torch_dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; install one that has it")
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(local)
    torch_dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(seconds=timeout_seconds()))
    atexit.register(_leave)
    return _joined()


def _leave() -> None:
    """Leave the group joined by :func:`current` at exit: every rank meets at a barrier first, so no rank
    tears its gloo pairs down while a peer still talks to it (a peer already gone fails the barrier at
    once; the exit goes on), then the group is destroyed while the interpreter is fully alive."""
    if not torch_dist.is_initialized():
        return
    gc.collect()  # any DDP reducer still holding the group goes first
    try:
        torch_dist.barrier()
    except Exception:  # noqa: BLE001 - a failed peer: nothing left to wait for
        pass
    torch_dist.destroy_process_group()


def check_batch(batch_size: int, dist: Dist) -> None:
    """``batch_size`` (the global batch) must split evenly over the ranks."""
    if batch_size % dist.world:
        raise ValueError(f"batch_size {batch_size} (--batch-size, the global batch of all ranks together) must be "
                         f"divisible by the {dist.world} ranks (WORLD_SIZE), so that each rank gets the same number "
                         f"of rows; try {max(dist.world, batch_size // dist.world * dist.world)}")


def split(n: int, parts: int) -> list[range]:
    """``range(n)`` in ``parts`` consecutive pieces whose sizes differ by at most one (larger first)."""
    size, extra = divmod(n, parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def own(items: Sequence[T], dist: Dist) -> list[T]:
    """This rank's consecutive block of ``items`` (:func:`split` over the ranks)."""
    return [items[i] for i in split(len(items), dist.world)[dist.rank]]


def step_parts(rows: Sequence[T], accum: int, dist: Dist) -> list[tuple[list[T], float]]:
    """This rank's ``(rows, weight)`` per micro-batch of one optimiser step (see the module docstring)."""
    parts = []
    for micro in split(len(rows), min(accum, len(rows))):
        mine = [rows[micro[i]] for i in split(len(micro), dist.world)[dist.rank]]
        if mine:
            parts.append((mine, dist.world * len(mine) / len(rows)))
        else:  # a short last batch left this rank nothing: join the all-reduce with a zero-weight row
            parts.append(([rows[micro[0]]], 0.0))
    return parts


def rank_seed(seed: int, dist: Dist) -> int:
    """The dropout seed of this rank: ``seed`` in one process, distinct per rank otherwise."""
    return seed * dist.world + dist.rank


def _failed(dist: Dist, failed: bool) -> list[int]:
    flags = torch.zeros(dist.world, dtype=torch.int32, device=dist.device)  # (W,)
    flags[dist.rank] = int(failed)
    torch_dist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]


@contextlib.contextmanager
def together(dist: Dist, where: str) -> Iterator[None]:
    """Run the block on every rank, then agree: if it raised on any rank, it raises on every rank (the
    failed ranks their own error, the others :class:`RankFailure`). The block must hold no collective."""
    if dist.world == 1:
        yield
        return
    try:
        yield
    except BaseException:
        _failed(dist, True)
        raise
    failed = _failed(dist, False)
    if failed:
        raise RankFailure(f"{where}: rank(s) {', '.join(map(str, failed))} of {dist.world} failed (see their error); "
                          f"rank {dist.rank} stopped too; nothing was saved")


def gather_rows(local: Tensor, n: int, dist: Dist) -> Tensor:
    """Every rank's block of rows (this rank's: ``local`` (n_r, ...), its block of :func:`own`) joined in
    order on every rank: (N, ...)."""
    if dist.world == 1:
        return local
    sizes = [len(r) for r in split(n, dist.world)]
    padded = local.new_zeros((sizes[0], *local.shape[1:]), device=dist.device)  # (ceil(N / W), ...)
    padded[: local.shape[0]] = local.to(dist.device)
    out = [torch.empty_like(padded) for _ in sizes]
    torch_dist.all_gather(out, padded)
    return torch.cat([t[:s] for t, s in zip(out, sizes)]).to(local.device)  # (N, ...)


def sharded(dist: Dist, items: Sequence[Any], fn: Callable[[list[Any]], Any], *, where: str) -> Any:
    """``fn`` over this rank's block of ``items``, the results (a tensor (n, ...) or a tuple of them, rows in
    the order of the block) gathered into (N, ...) on every rank: equal to ``fn(items)`` up to float rounding."""
    with together(dist, where):
        local = fn(own(items, dist) if dist.world > 1 else list(items))
    if isinstance(local, tuple):
        return tuple(gather_rows(t, len(items), dist) for t in local)
    return gather_rows(local, len(items), dist)


def all_sum(value: Tensor, dist: Dist) -> Tensor:
    """The sum of ``value`` (a 0-d tensor) over the ranks, on every rank."""
    if dist.world == 1:
        return value
    out = value.detach().to(dist.device, torch.float64)
    torch_dist.all_reduce(out)
    return out.to(value.device, value.dtype)


def on_main(dist: Dist, act: Callable[[], T], *, where: str) -> T:
    """``act()`` on rank 0 only; its result (or failure) is broadcast, so every rank returns the same value
    or raises (rank 0 its own error, the others :class:`RankFailure` with rank 0's message)."""
    if dist.world == 1:
        return act()
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if dist.main:
        try:
            outcome = [("ok", act())]
        except BaseException as err:  # KeyboardInterrupt too: the others must not wait for a commit
            error, outcome = err, [("error", f"{type(err).__name__}: {err}")]
    torch_dist.broadcast_object_list(outcome, src=0, device=dist.device)
    if error is not None:
        raise error
    kind, value = outcome[0]
    if kind == "error":
        raise RankFailure(f"{where}: rank 0 failed ({value}); rank {dist.rank} stopped too")
    return value  # type: ignore[no-any-return]


class _Trainable(nn.Module):
    """The parameters a run trains and nothing else (the model's own Parameter objects, registered here
    too, not copied), as one module that DistributedDataParallel can own; ``forward(fn)`` runs the step."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)

    def forward(self, fn: Callable[[], Tensor]) -> Tensor:
        return fn()


class Synced:
    """``synced(fn)`` computes a step's loss so that its backward pass averages the gradients over the
    ranks (one process: just ``fn()``); ``no_sync(last)`` defers that to the last micro-batch."""

    def __init__(self, params: Sequence[nn.Parameter], dist: Dist) -> None:
        self._ddp: nn.Module | None = None
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: a step may leave some trained parameters out (the heads of tasks a
            # replay batch lacks); broadcast at construction makes every rank start from rank 0's values.
            self._ddp = DistributedDataParallel(_Trainable(params), find_unused_parameters=True)  # no buffers

    def __call__(self, fn: Callable[[], Tensor]) -> Tensor:
        return fn() if self._ddp is None else self._ddp(fn)

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        if self._ddp is None or last:
            return contextlib.nullcontext()
        return self._ddp.no_sync()  # type: ignore[operator]

    def close(self) -> None:
        """Drop the DDP wrapper now (its reducer holds the process group and autograd hooks; left to the
        garbage collector it may outlive the group and die in interpreter shutdown, a gloo abort)."""
        if self._ddp is not None:
            self._ddp = None
            gc.collect()

    def __enter__(self) -> Synced:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def synced(params: Sequence[nn.Parameter], dist: Dist) -> Synced:
    """The gradient averaging of a data-parallel run over ``params`` (see :class:`Synced`)."""
    return Synced(params, dist)
