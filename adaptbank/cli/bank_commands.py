"""The bank commands: ``init``, ``add-task``, ``list``, ``show``, ``remove``, ``verify``, ``graph``.

One function per command, argument handling only; the work is done by ``adaptbank.bank``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import click

from adaptbank.cli.errors import friendly
from adaptbank.cli.options import ADAPTER_WIDTHS, also_note, config_option, given, lock_timeout_option
from adaptbank.cli.output import emit, human, pct
from adaptbank.core.config import (
    METHOD_KINDS,
    TARGET_PRESETS,
    AdapterConfig,
    BitFitConfig,
    CombinedConfig,
    IA3Config,
    LoRAConfig,
    MethodConfig,
    ParallelAdapterConfig,
    PrefixConfig,
    PromptTuningConfig,
    PTuningV2Config,
    RouterConfig,
    TrainConfig,
    combined_kinds,
)

__all__ = ["init", "add_task", "list_", "show", "remove", "verify", "graph", "register"]

_friendly = friendly()
_BANK = click.argument("bank", type=click.Path(file_okay=False))


@click.command()
@_BANK
@click.option("--base", default=None, help="Backbone: a local folder, a .gguf file, or the bundled default "
              "sentence-transformers/all-MiniLM-L6-v2.")
@config_option(RouterConfig, "layers", "--router-layers")
@config_option(RouterConfig, "top_k")
@config_option(RouterConfig, "temperature")
@config_option(RouterConfig, "shrinkage", "--router-shrinkage")
@config_option(RouterConfig, "share_distance")
@config_option(RouterConfig, "pools", "--router-pools")
@config_option(RouterConfig, "replay", "--router-replay")
@click.option("--quantize", default=None, metavar="nf4|int8", help="Hold the base's frozen linear layers "
              "weight-only quantised (QLoRA-style nf4, or int8); experts train in full precision on top. "
              "Needs bitsandbytes (pip install 'adaptbank[quantize]').")
@_friendly
def init(bank: str, base: str | None, quantize: str | None, **router: Any) -> None:
    """Create an empty bank BANK for one frozen base model, with its router settings."""
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.core.backbone import DEFAULT_BACKBONE

    b = AdapterBank.init(bank, base=base or DEFAULT_BACKBONE, router=RouterConfig(**given(**router)), quantize=quantize)
    held = f", {quantize}-quantised" if quantize else ""
    click.echo(f"created bank {b.path} for base {b.base['name']} (fingerprint {b.base['fingerprint'][:12]}{held})")


_TAKES: dict[str, set[str]] = {
    "lora": {"targets", "layers", "rank", "alpha", "dropout"}, "adapter": {"targets", "layers", "rank"},
    "parallel-adapter": {"targets", "layers", "rank"}, "bitfit": {"targets", "layers"}, "ia3": {"targets", "layers"},
    "prompt": {"prompt_length", "prompt_init"}, "prefix": {"prefix_length", "prefix_positions"},
    "ptuning-v2": {"prefix_length", "prefix_positions"}}
"""The add-task flags each method kind takes (by parameter name)."""


def _flags(names: set[str] | list[str]) -> str:
    return ", ".join("--" + k.replace("_", "-") for k in sorted(names))


class MethodChoice(click.Choice):  # type: ignore[type-arg]
    """``--method``: one of ``METHOD_KINDS``, or several joined by ``+`` (a combined method, one task)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and "+" in value:
            try:
                combined_kinds(value)
            except ValueError as err:
                self.fail(str(err), param, ctx)
            return value
        return super().convert(value, param, ctx)


