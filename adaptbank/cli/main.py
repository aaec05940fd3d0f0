"""The ``adaptbank`` command line: thin click wrappers over the Python API.

Every command turns a bad value into one clear line (``Error: ...``) and a non-zero exit, never a
traceback, and a failed command leaves the bank as it was.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from adaptbank.cli.continual import register
from adaptbank.cli.errors import friendly

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


_friendly = friendly()


def _emit(data: Any, as_json: bool, text: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))
    else:
        text()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adaptbank")
def main() -> None:
    """adaptbank: one frozen transformer, a bank of per-task experts, a router, continual runs."""


# ------------------------------------------------------------------------------------------- init
@main.command()
@click.argument("bank", type=click.Path(file_okay=False))
@click.option("--base", default=None, help="Backbone: a local folder, a .gguf file, or the bundled default "
              "sentence-transformers/all-MiniLM-L6-v2.")
@click.option("--router-layers", type=int, default=2, show_default=True,
              help="The router reads the embeddings and this many lowest layers, which hold no experts.")
@_friendly
def init(bank: str, base: str | None, router_layers: int) -> None:
    """Create an empty bank BANK for one frozen base model."""
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.core.backbone import DEFAULT_BACKBONE
    from adaptbank.core.config import RouterConfig

    b = AdapterBank.init(bank, base=base or DEFAULT_BACKBONE, router=RouterConfig(layers=router_layers))
    click.echo(f"created bank {b.path} for base {b.base['name']} (fingerprint {b.base['fingerprint'][:12]})")


# ------------------------------------------------------------------------------------------- add-task
def _method(method: str, rank: int | None, alpha: float | None, targets: str | None, dropout: float | None) -> Any:
    from adaptbank.core.config import AdapterConfig, LoRAConfig, ParallelAdapterConfig

    kw: dict[str, Any] = {}
    if targets is not None:
        kw["targets"] = targets if "," not in targets and targets in _presets() else tuple(targets.split(","))
    if method == "lora":
        kw |= {k: v for k, v in (("rank", rank), ("alpha", alpha), ("dropout", dropout)) if v is not None}
        return LoRAConfig(**kw)
    if rank is not None:
        kw["bottleneck"] = rank
    return AdapterConfig(**kw) if method == "adapter" else ParallelAdapterConfig(**kw)


def _presets() -> tuple[str, ...]:
    from adaptbank.core.config import TARGET_PRESETS

    return TARGET_PRESETS


@main.command("add-task")
@click.argument("bank", type=click.Path(file_okay=False))
@click.argument("spec")
@click.option("--method", type=click.Choice(["lora", "adapter", "parallel-adapter"]), default="lora", show_default=True)
@click.option("--rank", type=int, default=None, help="LoRA rank r, or bottleneck width for adapters [8 / 64].")
@click.option("--alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha/r [16].")
@click.option("--dropout", type=float, default=None, help="LoRA dropout [0.1].")
@click.option("--targets", default=None, help="Preset (qv, attn, all-linear, v, houlsby, pfeiffer, ffn) or "
              "comma-separated module-name regexes [lora: qv, adapter: pfeiffer, parallel-adapter: ffn].")
@click.option("--share-a", default=None, help="Shared-A group name for a LoRA task-B expert, or 'auto'.")
@click.option("--name", default=None, help="Task name in the bank [the spec's name].")
@click.option("--parent", default=None, help="Record this bank task as the new task's parent (lineage).")
@click.option("--epochs", type=float, default=None, help="Training epochs [3].")
@click.option("--lr", type=float, default=None, help="Expert learning rate [5e-4].")
@click.option("--head-lr", type=float, default=None, help="Head learning rate [2e-3].")
@click.option("--batch-size", type=int, default=None, help="Batch size [16].")
@click.option("--max-length", type=int, default=None, help="Tokens per example [128].")
@click.option("--max-train", type=int, default=None, help="Use at most N training examples [all].")
@click.option("--max-test", type=int, default=None, help="Evaluate on at most N test examples [all].")
@click.option("--seed", type=int, default=None, help="Random seed [0].")
@click.option("--replace", is_flag=True, help="Retrain and replace a task that exists already.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_friendly
def add_task(bank: str, spec: str, method: str, rank: int | None, alpha: float | None, dropout: float | None,
             targets: str | None, share_a: str | None, name: str | None, parent: str | None, replace: bool,
             as_json: bool, **train_kw: Any) -> None:
    """Train SPEC's expert and head, evaluate on its test split, and store them in BANK.

    SPEC is a task spec file (TOML) or the name of a spec in tasks/ (e.g. ag_news, weather).
    """
    from tqdm.auto import tqdm

    from adaptbank.bank.facade import AdapterBank
    from adaptbank.core.config import TrainConfig

    cfg = _method(method, rank, alpha, targets, dropout)
    train = TrainConfig(**{k: v for k, v in train_kw.items() if v is not None})
    b = AdapterBank.open(bank)
    bar = tqdm(desc=f"training {name or spec}", unit="step", disable=as_json or None, file=sys.stderr)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        r = b.add_task(spec, cfg, train, name=name, share_a=share_a, replace=replace, parent=parent, on_step=on_step,
                       log=lambda msg: click.echo(msg, err=True))
    finally:
        bar.close()
    summary = {"task": r.name, "test_accuracy": r.test_accuracy, "probe_accuracy": r.probe_accuracy,
               "trainable_params": r.trainable_params, "bytes_on_disk": r.bytes_on_disk, "seconds": round(r.seconds, 2),
               "n_train": r.n_train, "n_test": r.n_test, "shared_group": r.shared_group, "share_reason": r.share_reason}
    _emit(summary, as_json, lambda: click.echo(
        f"added {r.name}: test accuracy {_pct(r.test_accuracy)} on {r.n_test} examples "
        f"(probe init {_pct(r.probe_accuracy)}), {r.trainable_params:,} trainable parameters, "
        f"{_human(r.bytes_on_disk)} on disk, {r.seconds:.1f}s"
        + (f"\nshared A: {r.share_reason}" if r.share_reason else "")))


# ------------------------------------------------------------------------------------------- list / show / remove
@main.command("list")
@click.argument("bank", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
@_friendly
def list_(bank: str, as_json: bool) -> None:
    """List the tasks in BANK with method, accuracy and size."""
    from adaptbank.bank.store import BankStore  # the store alone: listing never imports torch

    b = BankStore.open(bank)
    manifest = b.manifest
    base = manifest["base"]
    rows = []
    for entry in manifest["tasks"]:
        cfg = b.read_config(entry["name"], check="none")
        rows.append({"task": entry["name"], "method": cfg["method"]["kind"], "labels": len(cfg["labels"]),
                     "test_accuracy": cfg["metrics"].get("test_accuracy"), "shared_group": cfg.get("shared_group"),
                     "bytes": sum(f["size"] for f in entry["files"].values())})
    _emit({"bank": str(b.path), "base": base["name"], "tasks": rows}, as_json, lambda: (
        click.echo(f"{b.path}: base {base['name']}, {len(rows)} task(s)"),
        [click.echo(f"  {r['task']:<24} {r['method']:<16} {r['labels']:>4} labels  acc {_pct(r['test_accuracy']):>6}  "
                    f"{_human(r['bytes']):>9}" + (f"  shared-A {r['shared_group']}" if r["shared_group"] else ""))
         for r in rows]))


@main.command()
@click.argument("bank", type=click.Path(file_okay=False))
@click.argument("task")
@click.option("--json", "as_json", is_flag=True)
@_friendly
def show(bank: str, task: str, as_json: bool) -> None:
    """Show everything BANK stores about TASK."""
    from adaptbank.bank.facade import AdapterBank

    info = AdapterBank.open(bank).info(task)
    _emit(info, as_json, lambda: click.echo(json.dumps(info, indent=2, default=str)))


@main.command()
@click.argument("bank", type=click.Path(file_okay=False))
@click.argument("task")
@_friendly
def remove(bank: str, task: str) -> None:
    """Remove TASK from BANK."""
    from adaptbank.bank.facade import AdapterBank

    AdapterBank.open(bank).remove(task)
    click.echo(f"removed {task}")


# ------------------------------------------------------------------------------------------- eval / verify
@main.command("eval")
@click.argument("bank", type=click.Path(file_okay=False))
@click.argument("tasks", nargs=-1)
@click.option("--routed", is_flag=True, help="Also evaluate without task ids, through the router.")
@click.option("--top-k", type=int, default=1, show_default=True, help="Experts mixed per input when routed.")
@click.option("--router", "router_kind", type=click.Choice(["sequence", "token"]), default="sequence",
              show_default=True, help="Which router --routed uses.")
@click.option("--json", "as_json", is_flag=True)
@_friendly
def eval_(bank: str, tasks: tuple[str, ...], routed: bool, top_k: int, router_kind: str, as_json: bool) -> None:
    """Evaluate TASKS (all by default) on their test splits: with the true task id (oracle), and with
    --routed also through the router (task-identification, routed and oracle accuracy per task)."""
    from adaptbank.bank.facade import AdapterBank

    b = AdapterBank.open(bank)
    if not routed:
        acc = b.evaluate(list(tasks) or None)
        avg = sum(acc.values()) / len(acc) if acc else None
        _emit({"oracle": acc, "average": avg}, as_json, lambda: (
            [click.echo(f"  {t:<24} {_pct(a)}") for t, a in acc.items()], click.echo(f"  {'average':<24} {_pct(avg)}")))
        return
    res = b.evaluate_routed(list(tasks) or None, top_k=top_k, token_level=router_kind == "token")

    def text() -> None:
        click.echo(f"  {'task':<20} {'router':>8} {'routed':>8} {'oracle':>8}")
        for t, r in res["tasks"].items():
            click.echo(f"  {t:<20} {_pct(r['router_accuracy']):>8} {_pct(r['routed_accuracy']):>8} "
                       f"{_pct(r['oracle_accuracy']):>8}")
        a = res["average"]
        click.echo(f"  {'average':<20} {_pct(a['router_accuracy']):>8} {_pct(a['routed_accuracy']):>8} "
                   f"{_pct(a['oracle_accuracy']):>8}   routed/oracle {a['routed_over_oracle']:.3f}")
        click.echo("  router confusion (true task -> chosen task: count):")
        for t, row in res["confusion"].items():
            off = {k: v for k, v in row.items() if k != t}
            if off:
                click.echo(f"    {t}: " + ", ".join(f"{k} {v}" for k, v in sorted(off.items(), key=lambda p: -p[1])))

    _emit(res, as_json, text)


# ------------------------------------------------------------------------------------------- predict / router
@main.command()
@click.argument("bank", type=click.Path(file_okay=False))
@click.argument("texts", nargs=-1)
@click.option("--input", "input_file", type=click.Path(dir_okay=False), default=None,
              help="JSONL file: one {\"text\": ...} object (or JSON string) per line.")
@click.option("--task", default=None, help="Force this task (oracle routing) instead of the router.")
@click.option("--top-k", type=int, default=1, show_default=True, help="Experts mixed per input.")
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per input; longer is cut.")
@click.option("--router", "router_kind", type=click.Choice(["sequence", "token"]), default="sequence",
              show_default=True, help="The sequence router, or the per-layer token gates.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input (JSON lines).")
@_friendly
def predict(bank: str, texts: tuple[str, ...], input_file: str | None, task: str | None, top_k: int,
            max_length: int, router_kind: str, as_json: bool) -> None:
    """Predict TEXTS (or --input FILE) with BANK: the router picks the task, its head the label."""
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.routing.predict import predict as run

    items = list(texts) + (_read_inputs(Path(input_file)) if input_file else [])
    if not items:
        raise click.UsageError("give TEXT arguments or --input FILE.jsonl")
    b = AdapterBank.open(bank)
    if not b.tasks():
        raise click.ClickException(f"bank {b.path} holds no tasks; add one with `adaptbank add-task`")
    token = router_kind == "token"
    model = b.load() if task else b.load_routed(top_k=top_k, token_level=token)
    preds = run(model, items, task=task, max_length=max_length, token_level=token, top_k=top_k)
    for i, p in enumerate(preds):
        if p.truncated:
            click.echo(f"warning: input {i + 1} is longer than {max_length} tokens and was truncated", err=True)
        if as_json:
            click.echo(json.dumps(p.to_dict(), ensure_ascii=False))
        else:
            mix = ", ".join(f"{t} {w:.2f}" for t, w in p.routing.items())
            click.echo(f"{p.task}: {p.label} ({p.score:.2f})  [{mix}]  {p.text[:60]!r}")


def _read_inputs(path: Path) -> list[str]:
    out = []
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise click.ClickException(f"{path}: not UTF-8 text ({err})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise click.ClickException(f"{path}:{n}: invalid JSON: {err.msg}") from None
        text = obj.get("text") if isinstance(obj, dict) else obj
        if not isinstance(text, str):
            raise click.ClickException(f"{path}:{n}: expected a string or an object with a \"text\" string")
        out.append(text)
    return out


@main.group()
def router() -> None:
    """The bank's learned router."""


