"""The single-learner baselines: seq-lora, seq-full, ewc, replay, olora and joint.

Letters in shape comments: B batch, D hidden size, E experts, r LoRA rank, I layer input features.

Methods, references and equations are in the docstring of :mod:`adaptbank.continual.strategies`.
Each is a small composition over :class:`SeqLoRA`'s machinery: heads start from the task's initial
head and become a probe on the current features (``probe_init``); training is the one loop
(``training.loop.fit``) with the strategy's parameter groups, its loss terms (EWC's penalty, O-LoRA's
orthogonality: ``training.regularizers``) and its data wrapper (replay's buffer rows); the checkpoint
is one safetensors file (``RUN_DIR/checkpoint/state.safetensors``: the persisted parameters, the
strategy's state, and what each step trained) rewritten atomically after every task.

Generation runs (``continual.generation``): no heads and no probe; rows are ``prompt + target + EOS``,
the loss is ``generation_loss`` over the hidden states that :meth:`SeqLoRA._hidden` returns under the
same gates as ``_features``, and the matrix is scored by greedy decoding under :meth:`SeqLoRA._gates`.

Data-parallel runs (``Context.dist``): ``fit`` shards every batch; the probe's features and the oracle
rows are sharded and gathered; rank 0 alone writes the checkpoint (every rank reads it on resume). EWC's
Fisher and replay's buffer are computed on every rank, identically: the same rows, and parameters that
DDP keeps equal on every rank (the same averaged gradients, the same optimiser), so they equal one process's.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor

from adaptbank._atomic import atomic_write_bytes
from adaptbank.continual.base import Context, Learned, OnStep, Scores, Strategy
from adaptbank.continual.generation import target_log_likelihood, train_rows
from adaptbank.core.adapted import AdaptedLinear
from adaptbank.core.backbone import load_backbone
from adaptbank.core.experts import LoRAExpert
from adaptbank.core.heads import ClassificationHead
from adaptbank.core.model import AdaptBankModel
from adaptbank.core.seeding import seeded
from adaptbank.data.tokens import tokenize
from adaptbank.training import distributed
from adaptbank.training.evaluate import head_hits
from adaptbank.training.features import probe_head
from adaptbank.training.generation import generation_loss
from adaptbank.training.loop import LossTerm, Row, epoch_batches, fit, total_steps
from adaptbank.training.regularizers import (
    EWCPenalty,
    OrthogonalityPenalty,
    class_balanced,
    fisher_diagonal,
    with_replay,
)

__all__ = ["LEARNER", "SeqLoRA", "SeqFull", "EWC", "Replay", "OLoRA", "Joint"]

LEARNER = "_learner"
"""Name of the one shared expert of seq-lora/ewc/replay/joint; task names cannot start with '_'."""


class SeqLoRA(Strategy):
    """One LoRA learner expert trained on task after task, one head per task."""

    name = "seq-lora"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.infos: dict[int, Learned] = {}
        self._rows: dict[int, list[Row]] = {}
        self.path = ctx.run_dir / "checkpoint" / "state.safetensors"

    # -- what the subclasses change
    def _build(self) -> AdaptBankModel:
        model = AdaptBankModel(load_backbone(self.spec.backbone))
        model.add_task(LEARNER, self.spec.method, ("_a", "_b"), seed=self.spec.seed,
                       head="generation" if self.generation else "classification")
        return model

    def _route(self, batch: dict[str, Tensor]) -> None:
        """The gates every training and evaluation batch runs under: the learner expert."""
        self.model.route(task=LEARNER)

    def _gates(self) -> dict[str, Any]:
        """The same gates for ``generate`` (generation runs): ``{"gate": name}`` or ``{"experts": names}``."""
        return {"gate": LEARNER}

    def _features(self, batch: dict[str, Tensor]) -> Tensor:
        self._route(batch)
        return self.model.features(**batch)  # (B, D)

    def _hidden(self, batch: dict[str, Tensor]) -> Tensor:
        """Generation runs: the decoder's hidden states under the gates of ``_route`` (an encoder-decoder's:
        its encoder's; the decoder runs in ``generation_loss``)."""
        self._route(batch)
        return self.model.encoder(**batch).last_hidden_state  # (B, T, D)

    def _new_task(self, task: str) -> None:
        """Give ``task`` its head, starting from the initial head (generation tasks have none)."""
        if self.generation:
            return
        self.model.add_head(task, self.ctx.data[self.tasks.index(task)].labels)
        self.model.heads[task].load_state_dict(self.init_heads[task].state_dict())

    def _head_params(self, tasks: Iterable[str]) -> list[Any]:
        """The head parameters of ``tasks`` (none in a generation run: the LM head is frozen and shared)."""
        return [] if self.generation else [p for t in tasks for p in self.model.heads[t].parameters()]

    def _groups(self, i: int) -> list[dict[str, Any]]:
        return [{"params": self.model.expert_parameters(LEARNER), "lr": self.spec.train.lr, "name": "expert"},
                {"params": self._head_params([self.tasks[i]]), "lr": self.spec.train.head_lr, "name": "head"}]

    def _loss_terms(self, i: int) -> list[LossTerm]:
        """Extra loss terms while task ``i`` trains (EWC, O-LoRA)."""
        return []

    def _plan(self, i: int, plan: Iterable[list[Row]]) -> Iterable[list[Row]]:
        """The batches task ``i`` trains on (replay adds buffer rows to each)."""
        return plan

    def _after(self, i: int) -> None:
        """Runs after task ``i`` is trained (EWC: Fisher; replay: fill the buffer)."""

    def _persist(self, name: str) -> bool:
        return ".experts." in name or name.startswith("heads.")

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {}, {}

    def _load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        pass

    # -- shared machinery
    def rows(self, j: int) -> list[Row]:
        if j not in self._rows:
            d = self.ctx.data[j]
            if self.generation:
                self._rows[j] = train_rows(self.model, d, d.spec.name, self.spec.train.max_length)
                return self._rows[j]
            ids = tokenize(self.model.tokenizer, [e.text for e in d.train], self.spec.train.max_length)
            self._rows[j] = [Row(x, e.label, d.spec.name) for x, e in zip(ids, d.train, strict=True)]
        return self._rows[j]

    def open(self) -> int:
        with distributed.together(self.dist, "opening the run's model and checkpoint"):
            return self._open()

    def _open(self) -> int:
        self._setup(self._build())
        if not self.path.is_file():
            return 0
        with safe_open(str(self.path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("strategy") != self.name:
            raise ValueError(f"{self.path} is a checkpoint of strategy {meta.get('strategy')!r}, not {self.name!r}")
        learned = int(meta["learned"])
        self.infos = {int(k): Learned(**v) for k, v in json.loads(meta["infos"]).items()}
        for task in self._structure(learned):
            self._new_task(task)
        model_part = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        names = [n for n, _ in self.model.named_parameters()]
        unexpected = sorted(set(model_part) - set(names))
        missing = [n for n in names if self._persist(n) and n not in model_part]
        if unexpected or missing:
            raise ValueError(f"{self.path} does not fit the model: unexpected {unexpected[:3]}, missing {missing[:3]}; "
                             "was it written by another version? Use a new --out")
        self.model.load_state_dict(model_part, strict=False)
        self._load_state({k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")},
                         json.loads(meta.get("state", "{}")))
        return learned

    def _structure(self, learned: int) -> tuple[str, ...]:
        """Tasks whose heads (or experts) exist after ``learned`` tasks."""
        return self.tasks[:learned]

    def learn(self, i: int, on_step: OnStep) -> Learned:
        with distributed.together(self.dist, f"task {self.tasks[i]!r}: preparing"), seeded(self.spec.seed + i):
            self._new_task(self.tasks[i])
        return self._train(i, [i], self.rows(i), on_step)

    def _train(self, i: int, new: list[int], rows: list[Row], on_step: OnStep) -> Learned:
        cfg, what = self.spec.train_config(), f"task {self.tasks[i]!r}"
        if cfg.probe_init and not self.generation:
            for j in new:
                feats = self._encode([r.ids for r in self.rows(j)], self._features, where=f"{what}: probe")  # (N, D)
                with distributed.together(self.dist, f"{what}: probe"):  # the same fit on every rank
                    probe_head(self._head(self.tasks[j]), feats, [r.label for r in self.rows(j)], seed=cfg.seed,
                               c=cfg.probe_c, scale=cfg.probe_scale)
        with distributed.together(self.dist, f"{what}: preparing"):
            groups, seed = self._groups(i), self.spec.seed + i
            plan = self._plan(i, epoch_batches(rows, cfg, seed))
            terms = self._loss_terms(i)
        extra: dict[str, Any] = {"features": self._hidden, "loss": generation_loss} if self.generation else {
            "features": self._features}
        res = fit(self.model, plan, steps=total_steps(len(rows), cfg), groups=groups, cfg=cfg, seed=seed, what=what,
                  loss_terms=terms, on_step=on_step, dropout=cfg.train_dropout, dist=self.dist, **extra)
        with distributed.together(self.dist, f"{what}: after training"):
            self._after(i)
        n_params = sum(p.numel() for g in groups for p in g["params"])
        self.infos[i] = Learned(n_params, res.steps, res.losses[-1] if res.losses else None)
        return self.infos[i]

    def recall(self, i: int) -> Learned:
        return self.infos[i]

    def save(self, learned: int) -> None:
        """Rank 0 writes the checkpoint (atomically); the other ranks wait for it and share its outcome."""
        distributed.on_main(self.dist, lambda: self._write(learned), where=f"checkpoint after {learned} task(s)")

    def _write(self, learned: int) -> None:
        tensors = {f"model.{n}": p.detach().clone().contiguous() for n, p in self.model.named_parameters()
                   if self._persist(n)}
        extra, state = self._state()
        tensors.update({f"state.{k}": v.detach().clone().contiguous() for k, v in extra.items()})
        meta = {"strategy": self.name, "learned": str(learned), "state": json.dumps(state),
                "infos": json.dumps({str(k): dataclasses.asdict(v) for k, v in sorted(self.infos.items())})}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, safetensors_save(tensors, metadata=meta))

    def _head(self, task: str) -> ClassificationHead:
        return self.model.heads[task] if task in self.model.heads else self.init_heads[task]  # type: ignore[return-value]

    def oracle_row(self, i: int, baseline: list[float]) -> list[float]:
        self.oracle_hits = {t: head_hits(self._head(t), self._encode(self.test_ids[j], self._features,
                                                                     where=f"evaluating {t!r}"), self._labels(j))
                            for j, t in enumerate(self.tasks)}
        return [sum(h) / len(h) for h in self.oracle_hits.values()]

    def gen_oracle(self, i: int, baseline: Scores) -> Scores:
        """Exact match and F1 of every task, seen or not, decoded under the learner's gates."""
        pairs = [self._score(j, **self._gates()) for j in range(len(self.tasks))]
        return [e for e, _ in pairs], [f for _, f in pairs]

    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path.is_file() else 0


class SeqFull(SeqLoRA):
    """Full fine-tuning of every backbone weight, task after task."""

    name = "seq-full"

    def _build(self) -> AdaptBankModel:
        return AdaptBankModel(load_backbone(self.spec.backbone))

    def _route(self, batch: dict[str, Tensor]) -> None:
        self.model.route()  # no expert: the backbone itself trains

    def _gates(self) -> dict[str, Any]:
        return {"experts": ()}

    def _groups(self, i: int) -> list[dict[str, Any]]:
        return [{"params": list(self.model.backbone.parameters()), "lr": self.spec.train.lr, "name": "backbone"},
                {"params": self._head_params([self.tasks[i]]), "lr": self.spec.train.head_lr, "name": "head"}]

    def _persist(self, name: str) -> bool:
        return True


class EWC(SeqLoRA):
    """seq-lora plus the EWC penalty on the learner's parameters (see the module docstring)."""

    name = "ewc"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.fisher: dict[str, list[Tensor]] = {}
        self.star: dict[str, list[Tensor]] = {}

    def _loss_terms(self, i: int) -> list[LossTerm]:
        done = [t for t in self.tasks[:i] if t in self.fisher]  # sequence order: a fixed summation order
        if not done:
            return []
        return [EWCPenalty(self.model.expert_parameters(LEARNER), [self.fisher[t] for t in done],
                           [self.star[t] for t in done], self.spec.options.ewc_lambda)]

    def _after(self, i: int) -> None:
        task, rows = self.tasks[i], self.rows(i)
        picked = sorted(random.Random(self.spec.seed + i).sample(range(len(rows)), min(len(rows),
                                                                                       self.spec.options.ewc_samples)))
        params = self.model.expert_parameters(LEARNER)
        how: dict[str, Any] = ({"features": self._hidden, "log_likelihood": target_log_likelihood} if self.generation
                               else {"features": self._features})
        self.fisher[task] = fisher_diagonal(self.model, [rows[k] for k in picked], params, **how)
        self.star[task] = [p.detach().clone() for p in params]

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        out: dict[str, Tensor] = {}
        for t in self.fisher:
            out |= {f"fisher.{t}.{k}": f for k, f in enumerate(self.fisher[t])}
            out |= {f"star.{t}.{k}": s for k, s in enumerate(self.star[t])}
        return out, {"ewc_tasks": list(self.fisher)}

    def _load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        n = len(self.model.expert_parameters(LEARNER))
        for t in meta.get("ewc_tasks", []):
            self.fisher[t] = [tensors[f"fisher.{t}.{k}"] for k in range(n)]
            self.star[t] = [tensors[f"star.{t}.{k}"] for k in range(n)]


class Replay(SeqLoRA):
    """seq-lora plus experience replay from a bounded, class-balanced buffer."""

    name = "replay"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.buffer: dict[str, list[int]] = {}

    def _buffered(self, i: int) -> list[int]:
        return [j for j in range(i) if self.tasks[j] in self.buffer]

    def _groups(self, i: int) -> list[dict[str, Any]]:
        groups = super()._groups(i)
        groups[1]["params"] += self._head_params(self.tasks[j] for j in self._buffered(i))
        return groups

    def _plan(self, i: int, plan: Iterable[list[Row]]) -> Iterable[list[Row]]:
        pool = [self.rows(j)[k] for j in self._buffered(i) for k in self.buffer[self.tasks[j]]]
        if not pool:
            return plan
        return with_replay(plan, pool, min(self.spec.train.batch_size, len(pool)), (self.spec.seed + i) * 7919)

    def _after(self, i: int) -> None:
        """A class-balanced buffer of the task's training rows."""
        self.buffer[self.tasks[i]] = class_balanced(self.rows(i), self.spec.options.replay_per_task, self.spec.seed + i)

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {}, {"buffer": self.buffer}

    def _load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.buffer = {k: list(v) for k, v in meta.get("buffer", {}).items()}


class OLoRA(SeqLoRA):
    """A new LoRA expert per task, kept orthogonal to the older ones; all experts on at inference."""

    name = "olora"

    def _build(self) -> AdaptBankModel:
        return AdaptBankModel(load_backbone(self.spec.backbone))

    def _route(self, batch: dict[str, Tensor]) -> None:
        n, b = len(self.model.tasks), batch["input_ids"].shape[0]
        if n == 0:
            self.model.route()
        else:
            device = batch["input_ids"].device
            index = torch.arange(n, device=device).expand(b, n)  # (B, E): every expert so far
            self.model.route(index=index, weight=torch.ones(b, n, device=device))  # (B, E) weight 1 each

    def _gates(self) -> dict[str, Any]:
        return {"experts": tuple(self.model.tasks)}

    def _new_task(self, task: str) -> None:
        labels = self.ctx.data[self.tasks.index(task)].labels
        if self.generation:
            self.model.add_task(task, self.spec.method, labels, head="generation")
            return
        self.model.add_task(task, self.spec.method, labels)
        self.model.heads[task].load_state_dict(self.init_heads[task].state_dict())

    def _groups(self, i: int) -> list[dict[str, Any]]:
        task = self.tasks[i]
        return [{"params": self.model.expert_parameters(task), "lr": self.spec.train.lr, "name": "expert"},
                {"params": self._head_params([task]), "lr": self.spec.train.head_lr, "name": "head"}]

    def _loss_terms(self, i: int) -> list[LossTerm]:
        lam1, lam2 = self.spec.options.olora_lambda, self.spec.options.olora_l2
        task, old = self.tasks[i], self.tasks[:i]
        if (not old or lam1 == 0) and lam2 == 0:
            return []
        pairs = [(_lora_A(layer, task), _lora_A(layer, t))  # (r, I) each
                 for layer in self.model.layers_of(task).values() for t in old]
        return [OrthogonalityPenalty(pairs, self.model.expert_parameters(task), lam1, lam2)]


def _lora_A(layer: AdaptedLinear, name: str) -> Tensor:
    expert = layer.experts[name]
    if not isinstance(expert, LoRAExpert):
        raise TypeError(f"olora needs LoRA experts; task {name!r} has {type(expert).__name__}")
    return expert.A  # (r, I)


class Joint(SeqLoRA):
    """Multi-task training on all tasks at once (the upper bound): trained once, in step 0."""

    name = "joint"

    def _structure(self, learned: int) -> tuple[str, ...]:
        return self.tasks if learned else ()

    def _groups(self, i: int) -> list[dict[str, Any]]:
        return [{"params": self.model.expert_parameters(LEARNER), "lr": self.spec.train.lr, "name": "expert"},
                {"params": self._head_params(self.tasks), "lr": self.spec.train.head_lr, "name": "head"}]

    def learn(self, i: int, on_step: OnStep) -> Learned:
        if i > 0:  # everything was learned in step 0; the row evaluates the same model again
            self.infos[i] = Learned(0, 0, None)
            return self.infos[i]
        with distributed.together(self.dist, "joint: preparing"), seeded(self.spec.seed):
            for t in self.tasks:
                self._new_task(t)
        rows = [r for j in range(len(self.tasks)) for r in self.rows(j)]
        return self._train(0, list(range(len(self.tasks))), rows, on_step)

