"""Click options generated from the config dataclasses of ``adaptbank.core.config``.

The dataclasses stay the single source of truth: :func:`config_option` takes an option's type and
help from a field (its attribute docstring, then ``[default: <the field's default>]``) and gives it
the click default ``None``, which means "the dataclass default" (or, where ``default_from`` says so,
the value the bank stored). Commands pass on only the options that were given (:func:`given`).

:data:`CONFIG_FLAGS` is the table of every option that maps onto a config field, per command;
``tests/test_cli_options.py`` checks the commands against it and it against the dataclasses.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args, get_origin

import click

from adaptbank.bank.store import DEFAULT_LOCK_TIMEOUT
from adaptbank.core.config import (
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    LoRAConfig,
    ParallelAdapterConfig,
    PrefixConfig,
    PromptTuningConfig,
    RouterConfig,
    TrainConfig,
)

__all__ = ["CONFIG_FLAGS", "NOT_CONFIG", "UNFLAGGED", "ConfigFlag", "ConfigOption", "ADAPTER_WIDTHS", "BANK_ROUTER",
           "also_note", "config_option", "field_default", "field_doc", "flag_for", "given", "lock_timeout_option"]

F = TypeVar("F", bound=Callable[..., Any])

BANK_ROUTER = "the bank's router config (stored by init)"
"""``default_from`` of the routed-inference options: None takes the bank's stored RouterConfig."""


