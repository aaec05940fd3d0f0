"""A torchrun worker for tests/test_distributed.py: ``add_task`` through the library with an ``on_step``
callback that raises on one chosen rank at one chosen step (the test's fault, from its command line;
nothing in the library knows of it). Every rank writes what it raised to ``OUT/rank<r>.txt``, waits for
the others at a barrier (so the launcher does not stop a rank before it reports) and exits 1.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_dist_worker.py BANK OUT FAIL_RANK STEP [die]

With ``die`` the chosen rank ends at once (``os._exit(3)``, like a crash or the out-of-memory killer),
joining no agreement: the other ranks must notice by themselves.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist

from adaptbank.bank.facade import AdapterBank
from adaptbank.core.config import LoRAConfig, TrainConfig


def main() -> int:
    bank, out, fail_rank, fail_step = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    die = sys.argv[5:] == ["die"]
    train = TrainConfig(epochs=1, max_train=48, max_test=16, max_length=32, batch_size=8, train_dropout=False)
    rank = -1

    def on_step(step: int, loss: float) -> None:
        if rank == fail_rank and step == fail_step and die:
            os._exit(3)
        if rank == fail_rank and step == fail_step:
            raise RuntimeError(f"simulated fault on rank {rank} at step {step}")

    b = AdapterBank.open(bank, lock_timeout=1.0)
    try:
        from adaptbank.training.distributed import current

        rank = current().rank
        b.add_task("weather", LoRAConfig(rank=4, dropout=0.0), train, on_step=on_step)
    except Exception as err:  # noqa: BLE001 - the report is the point
        (out / f"rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")
        if not die:
            dist.barrier()
        return 1
    (out / f"rank{rank}.txt").write_text("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