def parse_layers(value: str | None) -> tuple[int, ...] | None:
    """``--layers``: comma-separated layer indices and ranges (``4,5``, ``2-5``; negative indices count from
    the top, ``-2,-1``) as a tuple; ``click.BadParameter`` naming the bad part."""
    if value is None:
        return None
    out: list[int] = []
    for part in value.split(","):
        token = part.strip()
        if re.fullmatch(r"-?\d+", token):
            out.append(int(token))
        elif (m := re.fullmatch(r"(\d+)-(\d+)", token)) and int(m[1]) <= int(m[2]):
            out.extend(range(int(m[1]), int(m[2]) + 1))
        else:
            raise click.BadParameter(f"{token!r} in {value!r} is not a layer index or an ascending range; give e.g. "
                                     "4,5 or 2-5 or -2,-1", param_hint="--layers")
    if len(set(out)) != len(out):
        raise click.BadParameter(f"{value!r} names a layer twice", param_hint="--layers")
    return tuple(out)


def _method_config(method: str, targets: str | None, rank: int | None, *, prompt: dict[str, Any],
                   layers: tuple[int, ...] | None = None, **lora: Any) -> MethodConfig:
    """The method config of add-task's flags: ``--rank`` is LoRA's rank or an adapter's bottleneck width;
    ``--targets`` a preset or comma-separated patterns; ``--alpha``/``--dropout`` apply to LoRA only;
    ``--prompt-length``/``--prompt-init`` to prompt tuning, ``--prefix-length``/``--prefix-positions`` to
    prefix and P-tuning v2.
    A flag given for a method that does not take it is an error naming both. A combined ``a+b`` gives
    each flag to the part that takes it (``--rank`` to the LoRA part where there is one, else the first
    taker); its parts keep their default targets, so ``--targets`` is refused there."""
    if "+" in method:
        return _combined_config(method, targets, rank, prompt=prompt, layers=layers, **lora)
    kw: dict[str, Any] = given(layers=layers)
    if targets is not None:
        kw["targets"] = targets if "," not in targets and targets in TARGET_PRESETS else tuple(targets.split(","))
    flags = {"targets": targets, "layers": layers, "rank": rank, **lora, **prompt}
    wrong = [k for k, v in flags.items() if v is not None and k not in _TAKES[method]]
    if wrong:
        raise click.UsageError(f"{_flags(wrong)} does not apply to --method {method}; it takes: {_flags(_TAKES[method])}")
    if method == "lora":
        return LoRAConfig(**kw, **given(rank=rank, **lora))
    if method in ("adapter", "parallel-adapter"):
        kw |= given(bottleneck=rank)
        return AdapterConfig(**kw) if method == "adapter" else ParallelAdapterConfig(**kw)
    if method == "prompt":
        return PromptTuningConfig(**given(**{k: prompt[k] for k in ("prompt_length", "prompt_init")}))
    if method in ("prefix", "ptuning-v2"):
        cls = PrefixConfig if method == "prefix" else PTuningV2Config
        return cls(**given(prefix_length=prompt["prefix_length"], positions=prompt.get("prefix_positions")))
    return (BitFitConfig if method == "bitfit" else IA3Config)(**kw)


def _combined_config(method: str, targets: str | None, rank: int | None, *, prompt: dict[str, Any],
                     layers: tuple[int, ...] | None = None, **lora: Any) -> CombinedConfig:
    kinds = combined_kinds(method)
    if targets is not None:
        raise click.UsageError(f"--targets does not apply to the combined --method {method}: each part keeps its "
                               "default targets; give per-part targets in a run spec's [method] parts")
    if layers is not None and any("layers" not in _TAKES[k] for k in kinds):
        raise click.UsageError(f"--layers does not apply to --method {method}: its prompt/prefix part acts in every "
                               "layer; give per-part layers in a run spec's [method] parts")
    given_flags = {k: v for k, v in {"rank": rank, **lora, **prompt}.items() if v is not None}
    per_part: list[dict[str, Any]] = [{} for _ in kinds]
    for flag, value in given_flags.items():
        takers = [i for i, kind in enumerate(kinds) if flag in _TAKES[kind]]
        if not takers:
            raise click.UsageError(f"{_flags([flag])} does not apply to --method {method}; its parts take: "
                                   f"{_flags(set().union(*(_TAKES[k] for k in kinds)) - {'targets'})}")
        per_part[next((i for i in takers if kinds[i] == "lora"), takers[0])][flag] = value
    parts = []
    for kind, kw in zip(kinds, per_part):
        got = {k: kw.get(k) for k in ("prompt_length", "prompt_init", "prefix_length", "prefix_positions")}
        parts.append(_method_config(kind, None, kw.get("rank"), prompt=got, alpha=kw.get("alpha"),
                                    dropout=kw.get("dropout"), layers=layers))  # every part in the same layers
    return CombinedConfig(parts=tuple(parts))  # type: ignore[arg-type]


