"""Reading command inputs from files: ``adaptbank predict --input FILE.jsonl``, streamed.

The file is read one line at a time and handed on in chunks, so ``predict --input`` runs in memory
bounded by the chunk size whatever the file's size (``bench/predict_memory.py`` measures it); one line
may be at most ``adaptbank._limits.MAX_LINE_BYTES``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import click

from adaptbank._limits import MAX_LINE_BYTES

__all__ = ["iter_jsonl_texts", "chunked"]


def iter_jsonl_texts(path: Path, *, max_line: int = MAX_LINE_BYTES) -> Iterator[str]:
    """The texts of a JSONL file, one at a time: one ``{"text": ...}`` object or JSON string per line;
    blank lines skipped.

    A line that is not UTF-8, not JSON, without a text string, or longer than ``max_line`` bytes raises
    ``click.ClickException`` naming the file and line (texts before it have been yielded already)."""
    try:
        fh = path.open("rb")
    except OSError as err:
        raise click.ClickException(f"cannot read {path}: {err.strerror or err}") from None
    with fh:
        n = 0
        while raw := fh.readline(max_line + 1):
            n += 1
            if len(raw) > max_line and not raw.endswith(b"\n"):
                raise click.ClickException(f"{path}:{n}: line longer than {max_line:,} bytes; split the input")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise click.ClickException(f"{path}:{n}: not UTF-8 text ({err})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise click.ClickException(f"{path}:{n}: invalid JSON: {err.msg}") from None
            text = obj.get("text") if isinstance(obj, dict) else obj
            if not isinstance(text, str):
                raise click.ClickException(f"{path}:{n}: expected a string or an object with a \"text\" string")
            yield text


def chunked(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of at most ``size`` items."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
