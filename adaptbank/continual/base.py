"""The strategy interface and what every strategy shares: the run context, initial heads, the baseline.

Letters in shape comments: B batch, D hidden size.

A strategy is driven by the loop (``loop.py``) through six methods, in this order::

    open() -> learned          build the model, or resume it from RUN_DIR (returns tasks already learned)
    baseline()                 b_j for every task (only for a new run)
    learn(i, on_step)          train task i          } per task, from the first
    save(i + 1)                checkpoint            } one not yet in result.json
    oracle_row(i, baseline)    R[i][j] for all j     }
    routed_row(i)              routed R[i][j], router accuracy (bank strategies only)

Initial heads: every task j gets a random head seeded by the run seed and j alone, identical for all
strategies. ``b_j`` is the backbone without experts with that head (chance level); an unseen task
is evaluated with the current features and its initial head (see ``strategies.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import Tensor

from adaptbank.continual.runspec import RunSpec
from adaptbank.core.heads import ClassificationHead
from adaptbank.core.model import AdaptBankModel
from adaptbank.core.seeding import seeded
from adaptbank.data.load import TaskData
from adaptbank.data.tokens import tokenize
from adaptbank.training.evaluate import head_accuracy
from adaptbank.training.features import encode

__all__ = ["Context", "Learned", "Strategy", "initial_heads", "OnStep"]

OnStep = Callable[[int, float], None]


@dataclass(frozen=True)
class Learned:
    """What one learning step trained."""

    trainable_params: int
    train_steps: int
    final_loss: float | None


@dataclass(frozen=True)
class Context:
    """What a strategy gets: the spec, its run directory, the loaded tasks and a log function."""

    spec: RunSpec
    run_dir: Path
    data: tuple[TaskData, ...]
    log: Callable[[str], None]


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

    def _setup(self, model: AdaptBankModel) -> None:
        self.model = model
        self.init_heads = initial_heads(model, self.ctx.data, self.spec.seed)
        length = self.spec.train.max_length
        self.test_ids = [tokenize(model.tokenizer, [e.text for e in d.test], length) for d in self.ctx.data]

    def _labels(self, j: int) -> list[int]:
        return [e.label for e in self.ctx.data[j].test]

    def _plain(self, batch: dict[str, Tensor]) -> Tensor:
        self.model.route()
        return self.model.features(**batch)  # (B, D) of the backbone without experts

    def baseline(self) -> list[float]:
        """``b_j``: the backbone without experts, with task j's initial head (chance level)."""
        return [head_accuracy(self.init_heads[t], encode(self.model, self.test_ids[j], self._plain), self._labels(j))
                for j, t in enumerate(self.tasks)]

    # ------------------------------------------------------------------ the interface the loop uses
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