@router.command("fit")
@click.argument("bank", type=click.Path(file_okay=False))
@click.option("--token-level", is_flag=True, help="Train per-layer token gates (experts frozen) instead; this "
              "reads up to --max-train training examples per task from the tasks' specs.")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Token router: passes over the data.")
@click.option("--max-train", type=int, default=200, show_default=True, help="Token router: examples per task.")
@click.option("--balance", type=float, default=0.01, show_default=True, help="Token router: load-balancing weight.")
@_friendly
def router_fit(bank: str, token_level: bool, epochs: float, max_train: int, balance: float) -> None:
    """Refit the sequence router from the bank's memory (no raw text needed), or train the token-level
    router with --token-level."""
    from adaptbank.bank.facade import AdapterBank

    b = AdapterBank.open(bank)
    if token_level:
        losses = b.fit_token_router(epochs=epochs, max_train=max_train, balance=balance)
        click.echo(f"token router trained: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        return
    order = b.fit_router()
    click.echo(f"router fitted over {len(order)} experts: {', '.join(order)}")


@main.command()
@click.argument("bank", type=click.Path(file_okay=False))
@click.option("--repair", is_flag=True, help="Remove leftover temporaries and unreferenced directories.")
@click.option("--fast", is_flag=True, help="Compare sizes and times instead of sha256.")
@click.option("--json", "as_json", is_flag=True)
@_friendly
def verify(bank: str, repair: bool, fast: bool, as_json: bool) -> None:
    """Check BANK: checksums, manifest against files, and the base model's fingerprint."""
    from adaptbank.bank.facade import AdapterBank

    b = AdapterBank.open(bank)
    removed = b.store.repair() if repair else []
    problems = b.verify(full=not fast)
    errors = [p for p in problems if p.is_error]
    data = {"ok": not errors, "problems": [{"kind": p.kind, "path": p.path, "message": p.message} for p in problems],
            "repaired": removed}
    _emit(data, as_json, lambda: (
        [click.echo(f"repaired: removed {r}") for r in removed],
        [click.echo(f"{'ERROR' if p.is_error else 'warning'} [{p.kind}] {p.path}: {p.message}") for p in problems],
        click.echo("ok" if not errors else f"{len(errors)} error(s)")))
    if errors:
        sys.exit(1)


# ------------------------------------------------------------------------------------------- graph
@main.command()
@click.argument("bank", type=click.Path(file_okay=False))
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


# ------------------------------------------------------------------------------------------- demo
@main.command()
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Working folder [a new temp folder].")
@click.option("--spec", default=None, help="Run spec file or shipped name [builtin: the built-in tasks].")
@_friendly
def demo(out: str | None, spec: str | None) -> None:
    """The main job on the embedded default, no data needed: the bundled MiniLM and the built-in tasks
    added one by one to a bank, the router fitted, every task evaluated after each addition (with and
    without task ids), and a report written."""
    from adaptbank.continual.loop import run_sequence
    from adaptbank.continual.runspec import load_run_spec
    from adaptbank.metrics import AccuracyMatrix
    from adaptbank.report.build import write_report

    work = Path(out or tempfile.mkdtemp(prefix="adaptbank-demo-"))
    start = time.perf_counter()
    run_spec = load_run_spec(spec or "builtin")
    click.echo(f"demo: {len(run_spec.tasks)} tasks into a bank on {run_spec.backbone}, in {work}")
    result = run_sequence(run_spec, work / "run", log=click.echo)
    tasks = result["tasks"]
    oracle = AccuracyMatrix(tuple(tasks), result["oracle"]["matrix"], result["oracle"]["baseline"])
    routed = AccuracyMatrix(tuple(tasks), result["routed"]["matrix"]) if result["routed"] else None
    click.echo("\naccuracy per task: untrained -> after its expert was added -> at the end (oracle | routed)")
    final = oracle.rows[-1]
    for j, t in enumerate(tasks):
        end = f" | {_pct(routed.rows[-1][j])}" if routed else ""
        click.echo(f"  {t:<10} {_pct(oracle.baseline[j]):>6} -> {_pct(oracle.rows[j][j]):>6} -> {_pct(final[j]):>6}{end}")
    s = oracle.summary()
    click.echo(f"ACC {_pct(s['acc'])}, BWT {_pct(s['bwt'])}, forgetting {_pct(s['forgetting'])}"
               + (f"; routed ACC {_pct(routed.summary()['acc'])} with no task ids" if routed else ""))
    html, md = work / "report.html", work / "report.md"
    write_report([work / "run"], "html", html)
    write_report([work / "run"], "md", md)
    click.echo(f"bank: {work / 'run' / 'bank'}\nreport: {html} (and {md})")
    click.echo(f"done in {time.perf_counter() - start:.0f}s")


register(main)


if __name__ == "__main__":  # pragma: no cover
    main()