@click.command("add-task")
@_BANK
@click.argument("spec")
@click.option("--method", type=MethodChoice(list(METHOD_KINDS)), default="lora", show_default=True,
              help="The expert kind (README, Methods), or several joined by '+' for one task with several parts "
              "(lora+adapter, bitfit+lora, prefix+lora), each on its default targets; a part flag goes to the "
              "part that takes it (--rank to LoRA).")
@config_option(LoRAConfig, "rank", note=also_note(ADAPTER_WIDTHS))
@config_option(LoRAConfig, "alpha")
@config_option(LoRAConfig, "dropout")
@config_option(PromptTuningConfig, "prompt_length")
@config_option(PromptTuningConfig, "prompt_init")
@config_option(PrefixConfig, "prefix_length")
@config_option(PrefixConfig, "positions", "--prefix-positions")
@click.option("--targets", default=None, help="Preset (qv, attn, all-linear, v, houlsby, pfeiffer, pfeiffer-block, ffn, "
              "ia3, ffn-block) or comma-separated module-name regexes [lora: qv, adapter: pfeiffer-block, "
              "parallel-adapter: ffn-block, "
              "bitfit: all-linear, ia3: ia3].")
@click.option("--layers", "layers_text", default=None, metavar="LIST",
              help="Transformer layers the expert goes in, comma-separated indices or ranges (4,5 or 2-5; -2,-1 the "
              "top two) [every layer the router leaves free]; with --cache-frozen the layers below train from "
              "cached states.")
@click.option("--share-a", default=None, help="Shared-A group name for a LoRA task-B expert, or 'auto'.")
@click.option("--name", default=None, help="Task name in the bank [the spec's name].")
@click.option("--parent", default=None, help="Record this bank task as the new task's parent (lineage).")
@click.option("--init-from", default=None, metavar="nearest|TASK", help="Start the expert from a stored task's expert "
              "of the same method: 'nearest' (in the router's feature space) or a task name; it becomes the parent.")
@config_option(TrainConfig, "epochs")
@config_option(TrainConfig, "lr")
@config_option(TrainConfig, "head_lr")
@config_option(TrainConfig, "batch_size")
@config_option(TrainConfig, "grad_accum")
@config_option(TrainConfig, "max_length")
@config_option(TrainConfig, "max_train")
@config_option(TrainConfig, "max_test")
@config_option(TrainConfig, "seed")
@config_option(TrainConfig, "train_dropout")
@config_option(TrainConfig, "cache_frozen")
@click.option("--replace", is_flag=True, help="Retrain and replace a task that exists already.")
@click.option("--allow-router-drift", is_flag=True, help="With --replace of a task stored before tasks kept "
              "their router scatter: leave the old version's share in the router's pooled covariance.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--diagnose", is_flag=True, help="Gradient norms per expert parameter group over the first 10 steps, "
              "warnings on the usual faults, and a LoRA rank suggestion (stored with the task; stderr or --json).")
