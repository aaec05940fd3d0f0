"""``AdapterBank``: the product's centre. A directory that holds one frozen base model's task experts.

The bank joins three pieces that know nothing of each other: the storage layer (``store``: atomic,
locked, checksummed files), the model (``AdaptBankModel``: experts and heads as tensors) and the
training loop. ``add_task`` loads the task's data, trains its expert and head, evaluates them on the
test split and commits everything in one atomic step; a failure at any point (bad data, a NaN loss,
Ctrl-C, a full disk) leaves the bank as it was.

Per task the bank stores ``adapter.safetensors`` (the expert, keys free of the task name),
``head.safetensors``, ``memory.safetensors`` (the task's mean router feature, example count and packed
within-task scatter factor: its bounded share of the router's memory, see ``bank.router_memory``; the
pooled covariance lives with the router)
and ``config.json`` (method, task spec, labels, lineage, creation time, training settings, metrics).
The shared A of a shared-A / task-B LoRA group is stored once under ``shared/``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adaptbank.bank import adding, router_memory
from adaptbank.bank.adding import AddResult
from adaptbank.bank.snapshot import consistent
from adaptbank.bank.store import DEFAULT_LOCK_TIMEOUT, BankError, BankStore, Problem
from adaptbank.bank.trust import allow_base, base_to_load, canonical
from adaptbank.core.backbone import DEFAULT_ALIASES, DEFAULT_BACKBONE, Backbone, load_backbone
from adaptbank.core.config import MethodConfig, RouterConfig, TrainConfig, stored_method
from adaptbank.core.model import AdaptBankModel, share_frozen
from adaptbank.core.quantize import quantize_loaded
from adaptbank.data.load import load_task
from adaptbank.data.specs import TaskSpec
from adaptbank.metrics import confusion_table, expert_usage, gate_entropy
from adaptbank.routing.ambiguity import AMBIGUOUS_PAIR, ambiguous_pairs, gap_split
from adaptbank.routing.lda import LDARouter
from adaptbank.routing.pools import feature_dim
from adaptbank.routing.predict import predict, right_task, routed_hit
from adaptbank.routing.taps import layer_list
from adaptbank.routing.token import fit_token_router, load_token_gates, token_gate_tensors
from adaptbank.training.distributed import Dist
from adaptbank.training.evaluate import evaluate_hits
from adaptbank.training.generation import evaluate_task

__all__ = ["AdapterBank", "AddResult", "BankError"]



class AdapterBank:
    """A bank directory. Open one with :meth:`open`, create one with :meth:`init`."""

    def __init__(self, store: BankStore) -> None:
        self.store = store
        self._base: Backbone | None = None
        """The frozen backbone, loaded and fingerprint-checked once; every model gets its own module
        tree over these (shared, read-only) weights, see :meth:`new_model`."""
        self._fingerprint: str | None = None

    # ----------------------------------------------------------------------------- open / init
    @classmethod
    def init(cls, path: str | Path, *, base: str = DEFAULT_BACKBONE, router: RouterConfig | None = None, quantize: str | None = None) -> AdapterBank:
        """Create an empty bank for backbone ``base`` (a path, a .gguf file or the bundled default).

        ``router.layers`` L: the router reads the embeddings and layers 0..L-1, which therefore hold no experts
        (see ``routing.lda``); ``router`` sets the rest. ``quantize`` (nf4, int8): see ``core.quantize``."""
        router = router or RouterConfig()
        backbone = quantize_loaded(load_backbone(base), quantize)
        model = AdaptBankModel(backbone)
        n_layers = len(layer_list(model.encoder))
        if not router.layers < n_layers:
            raise ValueError(f"router layers must be in [1, {n_layers - 1}] for this {n_layers}-layer backbone "
                             f"(--router-layers), got {router.layers!r}")
        cfg = backbone.model.config
        info = {"name": base, "fingerprint": model.base_fingerprint(), "model_type": cfg.model_type,
                "hidden_size": model.hidden_size, "layers": n_layers, "router_layers": router.layers,
                "router": router.to_dict(), "quantize": quantize}
        if base not in DEFAULT_ALIASES:  # informational: trust.base_to_load trusts only the user's own records
            info |= {"path": canonical(base), "allowed_by": "init"}
        bank = cls(BankStore.create(path, base=info))
        allow_base(base)  # the user named it: later processes may load it for banks on it (bank.trust)
        bank._base, bank._fingerprint = backbone, info["fingerprint"]
        return bank

    @classmethod
    def open(cls, path: str | Path, *, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> AdapterBank:
        """Open an existing bank (reads only the manifest); writers wait ``lock_timeout`` s for the lock."""
        return cls(BankStore.open(path, lock_timeout=lock_timeout))

    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def base(self) -> dict[str, Any]:
        return self.store.section("base")

    def tasks(self) -> list[str]:
        """Task names in the order they were added (the router's expert order)."""
        return self.store.tasks()

    def info(self, name: str) -> dict[str, Any]:
        """The task's config.json plus its files (size, sha256) from the manifest."""
        config = self.store.read_config(name)
        entry = self.store.task_entry(name)
        config["files"] = {k: {"size": v["size"], "sha256": v["sha256"]} for k, v in entry["files"].items()}
        config["bytes_on_disk"] = self.store.bytes_on_disk(name)
        return config

    # ----------------------------------------------------------------------------- model
    def new_model(self) -> AdaptBankModel:
        """A new model over the bank's frozen backbone, with no tasks loaded, owned by the caller.

        The backbone is loaded and checked against the bank's fingerprint once per bank object; each model
        gets its own module tree sharing the frozen weights (``core.records.share_frozen``), so experts,
        heads, routers and merges of one model never show in another. It comes in eval mode."""
        if self._base is None:  # the manifest's base is loaded only if the user allows it (bank.trust)
            backbone = quantize_loaded(load_backbone(base_to_load(self.base, self.path)), kind := self.base.get("quantize"))
            backbone.name = self.base["name"]
            found = AdaptBankModel(backbone).base_fingerprint()
            if found != self.base["fingerprint"]:
                raise BankError(f"{self.path}: the bank was made for base {self.base['name']!r} (quantised: {kind or 'no'}) with "
                                f"fingerprint {self.base['fingerprint']}, but the backbone loaded now has fingerprint {found}; "
                                "refusing to mix experts of another base model")
            self._base, self._fingerprint = backbone, found
        b = self._base
        model = AdaptBankModel(Backbone(name=b.name, model=share_frozen(b.model), tokenizer=b.tokenizer, path=b.path,
                                        lm_head=b.lm_head), fingerprint=self._fingerprint)  # the frozen LM head is shared
        model.reserved_layers = self.router_layers
        return model.eval()  # loaded for inference; the training loop switches modes itself

    @property
    def router_config(self) -> RouterConfig:
        """The router settings chosen at ``init`` (banks made before RouterConfig: defaults, their layers)."""
        return RouterConfig.from_dict(self.base.get("router", {"layers": self.base.get("router_layers", 2)}))

    @property
    def router_layers(self) -> int:
        return self.router_config.layers

    @property
    def router_pools(self) -> tuple[str, ...]:
        """The pools of each hidden state the router reads (``RouterConfig.pools``; old banks: mean)."""
        return self.router_config.pool_names

    @consistent
    def load(self, names: Sequence[str] | None = None) -> AdaptBankModel:
        """A new model with tasks ``names`` (all when None) loaded, owned by the caller; reads only those
        tasks' files, all of one committed version even while writers commit (``bank.snapshot``)."""
        wanted = list(self.tasks() if names is None else names)
        unknown = [n for n in wanted if n not in self.tasks()]
        if unknown:
            raise KeyError(f"unknown task(s) {unknown} in bank {self.path}; it holds: {', '.join(self.tasks()) or 'none'}")
        model = self.new_model()
        for name in wanted:
            self._import(model, name)
        return model

    def _import(self, model: AdaptBankModel, name: str) -> None:
        cfg = self.store.read_config(name)
        files = {stem: self.store.read_tensors(name, stem) for stem in ("adapter", "head")}
        group = cfg.get("shared_group")
        shared = None
        if group is not None and not any(t.shared_group == group for t in model.tasks.values()):
            shared = self.store.read_shared(group, "A")
        model.import_task(name, stored_method(cfg["method"]), cfg["labels"], files, shared_group=group,
                          shared=shared, head=cfg.get("head", "classification"))

    # ----------------------------------------------------------------------------- add / remove
    def add_task(self, spec: TaskSpec | str | Path, method: MethodConfig | None = None,
                 train: TrainConfig | None = None, *, name: str | None = None, share_a: str | None = None,
                 replace: bool = False, parent: str | None = None,
                 on_step: Callable[[int, float], None] | None = None,
                 log: Callable[[str], None] | None = None, diagnose: int = 0,
                 allow_router_drift: bool = False, dist: Dist | None = None, init_from: str | None = None) -> AddResult:
        """Train task ``spec``'s expert and head, evaluate on its test split and store both atomically; on
        any failure the bank is unchanged. The arguments are those of :func:`adaptbank.bank.adding.add_task`."""
        return adding.add_task(self, spec, method, train, name=name, share_a=share_a, replace=replace, parent=parent,
                               on_step=on_step, log=log, diagnose=diagnose, allow_router_drift=allow_router_drift,
                               dist=dist, init_from=init_from)

    def remove(self, name: str, *, allow_router_drift: bool = False) -> None:
        """Delete task ``name`` (and its shared group when it was the last member); the router drops
        its output and its scatter in the same commit. An old bank's task (no stored scatter) is refused
        unless ``allow_router_drift`` (see ``bank.router_memory``)."""
        router_memory.precheck(self.store, name, doing="removing", allow_drift=allow_router_drift)
        self.store.remove_task(name, router=self._router_update(drop=name, allow_drift=allow_router_drift))

    # ----------------------------------------------------------------------------- router
    @property
    def _router_dim(self) -> int:
        return feature_dim(self.router_layers, int(self.base["hidden_size"]), self.router_pools)

    def _router_update(self, **change: Any) -> Any:
        """A store callback: the router statistics with ``change`` (see ``router_memory.router_update``)."""
        return router_memory.router_update(self.store, dim=lambda: self._router_dim, layers=self.router_layers,
                                           shrinkage=self.router_config.shrinkage, pools=self.router_pools,
                                           replay=self.router_config.replay > 0, **change)

    def fit_router(self) -> list[str]:
        """Refit the router from the bank's memory (``router_memory.refit``: from scratch on the tasks'
        stored means, counts and scatters when all hold one). Returns the expert order."""
        files, meta, order = router_memory.refit(self.store, dim=self._router_dim, layers=self.router_layers,
                                                 shrinkage=self.router_config.shrinkage, pools=self.router_pools,
                                                 replay=self.router_config.replay > 0)
        self.store.write_router(files, meta, order)
        return order

    def router(self) -> LDARouter:
        """The stored router; an error says what to run when it is missing or stale."""
        stored = self.store.read_router()
        if stored is None or "stats" not in stored[0] or not stored[1].get("expert_order"):
            raise BankError(f"bank {self.path} has no router yet; add a task or run `adaptbank router fit`")
        files, meta = stored
        if list(meta["expert_order"]) != self.tasks():
            raise BankError(f"the router of bank {self.path} covers {meta['expert_order']} but the bank holds "
                            f"{self.tasks()}; run `adaptbank router fit`")
        return router_memory.stored_router(  # the LDA is solved here from the tasks' means, read lazily
            files, meta, lambda name: self.store.read_tensors(name, "memory", keys=["mean"])["mean"])

    @consistent
    def load_routed(self, *, top_k: int | None = None, temperature: float | None = None,
                    token_level: bool = False) -> AdaptBankModel:
        """All tasks loaded and the router attached (or, with ``token_level``, the token gates installed),
        router and experts of one committed version (``bank.snapshot``): ready for task-agnostic prediction.
        ``top_k`` and ``temperature`` default to the bank's :class:`RouterConfig`."""
        cfg = self.router_config
        top_k = cfg.top_k if top_k is None else top_k
        temperature = cfg.temperature if temperature is None else temperature
        if token_level:
            stored = self.store.read_router()
            if stored is None or "token" not in stored[0]:
                raise BankError(f"bank {self.path} has no token-level router; run `adaptbank router fit --token-level`")
            if stored[1].get("token_expert_order") != self.tasks():
                raise BankError(f"the token router of bank {self.path} covers {stored[1].get('token_expert_order')} "
                                f"but the bank holds {self.tasks()}; run `adaptbank router fit --token-level`")
            model = self.load()
            load_token_gates(model, stored[0]["token"])
            return model
        router = self.router()
        model = self.load()
        model.attach_router(router, top_k=top_k, temperature=temperature)
        return model

    def fit_token_router(self, *, epochs: float = 1.0, max_train: int = 200, lr: float = 5e-3,
                         balance: float = 0.01, seed: int = 0) -> list[float]:
        """Train token-level gates over all the bank's experts (frozen) on up to ``max_train``
        training examples per task, reloaded from each task's stored spec; store them with the router."""
        self._classification_only("the token router")
        model = self.load()
        data = {}
        for name in self.tasks():
            cfg = self.store.read_config(name)
            task = load_task(TaskSpec.from_dict(cfg["spec"]), max_train=max_train, max_test=1, seed=seed)
            data[name] = ([e.text for e in task.train], [e.label for e in task.train])
        max_length = max(self.store.read_config(n)["train"]["max_length"] for n in self.tasks())
        losses = fit_token_router(model, data, epochs=epochs, lr=lr, max_length=max_length, balance=balance, seed=seed)
        stored = self.store.read_router()
        files, meta = stored if stored is not None else ({}, {"kind": "lda", "layers": self.router_layers,
                                                              "expert_order": []})
        files = dict(files) | {"token": token_gate_tensors(model)}
        meta = dict(meta) | {"token_expert_order": self.tasks(), "token_balance": balance, "token_epochs": epochs}
        self.store.write_router(files, meta, list(meta.get("expert_order", [])))
        return losses

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """Test accuracy per task with the true task id, on the same test examples as at add time (a
        generation task's: its exact match; its F1 too in :meth:`evaluate_metrics`)."""
        return {n: m.get("accuracy", m.get("exact_match", 0.0)) for n, m in self.evaluate_metrics(names).items()}

    def evaluate_metrics(self, names: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """Per task with the true task id: ``{"accuracy"}``, or ``{"exact_match", "f1"}`` for a generation task."""
        names = list(self.tasks() if names is None else names)
        model = self.load(names)
        out = {}
        for name in names:
            cfg = self.store.read_config(name)
            train = TrainConfig.from_dict(cfg["train"])
            data = load_task(TaskSpec.from_dict(cfg["spec"]), max_train=1, max_test=train.max_test, seed=train.seed)
            out[name] = evaluate_task(model, name, data, max_length=train.max_length,
                                      max_new_tokens=int(cfg["metrics"].get("max_new_tokens", 16)))
        return out

    def evaluate_routed(self, names: Sequence[str] | None = None, *, top_k: int | None = None,
                        temperature: float | None = None, token_level: bool = False) -> dict[str, Any]:
        """Per task: the router's task-identification accuracy, the routed accuracy (no task id), the
        oracle accuracy (true task id) and the mean normalised entropy of the routing weights (0: one
        expert per input, 1: uniform), their averages, and which task the router chose how often.
        ``top_k`` and ``temperature`` default to the bank's :class:`RouterConfig`.

        A routed prediction is correct when its label is the true label and it came from the true
        task, or from a task with the identical label list (amazon vs yelp).

        Also (``routing.ambiguity``): ``ambiguity``, the task pairs the router confuses (mean router
        probability each puts on the other, and test texts they share; ambiguous at overlap >=
        :data:`AMBIGUOUS_PAIR` or any shared text), and ``gap_split`` per task and on average: the
        routed-vs-oracle gap split into routing loss on ambiguous pairs, routing loss elsewhere,
        mixing loss and routing gain, beside the expert error (1 - oracle)."""
        names = list(self.tasks() if names is None else names)
        self._classification_only("routed evaluation")
        top_k = self.router_config.top_k if top_k is None else top_k
        model = self.load_routed(top_k=top_k, temperature=temperature, token_level=token_level)
        rows: dict[str, dict[str, float]] = {}
        confusion: dict[str, dict[str, int]] = {}
        chosen: list[str] = []
        outcomes: dict[str, list[tuple[int, int, str, bool]]] = {}
        mass: dict[str, dict[str, float]] = {}
        texts_of: dict[str, list[str]] = {}
        for name in names:
            cfg = self.store.read_config(name)
            train = TrainConfig.from_dict(cfg["train"])
            data = load_task(TaskSpec.from_dict(cfg["spec"]), max_train=1, max_test=train.max_test, seed=train.seed)
            texts, labels = [e.text for e in data.test], [e.label for e in data.test]
            preds = predict(model, texts, max_length=train.max_length, token_level=token_level, top_k=max(top_k, 2))
            names_of = model.tasks[name].labels
            hit_task = sum(p.task == name for p in preds)
            labels_of = {t: info.labels for t, info in model.tasks.items()}
            routed_hits = [int(routed_hit(p.task, p.label, name, names_of[y], labels_of)) for p, y in zip(preds, labels)]
            hit = sum(routed_hits)
            oracle_hits = evaluate_hits(model, name, texts, labels, max_length=train.max_length)
            oracle = sum(oracle_hits) / len(oracle_hits)
            outcomes[name] = [(o, r, p.task, right_task(p.task, name, labels_of))
                              for o, r, p in zip(oracle_hits, routed_hits, preds)]
            mass[name] = {t: sum(p.task_probabilities.get(t, 0.0) for p in preds) / len(preds) for t in self.tasks()}
            texts_of[name] = texts
            tasks = self.tasks()
            gates = [[p.routing.get(t, 0.0) for t in tasks] for p in preds]  # (n, E) each row sums to 1
            rows[name] = {"router_accuracy": hit_task / len(preds), "routed_accuracy": hit / len(preds),
                          "oracle_accuracy": oracle, "n": len(preds),
                          "gate_entropy": gate_entropy(gates, normalize=True) if len(tasks) > 1 else 0.0}
            table = confusion_table([name] * len(preds), [p.task for p in preds], labels=tasks)[name]
            confusion[name] = {t: c for t, c in table.items() if c}
            chosen += [p.task for p in preds]
        avg = {k: sum(r[k] for r in rows.values()) / len(rows) for k in ("router_accuracy", "routed_accuracy",
                                                                          "oracle_accuracy")} if rows else {}
        if avg:
            avg["routed_over_oracle"] = avg["routed_accuracy"] / avg["oracle_accuracy"] if avg["oracle_accuracy"] else 0.0
        usage = expert_usage(chosen, self.tasks()) if chosen else {}
        pairs = ambiguous_pairs(mass, texts_of)
        split = {name: gap_split(outcomes[name], name, pairs) for name in names}
        for name, s in split.items():
            rows[name]["gap_split"] = s
        avg_split = {k: sum(s[k] for s in split.values()) / len(split) for k in next(iter(split.values()))} if split else {}
        return {"tasks": rows, "average": avg, "confusion": confusion, "expert_usage": usage, "top_k": top_k,
                "router": "token" if token_level else "sequence",
                "ambiguity": {"pairs": pairs, "threshold": AMBIGUOUS_PAIR}, "gap_split": avg_split}

    def _classification_only(self, what: str) -> None:
        if gen := [n for n in self.tasks() if self.store.read_config(n).get("head") == "generation"]:
            raise BankError(f"{what} covers classification tasks only; bank {self.path} holds generation task(s) {gen}")

    def verify(self, *, full: bool = True) -> list[Problem]:
        """Checksums, manifest against files, and (when the backbone loads) the base fingerprint."""
        return self.store.verify(full=full)


