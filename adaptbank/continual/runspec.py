"""Run specs: one TOML file that says which tasks to learn in which order, how, and how to score it.

A run spec (``tasks/runs/*.toml``) is data only; nothing in it is executed::

    [run]
    name = "builtin"                       # the run's name in reports
    backbone = "sentence-transformers/all-MiniLM-L6-v2"
    tasks = ["weather", "reviews", "intent"]   # task spec names (tasks/<name>.toml) or .toml paths
    strategy = "bank"                      # see STRATEGIES
    seed = 0                               # data subsets use it; the learners reseed with seed + i per task
    eval = ["oracle", "routed"]            # oracle is always computed; routed needs a router (bank, shared-a)

    [method]                               # LoRAConfig / AdapterConfig fields; kind defaults to "lora"
    kind = "lora"                          # or a combination, "lora+adapter" with [[method.parts]] tables
    rank = 8                               # (see ``core.config``)

    [train]                                # TrainConfig fields (not seed: that is [run] seed)
    epochs = 2
    max_train = 300

    [options]                              # optional: StrategyOptions fields
    ewc_lambda = 100000.0

Everything is validated when the spec is loaded, before any model is: unknown keys (with the
closest valid key), unknown task specs, unknown strategies, an empty or repeated task list and bad
eval modes are ``ValueError`` naming the value. CLI flags override a loaded spec through
:meth:`RunSpec.with_overrides`, which records what changed (``config_changed`` in ``result.json``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptbank._limits import MAX_SPEC_BYTES, read_small_text
from adaptbank.core.config import LoRAConfig, MethodConfig, TrainConfig, check_keys, method_from_dict
from adaptbank.data.specs import TaskSpec, find_spec_file, list_task_specs, load_task_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["STRATEGIES", "ROUTED_STRATEGIES", "EVAL_MODES", "StrategyOptions", "RunSpec", "load_run_spec",
           "run_spec_from_toml", "run_spec_from_dict"]

STRATEGIES: tuple[str, ...] = ("bank", "shared-a", "seq-lora", "seq-full", "ewc", "replay", "olora", "joint")
"""Continual-learning strategies (see :mod:`adaptbank.continual.strategies`)."""

ROUTED_STRATEGIES: tuple[str, ...] = ("bank", "shared-a")
"""Strategies with a learned router, and so a routed (task-id-free) evaluation."""

EVAL_MODES: tuple[str, ...] = ("oracle", "routed")

DEFAULT_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
"""Same as ``backbone.DEFAULT_BACKBONE``, repeated so that this module (and the CLI) loads without torch."""

_LORA_ONLY = ("shared-a", "olora")
_TOP_KEYS = ("run", "method", "train", "options")
_RUN_KEYS = ("name", "backbone", "tasks", "strategy", "seed", "eval")


@dataclass(frozen=True, kw_only=True)
class StrategyOptions:
    """Settings that only some strategies read (the ``[options]`` table)."""

    ewc_lambda: float = 1e5
    """EWC penalty strength lambda in ``lambda/2 * sum_i F_i (theta_i - theta*_i)^2`` (raw empirical
    Fisher: mean squared per-example gradient, no normalisation). Chosen from the measured scale on
    MiniLM with rank-8 qv LoRA (builtin tasks, 100 examples, 1 epoch): Fisher entries have mean 2e-6,
    median 1e-7 and max 6e-4, and one task's unconstrained drift gives ``sum F d^2`` of about 3e-7. So
    lambda = 5e3 leaves a penalty of ~1e-3 (no effect); 1e5 pulls the high-Fisher entries back hard
    (gradient ``lambda F_i d_i``) while low-Fisher ones stay free; 1e6 was also stable. Sweep it
    (1e4 .. 1e6) for a new backbone or method: the scale follows the gradients, not a constant. A task
    fitted to confident predictions drives the Fisher towards zero: on the tiny BERT of
    ``tests/test_baselines.py`` (task fitted to accuracy 1.0) entries average 1e-11 and lambda must be
    about 1e11 before EWC has any effect."""
    ewc_samples: int = 200
    """Training examples per finished task used to estimate its diagonal Fisher."""
    replay_per_task: int = 50
    """Replay buffer size per finished task (a class-balanced sample of its training split)."""
    olora_lambda: float = 0.5
    """O-LoRA orthogonality weight lambda_1 on ``sum_layers sum_old ||A_new A_old^T||_F^2`` (paper: 0.5)."""
    olora_l2: float = 0.0
    """O-LoRA L2 weight lambda_2 on the new expert's parameters (paper: 0 or small)."""
    init_from: str | None = None
    """``bank`` only: ``"nearest"`` starts each new expert from the stored expert nearest to its task in the
    router's feature space (``add-task --init-from nearest``, ``bank.init_from``); None: from zero."""

    def __post_init__(self) -> None:
        for name in ("ewc_lambda", "olora_lambda", "olora_l2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"options.{name} must be a number >= 0, got {value!r}")
        for name in ("ewc_samples", "replay_per_task"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"options.{name} must be a positive integer, got {value!r}")
        if self.init_from not in (None, "nearest"):
            raise ValueError(f"options.init_from must be \"nearest\" or absent (start from zero), got {self.init_from!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One continual-learning run: the task sequence, the strategy and every setting it trains with."""

    name: str
    """Run name shown in reports."""
    tasks: tuple[TaskSpec, ...]
    """The task sequence, resolved to task specs; names must be unique."""
    backbone: str = DEFAULT_BACKBONE
    """Backbone for every strategy: a local folder, a .gguf file or the bundled default."""
    strategy: str = "bank"
    """One of :data:`STRATEGIES` (--strategy)."""
    seed: int = 0
    """Run seed (--seed). Every task's data subset (max_train/max_test) is drawn with it, so a task has
    the same examples at any position in the sequence and runs of different orders compare; training
    of task i is seeded from it (``train_config``; the learner strategies reseed with ``seed + i``)."""
    eval: tuple[str, ...] = ("oracle", "routed")
    """Evaluation modes; oracle is always computed, routed only for strategies with a router."""
    method: MethodConfig = field(default_factory=LoRAConfig)
    """The expert kind and its settings (``[method]``)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training settings (``[train]``); their seed is the run seed (see :meth:`train_config`)."""
    options: StrategyOptions = field(default_factory=StrategyOptions)
    """Strategy-specific settings (``[options]``)."""
    changed: tuple[tuple[str, Any, Any], ...] = ()
    """``(key, spec value, new value)`` for every CLI override that changed the spec."""
    source: str = "<string>"
    """Where the spec came from (a path), for messages."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"{self.source}: run name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"{self.source}: backbone must be a non-empty string, got {self.backbone!r}")
        if not self.tasks:
            raise ValueError(f"{self.source}: the task sequence is empty; [run] tasks needs at least one task")
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"{self.source}: duplicate task(s) {', '.join(dupes)} in the sequence {names}; "
                             "each task may appear once")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"{self.source}: unknown strategy {self.strategy!r} (--strategy); allowed: "
                             f"{', '.join(STRATEGIES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{self.source}: seed must be an integer (--seed), got {self.seed!r}")
        if not self.eval or isinstance(self.eval, str):
            raise ValueError(f"{self.source}: eval must be a non-empty list from {list(EVAL_MODES)}, got {self.eval!r}")
        for mode in self.eval:
            if mode not in EVAL_MODES:
                raise ValueError(f"{self.source}: unknown eval mode {mode!r}; allowed: {', '.join(EVAL_MODES)}")
        if len(set(self.eval)) != len(self.eval):
            raise ValueError(f"{self.source}: eval lists a mode twice: {list(self.eval)}")
        kinds = {t.head for t in self.tasks}
        if len(kinds) > 1:
            gen = [t.name for t in self.tasks if t.head == "generation"]
            cls = [t.name for t in self.tasks if t.head == "classification"]
            raise ValueError(f"{self.source}: the run mixes generation tasks {gen} with classification tasks {cls}; "
                             "a run takes one kind (its matrix holds accuracy or exact match): pose the "
                             "classification tasks as generation (pose = \"generation\" and a template) or "
                             "run the two kinds separately")
        if self.options.init_from is not None and self.strategy != "bank":
            raise ValueError(f"{self.source}: options.init_from = {self.options.init_from!r} needs strategy 'bank' "
                             f"(independent experts in a bank), got {self.strategy!r}")
        if self.strategy in _LORA_ONLY and not isinstance(self.method, LoRAConfig):
            raise ValueError(f"{self.source}: strategy {self.strategy!r} needs method kind 'lora', got "
                             f"{self.method.kind!r}")

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def head(self) -> str:
        """``"generation"`` when the tasks are generation tasks (scored by exact match), else
        ``"classification"`` (scored by accuracy); a run never mixes the two."""
        return self.tasks[0].head

    @property
    def routed(self) -> bool:
        """True when this run evaluates with the learned router."""
        return "routed" in self.eval and self.strategy in ROUTED_STRATEGIES

    def train_config(self) -> TrainConfig:
        """The settings every task trains with: ``[train]`` with the run seed. The seed stays the same
        for every task because ``AdapterBank.add_task`` also subsamples the data with it."""
        return dataclasses.replace(self.train, seed=self.seed)

    def to_config(self) -> dict[str, Any]:
        """Everything that determines the run's numbers, JSON-ready (``config`` in ``result.json``)."""
        return {"tasks": list(self.task_names), "task_specs": [t.to_dict() for t in self.tasks],
                "backbone": self.backbone, "strategy": self.strategy, "seed": self.seed, "eval": list(self.eval),
                "method": self.method.to_dict(), "train": {k: v for k, v in self.train.to_dict().items()
                                                            if k != "seed"},
                "options": self.options.to_dict()}

    def config_changed(self) -> dict[str, list[Any]]:
        """``{key: [spec value, new value]}`` of the CLI overrides (``config_changed`` in ``result.json``)."""
        return {key: [old, new] for key, old, new in self.changed}

    def with_overrides(self, *, strategy: str | None = None, max_train: int | None = None,
                       max_test: int | None = None, epochs: float | None = None, seed: int | None = None,
                       max_length: int | None = None, backbone: str | None = None,
                       init_from: str | None = None) -> RunSpec:
        """A copy with the given CLI flags applied (None leaves a setting as it is); validated again."""
        train_kw: dict[str, Any] = {k: v for k, v in (("max_train", max_train), ("max_test", max_test), ("epochs", epochs),
                                                      ("max_length", max_length)) if v is not None}
        run_kw: dict[str, Any] = {k: v for k, v in (("strategy", strategy), ("seed", seed), ("backbone", backbone))
                                  if v is not None}
        changed = dict((k, (old, new)) for k, old, new in self.changed)
        for key, value in [*train_kw.items(), *run_kw.items()]:
            old = getattr(self.train, key) if key in train_kw else getattr(self, key)
            if old != value:
                first = changed.get(key, (old, value))[0]
                changed[key] = (first, value)
        options = self.options
        if init_from is not None and init_from != options.init_from:
            changed["init_from"] = (changed.get("init_from", (options.init_from, None))[0], init_from)
            options = dataclasses.replace(options, init_from=init_from)
        train = dataclasses.replace(self.train, **train_kw) if train_kw else self.train
        return dataclasses.replace(self, train=train, options=options, changed=tuple(
            (k, o, n) for k, (o, n) in changed.items() if o != n), **run_kw)


def _resolve_task(entry: object, base_dir: Path | None, source: str) -> TaskSpec:
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"{source}: every entry of [run] tasks must be a task name or a .toml path, got {entry!r}")
    looks_like_path = entry.endswith(".toml") or "/" in entry or os.sep in entry
    target: str | Path = entry
    if looks_like_path and base_dir is not None and not Path(entry).expanduser().is_absolute():
        target = base_dir / entry
    try:
        return load_task_spec(target)
    except ValueError as err:  # SpecNotFoundError is a ValueError: name the run spec too
        raise ValueError(f"{source}: unknown task {entry!r}: {err}") from None


def run_spec_from_dict(doc: dict[str, Any], *, source: str = "<string>", base_dir: str | Path | None = None) -> RunSpec:
    """Build a :class:`RunSpec` from a parsed TOML document (tables ``run``, ``method``, ``train``, ``options``)."""
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: a run spec must be a table, got {type(doc).__name__}")
    check_keys(doc, _TOP_KEYS, f"run spec {source}")
    tables: dict[str, dict[str, Any]] = {}
    for key in _TOP_KEYS:
        value = doc.get(key, {})
        if not isinstance(value, dict):
            raise ValueError(f"{source}: [{key}] must be a table, got {value!r}")
        tables[key] = value
    run = tables["run"]
    check_keys(run, _RUN_KEYS, f"[run] of {source}")
    for required in ("name", "tasks"):
        if required not in run:
            raise ValueError(f"{source}: [run] needs {required!r}")
    tasks = run["tasks"]
    if isinstance(tasks, str) or not isinstance(tasks, list):
        raise ValueError(f"{source}: [run] tasks must be a list of task names, got {tasks!r}")
    if not tasks:
        raise ValueError(f"{source}: the task sequence is empty; [run] tasks needs at least one task")
    if "seed" in tables["train"]:
        raise ValueError(f"{source}: put the seed in [run] (seed = {tables['train']['seed']!r}), not in [train]; "
                         "it seeds the data subsets and the training of every task")
    base = Path(base_dir) if base_dir is not None else None
    try:
        given = tables["method"]
        method = method_from_dict(given if "kind" in given or "parts" in given else {"kind": "lora", **given})
        train = TrainConfig.from_dict(tables["train"])
        check_keys(tables["options"], [f.name for f in dataclasses.fields(StrategyOptions)], f"[options] of {source}")
        options = StrategyOptions(**tables["options"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: {err}") from None
    eval_modes = run.get("eval", ["oracle", "routed"])
    if isinstance(eval_modes, str) or not isinstance(eval_modes, list):
        raise ValueError(f"{source}: [run] eval must be a list from {list(EVAL_MODES)}, got {eval_modes!r}")
    # Cheap checks first, so that a bad strategy is named before task specs are looked up.
    if run.get("strategy", "bank") not in STRATEGIES:
        raise ValueError(f"{source}: unknown strategy {run.get('strategy')!r} (--strategy); allowed: "
                         f"{', '.join(STRATEGIES)}")
    specs = tuple(_resolve_task(t, base, source) for t in tasks)
    return RunSpec(name=run["name"], tasks=specs, backbone=run.get("backbone", DEFAULT_BACKBONE),
                   strategy=run.get("strategy", "bank"), seed=run.get("seed", 0), eval=tuple(eval_modes),
                   method=method, train=train, options=options, source=source)


def run_spec_from_toml(text: str, *, source: str = "<string>", base_dir: str | Path | None = None) -> RunSpec:
    """Parse TOML text into a :class:`RunSpec`; relative task paths resolve against ``base_dir``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{source}: invalid TOML: {err}") from None
    return run_spec_from_dict(doc, source=source, base_dir=base_dir)


def load_run_spec(path: str | os.PathLike[str]) -> RunSpec:
    """Load and validate a run spec: a ``.toml`` file, or the name of a shipped one (``builtin``,
    ``runs/builtin``, ``standard5-order1``...) looked up in the ``runs/`` folder of each spec directory
    (``ADAPTBANK_TASKS``, then the specs inside the package)."""
    raw = os.fspath(path)
    file: Path | None = Path(raw).expanduser()
    if not file.is_file():  # type: ignore[union-attr]
        name = raw[: -len(".toml")] if raw.endswith(".toml") else raw
        name = name[len("runs/"):] if name.startswith("runs/") else name
        file = find_spec_file(name, "runs") if "/" not in name and os.sep not in name else None
    if file is None or not file.is_file():
        raise ValueError(f"run spec {raw!r} not found: not a file, nor a shipped run spec; available: "
                         f"{', '.join(list_task_specs('runs')) or '(none)'}")
    text = read_small_text(file, MAX_SPEC_BYTES, "run spec")
    return run_spec_from_toml(text, source=str(file), base_dir=file.resolve().parent)
