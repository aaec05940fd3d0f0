"""The routing commands: ``eval``, ``predict`` and ``router fit``.

One function per command, argument handling only. ``--top-k`` and ``--temperature`` default to the
bank's stored :class:`~adaptbank.core.config.RouterConfig`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from adaptbank.cli.errors import friendly
from adaptbank.cli.inputs import chunked, iter_jsonl_texts
from adaptbank.cli.options import BANK_ROUTER, config_option, given, lock_timeout_option
from adaptbank.cli.output import emit, pct
from adaptbank.core.config import RouterConfig, TrainConfig
from adaptbank.routing.ambiguity import AMBIGUOUS_AT

if TYPE_CHECKING:
    from adaptbank.bank.facade import AdapterBank

__all__ = ["eval_", "predict", "router", "router_fit", "register"]

_friendly = friendly()
_BANK = click.argument("bank", type=click.Path(file_okay=False))


@click.command("eval")
@_BANK
@click.argument("tasks", nargs=-1)
@click.option("--routed", is_flag=True, help="Also evaluate without task ids, through the router.")
@config_option(RouterConfig, "top_k", default_from=BANK_ROUTER)
@config_option(RouterConfig, "temperature", default_from=BANK_ROUTER)
@click.option("--router", "router_kind", type=click.Choice(["sequence", "token"]), default="sequence",
              show_default=True, help="Which router --routed uses.")
@click.option("--json", "as_json", is_flag=True)
@_friendly
def eval_(bank: str, tasks: tuple[str, ...], routed: bool, top_k: int | None, temperature: float | None,
          router_kind: str, as_json: bool) -> None:
    """Evaluate TASKS (all by default) on their test splits: with the true task id (oracle), and with
    --routed also through the router (task-identification, routed and oracle accuracy per task)."""
    from adaptbank.bank.facade import AdapterBank

    b = AdapterBank.open(bank)
    if not routed:
        metrics = b.evaluate_metrics(list(tasks) or None)  # accuracy, or exact match and F1 for generation tasks
        acc = {t: m.get("accuracy", m.get("exact_match", 0.0)) for t, m in metrics.items()}
        avg = sum(acc.values()) / len(acc) if acc else None

        def line(t: str, m: dict[str, float]) -> str:
            return pct(m["accuracy"]) if "accuracy" in m else f"{pct(m['exact_match'])} exact match, F1 {pct(m['f1'])}"

        emit({"oracle": acc, "metrics": metrics, "average": avg}, as_json, lambda: (
            [click.echo(f"  {t:<24} {line(t, m)}") for t, m in metrics.items()],
            click.echo(f"  {'average':<24} {pct(avg)}")))
        return
    res = b.evaluate_routed(list(tasks) or None, top_k=top_k, temperature=temperature,
                            token_level=router_kind == "token")

    def text() -> None:
        click.echo(f"  {'task':<20} {'router':>8} {'routed':>8} {'oracle':>8}")
        for t, r in res["tasks"].items():
            click.echo(f"  {t:<20} {pct(r['router_accuracy']):>8} {pct(r['routed_accuracy']):>8} "
                       f"{pct(r['oracle_accuracy']):>8}")
        a = res["average"]
        click.echo(f"  {'average':<20} {pct(a['router_accuracy']):>8} {pct(a['routed_accuracy']):>8} "
                   f"{pct(a['oracle_accuracy']):>8}   routed/oracle {a['routed_over_oracle']:.3f}")
        s = res["gap_split"]
        click.echo(f"  gap split (mean over tasks): expert error {pct(s['expert_error'])}, routing loss on ambiguous "
                   f"pairs {pct(s['loss_ambiguous'])}, elsewhere {pct(s['loss_other'])}, mixing "
                   f"{pct(s['loss_mixing'])}, gain {pct(s['gain'])}")
        amb = [p for p in res["ambiguity"]["pairs"] if p["ambiguous"]]
        click.echo(f"  ambiguous task pairs (router overlap >= {pct(res['ambiguity']['threshold'])}% or shared "
                   f"texts): " + (", ".join(f"{a}~{b} {pct(p['overlap'])}% ({p['shared_texts']} shared)"
                                            for p in amb for a, b in [p["tasks"]]) or "none"))
        click.echo("  router confusion (true task -> chosen task: count):")
        for t, row in res["confusion"].items():
            off = {k: v for k, v in row.items() if k != t}
            if off:
                click.echo(f"    {t}: " + ", ".join(f"{k} {v}" for k, v in sorted(off.items(), key=lambda p: -p[1])))

    emit(res, as_json, text)


PREDICT_CHUNK = 1024
"""Inputs tokenized and predicted at a time by ``predict``: the input is streamed in chunks of this size."""


@click.command()
@_BANK
@click.argument("texts", nargs=-1)
@click.option("--input", "input_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSONL file: one {\"text\": ...} object (or JSON string) per line.")
@click.option("--task", default=None, help="Force this task (oracle routing) instead of the router.")
@config_option(RouterConfig, "top_k", default_from=BANK_ROUTER)
@config_option(RouterConfig, "temperature", default_from=BANK_ROUTER)
@config_option(TrainConfig, "max_length")
@click.option("--router", "router_kind", type=click.Choice(["sequence", "token"]), default="sequence",
              show_default=True, help="The sequence router, or the per-layer token gates.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input (JSON lines).")
@click.option("--explain", is_flag=True, help="Show every input's runner-up task and its answer (without it: only "
              "for ambiguous inputs, where the runner-up holds at least --ambiguous-at of the router's probability).")
@click.option("--ambiguous-at", type=click.FloatRange(0.0, 1.0, min_open=True), default=AMBIGUOUS_AT,
              show_default=True, help="Router probability of the runner-up task from which an input is ambiguous.")
@_friendly
def predict(bank: str, texts: tuple[str, ...], input_file: str | None, task: str | None, top_k: int | None,
            temperature: float | None, max_length: int | None, router_kind: str, as_json: bool, explain: bool,
            ambiguous_at: float) -> None:
    """Predict TEXTS (or --input FILE) with BANK: the router picks the task, its head the label. A
    generation task writes text: with --task each input goes into the task's template; without it (a
    bank of generation tasks only) each input is a whole prompt and the router picks the expert."""
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.routing.predict import ONE_TASK_NOTE
    from adaptbank.routing.predict import predict as run

    if not texts and not input_file:
        raise click.UsageError("give TEXT arguments or --input FILE.jsonl")
    items = itertools.chain(texts, iter_jsonl_texts(Path(input_file)) if input_file else ())
    length = TrainConfig(**given(max_length=max_length)).max_length
    b = AdapterBank.open(bank)
    if not b.tasks():
        raise click.ClickException(f"bank {b.path} holds no tasks; add one with `adaptbank add-task`")
    token = router_kind == "token"
    k = b.router_config.top_k if top_k is None else top_k  # also the token gates' head mixing
    gen = [t for t in b.tasks() if b.store.read_config(t).get("head") == "generation"]
    if task in gen or (task is None and gen):
        if token:
            raise click.UsageError("--router token scores classification heads; generation tasks route with the "
                                   "sequence router (leave --router out)")
        return _generate(b, items, task, gen, length, k, temperature, as_json, input_file)
    model = b.load() if task else b.load_routed(top_k=k, temperature=temperature, token_level=token)
    seen = 0
    if task is None and len(b.tasks()) == 1:
        click.echo(f"note: {ONE_TASK_NOTE} ({b.tasks()[0]})", err=True)
    for chunk in chunked(items, PREDICT_CHUNK):  # streamed: memory bounded by the chunk, not the input
        for i, p in enumerate(run(model, chunk, task=task, max_length=length, token_level=token, top_k=k,
                                  explain=explain, ambiguous_at=ambiguous_at), seen):
            if p.truncated:
                click.echo(f"warning: input {i + 1} is longer than {length} tokens and was truncated", err=True)
            for note in p.notes:
                if note != ONE_TASK_NOTE:
                    click.echo(f"warning: input {i + 1}: {note}", err=True)
            if as_json:
                click.echo(json.dumps(p.to_dict(), ensure_ascii=False))
            else:
                mix = ", ".join(f"{t} {w:.2f}" for t, w in p.routing.items())
                sure = "" if p.router_probability is None else f" router p {p.router_probability:.2f}"
                click.echo(f"{p.task}: {p.label} ({p.score:.2f})  [{mix}]{sure}  {p.text[:60]!r}")
                if p.alternative is not None:
                    a = p.alternative
                    why = "ambiguous; " if p.ambiguous else ""
                    click.echo(f"    {why}runner-up {a['task']} (router p {a['probability']:.2f}): {a['label']} "
                               f"({a['score']:.2f})")
        seen += len(chunk)
    if not seen:
        raise click.ClickException(f"{input_file}: no inputs (only blank lines)")


def _generate(b: AdapterBank, items: Iterable[str], task: str | None, gen: list[str], length: int, top_k: int,
              temperature: float | None, as_json: bool, input_file: str | None) -> None:
    """``predict`` for generation tasks: greedy text from ``task`` (each input put into its template), or
    from the router's choice per input when every task of the bank is a generation task (the inputs are
    then whole prompts: the router chooses from the prompt, before any template could be picked)."""
    from adaptbank.training.generation import generate_texts

    if task is None and len(gen) != len(b.tasks()):
        other = [t for t in b.tasks() if t not in gen]
        raise click.ClickException(f"bank {b.path} holds generation tasks {gen} and classification tasks {other}; "
                                   "routed predict covers one kind per bank, so name the task with --task")
    model = b.load([task]) if task else b.load_routed(top_k=top_k, temperature=temperature)
    limit = max(int(b.info(t)["metrics"]["max_new_tokens"]) for t in ([task] if task else gen))
    template = b.info(task)["spec"]["template"] if task else "{text}"
    seen = 0
    for chunk in chunked(items, PREDICT_CHUNK):  # streamed, as for classification
        texts, tasks = generate_texts(model, [template.format(text=x) for x in chunk], task=task, routed=task is None,
                                      max_length=length, max_new_tokens=limit)
        for item, text, t in zip(chunk, texts, tasks):
            if as_json:
                click.echo(json.dumps({"text": item, "task": t, "generated": text}, ensure_ascii=False))
            else:
                click.echo(f"{t}: {text!r}  {item[:60]!r}")
        seen += len(chunk)
    if not seen:
        raise click.ClickException(f"{input_file}: no inputs (only blank lines)")


@click.group()
def router() -> None:
    """The bank's learned router."""


