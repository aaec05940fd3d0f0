"""How the commands print: JSON or text, percentages and sizes."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from adaptbank.metrics import pct as metrics_pct

__all__ = ["emit", "pct", "human"]


def emit(data: Any, as_json: bool, text: Callable[[], object]) -> None:
    """Print ``data`` as indented JSON with ``--json``, else call ``text`` to print it for people."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))
    else:
        text()


def pct(x: float | None) -> str:
    """``0.912`` -> ``'91.2%'``; None -> ``'-'`` (``metrics.pct`` with a unit)."""
    return metrics_pct(x, unit="%", missing="-")


def human(n: float) -> str:
    """A byte count for people: ``B``, ``KB``, ``MB`` or ``GB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