@functools.cache
def _class_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of ``cls`` and its dataclass bases, whitespace-normalised, parsed from source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError) as err:  # an install without the .py sources
            raise RuntimeError(f"cannot read the source of {klass.__module__}.{klass.__name__} for the CLI's "
                               f"help text ({err}); install adaptbank with its .py files") from None
        tree = ast.parse(source)
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _field(cls: type, name: str) -> dataclasses.Field[Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ValueError(f"{cls.__name__} has no field {name!r}; fields: {', '.join(fields)}")
    return fields[name]


def field_doc(cls: type, name: str) -> str:
    """The attribute docstring of field ``name`` of config dataclass ``cls`` (one line)."""
    _field(cls, name)
    doc = _class_docs(cls).get(name)
    if not doc:
        raise ValueError(f"{cls.__name__}.{name} has no attribute docstring; document it under the field")
    return doc


def field_default(cls: type, name: str) -> Any:
    """The dataclass default of field ``name`` of ``cls``."""
    f = _field(cls, name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"{cls.__name__}.{name} has no default; a CLI option needs one")


def flag_for(name: str) -> str:
    """The flag a field gets by rule: ``--`` and the field name with underscores as dashes."""
    return "--" + name.replace("_", "-")


def _click_type(cls: type, name: str) -> click.ParamType:
    hint = typing.get_type_hints(cls)[name]
    if get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else hint
    if get_origin(hint) is Literal:
        return click.Choice([str(a) for a in get_args(hint)])
    simple: dict[Any, click.ParamType] = {int: click.INT, float: click.FLOAT, str: click.STRING, bool: click.BOOL}
    if hint not in simple:
        raise TypeError(f"config_option supports int, float, str, bool and Literal fields (optionally | None); "
                        f"{cls.__name__}.{name} is {hint!r}")
    return simple[hint]


class ConfigOption(click.Option):
    """A click option generated from a config field; remembers which (``config_cls``, ``config_field``)."""

    def __init__(self, *args: Any, config_cls: type, config_field: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config_cls = config_cls
        self.config_field = config_field


def config_option(cls: type, field_name: str, flag: str | None = None, *, default_from: str | None = None,
                  note: str = "", **click_kwargs: Any) -> Callable[[F], F]:
    """A ``click.option`` for field ``field_name`` of config dataclass ``cls``.

    Flag ``--field-name`` unless ``flag`` (a documented alias) is given; the parameter is named after
    the field; type from the field's annotation; click default ``None``; help is the field's attribute
    docstring, then ``note``, then ``[default: <the dataclass default>]`` (with ``default_from``:
    ``[default: <default_from>, where it defaults to <the dataclass default>]``)."""
    value = field_default(cls, field_name)
    suffix = f"[default: {default_from}, where it defaults to {value}]" if default_from else f"[default: {value}]"
    help_text = " ".join(p for p in (field_doc(cls, field_name), note, suffix) if p)
    kind, name = _click_type(cls, field_name), flag or flag_for(field_name)
    if kind is click.BOOL:  # a switch pair, --x/--no-x; neither given: None, the dataclass default
        name = f"{name}/--no-{name[2:]}"
    return click.option(name, field_name, cls=ConfigOption, config_cls=cls, config_field=field_name, type=kind,
                        default=None, show_default=False, help=help_text, **click_kwargs)


def also_note(also: tuple[tuple[type, str], ...]) -> str:
    """Help text for a flag that also sets other methods' fields, with their defaults (``--rank``)."""
    kinds = " or ".join(str(getattr(c, "kind", c.__name__)) for c, _ in also)
    values = ", ".join(f"{getattr(c, 'kind', c.__name__)} {field_default(c, f)}" for c, f in also)
    return f"With --method {kinds} it sets the bottleneck width instead ({values})."


def lock_timeout_option(fn: F) -> F:
    """``--lock-timeout SECONDS`` for the commands that write a bank: how long to wait for another writer."""
    return click.option("--lock-timeout", type=click.FloatRange(min=0), default=DEFAULT_LOCK_TIMEOUT,
                        show_default=True, metavar="SECONDS",
                        help="Wait at most this long for another writer's bank lock, then fail naming its "
                        "process id.")(fn)


def given(**options: Any) -> dict[str, Any]:
    """The options that were given (not None): the keyword arguments for a config dataclass."""
    return {k: v for k, v in options.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class ConfigFlag:
    """One row of :data:`CONFIG_FLAGS`: the field a flag maps onto, and why it is named otherwise."""

    cls: type
    field: str
    alias: str = ""
    """Why the flag is not ``--<field with dashes>`` (empty: it follows the rule)."""
    default_from: str | None = None
    """Where a None default is taken from when it is not the dataclass default."""
    also: tuple[tuple[type, str], ...] = ()
    """Further fields the flag sets (``--rank`` is the bottleneck width of adapters)."""


HEAD_TRAIN = "the head file's"
"""Where ``import`` takes its data settings from when a flag is not given: the exported task's own."""
_TRAIN = ("epochs", "lr", "head_lr", "batch_size", "grad_accum", "max_length", "max_train", "max_test", "seed",
          "train_dropout", "cache_frozen")
ADAPTER_WIDTHS: tuple[tuple[type, str], ...] = ((AdapterConfig, "bottleneck"), (ParallelAdapterConfig, "bottleneck"))
_ROUTED = {"--top-k": ConfigFlag(RouterConfig, "top_k", default_from=BANK_ROUTER),
           "--temperature": ConfigFlag(RouterConfig, "temperature", default_from=BANK_ROUTER)}

CONFIG_FLAGS: dict[str, dict[str, ConfigFlag]] = {
    "init": {
        "--router-layers": ConfigFlag(RouterConfig, "layers", alias="--layers alone would not say which layers"),
        "--top-k": ConfigFlag(RouterConfig, "top_k"),
        "--temperature": ConfigFlag(RouterConfig, "temperature"),
        "--router-shrinkage": ConfigFlag(RouterConfig, "shrinkage", alias="--shrinkage alone would not say of what"),
        "--share-distance": ConfigFlag(RouterConfig, "share_distance"),
        "--router-pools": ConfigFlag(RouterConfig, "pools", alias="--pools alone would not say of what"),
        "--router-replay": ConfigFlag(RouterConfig, "replay", alias="--replay is a continual strategy's"),
    },
    "add-task": {
        "--rank": ConfigFlag(LoRAConfig, "rank", also=ADAPTER_WIDTHS),
        "--alpha": ConfigFlag(LoRAConfig, "alpha"),
        "--dropout": ConfigFlag(LoRAConfig, "dropout"),
        "--prompt-length": ConfigFlag(PromptTuningConfig, "prompt_length"),
        "--prompt-init": ConfigFlag(PromptTuningConfig, "prompt_init"),
        "--prefix-length": ConfigFlag(PrefixConfig, "prefix_length"),
        "--prefix-positions": ConfigFlag(PrefixConfig, "positions", alias="--positions alone would not say of what"),
        **{flag_for(f): ConfigFlag(TrainConfig, f) for f in _TRAIN},
    },
    "eval": dict(_ROUTED),
    "predict": {**_ROUTED, "--max-length": ConfigFlag(TrainConfig, "max_length")},
    "import": {flag_for(f): ConfigFlag(TrainConfig, f, default_from=HEAD_TRAIN)
               for f in ("max_length", "max_train", "max_test", "seed")},
}
"""Per command (space-separated path, e.g. ``router fit``): flag -> the config field it maps onto."""

UNFLAGGED: dict[tuple[type, str], str] = {
    (TrainConfig, "weight_decay"): "rarely changed; set it in a run spec's [train] table or TrainConfig",
    (TrainConfig, "warmup"): "rarely changed; set it in a run spec's [train] table or TrainConfig",
    (TrainConfig, "probe_init"): "LP-FT is always wanted from the CLI; a run spec's [train] table can turn it off",
    (TrainConfig, "grad_clip"): "rarely changed; set it in a run spec's [train] table or TrainConfig",
    (TrainConfig, "probe_c"): "chosen by the ablations (README); set it in a run spec's [train] table or TrainConfig",
    (TrainConfig, "probe_scale"): "chosen by the ablations (README); set it in a run spec's [train] table or TrainConfig",
    (LoRAConfig, "targets"): "--targets is one flag for three methods whose defaults differ (qv, pfeiffer-block, ffn), "
                             "and takes comma-separated patterns",
    (PrefixConfig, "reparam_hidden"): "the reparameterisation's width (512, as peft's default); a run spec's "
                                      "[method] table can change it; --method ptuning-v2 trains without it",
    (BitFitConfig, "targets"): "set by the one --targets flag of every method",
    (IA3Config, "targets"): "set by the one --targets flag of every method",
    (IA3Config, "feedforward"): "which targets scale their input; a run spec's [method] table can change it",
    (LoRAConfig, "layers"): "set by the one --layers flag of every method with targets (comma-separated indices "
                            "and ranges)",
    (BitFitConfig, "layers"): "set by the one --layers flag of every method with targets",
    (IA3Config, "layers"): "set by the one --layers flag of every method with targets",
}
"""Config fields the CLI deliberately gives no generated option, with the reason."""

NOT_CONFIG: dict[tuple[str, str], str] = {
    ("add-task", "--targets"): "see UNFLAGGED (LoRAConfig, 'targets'); the method's default applies when omitted",
    ("add-task", "--layers"): "see UNFLAGGED (LoRAConfig, 'layers'); parsed from '4,5', '2-5' or '-2,-1' into a tuple",
    ("router fit", "--epochs"): "the token router's passes (AdapterBank.fit_token_router), not TrainConfig.epochs",
    ("router fit", "--max-train"): "token-router examples per task (AdapterBank.fit_token_router)",
    ("run", "--epochs"): "overrides the run spec's [train] epochs; None keeps the spec's value",
    ("run", "--max-train"): "overrides the run spec's [train] max_train; None keeps the spec's value",
    ("run", "--max-test"): "overrides the run spec's [train] max_test; None keeps the spec's value",
    ("run", "--max-length"): "overrides the run spec's [train] max_length; None keeps the spec's value",
    ("run", "--seed"): "overrides RunSpec.seed (the run seed), not TrainConfig.seed",
}
"""Options named like a config field's flag that are not generated from it, with the reason."""
