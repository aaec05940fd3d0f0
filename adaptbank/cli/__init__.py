"""The ``adaptbank`` command line: one thin function per command (argument handling only)."""

from adaptbank.cli.main import main

__all__ = ["main"]
