"""The strategy interface and what every strategy shares: the run context, initial heads, the baseline.

Letters in shape comments: B batch, D hidden size.

A strategy is driven by the loop (``loop.py``) through six methods, in this order::

    open() -> learned               build the model, or resume it from RUN_DIR (returns tasks already learned)
    evaluate_baseline()             b_j for every task (only for a new run)
    learn(i, on_step)               train task i          } per task, from the first
    save(i + 1)                     checkpoint            } one not yet in result.json
    evaluate_oracle(i, baseline)    R[i][j] for all j     }
    evaluate_routed(i)              routed R[i][j], router accuracy (bank strategies only)

Data-parallel runs (``Context.dist``, torchrun/accelerate): every rank runs every method with the same
arguments; training shards each batch (``training.loop.fit``), every feature pass and evaluation is
sharded over the ranks and gathered (:meth:`Strategy._encode`, ``training.distributed.sharded``), so
every rank holds the same rows, and local work that could fail runs inside ``distributed.together``
so that a failure on one rank stops all. Only rank 0 writes (``save``, the bank's commit).

The ``evaluate_*`` methods return ``(scores, f1)``: accuracies and None for a classification run
(``baseline``, ``oracle_row``, ``routed_row``), exact matches and token F1s for a generation run
(``gen_oracle``, ``gen_routed``; see ``continual.generation``).

Initial heads (classification): every task j gets a random head seeded by the run seed and j alone,
identical for all strategies. ``b_j`` is the backbone without experts with that head (chance level);
an unseen task is evaluated with the current features and its initial head (see ``strategies.py``).
A generation run has no heads: ``b_j`` is the untrained model's exact match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import Tensor

from adaptbank.continual.generation import GenTask, gen_task, score
from adaptbank.continual.runspec import RunSpec
from adaptbank.core.heads import ClassificationHead, check_head
from adaptbank.core.model import AdaptBankModel
from adaptbank.core.seeding import seeded
from adaptbank.data.load import TaskData
from adaptbank.data.tokens import tokenize
from adaptbank.training import distributed
from adaptbank.training.distributed import LOCAL, Dist
from adaptbank.training.evaluate import head_accuracy
from adaptbank.training.features import encode

__all__ = ["Context", "Learned", "Strategy", "initial_heads", "OnStep", "Scores"]

OnStep = Callable[[int, float], None]
Scores = tuple[list[float | None], list[float | None] | None]
"""``(row, f1)``: accuracies (classification; f1 None) or exact matches and token F1s (generation)."""


@dataclass(frozen=True)
class Learned:
    """What one learning step trained."""

    trainable_params: int
    train_steps: int
    final_loss: float | None


@dataclass(frozen=True)
class Context:
    """What a strategy gets: the spec, its run directory, the loaded tasks, a log function (called on
    rank 0 only in a data-parallel run) and where this process stands in the run (:class:`Dist`)."""

    spec: RunSpec
    run_dir: Path
    data: tuple[TaskData, ...]
    log: Callable[[str], None]
    dist: Dist = LOCAL


def initial_heads(model: AdaptBankModel, data: tuple[TaskData, ...], seed: int) -> dict[str, ClassificationHead]:
    """One fresh random head per task, seeded by ``seed`` and the task's position only (global RNG untouched)."""
    heads = {}
    device = next(model.parameters()).device
    for j, d in enumerate(data):
        with seeded(seed * 1_000_003 + 17 + j):
            heads[d.spec.name] = ClassificationHead(model.hidden_size, len(d.labels)).to(device).eval()
    return heads