@router.command("fit")
@_BANK
@click.option("--token-level", is_flag=True, help="Train per-layer token gates (experts frozen) instead; this "
              "reads up to --max-train training examples per task from the tasks' specs.")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Token router: passes over the data.")
@click.option("--max-train", type=int, default=200, show_default=True, help="Token router: examples per task.")
@click.option("--balance", type=float, default=0.01, show_default=True, help="Token router: load-balancing weight.")
@lock_timeout_option
@_friendly
def router_fit(bank: str, token_level: bool, epochs: float, max_train: int, balance: float,
               lock_timeout: float) -> None:
    """Refit the sequence router from the bank's memory (no raw text needed), or train the token-level
    router with --token-level."""
    from adaptbank.bank.facade import AdapterBank

    b = AdapterBank.open(bank, lock_timeout=lock_timeout)
    if token_level:
        losses = b.fit_token_router(epochs=epochs, max_train=max_train, balance=balance)
        click.echo(f"token router trained: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        return
    order = b.fit_router()
    click.echo(f"router fitted over {len(order)} experts: {', '.join(order)}")


def register(group: click.Group) -> None:
    """Add ``eval``, ``predict`` and the ``router`` group to a click group (the ``adaptbank`` CLI)."""
    for command in (eval_, predict, router):
        group.add_command(command)
