"""A torchrun worker for tests/test_distributed.py: ``adaptbank run SPEC --out OUT`` through the CLI, with
a fault on one chosen rank (the test's, from its command line; nothing in the library knows of it):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_dist_run_worker.py SPEC OUT REPORTS FAIL_RANK WHERE

WHERE is ``baseline`` (the rank's baseline features raise: the run has not started) or ``step:N`` (the
rank's N-th optimiser step of the run raises, inside training). At a ``step:N`` fault the failing rank
first records ``tree_digest(OUT)`` in ``REPORTS/digest.json`` (rank 0 then waits in the step's agreement,
so nothing is being written). Every rank writes its exit code and its stderr to ``REPORTS/rank<r>.txt``,
waits for the others at a barrier (so the launcher stops no rank before it reports) and exits with that code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as torch_dist

import adaptbank.continual.base as base
import adaptbank.training.loop as loop
from adaptbank.cli.main import main as cli


def tree_digest(path: Path) -> dict[str, str]:
    """conftest.tree_digest, restated: importing conftest would give this process its own ADAPTBANK_CONFIG_DIR
    (and so its own allow file, without the base that rank 0's bank init allowed)."""
    return {str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}


def main() -> int:
    spec, out, reports, fail_rank, where = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    rank = int(os.environ["RANK"])
    if rank == fail_rank and where == "baseline":
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"simulated fault on rank {rank} in the baseline")

        base.encode = broken  # type: ignore[assignment]
    elif rank == fail_rank:
        at, apply_step, calls = int(where.split(":")[1]), loop.apply_step, [0]

        def faulty(*args: Any, **kwargs: Any) -> None:
            calls[0] += 1
            if calls[0] == at:
                (reports / "digest.json").write_text(json.dumps(tree_digest(out)))
                raise RuntimeError(f"simulated fault on rank {rank} at step {at} of the run")
            apply_step(*args, **kwargs)

        loop.apply_step = faulty  # type: ignore[assignment]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli.main(["run", spec, "--out", str(out)], prog_name="adaptbank", standalone_mode=True)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    (reports / f"rank{rank}.txt").write_text(f"{code}\n{err.getvalue()}")
    if torch_dist.is_initialized():
        torch_dist.barrier()
    return code


if __name__ == "__main__":
    sys.exit(main())
