"""``add-task``: train one task's expert and head, evaluate them, and commit them to the bank atomically.

The body of :meth:`AdapterBank.add_task <adaptbank.bank.facade.AdapterBank.add_task>`, kept apart from the
facade: validate everything first (spec, name, method, router fit, init source), tokenise, one frozen pass
for the probe head and the router's statistics (and, with ``cache_frozen``, the states training starts
from: ``core.frozen_start``), train (``training.loop.train_task``), evaluate, and write the task, its
router share and a shared-A group in one commit. Its profile (seconds per phase) is stored as
``metrics.phase_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptbank._timing import Phases
from adaptbank.bank import init_from as init_source
from adaptbank.bank import router_memory
from adaptbank.bank.store import TaskExistsError
from adaptbank.bank.task_config import task_config
from adaptbank.core.config import LoRAConfig, MethodConfig, TrainConfig
from adaptbank.core.frozen_start import cache_refusal, first_layer
from adaptbank.core.heads import check_head
from adaptbank.data.load import generation_pairs, load_task
from adaptbank.data.specs import TaskSpec, load_task_spec, validate_task_name
from adaptbank.data.tokens import tokenize
from adaptbank.training import distributed
from adaptbank.training.distributed import Dist
from adaptbank.training.evaluate import evaluate_hits
from adaptbank.training.features import frozen_pass, frozen_pass_states
from adaptbank.training.generation import encode_prompts, fit_generation_task
from adaptbank.training.loop import train_task

if TYPE_CHECKING:
    from adaptbank.bank.facade import AdapterBank

__all__ = ["AddResult", "add_task"]


@dataclass
class AddResult:
    """What ``add_task`` did."""

    name: str
    test_accuracy: float
    probe_accuracy: float | None
    trainable_params: int
    bytes_on_disk: int
    seconds: float
    shared_group: str | None
    share_reason: str | None
    n_train: int
    n_test: int
    init_from: dict[str, Any] | None = None
    """``--init-from``: the source task, its distance and why (``bank.init_from``); None for the usual zero start."""
    phase_seconds: dict[str, float] | None = None
    """Where the time went: the stored ``metrics.phase_seconds`` and the commit (written after the config)."""
    test_hits: list[int] | None = None
    """Per test example, 1 when the new task predicted its label (``test_accuracy`` is their mean: the
    vector a paired bootstrap needs); None for a generation task (scored by exact match)."""


def add_task(bank: AdapterBank, spec: TaskSpec | str | Path, method: MethodConfig | None = None,
             train: TrainConfig | None = None, *, name: str | None = None, share_a: str | None = None,
             replace: bool = False, parent: str | None = None,
             on_step: Callable[[int, float], None] | None = None,
             log: Callable[[str], None] | None = None, diagnose: int = 0,
             allow_router_drift: bool = False, dist: Dist | None = None, init_from: str | None = None) -> AddResult:
    """Train task ``spec``'s expert and head, evaluate on its test split, store both atomically.
    ``init_from`` (``"nearest"`` or a task) starts the expert from a stored one (``bank.init_from``).

    ``share_a`` puts a LoRA task in a shared-A group (``"auto"`` picks the most similar group or
    starts one). Everything is validated before training; on any failure the bank is unchanged.
    ``diagnose`` > 0: gradient diagnostics (``train_task``), stored in the config's ``metrics.diagnostics``.
    Replacing an old bank's task (no stored scatter) is refused unless ``allow_router_drift`` (see
    ``bank.router_memory``).

    ``dist`` (None: ``training.distributed.current()``, which joins a torchrun/accelerate launch):
    every rank runs this call with the same arguments; features, training and evaluation are sharded
    over the ranks, rank 0 alone writes (under the bank's lock) and every rank returns its result, or
    raises when any rank failed, the bank unchanged. ``log`` is called on rank 0 only."""
    dist = distributed.current() if dist is None else dist
    say = log if log is not None and dist.main else (lambda _msg: None)
    phases = Phases()  # the profile stored as metrics.phase_seconds
    method = method or LoRAConfig()
    train = train or TrainConfig()
    with distributed.together(dist, "add-task: preparing"):
        spec = spec if isinstance(spec, TaskSpec) else load_task_spec(spec)
        name = validate_task_name(spec.name if name is None else name)
        if name in bank.tasks() and not replace:
            raise TaskExistsError(f"task {name!r} already exists in bank {bank.path}; pass --replace to retrain it")
        if replace:
            router_memory.precheck(bank.store, name, doing="replacing", allow_drift=allow_router_drift)
        if parent is not None and parent not in bank.tasks():
            raise KeyError(f"parent task {parent!r} is not in bank {bank.path}")
        if share_a is not None and not isinstance(method, LoRAConfig):
            raise ValueError(f"--share-a works with --method lora only, not {method.kind!r}")
        if (gen := spec.head == "generation") and diagnose:  # generation: the shared LM head, no head of its own
            raise ValueError("--diagnose works with classification tasks only (its report reads the head's gradients)")
        if gen and dist.world > 1:
            raise ValueError(f"generation task {name!r}: distributed add-task (WORLD_SIZE={dist.world}) trains "
                             "classification tasks only so far; add it in one process")
        data = load_task(spec, max_train=train.max_train, max_test=train.max_test, seed=train.seed)
        start = time.perf_counter()
        phases.mark("data")
        model = bank.new_model()  # the task trains alone: other experts would be frozen anyway
        method = model.resolve_method(method)  # as stored: a prefix's auto positions made concrete
        if init_from is not None:
            init_source.check(bank.store, init_from, method, share_a=share_a)
        if dist.device.type != "cpu":
            model.to(dist.device)
        if gen:  # before any tokenising: an encoder has no LM head, a prompt expert cannot decode with the cache
            check_head(model, name, method, data.labels, "generation")
        if train.cache_frozen and (why := cache_refusal(model, method, spec.head, dist.world)):
            raise ValueError(f"--cache-frozen cannot train task {name!r} on cached layers: {why}")
        phases.mark("model")
        train_ids = (encode_prompts(model, generation_pairs(data, "train")[0], train.max_length) if gen
                     else tokenize(model.tokenizer, [e.text for e in data.train], train.max_length))
        phases.mark("tokenise")
    cached = None
    if train.cache_frozen:  # one process (cache_refusal): the pass also keeps the states the training starts from
        pooled, router_feats, cached = frozen_pass_states(  # (N, D), (N, F), N x (T_i, D)
            model, train_ids, router_layers=bank.router_layers, pools=bank.router_pools,
            capture=first_layer(model, method, spec.head))
    else:
        pooled, router_feats = distributed.sharded(dist, train_ids, lambda part: frozen_pass(  # (N, D), (N, F)
            model, part, router_layers=bank.router_layers, pools=bank.router_pools),
            where=f"task {name!r}: frozen features")
    phases.mark("frozen pass")
    with distributed.together(dist, f"task {name!r}: router memory"):
        memory = router_memory.task_memory(router_feats, bank.router_config.replay)
        mean, count, scatter = task_stats = router_memory.memory_stats(memory)  # (F,), N, (F, F)
        group, reason = (router_memory.choose_group(
            bank.store, share_a, mean, scatter, count, method, dim=bank._router_dim,
            shrinkage=bank.router_config.shrinkage, share_distance=bank.router_config.share_distance)
            if share_a else (None, None))
        owns = group is not None and group not in bank.store.section("shared")
        if group is not None and not owns:
            model.import_shared(group, bank.store.read_shared(group, "A"), method)  # type: ignore[arg-type]
        model.add_task(name, method, data.labels, shared_group=group, seed=train.seed, head=spec.head)
        start_from = init_source.start(bank.store, model, name, init_from, method, task_stats, dim=bank._router_dim,
                                       shrinkage=bank.router_config.shrinkage)
        parent = start_from["task"] if parent is None and start_from else parent
        say(f"{name}: training on {len(data.train)} examples, testing on {len(data.test)}")
    phases.mark("router memory")
    scores: dict[str, float] = {}
    test_hits: list[int] | None = None  # a generation task is scored by exact match, not per-example hits
    if gen:
        result, scores = fit_generation_task(model, name, data, train, on_step=on_step)
        acc = scores["test_exact_match"]  # a generation task's accuracy is its exact match
        phases.mark("training and evaluation")
    else:
        result = train_task(model, name, [e.text for e in data.train], [e.label for e in data.train], train,
                            on_step=on_step, features=init_source.probe_features(model, name, train_ids, pooled,
                                                                                 start_from, dist),
                            diagnose=diagnose, dist=dist, cached=cached)
        phases.mark("training")
        phases.carve("training", "probe", result.probe_seconds)
        test_hits = evaluate_hits(model, name, [e.text for e in data.test], [e.label for e in data.test],
                                  max_length=train.max_length, dist=dist)
        acc = sum(test_hits) / len(test_hits)
        phases.mark("evaluation")
    with distributed.together(dist, f"task {name!r}: before the commit"):
        say(f"{name}: trained {result.steps} steps in {result.seconds:.1f}s")
        files = model.export_task(name)
        files["memory"] = memory
        config = task_config(name, spec, method, train, data, group=group, owns=owns, parent=parent, reason=reason,
                             init_from=start_from, metrics={
            "test_accuracy": acc, "n_train": len(data.train), "n_test": len(data.test),
            "probe_accuracy": result.probe_accuracy, "train_seconds": result.seconds,
            "examples_per_second": result.examples_per_second, "steps": result.steps,
            "trainable_params": sum(p.numel() for p in model.expert_parameters(name)),
            "head_params": sum(p.numel() for p in model.heads[name].parameters()) if name in model.heads else 0,
            "final_loss": result.losses[-1] if result.losses else None, "diagnostics": result.diagnostics,
            "processes": dist.world, "phase_seconds": phases.rounded(), **scores})
        shared_files = {"A": model.export_shared(group)} if owns and group else None

    def commit() -> int:  # rank 0 only; the others wait for its outcome
        bank.store.write_task(name, files, config, shared=group, shared_files=shared_files, replace=replace,
                              router=bank._router_update(add=(name, task_stats), add_kept=memory.get("replay"),
                                                         allow_drift=allow_router_drift))
        bank.store.reload()
        return bank.store.bytes_on_disk(name)

    nbytes = distributed.on_main(dist, commit, where=f"task {name!r}: commit")
    if not dist.main:
        bank.store.reload()  # a bank on a file system all ranks share shows the commit; others keep the old view
    phases.mark("commit")
    return AddResult(name=name, test_accuracy=acc, probe_accuracy=result.probe_accuracy,
                     trainable_params=config["metrics"]["trainable_params"], bytes_on_disk=nbytes,
                     seconds=time.perf_counter() - start, shared_group=group, share_reason=reason,
                     n_train=len(data.train), n_test=len(data.test), init_from=start_from,
                     phase_seconds=phases.rounded(), test_hits=test_hits)
