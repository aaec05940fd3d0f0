"""``AdaptBankModel``: a frozen Hugging Face backbone with per-task experts and task heads.

Letters in shape comments: B batch, T tokens, D hidden size, C classes of a task, E experts, k experts per row.

One way to call it, returning a :class:`ModelOutput`::

    model(input_ids, attention_mask, task="a")            # every row: task a's expert and head
    model(input_ids, attention_mask, task_ids=["a", "b"]) # row i: its task's expert and head (one forward)
    model(input_ids, attention_mask, routed=True)         # the router picks each row's experts and head

``route()`` + ``features()`` stay as the low-level pair (set the gates, then pool features under them).

Prompt/prefix tasks wrap no linear: they live in ``self.virtual`` (``core.virtual``) and enter the one
backbone call per row. The router chooses too late for them (a prompt is layer 0's input), so rows it
sends to one get a second pass under that task (top-1 only; ``attach_router`` refuses top-k > 1).

The backbone is never modified except by wrapping target linears (see ``inject``); it is called
unchanged, and the gates reach the wrapped layers through one :class:`RoutingState`. Per-task state
(experts inside the wrapped layers, heads here, task facts in ``self.tasks``) is keyed by task name.
Tasks are stored through ``export_task``/``import_task`` (``core.task_io``) as plain ``dict[str, Tensor]``
whose keys do not contain the task name, so files are portable between banks and names.

A combined method (``CombinedConfig``, e.g. ``prefix+lora``) is one task: its linear parts sit in the
wrapped layers under the task name (``core.composed``), its prompt/prefix part in ``self.virtual``, its
head here; it is routed, stored and removed as one.

A generation task (``head="generation"``) reads the frozen shared ``self.lm_head`` (``core.generate``); on an
encoder-decoder (T5) its experts sit in the encoder and the decoder (``core.seq2seq``), a classification task's in the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal, cast

import torch
from torch import Tensor, nn

from adaptbank.core import merging, targets, task_io
from adaptbank.core.adapted import AdaptedLinear
from adaptbank.core.backbone import LM_FAMILIES, Backbone, fingerprint
from adaptbank.core.config import (
    CombinedConfig,
    LoRAConfig,
    MethodConfig,
    resolve_positions,
    validate_name,
)
from adaptbank.core.experts import LoRAExpert
from adaptbank.core.heads import ClassificationHead, HeadKind, check_classifying, check_head, row_logits
from adaptbank.core.inject import add_experts, add_parts, inject, submodule
from adaptbank.core.pooling import pool
from adaptbank.core.prompts import check_positions
from adaptbank.core.records import ModelOutput, TaskInfo, share_frozen
from adaptbank.core.seeding import seeded
from adaptbank.core.virtual import VirtualExperts, is_virtual, virtual_rows
from adaptbank.routing.lda import LDARouter
from adaptbank.routing.state import RoutingState
from adaptbank.routing.taps import RouterTrace, install_taps, layer_list, remove_taps

__all__ = ["AdaptBankModel", "ModelOutput", "TaskInfo", "ClassificationHead", "share_frozen"]


class AdaptBankModel(nn.Module):
    """A frozen backbone plus name-keyed task experts and heads, routed per forward."""

    def __init__(self, backbone: Backbone, *, fingerprint: str | None = None) -> None:
        """Wrap ``backbone`` (its module tree becomes this model's; see :func:`share_frozen` for a second
        model over the same weights). ``fingerprint``: the base fingerprint when the caller knows it."""
        super().__init__()
        self.backbone = backbone.model
        self.backbone.requires_grad_(False)
        self.tokenizer = backbone.tokenizer
        self.lm_head = backbone.lm_head
        """The frozen shared LM head of a decoder (generation tasks), or None."""
        self.backbone_name = backbone.name
        self.state = RoutingState()
        self.heads = nn.ModuleDict()
        self.virtual = VirtualExperts()
        """Soft prompts and key/value prefixes by task name (the kinds that wrap no linear)."""
        self.tasks: dict[str, TaskInfo] = {}
        self.merged: str | None = None
        self.shared_groups: dict[str, tuple[str, ...]] = {}
        """Shared-A groups present in the layers, with the paths that hold their A."""
        self.reserved_layers = 0
        """Transformer layers 0 .. n-1 get no experts: the router reads its features there."""
        self.router: LDARouter | None = None
        self.router_temperature = 1.0
        """The softmax temperature the attached router's gates use (``attach_router``)."""
        self.trace = RouterTrace()
        """The router taps' per-forward record (see ``routing.taps``); read back by :meth:`forward`."""
        config = self.backbone.config
        self.pooling: Literal["mean", "last"] = "last" if config.model_type in LM_FAMILIES else "mean"
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

    def add_task(self, name: str, method: MethodConfig, labels: Sequence[str], *, shared_group: str | None = None,
                 head_dropout: float = 0.1, seed: int | None = None, head: HeadKind = "classification") -> TaskInfo:
        """Create task ``name``: its expert in every target layer and a fresh head for ``labels`` (with
        ``head="generation"``: no head, the shared LM head; ``labels`` are informational). With ``seed``,
        initialisation draws from that seed (the global RNG is left untouched)."""
        if seed is not None:
            with seeded(seed):
                return self.add_task(name, method, labels, shared_group=shared_group, head_dropout=head_dropout,
                                     head=head)
        if name in self.tasks:
            raise KeyError(f"task {name!r} already exists in the model")
        if not name.startswith("_"):  # "_learner" and the like: internal experts of the continual baselines
            validate_name(name)
        check_head(self, name, method, labels, head)
        method = self.resolve_method(method)
        if shared_group is not None and not isinstance(method, LoRAConfig):
            raise ValueError(f"--share-a works with LoRA only, not {method.kind!r}")
        if isinstance(method, CombinedConfig):
            return self._register(replace(self._add_combined(name, method, labels, head), head=head), head_dropout)
        if is_virtual(method):
            self.virtual.add(name, method, self.encoder, labels, self.tokenizer).train(self.training)
            return self._register(TaskInfo(name, method, tuple(labels), ()), head_dropout)
        paths = self.target_paths(method, head)
        owns = shared_group is not None and shared_group not in self.shared_groups
        if shared_group is not None and not owns:
            self._check_group_fits(shared_group, method, paths)
        add_experts(self.backbone, paths, self.state, name, method, shared_group=shared_group, training=self.training)
        if shared_group is not None:
            self.shared_groups.setdefault(shared_group, tuple(paths))
        return self._register(TaskInfo(name, method, tuple(labels), tuple(paths), shared_group, owns, head), head_dropout)

    def resolve_method(self, method: MethodConfig) -> MethodConfig:
        """``method`` as a task of this model holds it: a prefix's ``positions="auto"`` made concrete
        (after-prefix on a decoder, from-zero on an encoder; ``config.resolve_positions``)."""
        return resolve_positions(method, decoder=self.pooling == "last")

    def _add_combined(self, name: str, method: CombinedConfig, labels: Sequence[str], head: HeadKind) -> TaskInfo:
        """The linear parts in their target layers (one ``ComposedExpert`` per layer), then the prompt/prefix
        part; on an error nothing of the task is left."""
        layers = add_parts(self.backbone, {i: self.target_paths(p, head) for i, p in method.linear_parts.items()},
                           self.state, name, method, training=self.training)
        if method.virtual_part is not None:
            try:
                part = method.parts[method.virtual_part]
                self.virtual.add(name, part, self.encoder, labels, self.tokenizer).train(self.training)
            except Exception:
                for layer in layers.values():
                    layer.remove_expert(name)
                raise
        return TaskInfo(name, method, tuple(labels), tuple(layers))

    def _register(self, info: TaskInfo, head_dropout: float) -> TaskInfo:
        if info.head == "classification":
            self._new_head(info.name, info.labels, head_dropout)
        self.tasks[info.name] = info
        self._order_changed()
        return info

    def target_paths(self, method: MethodConfig, head: HeadKind = "classification") -> list[str]:
        """Module paths that ``method.targets`` (of a single kind) selects in this backbone for a ``head`` task,
        without the router's layers and within ``method.layers`` (``core.targets``)."""
        return targets.target_paths(self, method, head)

    def layer_paths(self) -> list[str]:
        """Paths of the transformer layers, in order."""
        return targets.layer_paths(self)

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
        prefixes = tuple(f"{p}." for p in self.layer_paths()[: router.layers])
        low = [p for t in self.tasks.values() for p in t.paths if p.startswith(prefixes)]
        if low:
            raise ValueError(f"experts sit in layers the router reads ({low[0]} ...); the router needs layers "
                             f"0..{router.layers - 1} free of experts")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (--top-k), got {top_k}")
        virtual = [n for n in self.tasks if n in self.virtual]
        if top_k > 1 and virtual:
            raise ValueError(f"top_k={top_k} would mix prompt/prefix task {virtual[0]!r} with other experts in one row; "
                             "such tasks route with top_k=1 only (--top-k 1)")
        order = {n: i for i, n in enumerate(self.state.experts)}
        to_model = torch.tensor([order[n] for n in router.names], device=next(self.parameters()).device)
        install_taps(layer_list(self.encoder), router, self.state, self.trace, top_k, temperature, to_model)
        self.router, self.router_temperature = router, temperature
        self.reserved_layers = max(self.reserved_layers, router.layers)

    def _check_group_fits(self, group: str, method: MethodConfig, paths: Sequence[str]) -> None:
        held = self.shared_groups[group]
        rank = submodule(self.backbone, held[0]).shared_A[group].shape[0]
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
            submodule(self.backbone, path).remove_expert(name)
        if name in self.virtual:
            self.virtual.remove(name)
        if name in self.heads:  # generation tasks have none
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
        remove_taps(layer_list(self.encoder))
        self.router = None

    def _info(self, name: str) -> TaskInfo:
        if name not in self.tasks:
            raise KeyError(f"unknown task {name!r}; the model holds: {', '.join(self.tasks) or 'none'}")
        return self.tasks[name]

    def layers_of(self, name: str) -> dict[str, AdaptedLinear]:
        return {p: submodule(self.backbone, p) for p in self._info(name).paths}  # type: ignore[misc]

    # ----------------------------------------------------------------------------- training setup
    def expert_parameters(self, name: str, *, include_shared: bool | None = None) -> list[nn.Parameter]:
        """Parameters of task ``name``'s experts. A shared A counts when the task owns its group
        (``include_shared=None``), always (True) or never (False)."""
        info = self._info(name)
        keep_shared = info.owns_shared if include_shared is None else include_shared
        out = list(self.virtual.get(name).parameters()) if name in self.virtual else []
        for layer in self.layers_of(name).values():
            expert = layer.experts[name]
            shared_A = expert.A if isinstance(expert, LoRAExpert) and info.shared_group else None
            out += [p for p in expert.parameters() if p is not shared_A or keep_shared]
        return out

    def train_only(self, name: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Freeze everything, then unfreeze task ``name``'s expert and head; returns both lists."""
        self.requires_grad_(False)
        expert = self.expert_parameters(name)
        head = list(self.heads[name].parameters()) if name in self.heads else []
        for p in expert + head:
            p.requires_grad_(True)
        return expert, head

    def finalize(self, name: str) -> None:
        """Task ``name`` in its stored form after training: a prefix's MLP collapsed (else a no-op)."""
        self._info(name)
        self.virtual.collapse(name)

    def check_length(self, name: str, max_length: int) -> None:
        """Refuse ``max_length`` input tokens that do not fit the model's positions after task ``name``'s
        prompt or prefix (a no-op for kinds that add no positions)."""
        self._info(name)
        if name in self.virtual:
            check_positions(f"task {name!r}", self.virtual.positions_taken(name), max_length, self.encoder.config)

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
        """Pooled features (B, D) under the current gates: masked mean, or last token for decoders, over the
        real tokens (prompt and prefix positions are never pooled)."""
        rows = virtual_rows(self.state, self.virtual, input_ids.shape[0])
        if rows is None:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        else:
            hidden = self.virtual.encode(self.encoder, input_ids, attention_mask, rows, **extra)  # (B, T, D)
        return pool(hidden, attention_mask, self.pooling)  # (B, D)

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
        check_classifying(self, [task] if task is not None else task_ids or ())
        if routed:
            pooled, index, weight, scores = self.routed_features(input_ids, attention_mask, **extra)
            names = self.state.experts
            rows = tuple(names[int(i)] for i in index.gather(1, weight.argmax(1, keepdim=True))[:, 0])
            redo = [b for b, t in enumerate(rows) if t in self.virtual]
            if redo:  # prompts/prefixes act before the router has chosen: a second pass for those rows
                self.route(task_ids=[rows[b] for b in redo])
                again = self.features(input_ids[redo], attention_mask[redo], **extra)  # (b, D)
                pooled = pooled.index_copy(0, torch.tensor(redo, device=pooled.device), again)  # (B, D)
                self.state.route(index, weight)
            return ModelOutput(row_logits(self.heads, pooled, rows), rows, pooled, index, weight, scores)
        if task_ids is not None:
            if len(task_ids) != input_ids.shape[0]:
                raise ValueError(f"task_ids has {len(task_ids)} entries for a batch of {input_ids.shape[0]} rows")
            self.route(task_ids=task_ids)
            pooled = self.features(input_ids, attention_mask, **extra)  # (B, D)
            return ModelOutput(row_logits(self.heads, pooled, tuple(task_ids)), tuple(task_ids), pooled)
        task = cast(str, task)  # narrowed by the count check above
        if task not in self.heads:
            raise KeyError(f"unknown task {task!r}; the model holds: {', '.join(self.heads) or 'none'}")
        self.route(task=task)
        pooled = self.features(input_ids, attention_mask, **extra)  # (B, D)
        return ModelOutput(self.heads[task](pooled), (task,) * input_ids.shape[0], pooled)  # (B, C)

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
        costs what the base costs (``core.merging``; each kind's rule in ``AdaptedLinear.merge``)."""
        merging.merge(self, name)

    def unmerge(self) -> None:
        """Restore the base weights; a no-op when nothing is merged."""
        merging.unmerge(self)

    # ----------------------------------------------------------------------------- export / import
    def export_task(self, name: str) -> dict[str, dict[str, Tensor]]:
        """``{"adapter": {key: t}, "head": {...}}``, keys free of the task name (``core.task_io``)."""
        return task_io.export_task(self, name)

    def export_shared(self, group: str) -> dict[str, Tensor]:
        """The shared A of ``group`` in every layer: ``{"<path>.A": (r, I)}``."""
        return task_io.export_shared(self, group)

    def import_task(self, name: str, method: MethodConfig, labels: Sequence[str], files: dict[str, dict[str, Tensor]],
                    *, shared_group: str | None = None, shared: dict[str, Tensor] | None = None,
                    head: HeadKind = "classification") -> TaskInfo:
        """Add task ``name`` and load its tensors, checked first; on an error the model is without the task."""
        return task_io.import_task(self, name, method, labels, files, shared_group=shared_group, shared=shared,
                                   head=head)
