"""``adaptbank run`` and ``adaptbank report``: click commands over :func:`run_sequence` and ``report.write_report``.

The main CLI registers them with ``main.add_command(run)`` and ``main.add_command(report)`` (or
``register(main)``). Expected errors become one ``Error: ...`` line and exit 1, never a traceback;
Ctrl-C keeps every finished task, and the same command resumes the run.

Under torchrun / accelerate launch, ``run`` trains data-parallel (``continual.loop``): rank 0 alone
writes ``OUT`` and prints; a failure on any rank makes every rank exit non-zero.
"""

from __future__ import annotations

from pathlib import Path

import click

from adaptbank.cli.errors import friendly
from adaptbank.cli.output import pct as _pct
from adaptbank.continual.runspec import STRATEGIES

__all__ = ["run", "report", "register"]

_RESUME = "Interrupted. Finished tasks are kept; run the same command again to resume."


@click.command("run")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Run directory: result.json, the checkpoint or bank. An existing run there is resumed.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=None, help="Override the spec's strategy.")
@click.option("--max-train", type=int, default=None, help="Override [train] max_train (examples per task).")
@click.option("--max-test", type=int, default=None, help="Override [train] max_test (test examples per task).")
@click.option("--epochs", type=float, default=None, help="Override [train] epochs.")
@click.option("--seed", type=int, default=None, help="Override [run] seed (data subsets and training).")
@click.option("--max-length", type=int, default=None, help="Override [train] max_length (tokens per example).")
@click.option("--init-from", type=click.Choice(["nearest"]), default=None,
              help="Strategy bank: start each new expert from the nearest stored one (override [options] init_from).")
@friendly(_RESUME)
def run(spec: str, out: str, strategy: str | None, max_train: int | None, max_test: int | None,
        epochs: float | None, seed: int | None, max_length: int | None, init_from: str | None) -> None:
    """Learn the tasks of run spec SPEC in order and write OUT/result.json after every task.

    Under torchrun or accelerate launch it trains data-parallel; rank 0 alone writes OUT and prints."""
    from adaptbank.continual.loop import run_sequence
    from adaptbank.continual.runspec import load_run_spec
    from adaptbank.metrics import AccuracyMatrix
    from adaptbank.training.distributed import current

    if epochs is not None and float(epochs).is_integer():
        epochs = int(epochs)  # "epochs = 1", not "1.0", in config_changed and reports
    run_spec = load_run_spec(spec).with_overrides(strategy=strategy, max_train=max_train, max_test=max_test,
                                                  epochs=epochs, seed=seed, max_length=max_length,
                                                  init_from=init_from)
    dist = current()
    result = run_sequence(run_spec, out, log=click.echo, dist=dist)
    if not dist.main:
        return
    oracle = AccuracyMatrix(tuple(result["tasks"]), result["oracle"]["matrix"], result["oracle"]["baseline"]).summary()
    what = ", exact match" if result.get("metric") == "exact_match" else ""
    line = (f"{result['name']} ({result['strategy']}{what}): ACC {_pct(oracle['acc'])}, BWT {_pct(oracle['bwt'])}, "
            f"FWT {_pct(oracle['fwt'])}, forgetting {_pct(oracle['forgetting'])}")
    if result["routed"] is not None:
        routed = AccuracyMatrix(tuple(result["tasks"]), result["routed"]["matrix"]).summary()
        line += f"; routed ACC {_pct(routed['acc'])}"
    click.echo(line)
    click.echo(f"wrote {Path(out) / 'result.json'}; see `adaptbank report {out}`")


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["md", "html", "json"]), default="md", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the report to this file instead of standard output.")
@friendly("Interrupted.")
def report(run_dirs: tuple[str, ...], fmt: str, output: str | None) -> None:
    """Report on one or more run directories (reads only their result.json; runs no model)."""
    from adaptbank.report.build import write_report

    text = write_report(list(run_dirs), fmt, Path(output) if output else None)  # type: ignore[arg-type]
    if output:
        click.echo(f"wrote {output}")
    else:
        click.echo(text, nl=False)


def register(group: click.Group) -> None:
    """Add ``run`` and ``report`` to a click group (the ``adaptbank`` CLI)."""
    group.add_command(run)
    group.add_command(report)
