"""The two configs that are not a method: how a task trains (:class:`TrainConfig`) and how a bank routes
(:class:`RouterConfig`). Frozen, validated dataclasses like every config (``core.config_base``), re-exported
by ``core.config``, where callers import them from."""

from __future__ import annotations

from dataclasses import dataclass

from adaptbank.core.config_base import _Config, _positive

__all__ = ["TrainConfig", "RouterConfig", "ROUTER_POOLS"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig(_Config):
    """Training settings for one task's expert and head."""

    epochs: float = 3.0
    """Passes over the training split; fractions allowed (--epochs)."""
    lr: float = 5e-4
    """AdamW learning rate of the expert (--lr)."""
    head_lr: float = 2e-3
    """AdamW learning rate of the classification head (--head-lr)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup: float = 0.06
    """Fraction of steps with linear warm-up; the rest decays linearly to zero."""
    batch_size: int = 16
    """Examples per forward pass, all processes together (a distributed run gives each of its W ranks
    batch_size / W of them); an optimiser step takes batch_size * grad_accum examples (--batch-size)."""
    grad_accum: int = 1
    """Micro-batches of batch_size examples whose gradients accumulate into one optimiser step: the step
    equals one of batch_size * grad_accum examples, up to float rounding (--grad-accum)."""
    max_length: int = 128
    """Tokens per example after truncation (--max-length)."""
    max_train: int | None = None
    """Use at most this many training examples (--max-train)."""
    max_test: int | None = None
    """Evaluate on at most this many test examples (--max-test)."""
    seed: int = 0
    """Seed for shuffling and dropout in ``train_task``, and for the expert's and head's initialisation
    where the bank creates them (``AdaptBankModel.add_task(seed=...)``) (--seed)."""
    probe_init: bool = True
    """Initialise the head as a logistic-regression probe on frozen features before training (LP-FT,
    Kumar et al. 2022): the expert starts from the linear probe's accuracy instead of a random head."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value (0 disables)."""
    train_dropout: bool = True
    """Dropout on while training (the backbone's, the expert's, the head's); off, training runs in eval
    mode and a run reproduces across process counts and --grad-accum up to float rounding
    (--train-dropout/--no-train-dropout)."""
    probe_c: float | None = None
    """Inverse L2 strength C of the probe head's logistic regression (scikit-learn's C). None: chosen
    from 0.01, 0.1, 1 by log-loss on a held-out quarter of the training split
    (``training.features.choose_probe_c``): scikit-learn's fixed C = 1 over-fits review tasks (amazon:
    82% train, 35% validation) and leaves the expert little to learn, while C = 0.1 costs the
    150-class task points (README, "Training defaults")."""
    probe_scale: float = 0.5
    """The probe head's weights and bias are multiplied by this before training: a softer start keeps
    the probe's direction but leaves the expert more gradient (1 keeps the probe as fitted)."""
    cache_frozen: bool = False
    """add-task: run the frozen layers below the task's first expert once, in the frozen pass that feeds the
    probe and the router, and train from their cached outputs (``core.frozen_start``): the same results
    with --no-train-dropout, those layers without dropout otherwise; classification in one process
    (--cache-frozen/--no-cache-frozen)."""

    def __post_init__(self) -> None:
        _positive("epochs", "--epochs", self.epochs)
        _positive("lr", "--lr", self.lr)
        _positive("head_lr", "--head-lr", self.head_lr)
        _positive("batch_size", "--batch-size", self.batch_size, integer=True)
        _positive("grad_accum", "--grad-accum", self.grad_accum, integer=True)
        _positive("max_length", "--max-length", self.max_length, integer=True)
        for name in ("max_train", "max_test"):
            value = getattr(self, name)
            if value is not None:
                _positive(name, "--" + name.replace("_", "-"), value, integer=True)
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay!r}, {self.grad_clip!r}")
        if self.probe_c is not None:
            _positive("probe_c", "probe_c", self.probe_c)
        _positive("probe_scale", "probe_scale", self.probe_scale)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer (--seed), got {self.seed!r}")
        if not isinstance(self.cache_frozen, bool):
            raise ValueError(f"cache_frozen must be true or false (--cache-frozen), got {self.cache_frozen!r}")
        if not isinstance(self.train_dropout, bool):
            raise ValueError(f"train_dropout must be true or false (--train-dropout), got {self.train_dropout!r}")

    @property
    def step_batch(self) -> int:
        """Examples per optimiser step: ``batch_size * grad_accum``."""
        return self.batch_size * self.grad_accum


ROUTER_POOLS: tuple[str, ...] = ("mean", "rms")
"""The pools a router may read of each hidden state (``routing.pools``), in the order they are concatenated."""


@dataclass(frozen=True, kw_only=True)
class RouterConfig(_Config):
    """The sequence router of a bank: LDA over pooled lower-layer features (see ``routing.lda``)."""

    layers: int = 2
    """The router reads the embeddings and layers 0 .. layers-1, which hold no experts (--router-layers)."""
    top_k: int = 1
    """Experts mixed per input at routed inference (--top-k)."""
    temperature: float = 1.0
    """Softmax temperature of the router's scores before top-k (--temperature)."""
    shrinkage: float = 0.1
    """Shrinkage of the pooled covariance towards a scaled identity (--router-shrinkage; measured: 0.03-0.1
    match scikit-learn's Ledoit-Wolf 'auto' on the nine shared tasks)."""
    share_distance: float = 3.0
    """``--share-a auto`` joins a group whose task lies within this Mahalanobis distance of the new task's
    mean router feature (--share-distance; about where two tasks' inputs start to overlap for the router)."""
    pools: str = "mean"
    """Summaries of each read hidden state, joined by '+': mean, rms or mean+rms, the per-dimension root
    mean square beside the mean (--router-pools; routed/oracle 96.7 -> 97.0% at 500 texts per task on
    the nine shared tasks, for twice the router statistics)."""
    replay: int = 0
    """Router features kept per task for a discriminative router refitted on every change
    (--router-replay; ``routing.replay``); 0: the closed-form LDA (default). 500 on the nine shared tasks:
    routed/oracle 96.7 -> 97.4%, for 2 * replay * F bytes more per task and a refit whose time grows with
    the bank."""

    def __post_init__(self) -> None:
        _positive("layers", "--router-layers", self.layers, integer=True)
        _positive("top_k", "--top-k", self.top_k, integer=True)
        _positive("temperature", "--temperature", self.temperature)
        _positive("share_distance", "--share-distance", self.share_distance)
        if isinstance(self.replay, bool) or not isinstance(self.replay, int) or self.replay < 0:
            raise ValueError(f"replay must be a whole number >= 0 of router vectors kept per task (--router-replay; "
                             f"0: the LDA router), got {self.replay!r}")
        if not (isinstance(self.shrinkage, (int, float)) and 0.0 <= self.shrinkage <= 1.0):
            raise ValueError(f"shrinkage must be in [0, 1] (--router-shrinkage), got {self.shrinkage!r}")
        names = self.pools.split("+") if isinstance(self.pools, str) else []
        if not names or any(n not in ROUTER_POOLS for n in names) or len(set(names)) != len(names):
            raise ValueError(f"pools must be distinct names from {', '.join(ROUTER_POOLS)} joined by '+' (e.g. mean+rms) "
                             f"(--router-pools), got {self.pools!r}")

    @property
    def pool_names(self) -> tuple[str, ...]:
        """The pools, in :data:`ROUTER_POOLS` order (the order of the router's features)."""
        return tuple(p for p in ROUTER_POOLS if p in self.pools.split("+"))
