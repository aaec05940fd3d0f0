"""Continual-learning strategies over one frozen backbone: the bank and the baselines it is compared to.

Every strategy learns the tasks of a :class:`RunSpec` in order, with the same backbone, method and
:class:`TrainConfig`, and a head per task. Each is a small class with ``open`` (build or resume),
``learn(i)``, ``save`` (checkpoint), ``oracle_row(i)`` (accuracy on every task of the sequence with
the true task id) and, for the two strategies with a router, ``routed_row(i)``:

- ``bank``: an :class:`AdapterBank` in ``RUN_DIR/bank``, one independent expert per task; older
  experts never change, so with the true task id there is no forgetting (BWT = 0 exactly).
- ``shared-a``: the bank with every task in one shared-A group (HydraLoRA's asymmetric LoRA, Tian
  et al. 2024, arXiv:2404.19245): A is trained by the first task and frozen, later tasks train B.
- ``seq-lora``: ONE LoRA expert fine-tuned task after task (the naive sequential baseline).
- ``seq-full``: full fine-tuning of the backbone, task after task, at ``[train] lr`` (the LoRA default
  5e-4 is high for full fine-tuning; 1e-5 .. 5e-5 is usual).
- ``ewc``: seq-lora plus Elastic Weight Consolidation (Kirkpatrick et al. 2017, arXiv:1612.00796) on
  the LoRA parameters: ``loss + lambda/2 * sum_{t finished} sum_i F_t,i (theta_i - theta*_t,i)^2``,
  with ``F_t`` the diagonal empirical Fisher (mean squared per-example gradient of log p(y|x), true
  labels, as avalanche does) on ``ewc_samples`` training examples of task t.
- ``replay``: seq-lora plus experience replay (Chaudhry et al. 2019, arXiv:1902.10486): a
  class-balanced buffer of ``replay_per_task`` training examples per finished task; every step adds
  ``batch_size`` buffer rows to the batch, each scored by its own task's head (trained too).
- ``olora``: O-LoRA (Wang et al. 2023, arXiv:2310.14152): a new LoRA expert per task, all older ones
  frozen and active; ``loss + lambda_1 * sum_layers sum_old ||A_new A_old^T||_F^2 + lambda_2 ||theta_new||^2``.
  At inference every expert so far is on with weight 1; the true task picks the head.
- ``joint``: multi-task training on all tasks at once (one LoRA + per-task heads, mixed batches), the
  upper bound. It trains once, in step 0, on every task; later steps train nothing, so every row
  evaluates that one model (BWT = 0; FWT is large because every task was seen from the start).

Baseline and unseen tasks. Every task j gets an *initial head*: a randomly initialised head seeded
from the run seed and j alone (the same for every strategy). The baseline ``b_j`` is the untrained
backbone (no expert) with that head: chance level. A task not yet learned is evaluated with the
current model's features and its initial head, so ``R[i][j]`` for ``j > i`` is comparable with
``b_j`` (FWT as in GEM). For the bank an unseen task has no expert, so ``R[i][j] = b_j`` exactly.
When a task is learned its head starts from the initial head, then (``probe_init``) becomes a
logistic-regression probe on the current features, as in ``training.loop.train_task``.

Generation runs (every task a generation task, or posed as one): the same strategies, with the loss on
the target tokens through the frozen shared LM head and exact match in the matrix (token F1 beside
it); see :mod:`adaptbank.continual.generation`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from adaptbank.bank.facade import AdapterBank
from adaptbank.continual.base import Context, Learned, OnStep, Scores, Strategy
from adaptbank.continual.generation import routed_scores
from adaptbank.continual.learners import EWC, Joint, OLoRA, Replay, SeqFull, SeqLoRA
from adaptbank.core.model import AdaptBankModel
from adaptbank.routing.predict import predict, routed_hit
from adaptbank.training import distributed
from adaptbank.training.evaluate import evaluate_hits

__all__ = ["BankStrategy", "SharedAStrategy", "STRATEGY_CLASSES", "make_strategy"]


# ---------------------------------------------------------------------------------------------- bank
class BankStrategy(Strategy):
    """Independent experts in an :class:`AdapterBank`; the bank on disk is the checkpoint."""

    name = "bank"
    share_a: ClassVar[str | None] = None

    def open(self) -> int:
        """Rank 0 creates ``RUN_DIR/bank`` for a new run; then every rank opens it."""
        path = self.ctx.run_dir / "bank"

        def init() -> None:
            if not path.exists():
                AdapterBank.init(path, base=self.spec.backbone)

        distributed.on_main(self.dist, init, where="creating the run's bank")
        with distributed.together(self.dist, "opening the run's bank"):
            self.bank = AdapterBank.open(path)
            held = self.bank.tasks()
            if held != list(self.tasks[: len(held)]):
                raise ValueError(f"{path} holds tasks {held}, which are not a prefix of the run's sequence "
                                 f"{list(self.tasks)}; use a new --out")
            self._setup(self.bank.new_model())
        return len(held)

    def learn(self, i: int, on_step: OnStep) -> Learned:
        """``add_task`` trains data-parallel over the ranks and commits on rank 0 (``AdapterBank.add_task``)."""
        self.bank.add_task(self.ctx.data[i].spec, self.spec.method, self.spec.train_config(), share_a=self.share_a,
                           on_step=on_step, dist=self.dist, init_from=self.spec.options.init_from)
        return self.recall(i)

    def _loaded(self, routed: bool = False) -> AdaptBankModel:
        """The bank's model (with its router), on this rank's device; every rank reads the bank."""
        with distributed.together(self.dist, "loading the run's bank"):
            return self._placed(self.bank.load_routed() if routed else self.bank.load())

    def recall(self, i: int) -> Learned:
        m = self.bank.info(self.tasks[i])["metrics"]
        return Learned(m["trainable_params"] + m["head_params"], m["steps"], m["final_loss"])

    def save(self, learned: int) -> None:
        """Nothing to do: ``add_task`` committed the task atomically."""

    def oracle_row(self, i: int, baseline: list[float]) -> list[float]:
        model, length = self._loaded(), self.spec.train.max_length
        self.oracle_hits = {t: evaluate_hits(model, t, [e.text for e in self.ctx.data[j].test], self._labels(j),
                                             max_length=length, dist=self.dist) for j, t in enumerate(self.tasks[: i + 1])}
        return [sum(h) / len(h) for h in self.oracle_hits.values()] + baseline[i + 1:]

    def gen_oracle(self, i: int, baseline: Scores) -> Scores:
        """Exact match and F1 of every seen task with its own expert (loaded from the bank); an unseen
        task has no expert, so its scores are the baseline's."""
        model = self.bank.load()
        pairs = [self._score(j, model, gate=t) if j <= i else (baseline[0][j], baseline[1][j])  # type: ignore[index]
                 for j, t in enumerate(self.tasks)]
        return [e for e, _ in pairs], [f for _, f in pairs]

    def gen_routed(self, i: int) -> tuple[list[float | None], list[float | None], float]:
        """Exact match and F1 per seen task with the router choosing each prompt's experts in the prefill
        (no task ids), and the router's task-identification accuracy."""
        em, f1, acc = routed_scores(self.bank.load_routed(), self.gen[: i + 1], max_length=self.spec.train.max_length)
        pad: list[float | None] = [None] * (len(self.tasks) - i - 1)
        return [*em, *pad], [*f1, *pad], acc

    def routed_row(self, i: int) -> tuple[list[float | None], float]:
        """Accuracy per seen task with the router choosing experts, and the router's task-id accuracy.

        A prediction counts when its label name is right and it came from the true task's head, or
        from a head with the identical label list (then the label names mean the same).

        Data-parallel: each rank predicts its block of the test rows and scores it as (task hit, label
        hit) per row; the hits are gathered, so every rank computes the same row."""
        model = self._loaded(routed=True)
        labels = {t: tuple(self.ctx.data[j].labels) for j, t in enumerate(self.tasks)}
        items = [(e.text, j, e.label) for j in range(i + 1) for e in self.ctx.data[j].test]

        def score(part: list[tuple[str, int, int]]) -> Tensor:
            preds = predict(model, [text for text, _, _ in part], max_length=self.spec.train.max_length) if part else []
            return torch.tensor([[p.task == self.tasks[j], routed_hit(p.task, p.label, self.tasks[j],
                                                                        labels[self.tasks[j]][y], labels),
                                  self.tasks.index(p.task)]
                                 for p, (_, j, y) in zip(preds, part, strict=True)], dtype=torch.long).reshape(-1, 3)

        hits = distributed.sharded(self.dist, items, score, where=f"routed evaluation after task {i + 1}")  # (N, 3)
        owners = torch.tensor([j for _, j, _ in items])  # (N,)
        self.routed_hits = {self.tasks[j]: hits[owners == j, 1].tolist() for j in range(i + 1)}
        self.confusion = [[int(((owners == j) & (hits[:, 2] == k)).sum()) for k in range(i + 1)] for j in range(i + 1)]
        row: list[float | None] = [sum(h) / len(h) for h in self.routed_hits.values()]
        return row + [None] * (len(self.tasks) - i - 1), int(hits[:, 0].sum()) / len(items)

    def size_bytes(self) -> int:
        return self.bank.store.bytes_on_disk()


class SharedAStrategy(BankStrategy):
    """The bank with all tasks in one shared-A group."""

    name = "shared-a"
    share_a = "shared"


STRATEGY_CLASSES: dict[str, type[Strategy]] = {c.name: c for c in (BankStrategy, SharedAStrategy, SeqLoRA, SeqFull,
                                                                    EWC, Replay, OLoRA, Joint)}


def make_strategy(ctx: Context) -> Strategy:
    """The strategy ``ctx.spec.strategy`` names (validated by the spec)."""
    return STRATEGY_CLASSES[ctx.spec.strategy](ctx)