@lock_timeout_option
@_friendly
def add_task(bank: str, spec: str, method: str, rank: int | None, alpha: float | None, dropout: float | None,
             prompt_length: int | None, prompt_init: str | None, prefix_length: int | None, positions: str | None,
             targets: str | None, layers_text: str | None, share_a: str | None, name: str | None, parent: str | None, init_from: str | None, replace: bool,
             allow_router_drift: bool, as_json: bool, lock_timeout: float, diagnose: bool, **train: Any) -> None:
    """Train SPEC's expert and head, evaluate on its test split, and store them in BANK.

    SPEC is a task spec file (TOML) or the name of a spec in tasks/ (e.g. ag_news, weather).
    Launched by torchrun or accelerate (WORLD_SIZE > 1), it trains data-parallel: --batch-size is the
    global batch, rank 0 writes the bank and prints, and a failure on any rank stops every rank.
    """
    from tqdm.auto import tqdm

    from adaptbank.bank.facade import AdapterBank
    from adaptbank.training import distributed
    from adaptbank.training.diagnostics import DEFAULT_STEPS, diagnose_report

    cfg = _method_config(method, targets, rank, alpha=alpha, dropout=dropout, layers=parse_layers(layers_text),
                         prompt={"prompt_length": prompt_length, "prompt_init": prompt_init,
                                 "prefix_length": prefix_length, "prefix_positions": positions})
    train_cfg = TrainConfig(**given(**train))
    dist = distributed.current()  # joins a torchrun/accelerate launch; one process: LOCAL
    b = AdapterBank.open(bank, lock_timeout=lock_timeout)
    bar = tqdm(desc=f"training {name or spec}", unit="step", disable=as_json or not dist.main or None, file=sys.stderr)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        r = b.add_task(spec, cfg, train_cfg, name=name, share_a=share_a, replace=replace, parent=parent,
                       on_step=on_step, log=lambda msg: click.echo(msg, err=True),
                       diagnose=DEFAULT_STEPS if diagnose else 0, allow_router_drift=allow_router_drift, dist=dist,
                       init_from=init_from)
    finally:
        bar.close()
    if not dist.main:  # rank 0 reports for all
        return
    summary = {"task": r.name, "test_accuracy": r.test_accuracy, "probe_accuracy": r.probe_accuracy,
               "trainable_params": r.trainable_params, "bytes_on_disk": r.bytes_on_disk, "seconds": round(r.seconds, 2),
               "n_train": r.n_train, "n_test": r.n_test, "shared_group": r.shared_group, "share_reason": r.share_reason,
               "init_from": r.init_from, "phase_seconds": r.phase_seconds}
    if diagnose:  # read back from the bank: what is printed is what was stored
        summary["diagnostics"] = b.info(r.name)["metrics"]["diagnostics"]
        if not as_json:
            click.echo(diagnose_report(summary["diagnostics"]), err=True)
    emit(summary, as_json, lambda: click.echo(
        f"added {r.name}: test accuracy {pct(r.test_accuracy)} on {r.n_test} examples "
        f"(probe init {pct(r.probe_accuracy)}), {r.trainable_params:,} trainable parameters, "
        f"{human(r.bytes_on_disk)} on disk, {r.seconds:.1f}s"
        + (f"\nshared A: {r.share_reason}" if r.share_reason else "")
        + (f"\ninit: {r.init_from['reason']}" if r.init_from else "")))


@click.command("list")
@_BANK
@click.option("--json", "as_json", is_flag=True)
@_friendly
def list_(bank: str, as_json: bool) -> None:
    """List the tasks in BANK with method, accuracy and size."""
    from adaptbank.bank.store import BankStore  # the store alone: listing never imports torch

    b = BankStore.open(bank)
    base = b.manifest["base"]
    rows = []
    for entry in b.manifest["tasks"]:
        cfg = b.read_config(entry["name"], check="none")
        rows.append({"task": entry["name"], "method": cfg["method"]["kind"], "labels": len(cfg["labels"]),
                     "test_accuracy": cfg["metrics"].get("test_accuracy"), "shared_group": cfg.get("shared_group"),
                     "bytes": sum(f["size"] for f in entry["files"].values())})
    emit({"bank": str(b.path), "base": base["name"], "tasks": rows}, as_json, lambda: (
        click.echo(f"{b.path}: base {base['name']}, {len(rows)} task(s)"),
        [click.echo(f"  {r['task']:<24} {r['method']:<16} {r['labels']:>4} labels  acc {pct(r['test_accuracy']):>6}  "
                    f"{human(r['bytes']):>9}" + (f"  shared-A {r['shared_group']}" if r["shared_group"] else ""))
         for r in rows]))


