"""``AdaptBankModel``: a frozen Hugging Face backbone with per-task experts and task heads.

Letters in shape comments: B batch, T tokens, D hidden size, C classes of a task, E experts, k experts per row.

One way to call it, returning a :class:`ModelOutput`::

    model(input_ids, attention_mask, task="a")            # every row: task a's expert and head
    model(input_ids, attention_mask, task_ids=["a", "b"]) # row i: its task's expert and head (one forward)
    model(input_ids, attention_mask, routed=True)         # the router picks each row's experts and head

``route()`` + ``features()`` stay as the low-level pair (set the gates, then pool features under them).

The backbone is never modified except by wrapping target linears (see ``inject``); it is called
unchanged, and the gates reach the wrapped layers through one :class:`RoutingState`. Per-task state
(experts inside the wrapped layers, heads here, task facts in ``self.tasks``) is keyed by task name.
Tasks are stored through ``export_task``/``import_task`` as plain ``dict[str, Tensor]`` whose keys
do not contain the task name, so files are portable between banks and names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch
from torch import Tensor, nn

from adaptbank.core.adapted import AdaptedLinear
from adaptbank.core.backbone import Backbone, fingerprint
from adaptbank.core.config import BitFitConfig, IA3Config, LoRAConfig, MethodConfig, validate_name
from adaptbank.core.experts import LoRAExpert
from adaptbank.core.heads import ClassificationHead
from adaptbank.core.inject import inject, iter_adapted, resolve_targets
from adaptbank.core.pooling import pool
from adaptbank.core.records import ModelOutput, TaskInfo, load_checked, share_frozen
from adaptbank.core.seeding import seeded
from adaptbank.routing.lda import LDARouter
from adaptbank.routing.state import RoutingState
from adaptbank.routing.taps import RouterTap, RouterTrace, layer_list

__all__ = ["AdaptBankModel", "ModelOutput", "TaskInfo", "ClassificationHead", "share_frozen"]

_DECODERS = {"gpt2", "llama", "mistral", "qwen2", "qwen3"}


class AdaptBankModel(nn.Module):
    """A frozen backbone plus name-keyed task experts and heads, routed per forward."""

    def __init__(self, backbone: Backbone, *, fingerprint: str | None = None) -> None:
        """Wrap ``backbone`` (its module tree becomes this model's; see :func:`share_frozen` for a second
        model over the same weights). ``fingerprint``: the base fingerprint when the caller knows it."""
        super().__init__()
        self.backbone = backbone.model
        self.backbone.requires_grad_(False)
        self.tokenizer = backbone.tokenizer
        self.backbone_name = backbone.name
        self.state = RoutingState()
        self.heads = nn.ModuleDict()
        self.tasks: dict[str, TaskInfo] = {}
        self.merged: str | None = None
        self.shared_groups: dict[str, tuple[str, ...]] = {}
        """Shared-A groups present in the layers, with the paths that hold their A."""
        self.reserved_layers = 0
        """Transformer layers 0 .. n-1 get no experts: the router reads its features there."""
        self.router: LDARouter | None = None
        self.trace = RouterTrace()
        """The router taps' per-forward record (see ``routing.taps``); read back by :meth:`forward`."""
        config = self.backbone.config
        self.pooling: Literal["mean", "last"] = "last" if config.model_type in _DECODERS else "mean"
        self.encoder = self.backbone.get_encoder() if getattr(config, "is_encoder_decoder", False) else self.backbone
        self.hidden_size = int(getattr(config, "hidden_size", None) or config.d_model)
        self._fingerprint: str | None = fingerprint

    # ----------------------------------------------------------------------------- tasks
    def base_fingerprint(self) -> str:
        """Fingerprint of the base weights and config (computed once, experts excluded)."""
        if self._fingerprint is None:
            if self.merged is not None:
                raise RuntimeError("unmerge() before fingerprinting the base model")
            self._fingerprint = fingerprint(self.backbone)
        return self._fingerprint

    def add_task(self, name: str, method: MethodConfig, labels: Sequence[str], *,
                 shared_group: str | None = None, head_dropout: float = 0.1, seed: int | None = None) -> TaskInfo:
        """Create task ``name``: its expert in every target layer and a fresh head for ``labels``.
        With ``seed``, initialisation draws from that seed (the global RNG is left untouched)."""
        if seed is not None:
            with seeded(seed):
                return self.add_task(name, method, labels, shared_group=shared_group, head_dropout=head_dropout)
        if name in self.tasks:
            raise KeyError(f"task {name!r} already exists in the model")
        if not name.startswith("_"):  # "_learner" and the like: internal experts of the continual baselines
            validate_name(name)
        if len(labels) < 2:
            raise ValueError(f"task {name!r} needs at least 2 labels, got {list(labels)!r}")
        paths = self.target_paths(method)
        owns = shared_group is not None and shared_group not in self.shared_groups
        if shared_group is not None and not owns:
            self._check_group_fits(shared_group, method, paths)
        feedforward = self._feedforward_paths(method, paths)
        layers = inject(self.backbone, paths, self.state)
        try:
            for path, layer in layers.items():
                layer.add_expert(name, method, shared_group=shared_group,  # type: ignore[arg-type]
                                 feedforward=path in feedforward).train(self.training)  # the model's mode
        except Exception:
            for layer in layers.values():
                if name in layer.experts:
                    layer.remove_expert(name)
            raise
        if shared_group is not None:
            self.shared_groups.setdefault(shared_group, tuple(paths))
        self._new_head(name, labels, head_dropout)
        info = TaskInfo(name, method, tuple(labels), tuple(paths), shared_group, owns)
        self.tasks[name] = info
        self._order_changed()
        return info

    def target_paths(self, method: MethodConfig) -> list[str]:
        """Module paths that ``method.targets`` selects in this backbone."""
        paths = resolve_targets(self.backbone, method.targets)
        if self.encoder is not self.backbone:  # encoder-decoder (T5): classification reads the encoder only
            paths = [p for p in paths if p.startswith("encoder.")]
        if self.reserved_layers:
            reserved = tuple(f"{p}." for p in self._layer_paths()[: self.reserved_layers])
            paths = [p for p in paths if not p.startswith(reserved)]
            if not paths:
                raise ValueError(f"targets {method.targets!r} select only layers below {self.reserved_layers}, which "
                                 "are reserved for the router's features")
        return paths

    def _feedforward_paths(self, method: MethodConfig, paths: Sequence[str]) -> set[str]:
        """Of ``paths``, those an (IA)^3 expert scales on their input (``IA3Config.feedforward``; peft's
        ``feedforward_modules``); empty for every other method."""
        if not isinstance(method, IA3Config):
            return set()
        return set(resolve_targets(self.backbone, method.feedforward)) & set(paths)

    def _layer_paths(self) -> list[str]:
        """Paths of the transformer layers, in order."""
        names = {id(m): n for n, m in self.backbone.named_modules()}
        return [names[id(m)] for m in layer_list(self.encoder)]

    # ----------------------------------------------------------------------------- router
    def attach_router(self, router: LDARouter, *, top_k: int = 1, temperature: float = 1.0) -> None:
        """Install ``router`` for routed forwards (:meth:`routed_features`); its features come from
        taps on layers ``0 .. router.layers - 1``, which must hold no experts."""
        if router.layers < 1:
            raise ValueError(f"router layers must be >= 1, got {router.layers}")
        missing = [n for n in router.names if n not in self.tasks]
        if missing or len(router.names) != len(self.tasks):
            raise ValueError(f"router experts {router.names} do not match the loaded tasks {list(self.tasks)}; "
                             "refit the router (adaptbank router fit)")
        prefixes = tuple(f"{p}." for p in self._layer_paths()[: router.layers])
        low = [p for t in self.tasks.values() for p in t.paths if p.startswith(prefixes)]
        if low:
            raise ValueError(f"experts sit in layers the router reads ({low[0]} ...); the router needs layers "
                             f"0..{router.layers - 1} free of experts")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (--top-k), got {top_k}")
        layers = layer_list(self.encoder)
        for i in range(router.layers):
            tap = layers[i] if isinstance(layers[i], RouterTap) else RouterTap(layers[i], self.state, self.trace,
                                                                                 first=i == 0, last=False)
            tap.first, tap.last, tap.router = i == 0, i == router.layers - 1, router
            layers[i] = tap
        last = layers[router.layers - 1]
        last.top_k, last.temperature = top_k, temperature  # type: ignore[union-attr]
        order = {n: i for i, n in enumerate(self.state.experts)}
        last.to_model = torch.tensor([order[n] for n in router.names], device=next(self.parameters()).device)
        self.router = router
        self.reserved_layers = max(self.reserved_layers, router.layers)

    def _check_group_fits(self, group: str, method: MethodConfig, paths: Sequence[str]) -> None:
        held = self.shared_groups[group]
        rank = self.backbone.get_submodule(held[0]).shared_A[group].shape[0]
        if not isinstance(method, LoRAConfig) or method.rank != rank or set(held) != set(paths):
            raise ValueError(f"shared-A group {group!r} holds rank-{rank} A on {len(held)} layers; the new task asks "
                             f"for {method.kind} rank {getattr(method, 'rank', '-')} on {len(paths)} layers")

    def import_shared(self, group: str, tensors: dict[str, Tensor], method: LoRAConfig) -> None:
        """Load a shared-A group (frozen) without any of its tasks, so a new task-B can join it."""
        if group in self.shared_groups:
            raise KeyError(f"shared-A group {group!r} is already loaded")
        paths = self.target_paths(method)
        want = {f"{p}.A" for p in paths}
        if set(tensors) != want:
            raise ValueError(f"shared A of group {group!r} does not fit targets {method.targets!r}: "
                             f"missing {sorted(want - set(tensors))[:3]}, unexpected {sorted(set(tensors) - want)[:3]}")
        for path, layer in inject(self.backbone, paths, self.state).items():
            layer.set_shared(group, tensors[f"{path}.A"])
        self.shared_groups[group] = tuple(paths)

    def remove_task(self, name: str) -> None:
        info = self._info(name)
        if self.merged == name:
            raise RuntimeError(f"task {name!r} is merged into the base weights; unmerge() first")
        for path in info.paths:
            self.backbone.get_submodule(path).remove_expert(name)
        del self.heads[name]
        del self.tasks[name]
        if info.shared_group and not any(t.shared_group == info.shared_group for t in self.tasks.values()):
            self.shared_groups.pop(info.shared_group, None)
        self._order_changed()

    def _order_changed(self) -> None:
        self.state.experts = tuple(self.tasks)
        self.state.version += 1
        self.state.off()
        if self.router is not None and list(self.router.names) != list(self.tasks):
            self.detach_router()

    def detach_router(self) -> None:
        """Remove the router taps; the layers are put back as they were."""
        layers = layer_list(self.encoder)
        for i, layer in enumerate(layers):
            if isinstance(layer, RouterTap):
                layers[i] = layer.layer
        self.router = None

    def _info(self, name: str) -> TaskInfo:
        if name not in self.tasks:
            raise KeyError(f"unknown task {name!r}; the model holds: {', '.join(self.tasks) or 'none'}")
        return self.tasks[name]

    def layers_of(self, name: str) -> dict[str, AdaptedLinear]:
        return {p: self.backbone.get_submodule(p) for p in self._info(name).paths}  # type: ignore[misc]

    # ----------------------------------------------------------------------------- training setup
    def expert_parameters(self, name: str, *, include_shared: bool | None = None) -> list[nn.Parameter]:
        """Parameters of task ``name``'s experts. A shared A counts when the task owns its group
        (``include_shared=None``), always (True) or never (False)."""
        info = self._info(name)
        keep_shared = info.owns_shared if include_shared is None else include_shared
        out: list[nn.Parameter] = []
        for layer in self.layers_of(name).values():
            expert = layer.experts[name]
            shared_A = expert.A if isinstance(expert, LoRAExpert) and info.shared_group else None
            out += [p for p in expert.parameters() if p is not shared_A or keep_shared]
        return out

    def train_only(self, name: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Freeze everything, then unfreeze task ``name``'s expert and head; returns both lists."""
        self.requires_grad_(False)
        expert = self.expert_parameters(name)
        head = list(self.heads[name].parameters())
        for p in expert + head:
            p.requires_grad_(True)
        return expert, head

    # ----------------------------------------------------------------------------- forward
    def route(self, *, task: str | None = None, task_ids: Sequence[str] | None = None,
              index: Tensor | None = None, weight: Tensor | None = None) -> None:
        """Set the gates for the next forward: one task, a task per row, or experts + weights per row.

        Validation happens here, outside the layers' forward, so that forward stays branch-free on
        tensor values.
        """
        if self.merged is not None and not (task == self.merged or (task_ids and set(task_ids) == {self.merged})):
            raise RuntimeError(f"task {self.merged!r} is merged into the base weights; route to it or unmerge()")
        if task is not None:
            self._info(task)
            self.state.use(task)
        elif task_ids is not None:
            unknown = sorted(set(task_ids) - set(self.tasks))
            if unknown:
                raise KeyError(f"unknown task(s) {unknown}; the model holds: {', '.join(self.tasks) or 'none'}")
            if len(set(task_ids)) == 1:
                self.state.use(task_ids[0])
            else:
                order = {n: i for i, n in enumerate(self.state.experts)}
                device = next(self.backbone.parameters()).device
                self.state.route(torch.tensor([order[t] for t in task_ids], device=device))  # (B, 1)
        elif index is not None:
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self.tasks)):
                raise ValueError(f"expert index out of range [0, {len(self.tasks)}): {index.tolist()}")
            self.state.route(index, weight)
        else:
            self.state.off()

    def features(self, input_ids: Tensor, attention_mask: Tensor, **extra: Tensor) -> Tensor:
        """Pooled features (B, D) under the current gates: masked mean, or last token for decoders."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return pool(out.last_hidden_state, attention_mask, self.pooling)  # (B, D)

    def routed_features(self, input_ids: Tensor, attention_mask: Tensor,
                        **extra: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One forward with the router choosing each row's experts inside it: pooled features (B, D),
        the experts used ``index (B, k)`` (model expert order), their ``weight (B, k)``, and the router
        scores (B, E) in the router's order."""
        if self.router is None:
            raise RuntimeError("no router attached; fit one (adaptbank router fit) or route by task")
        if self.merged is not None:
            raise RuntimeError(f"task {self.merged!r} is merged into the base weights; unmerge() before routing")
        self.state.off()
        self.trace.open(attention_mask)
        try:
            pooled = self.features(input_ids, attention_mask, **extra)  # (B, D)
            scores = self.trace.scores
        finally:
            self.trace.close()
        if scores is None or self.state.index is None or self.state.weight is None:
            raise RuntimeError("the routed forward did not reach the router's last tap")
        return pooled, self.state.index, self.state.weight, scores

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *, task: str | None = None,
                task_ids: Sequence[str] | None = None, routed: bool = False, **extra: Tensor) -> ModelOutput:
        """Logits for one task (``task``), a task per row (``task_ids``) or the router's choice per row
        (``routed``); exactly one of the three."""
        if sum((task is not None, task_ids is not None, routed)) != 1:
            raise ValueError("pass exactly one of task=, task_ids= or routed=True")
        if routed:
            pooled, index, weight, scores = self.routed_features(input_ids, attention_mask, **extra)
            names = self.state.experts
            rows = tuple(names[int(i)] for i in index.gather(1, weight.argmax(1, keepdim=True))[:, 0])
            return ModelOutput(self._logits(pooled, rows), rows, pooled, index, weight, scores)
        if task_ids is not None:
            if len(task_ids) != input_ids.shape[0]:
                raise ValueError(f"task_ids has {len(task_ids)} entries for a batch of {input_ids.shape[0]} rows")
            self.route(task_ids=task_ids)
            pooled = self.features(input_ids, attention_mask, **extra)  # (B, D)
            return ModelOutput(self._logits(pooled, tuple(task_ids)), tuple(task_ids), pooled)
        task = cast(str, task)  # narrowed by the count check above
        if task not in self.heads:
            raise KeyError(f"unknown task {task!r}; the model holds: {', '.join(self.heads) or 'none'}")
        self.route(task=task)
        pooled = self.features(input_ids, attention_mask, **extra)  # (B, D)
        return ModelOutput(self.heads[task](pooled), (task,) * input_ids.shape[0], pooled)  # (B, C)

    def _logits(self, pooled: Tensor, rows: Sequence[str]) -> Tensor:
        """Row b scored by head ``rows[b]``: (B, C_max), padded with -inf beyond a head's classes."""
        width = max(self.heads[t].linear.out_features for t in set(rows))
        out = pooled.new_full((pooled.shape[0], width), float("-inf"))  # (B, C_max)
        for t in dict.fromkeys(rows):
            idx = torch.tensor([b for b, r in enumerate(rows) if r == t], device=pooled.device)  # (b,)
            logits = self.heads[t](pooled[idx])  # (b, C_t)
            out[idx, : logits.shape[1]] = logits.to(out.dtype)
        return out

    def add_head(self, name: str, labels: Sequence[str], *, head_dropout: float = 0.1) -> None:
        """A classification head with no expert of its own (for baselines that share one learner
        expert across tasks, or train the backbone itself)."""
        if name in self.heads:
            raise KeyError(f"head {name!r} already exists")
        self._new_head(name, labels, head_dropout)

    def _new_head(self, name: str, labels: Sequence[str], dropout: float) -> None:
        """A fresh classification head for ``labels`` on the backbone's device, in the model's mode."""
        device = next(self.backbone.parameters()).device
        self.heads[name] = ClassificationHead(self.hidden_size, len(labels), dropout).to(device).train(self.training)

    # ----------------------------------------------------------------------------- merge
    def merge(self, name: str) -> None:
        """Fold task ``name`` (LoRA, BitFit or (IA)^3) into the base weights and biases: inference then
        costs what the base costs. See ``AdaptedLinear.merge`` for each kind's rule."""
        info = self._info(name)
        if self.merged is not None:
            raise RuntimeError(f"task {self.merged!r} is already merged; unmerge() before merging {name!r}")
        if not isinstance(info.method, (LoRAConfig, BitFitConfig, IA3Config)):
            raise TypeError(f"only LoRA, bitfit and ia3 tasks can be merged; {name!r} uses {info.method.kind!r}")
        if self.state.mixing:
            raise RuntimeError("cannot merge while gates mix several experts per example; route one task first")
        done: list[AdaptedLinear] = []
        try:
            for layer in self.layers_of(name).values():
                layer.merge(name)
                done.append(layer)
        except Exception:
            for layer in done:
                layer.unmerge()
            raise
        self.merged = name
        self.state.use(name)

    def unmerge(self) -> None:
        """Restore the base weights; a no-op when nothing is merged."""
        if self.merged is None:
            return
        for layer in self.layers_of(self.merged).values():
            layer.unmerge()
        self.merged = None

    # ----------------------------------------------------------------------------- export / import
    def export_task(self, name: str) -> dict[str, dict[str, Tensor]]:
        """``{"adapter": {"<path>.<key>": t}, "head": {...}}``; a shared A is exported by its group."""
        adapter = {f"{p}.{k}": v.detach().clone() for p, layer in self.layers_of(name).items()
                   for k, v in layer.expert_state(name).items()}
        head = {k: v.detach().clone() for k, v in self.heads[name].linear.state_dict().items()}
        return {"adapter": adapter, "head": head}

    def export_shared(self, group: str) -> dict[str, Tensor]:
        """The shared A of ``group`` in every layer: ``{"<path>.A": (r, I)}``."""
        return {f"{p}.A": layer.shared_A[group].detach().clone() for p, layer in iter_adapted(self.backbone)
                if group in layer.shared_A}

    def import_task(self, name: str, method: MethodConfig, labels: Sequence[str], files: dict[str, dict[str, Tensor]],
                    *, shared_group: str | None = None, shared: dict[str, Tensor] | None = None) -> TaskInfo:
        """Add task ``name`` and load its tensors; any missing key, extra key or shape mismatch is an
        error naming the layer and both shapes, and leaves the model without the task."""
        info = self.add_task(name, method, labels, shared_group=shared_group)
        try:
            expected = self.export_task(name)
            if shared_group is not None and info.owns_shared:
                if shared is None:
                    raise ValueError(f"task {name!r} is the first of shared-A group {shared_group!r} "
                                     "but no shared A tensors were given")
                load_checked(self.export_shared(shared_group), shared, f"shared A of group {shared_group!r}",
                              lambda k, v: self._set_shared(shared_group, k, v))
            for part in ("adapter", "head"):
                load_checked(expected[part], files.get(part, {}), f"{part} of task {name!r}",
                              lambda k, v, part=part: self._set_tensor(name, part, k, v))
        except Exception:
            self.remove_task(name)
            raise
        return info

    def _set_tensor(self, name: str, part: str, key: str, value: Tensor) -> None:
        if part == "head":
            target = self.heads[name].linear.get_parameter(key)
        else:
            path = next(p for p in self.tasks[name].paths if key.startswith(p + "."))
            target = self.backbone.get_submodule(path).experts[name].get_parameter(key[len(path) + 1:])
        with torch.no_grad():
            target.copy_(value)

    def _set_shared(self, group: str, key: str, value: Tensor) -> None:
        path = key[: -len(".A")]
        with torch.no_grad():
            self.backbone.get_submodule(path).shared_A[group].copy_(value)
