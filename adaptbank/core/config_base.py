"""The shared base of the config dataclasses (``core.config``): the target presets, the name rule, the
one unknown-key check, the validation helpers and ``_Config`` with ``to_dict``/``from_dict``."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

__all__ = ["TARGET_PRESETS", "NAME_RULE", "Activation", "validate_name", "check_keys"]

TARGET_PRESETS: tuple[str, ...] = ("qv", "attn", "all-linear", "v", "houlsby", "pfeiffer", "pfeiffer-block", "ffn",
                                   "ia3", "ffn-block")
"""Named target sets; ``inject.py`` maps each to module roles per model family."""

Activation = Literal["relu", "gelu", "silu", "tanh"]

C = TypeVar("C", bound="_Config")

NAME_RULE = "1-100 characters from [A-Za-z0-9_-], starting with a letter or digit"
"""Task, group and file-stem names: safe path components, and no '.' (names key torch ModuleDicts and
appear inside dotted module paths)."""
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def validate_name(value: object, what: str = "task name") -> str:
    """Return ``value`` if it is a valid name (:data:`NAME_RULE`), else raise ``ValueError`` naming it."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__} {value!r}; rule: {NAME_RULE}")
    if not 1 <= len(value) <= 100 or _NAME_RE.fullmatch(value) is None:
        raise ValueError(f"invalid {what} {value!r}; rule: {NAME_RULE}")
    return value


def check_keys(given: dict[Any, Any], allowed: list[str] | tuple[str, ...], where: str = "") -> None:
    """Raise ``ValueError`` for the first key of ``given`` not in ``allowed``, naming ``where`` it was
    found and suggesting the closest allowed key. The one unknown-key check of configs, specs and run specs."""
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            place = f" in {where}" if where else ""
            raise ValueError(f"unknown key {key!r}{place}{hint} allowed: {', '.join(sorted(allowed))}")


def _positive(name: str, flag: str, value: float, *, integer: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    if not ok or not math.isfinite(float(value)) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} must be {kind} ({flag}), got {value!r}")


def _choice(name: str, flag: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)} ({flag}), got {value!r}")


def _check_targets(targets: str | tuple[str, ...]) -> None:
    if isinstance(targets, str):
        _choice("targets", "--targets", targets, TARGET_PRESETS)
    elif not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be a preset ({', '.join(TARGET_PRESETS)}) or non-empty patterns, got {targets!r}")


def _check_layers(layers: tuple[int, ...] | None) -> None:
    """``layers`` is None or distinct integer layer indices (negative ones count from the top: -1 the last)."""
    if layers is None:
        return
    ok = (isinstance(layers, tuple) and layers and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
          and len(set(layers)) == len(layers))
    if not ok:
        raise ValueError(f"layers must be distinct integer layer indices, e.g. 4,5 or -2,-1 (--layers), got {layers!r}")


@dataclass(frozen=True, kw_only=True)
class _Config:
    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        if self.kind:
            out["kind"] = self.kind
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        fields = [f.name for f in dataclasses.fields(cls)]
        data = {k: v for k, v in data.items() if not (k == "kind" and v == cls.kind)}
        check_keys(data, fields, f"{cls.__name__}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**data)
