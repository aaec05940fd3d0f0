"""One error policy for every ``adaptbank`` command: expected errors become one ``Error: ...`` line
and exit 1; Ctrl-C says what was kept and exits 130; never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def friendly(interrupted: str = "Interrupted: nothing was written; the bank is unchanged.") -> Callable[[F], F]:
    """Decorate a click command: library errors -> ``click.ClickException``; Ctrl-C -> ``interrupted``."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from adaptbank.bank.store import BankError

            try:
                return fn(*args, **kwargs)
            except click.ClickException:
                raise
            except KeyboardInterrupt:
                click.echo(interrupted, err=True)
                sys.exit(130)
            except (BankError, ValueError, KeyError, TypeError, FileNotFoundError, RuntimeError, OSError) as err:
                message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
                raise click.ClickException(str(message)) from None

        return wrapper  # type: ignore[return-value]

    return wrap
