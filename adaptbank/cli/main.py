"""The ``adaptbank`` command line: thin click wrappers over the Python API.

The group :func:`main` and ``demo`` live here; the commands by group in ``bank_commands`` (init,
add-task, list, show, remove, verify, graph), ``routing_commands`` (eval, predict, router fit),
``interop_commands`` (export, import: peft folders and merged checkpoints) and ``continual`` (run, report). Every command turns a bad value into one clear line (``Error: ...``)
and a non-zero exit, never a traceback, and a failed command leaves the bank as it was.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click

from adaptbank.cli import bank_commands, continual, interop_commands, routing_commands
from adaptbank.cli.errors import friendly
from adaptbank.cli.output import pct

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = ["main", "demo"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adaptbank")
def main() -> None:
    """adaptbank: one frozen transformer, a bank of per-task experts, a router, continual runs."""


@main.command()
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Working folder [a new temp folder].")
@click.option("--spec", default=None, help="Run spec file or shipped name [builtin: the built-in tasks].")
@friendly()
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
        end = f" | {pct(routed.rows[-1][j])}" if routed else ""
        click.echo(f"  {t:<10} {pct(oracle.baseline[j]):>6} -> {pct(oracle.rows[j][j]):>6} -> {pct(final[j]):>6}{end}")
    s = oracle.summary()
    click.echo(f"ACC {pct(s['acc'])}, BWT {pct(s['bwt'])}, forgetting {pct(s['forgetting'])}"
               + (f"; routed ACC {pct(routed.summary()['acc'])} with no task ids" if routed else ""))
    html, md = work / "report.html", work / "report.md"
    write_report([work / "run"], "html", html)
    write_report([work / "run"], "md", md)
    click.echo(f"bank: {work / 'run' / 'bank'}\nreport: {html} (and {md})")
    click.echo(f"done in {time.perf_counter() - start:.0f}s")


bank_commands.register(main)
routing_commands.register(main)
continual.register(main)
interop_commands.register(main)


if __name__ == "__main__":  # pragma: no cover
    main()