class Strategy:
    """Common state and evaluation helpers; subclasses implement the learning."""

    name: ClassVar[str] = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.spec = ctx.spec
        self.tasks = ctx.spec.task_names
        self.model: AdaptBankModel
        self.init_heads: dict[str, ClassificationHead] = {}
        self.test_ids: list[list[list[int]]] = []
        self.generation = ctx.spec.head == "generation"
        self.gen: list[GenTask] = []
        """Generation runs: each task's test prompts, targets and decoding limit."""
        self.oracle_hits: dict[str, list[int]] = {}
        """Classification runs: per test example of each task evaluated in the last ``oracle_row``, 1 when
        right (``result.json`` ``hits.oracle``, for the paired bootstrap); tasks copied from the baseline
        (a bank's unseen tasks) have none."""
        self.routed_hits: dict[str, list[int]] = {}
        """The same for the last ``routed_row`` (``hits.routed``)."""
        self.confusion: list[list[int]] | None = None
        """The last ``routed_row``'s router confusion: ``[true task][routed expert]`` counts over the seen tasks."""

    @property
    def dist(self) -> Dist:
        return self.ctx.dist

    def _placed(self, model: AdaptBankModel) -> AdaptBankModel:
        """``model`` on this rank's device (a GPU rank's ``cuda:LOCAL_RANK``; the CPU: unchanged)."""
        return model.to(self.dist.device) if self.dist.device.type != "cpu" else model

    def _encode(self, ids: Sequence[list[int]], features: Callable[[dict[str, Tensor]], Tensor], *,
                where: str) -> Tensor:
        """Pooled features (N, D) of ``ids`` under ``features``' gates: each rank encodes its block of
        rows, and every rank gets all of them (one process: ``encode`` itself)."""
        return distributed.sharded(self.dist, list(ids), lambda part: encode(self.model, part, features),
                                   where=where)  # (N, D)

    def _setup(self, model: AdaptBankModel) -> None:
        self.model = model = self._placed(model)
        if self.generation:  # an encoder backbone or a prompt/prefix method is refused before anything trains
            check_head(model, self.tasks[0], self.spec.method, (), "generation")
            self.gen = [gen_task(model, d) for d in self.ctx.data]
            return
        self.init_heads = initial_heads(model, self.ctx.data, self.spec.seed)
        length = self.spec.train.max_length
        self.test_ids = [tokenize(model.tokenizer, [e.text for e in d.test], length) for d in self.ctx.data]

    def _score(self, j: int, model: AdaptBankModel | None = None, *, gate: str | None = None,
               experts: tuple[str, ...] | None = None) -> tuple[float, float]:
        """Exact match and token F1 of generation task j under ``gate`` or ``experts`` (see ``score``)."""
        return score(model or self.model, self.gen[j], max_length=self.spec.train.max_length, gate=gate,
                     experts=experts)

    def _labels(self, j: int) -> list[int]:
        return [e.label for e in self.ctx.data[j].test]

    def _plain(self, batch: dict[str, Tensor]) -> Tensor:
        self.model.route()
        return self.model.features(**batch)  # (B, D) of the backbone without experts

    def baseline(self) -> list[float]:
        """``b_j``: the backbone without experts, with task j's initial head (chance level)."""
        return [head_accuracy(self.init_heads[t], self._encode(self.test_ids[j], self._plain, where=f"baseline {t!r}"),
                              self._labels(j)) for j, t in enumerate(self.tasks)]

    # ------------------------------------------------------------------ the interface the loop uses
    def evaluate_baseline(self) -> Scores:
        """``b_j`` for every task: chance-level heads, or the untrained model's exact match and F1."""
        if not self.generation:
            return list(self.baseline()), None
        pairs = [self._score(j, experts=()) for j in range(len(self.tasks))]
        return [e for e, _ in pairs], [f for _, f in pairs]

    def evaluate_oracle(self, i: int, baseline: Scores) -> Scores:
        """``R[i][j]`` for every task j with the true task id (and F1 for a generation run)."""
        if not self.generation:
            return list(self.oracle_row(i, baseline[0])), None  # type: ignore[arg-type]
        return self.gen_oracle(i, baseline)

    def evaluate_routed(self, i: int) -> tuple[list[float | None], list[float | None] | None, float]:
        """Routed ``R[i][j]`` for the seen tasks (None for the others), their F1 (generation) and the
        router's task-identification accuracy."""
        if not self.generation:
            row, acc = self.routed_row(i)
            return row, None, acc
        return self.gen_routed(i)

    def gen_oracle(self, i: int, baseline: Scores) -> Scores:
        raise NotImplementedError

    def gen_routed(self, i: int) -> tuple[list[float | None], list[float | None], float]:
        raise ValueError(f"strategy {self.name!r} has no router; routed evaluation needs bank or shared-a")

    def open(self) -> int:
        """Build the model, or resume it from ``run_dir``; returns how many tasks are already learned."""
        raise NotImplementedError

    def learn(self, i: int, on_step: OnStep) -> Learned:
        raise NotImplementedError

    def recall(self, i: int) -> Learned:
        """What step ``i`` trained, for a step learned before a restart."""
        raise NotImplementedError

    def save(self, learned: int) -> None:
        """Checkpoint after ``learned`` tasks."""
        raise NotImplementedError

    def oracle_row(self, i: int, baseline: list[float]) -> list[float]:
        raise NotImplementedError

    def routed_row(self, i: int) -> tuple[list[float | None], float]:
        raise ValueError(f"strategy {self.name!r} has no router; routed evaluation needs bank or shared-a")

    def size_bytes(self) -> int:
        raise NotImplementedError