@click.command()
@_BANK
@click.argument("task")
@click.option("--json", "as_json", is_flag=True)
@_friendly
def show(bank: str, task: str, as_json: bool) -> None:
    """Show everything BANK stores about TASK."""
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.training.diagnostics import diagnose_report

    info = AdapterBank.open(bank).info(task)
    metrics = dict(info.get("metrics", {}))
    diag = metrics.pop("diagnostics", None)  # add-task --diagnose: shown as its table, not as JSON lines

    def text() -> None:
        click.echo(json.dumps(info | {"metrics": metrics}, indent=2, default=str))
        if diag:
            click.echo(diagnose_report(diag))

    emit(info, as_json, text)


@click.command()
@_BANK
@click.argument("task")
@click.option("--allow-router-drift", is_flag=True, help="For a task stored before tasks kept their router "
              "scatter: remove it anyway, leaving its share in the router's pooled covariance.")
@lock_timeout_option
@_friendly
def remove(bank: str, task: str, allow_router_drift: bool, lock_timeout: float) -> None:
    """Remove TASK from BANK."""
    from adaptbank.bank.facade import AdapterBank

    AdapterBank.open(bank, lock_timeout=lock_timeout).remove(task, allow_router_drift=allow_router_drift)
    click.echo(f"removed {task}")


@click.command()
@_BANK
@click.option("--repair", is_flag=True, help="Remove leftover temporaries and unreferenced directories.")
@click.option("--fast", is_flag=True, help="Compare sizes and times instead of sha256.")
@click.option("--json", "as_json", is_flag=True)
@lock_timeout_option
@_friendly
def verify(bank: str, repair: bool, fast: bool, as_json: bool, lock_timeout: float) -> None:
    """Check BANK: checksums, manifest against files, and the base model's fingerprint."""
    from adaptbank.bank.facade import AdapterBank

    b = AdapterBank.open(bank, lock_timeout=lock_timeout)  # only --repair takes the lock
    removed = b.store.repair() if repair else []
    problems = b.verify(full=not fast)
    errors = [p for p in problems if p.is_error]
    data = {"ok": not errors, "problems": [{"kind": p.kind, "path": p.path, "message": p.message} for p in problems],
            "repaired": removed}
    emit(data, as_json, lambda: (
        [click.echo(f"repaired: removed {r}") for r in removed],
        [click.echo(f"{'ERROR' if p.is_error else 'warning'} [{p.kind}] {p.path}: {p.message}") for p in problems],
        click.echo("ok" if not errors else f"{len(errors)} error(s)")))
    if errors:
        sys.exit(1)


@click.command()
@_BANK
@click.option("-o", "--output", default=None, help="Write .graphml, .json or .png (default: JSON to stdout).")
@_friendly
def graph(bank: str, output: str | None) -> None:
    """The bank as a graph: tasks, shared-A groups, lineage and expert-similarity edges."""
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.bank.graph import bank_graph, write_graph

    g = bank_graph(AdapterBank.open(bank))
    if output is None:
        import networkx as nx

        click.echo(json.dumps(nx.node_link_data(g, edges="edges"), indent=2, default=str))
    else:
        write_graph(g, Path(output))
        click.echo(f"wrote {output}: {g.number_of_nodes()} nodes, {g.number_of_edges()} edges")


def register(group: click.Group) -> None:
    """Add the bank commands to a click group (the ``adaptbank`` CLI)."""
    for command in (init, add_task, list_, show, remove, verify, graph):
        group.add_command(command)
