"""The continual-learning loop: learn the tasks of a run spec in order and fill the accuracy matrix.

A plain loop (avalanche ``Agent``'s pre/post-adapt shape, minGPT's trainer), not a template class::

    baseline b_j  (untrained backbone, initial head j: see strategies.py)
    for i, task in enumerate(tasks):            # resumes after the last finished task
        learn(task i)            -> checkpoint   (the bank itself, or RUN_DIR/checkpoint/state.safetensors)
        R[i][j] for every j      (oracle; routed too for strategies with a router)
        RUN_DIR/result.json      (atomic; "finished": false until the last row)

Resumable: a run killed at any point and restarted with the same spec continues after the last
task whose row is in ``result.json`` (a task learned but not yet evaluated is evaluated, not
relearned). Every task starts from the checkpointed tensors alone, with a fresh optimiser and RNG
seeds derived from the run seed and i, so a resumed run gives the same matrix as an unbroken one.

Files in ``RUN_DIR``: ``run.json`` (the config, written first, and the baseline row),
``result.json`` (schema in :mod:`adaptbank.report.build`), and ``bank/`` or ``checkpoint/``.

A generation run (``RunSpec.head == "generation"``) fills the same matrices with exact match
(``"metric": "exact_match"`` in ``result.json``), so every report reads it unchanged; token F1 goes
beside them in ``result.json["f1"]`` (``{"oracle": {"baseline", "matrix"}, "routed": {"matrix"} | null}``).

Callbacks receive small frozen dataclasses, never the strategy or the model (design §2.4).

Data-parallel runs (torchrun / accelerate launch; ``dist``, see ``training.distributed``): every rank
runs the whole loop with the same spec; training shards each batch over the ranks (DDP over the
trainable parameters, the same global batch and seeds), and every feature pass and evaluation is
sharded and gathered, so every rank holds the same matrix, equal to one process's. Rank 0 alone
touches ``RUN_DIR`` (``run.json``, ``result.json``, the checkpoint, the bank's commits, removing a new
run that failed to start), logs and calls the callbacks; the others read what it wrote only after a
collective, so ``RUN_DIR`` must be on a file system that every rank sees (checked at the start). A
failure on any rank stops every rank at the same point with ``RUN_DIR`` as it was after the last
finished task. Generation runs are refused under ``WORLD_SIZE`` > 1 (run them in one process).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from adaptbank._atomic import atomic_write_bytes
from adaptbank._memory import peak_bytes, reset_peak
from adaptbank.continual.runspec import RunSpec
from adaptbank.continual.strategies import Context, Learned, Strategy, make_strategy
from adaptbank.data.load import load_task
from adaptbank.metrics import AccuracyMatrix, pct
from adaptbank.report.build import SCHEMA_VERSION, load_run
from adaptbank.training import distributed
from adaptbank.training.distributed import Dist

__all__ = ["Callback", "RunStart", "TaskStart", "StepEnd", "TaskEnd", "RunEnd", "run_sequence", "NOTES"]

NOTES = (
    "baseline b_j: the backbone without experts and task j's initial head (random, seeded by the run seed "
    "and j; chance level)",
    "R[i][j] for j > i (a task not yet learned): the model after task i with task j's initial head; for "
    "bank strategies this equals b_j",
    "routed: the router picks the expert(s); tasks not yet learned are not evaluated (null)",
)
GENERATION_NOTE = ("generation tasks: every matrix holds exact match (SQuAD-normalised greedy continuations; "
                   "token F1 in 'f1'); b_j is the untrained model's exact match, and R[i][j] for j > i decodes "
                   "with the model after task i (the bank: no expert, so b_j)")
JOINT_NOTE = ("joint: trained once, in step 0, on all tasks together; later steps train nothing and every "
              "row evaluates that one model")


@dataclass(frozen=True)
class RunStart:
    name: str
    strategy: str
    tasks: tuple[str, ...]
    run_dir: str
    first: int
    """Index of the first task this process works on (> 0 when resuming)."""


@dataclass(frozen=True)
class TaskStart:
    index: int
    task: str


@dataclass(frozen=True)
class StepEnd:
    index: int
    task: str
    step: int
    loss: float


@dataclass(frozen=True)
class TaskEnd:
    index: int
    task: str
    oracle: tuple[float | None, ...]
    routed: tuple[float | None, ...] | None
    router_accuracy: float | None
    trainable_params: int
    bank_bytes: int
    seconds: float


@dataclass(frozen=True)
class RunEnd:
    run_dir: str
    finished: bool
    acc: float
    bwt: float


class Callback(Protocol):
    """Five hooks, each a no-op by default; a callback may define only the ones it needs."""

    def on_run_start(self, event: RunStart) -> None:
        return None

    def on_task_start(self, event: TaskStart) -> None:
        return None

    def on_step_end(self, event: StepEnd) -> None:
        return None

    def on_task_end(self, event: TaskEnd) -> None:
        return None

    def on_run_end(self, event: RunEnd) -> None:
        return None


def _emit(callbacks: Sequence[Any], hook: str, event: object) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(event)


def _emit_together(dist: Dist, callbacks: Sequence[Any], hook: str, event: object,
                   say: Callable[[], None] = lambda: None) -> None:
    """``say()`` and the callbacks (rank 0 holds them), every rank agreeing after: one that raises stops all."""
    with distributed.together(dist, f"callback {hook}"):
        say()
        _emit(callbacks, hook, event)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".") or "(all)"]


def _check_distributed(spec: RunSpec, dist: Dist) -> None:
    """What a data-parallel run cannot do, refused on every rank before anything is written."""
    if dist.world == 1:
        return
    if spec.head == "generation":
        raise ValueError(f"run {spec.name!r} has generation tasks: a distributed run (WORLD_SIZE={dist.world}) "
                         "trains classification tasks only so far, as distributed add-task does; run it in one "
                         "process (plain python, no torchrun/accelerate launch)")
    distributed.check_batch(spec.train.batch_size, dist)


def _start(spec: RunSpec, run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None, bool, bool]:
    """On rank 0: ``(run.json state, result.json or None, RUN_DIR existed, new run)``."""
    existed, fresh = run_dir.exists(), not (run_dir / "run.json").is_file()
    state = _open_run(spec, run_dir)
    result_file = run_dir / "result.json"
    return state, load_run(result_file) if result_file.is_file() else None, existed, fresh


def _open_run(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """The run state (``run.json``): created for a new run, checked against ``spec`` for a resumed one."""
    config = json.loads(json.dumps(spec.to_config()))
    state_file = run_dir / "run.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        changed = _diff(state.get("config"), config)
        if changed:
            raise ValueError(f"{run_dir} holds a run with other settings (differs in: {', '.join(changed[:5])}); "
                             "rerun with the same spec and flags to resume it, or choose a new --out")
        return state
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ValueError(f"{run_dir} exists and is not an adaptbank run directory (no run.json); "
                         "choose a new or empty --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {"schema": 1, "config": config, "baseline": None}
    _write_json(state_file, state)
    return state


def _remove_new_run(run_dir: Path, existed: bool) -> None:
    """Undo a run directory this call created (it was absent or empty before, see ``_open_run``)."""
    if existed:
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    else:
        shutil.rmtree(run_dir, ignore_errors=True)


def _result(spec: RunSpec, baseline: list[float], oracle: list[list[float]], routed: list[list[float | None]] | None,
            steps: list[dict[str, Any]], f1: dict[str, Any] | None, last: dict[str, Any] | None = None) -> dict[str, Any]:
    gen = spec.head == "generation"
    notes = list(NOTES) + ([JOINT_NOTE] if spec.strategy == "joint" else []) + ([GENERATION_NOTE] if gen else [])
    out = {"schema": SCHEMA_VERSION, "name": spec.name, "strategy": spec.strategy, "tasks": list(spec.task_names),
           "seed": spec.seed, "backbone": spec.backbone, "config": spec.to_config(),
           "config_changed": spec.config_changed(), "oracle": {"baseline": baseline, "matrix": oracle},
           "routed": None if routed is None else {"baseline": None, "matrix": routed}, "steps": steps,
           "finished": len(oracle) == len(spec.tasks), "notes": notes,
           "metric": "exact_match" if gen else "accuracy"}
    if gen:
        out["f1"] = f1
    rows = [s.get("router_row") for s in steps]
    if routed is not None and rows and all(r is not None for r in rows):  # runs resumed from before it: none
        out["router_matrix"] = [list(r) + [None] * (len(spec.tasks) - len(r)) for r in rows]  # type: ignore[arg-type]
    out.update(last or {})  # the last row's per-example hits and router confusion (classification runs)
    return out


def _router_row(strategy: Strategy) -> list[float] | None:
    """Task-identification accuracy of each seen task in the routed row just evaluated (the router
    confusion's diagonal over its row sums), or None without one."""
    if strategy.confusion is None:
        return None
    return [row[j] / sum(row) if sum(row) else 0.0 for j, row in enumerate(strategy.confusion)]


def _last_row(strategy: Strategy, task_names: tuple[str, ...]) -> dict[str, Any]:
    """``hits`` and ``router_confusion`` of the row just evaluated (``report.build``'s optional keys), or none."""
    if not strategy.oracle_hits:
        return {}
    out: dict[str, Any] = {"hits": {"oracle": dict(strategy.oracle_hits), "routed": dict(strategy.routed_hits) or None}}
    if strategy.confusion is not None:
        out["router_confusion"] = {"tasks": list(task_names[: len(strategy.confusion)]), "counts": strategy.confusion}
    return out


def _progress(spec: RunSpec, i: int, oracle: list[float], routed: list[float | None] | None,
              router_acc: float | None, info: Learned, seconds: float) -> str:
    """``[2/3] topic: 91.0%; mean over seen 92.5%, routed 90.1%, router 97.0%; 12,288 trainable params; 8.1s``."""
    def p(x: float | None) -> str:
        return pct(x, unit="%", missing="-")

    what = "exact match " if spec.head == "generation" else ""
    line = f"[{i + 1}/{len(spec.tasks)}] {spec.task_names[i]}: {what}{p(oracle[i])}; mean over seen "
    line += p(sum(oracle[: i + 1]) / (i + 1))
    if routed is not None:
        line += f", routed {p(sum(v or 0.0 for v in routed[: i + 1]) / (i + 1))}, router {p(router_acc)}"
    return line + f"; {info.trainable_params:,} trainable params; {seconds:.1f}s"


def run_sequence(spec: RunSpec, out_dir: str | Path, *, callbacks: Sequence[Callback] = (),
                 log: Callable[[str], None] = print, dist: Dist | None = None) -> dict[str, Any]:
    """Run (or resume) ``spec`` in ``out_dir``; returns the ``result.json`` dict.

    Every task's data is loaded before anything trains, so a missing file or a bad label fails first.
    ``dist`` (None: ``training.distributed.current()``, which joins a torchrun/accelerate launch): every
    rank calls this with the same arguments and returns the same matrices; rank 0 alone writes, logs
    and calls ``callbacks`` (see the module docstring).
    """
    dist = distributed.current() if dist is None else dist
    say = log if dist.main else (lambda _msg: None)
    callbacks = callbacks if dist.main else ()
    run_dir = Path(out_dir)
    _check_distributed(spec, dist)  # the same verdict on every rank: no agreement needed
    with distributed.together(dist, "loading the run's tasks"):
        data = tuple(load_task(t, max_train=spec.train.max_train, max_test=spec.train.max_test, seed=spec.seed)
                     for t in spec.tasks)
    state, previous, existed, fresh = distributed.on_main(dist, lambda: _start(spec, run_dir),
                                                          where="opening the run directory")
    with distributed.together(dist, "opening the run directory"):
        if not (run_dir / "run.json").is_file():  # rank 0 wrote it before the collective above
            raise FileNotFoundError(f"rank {dist.rank} cannot see {run_dir / 'run.json'}, which rank 0 wrote: put "
                                    "--out on a file system that every rank shares")
    result_file = run_dir / "result.json"
    oracle: list[list[float]] = [list(r) for r in previous["oracle"]["matrix"]] if previous else []
    routed: list[list[float | None]] | None = None
    if spec.routed:
        routed = [list(r) for r in previous["routed"]["matrix"]] if previous else []
    steps: list[dict[str, Any]] = [dict(s) for s in previous["steps"]] if previous else []
    gen = spec.head == "generation"
    f1: dict[str, Any] | None = None
    if gen:
        before = (previous or {}).get("f1") or {}
        f1 = {"oracle": {"baseline": None, "matrix": [list(r) for r in (before.get("oracle") or {}).get("matrix", [])]},
              "routed": {"matrix": [list(r) for r in (before.get("routed") or {}).get("matrix", [])]}
              if routed is not None else None}
    if "routed" in spec.eval and not spec.routed:
        say(f"note: strategy {spec.strategy} has no router; reporting oracle accuracy only")

    strategy: Strategy = make_strategy(Context(spec=spec, run_dir=run_dir, data=data, log=say, dist=dist))
    try:
        learned = strategy.open()
        main_learned = distributed.on_main(dist, lambda: learned, where="opening the run")
        with distributed.together(dist, "opening the run"):
            if learned != main_learned:
                raise RuntimeError(f"rank {dist.rank} finds {learned} learned task(s) in {run_dir}, rank 0 finds "
                                   f"{main_learned}: put --out on a file system that every rank shares")
        if state["baseline"] is None:
            state["baseline"], state["baseline_f1"] = strategy.evaluate_baseline()
            distributed.on_main(dist, lambda: _write_json(run_dir / "run.json", state), where="writing run.json")
    except BaseException:
        if fresh and dist.main:  # nothing learned yet: leave no half-made run behind (a bad backbone, Ctrl-C)
            _remove_new_run(run_dir, existed)
        raise
    done = len(oracle)
    if learned not in (done, done + 1):  # the same on every rank: both counts were agreed above
        raise RuntimeError(f"{run_dir}: the checkpoint holds {learned} learned task(s) but result.json has {done} "
                           "row(s); the run directory is inconsistent, start again with a new --out")
    baseline: list[float] = state["baseline"]
    if f1 is not None:
        f1["oracle"]["baseline"] = state.get("baseline_f1")
    if done:
        say(f"resuming {spec.name} after task {done} of {len(spec.tasks)} ({spec.task_names[done - 1]})")
    _emit_together(dist, callbacks, "on_run_start", RunStart(spec.name, spec.strategy, spec.task_names, str(run_dir), done))

    for i in range(done, len(spec.tasks)):
        task = spec.task_names[i]
        _emit_together(dist, callbacks, "on_task_start", TaskStart(i, task))
        start = time.perf_counter()
        peak_known = reset_peak()  # this task's peak resident memory (learning and evaluation), where /proc has it
        if i >= learned:
            def on_step(step: int, loss: float, i: int = i, task: str = task) -> None:  # inside fit's agreement
                _emit(callbacks, "on_step_end", StepEnd(i, task, step, loss))

            info: Learned = strategy.learn(i, on_step)
            strategy.save(i + 1)
        else:
            info = strategy.recall(i)
        row, row_f1 = strategy.evaluate_oracle(i, (baseline, state.get("baseline_f1")))
        oracle.append(row)  # type: ignore[arg-type]
        router_acc = None
        if routed is not None:
            routed_row, routed_f1, router_acc = strategy.evaluate_routed(i)
            routed.append(routed_row)
            if f1 is not None and f1["routed"] is not None:
                f1["routed"]["matrix"].append(routed_f1)
        if f1 is not None:
            f1["oracle"]["matrix"].append(row_f1)
        seconds = time.perf_counter() - start
        peak = peak_bytes() if peak_known else None
        last = _last_row(strategy, spec.task_names)
        router_row = _router_row(strategy) if routed is not None else None
        learned_hits = list(strategy.oracle_hits[task]) if task in strategy.oracle_hits else None  # R[i][i] per example

        def record(task: str = task, router_acc: float | None = router_acc, info: Learned = info,
                   seconds: float = seconds, peak: int | None = peak, last: dict[str, Any] = last,
                   router_row: list[float] | None = router_row,
                   learned_hits: list[int] | None = learned_hits) -> dict[str, Any]:  # rank 0: the entry, result.json
            entry = {"task": task, "router_accuracy": router_acc, "router_row": router_row, "learned_hits": learned_hits,
                     "trainable_params": info.trainable_params,
                     "bank_bytes": strategy.size_bytes(), "seconds": seconds, "train_steps": info.train_steps,
                     "final_loss": info.final_loss, "peak_memory_bytes": peak}
            _write_json(result_file, _result(spec, baseline, oracle, routed, [*steps, entry], f1, last))
            return entry

        steps.append(distributed.on_main(dist, record, where=f"writing result.json after task {task!r}"))
        size, line = steps[-1]["bank_bytes"], _progress(spec, i, oracle[-1], None if routed is None else routed[-1],
                                                        router_acc, info, seconds)
        _emit_together(dist, callbacks, "on_task_end", TaskEnd(i, task, tuple(oracle[-1]),
                                                               None if routed is None else tuple(routed[-1]),
                                                               router_acc, info.trainable_params, size, seconds),
                       lambda line=line: say(line))

    kept = {k: previous[k] for k in ("hits", "router_confusion") if previous and previous.get(k) is not None}
    result = _result(spec, baseline, oracle, routed, steps, f1, _last_row(strategy, spec.task_names) or kept)
    summary = AccuracyMatrix(spec.task_names, tuple(map(tuple, oracle)), tuple(baseline)).summary()
    if done == len(spec.tasks):
        say(f"{spec.name} was already finished in {run_dir}; nothing to do")
    _emit_together(dist, callbacks, "on_run_end", RunEnd(str(run_dir), result["finished"], summary["acc"], summary["bwt"]))  # type: ignore[arg-type]
    return result
