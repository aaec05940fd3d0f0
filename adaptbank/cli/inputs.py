"""Reading command inputs from files: ``adaptbank predict --input FILE.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import click

__all__ = ["read_jsonl_texts"]


def read_jsonl_texts(path: Path) -> list[str]:
    """The texts of a JSONL file: one ``{"text": ...}`` object or JSON string per line; blank lines skipped.

    A file that is not UTF-8, a line that is not JSON, or a line without a text string raises
    ``click.ClickException`` naming the file and line."""
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
