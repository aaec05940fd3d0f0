"""Declarative task specs: what a task is called, where its data lives, and how to read it.

A task spec is a small TOML file under ``tasks/`` (data only; nothing in a spec is ever executed)::

    name = "ag_news"
    type = "classification"
    description = "AG News topic, 4 classes"

    [data]
    train = "${ADAPTBANK_DATA}/ag_news/train.jsonl"
    test = "${ADAPTBANK_DATA}/ag_news/test.jsonl"
    text_field = "text"      # optional, default "text"
    label_field = "label"    # optional, default "label"
    # labels = ["World", ...] # optional; default: labels.json beside the train file
    format = "auto"          # auto | jsonl | csv | hf-datasets

A **generation** task (input text -> target text) names a prompt template and the target field::

    name = "summaries"
    type = "generation"
    template = "Article: {text}\nSummary:"   # the prompt; {text} is the input text, the only field
    [data]
    train = "..."
    target_field = "summary"                 # the field holding the target text

Any classification spec can be *posed* as generation with ``pose = "generation"`` and a template: the
target is then the label name (the model writes ``" " + label``), so the shared data tasks serve both
settings. :attr:`TaskSpec.head` says which head a spec's task gets.

A *source string* (``train`` / ``test``) is one of

- a path, absolute or relative to the spec file (made absolute when the spec is loaded);
- a path containing ``${ADAPTBANK_DATA}``, expanded when the data is read to the environment variable
  ``ADAPTBANK_DATA`` or, if unset, ``<repo>/../shared/data`` (see :func:`data_dir`);
- ``builtin:<generator>:<split>``, a deterministic generated task from :mod:`adaptbank.data.builtin`.

Bare names given to :func:`load_task_spec` resolve to ``<dir>/<name>.toml`` in the folders of the
environment variable ``ADAPTBANK_TASKS`` first, then in the specs shipped inside the package
(``adaptbank.tasks``, read with ``importlib.resources``; in the repository it is the ``tasks/`` folder).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import string
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from adaptbank._limits import MAX_SPEC_BYTES, read_small_text
from adaptbank.core.config import check_keys, validate_name
from adaptbank.data.builtin import BUILTIN_SPLITS, BUILTIN_TASKS
from adaptbank.data.builtin_text import BUILTIN_GENERATION

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "DATA_VAR",
    "SpecNotFoundError",
    "TaskSpec",
    "data_dir",
    "expand_source",
    "find_spec_file",
    "list_task_specs",
    "load_task_spec",
    "parse_builtin_source",
    "spec_from_toml",
    "spec_dirs",
    "tasks_dir",
    "validate_task_name",
]

TaskType = Literal["classification", "generation"]
DataFormat = Literal["auto", "jsonl", "csv", "hf-datasets"]

DATA_VAR = "${ADAPTBANK_DATA}"
"""The one placeholder expanded in source strings."""

_PLACEHOLDER_RE = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_]")
_TOP_KEYS = ("name", "type", "description", "template", "pose", "data")
_DATA_KEYS = ("train", "test", "text_field", "label_field", "target_field", "labels", "format")


class SpecNotFoundError(ValueError, FileNotFoundError):
    """A task spec named by path or bare name does not exist (both a ValueError and a FileNotFoundError)."""


def validate_task_name(name: object) -> str:
    """Return ``name`` if it is a valid task name, else raise ValueError naming the value and the rule.

    Task names become file and directory names in a bank, so they must be safe path components
    (``core.config.validate_name``, the one rule for task, group and stem names)."""
    return validate_name(name, "task name")


def data_dir() -> Path:
    """The directory ``${ADAPTBANK_DATA}`` expands to: env ``ADAPTBANK_DATA``, else ``../shared/data``
    beside a source checkout of adaptbank (``<repo>/../shared/data``), else ``../shared/data`` from the
    working directory (a wheel install run from the repository root finds the same folder)."""
    env = os.environ.get("ADAPTBANK_DATA")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parent.parent  # adaptbank/
    if (package.parent / "pyproject.toml").is_file():  # running from a source checkout
        return package.parent.parent / "shared" / "data"
    return Path.cwd().parent / "shared" / "data"


def tasks_dir() -> Path:
    """The specs shipped inside the package (``adaptbank.tasks``: the repository's ``tasks/`` folder)."""
    return Path(str(resources.files("adaptbank.tasks")))


def spec_dirs() -> list[Path]:
    """Where bare spec names are looked up, in order: the folders of env ``ADAPTBANK_TASKS`` (several
    separated by ``os.pathsep``), then the shipped specs of :func:`tasks_dir`."""
    extra = [Path(p).expanduser() for p in os.environ.get("ADAPTBANK_TASKS", "").split(os.pathsep) if p]
    return [*extra, tasks_dir()]


def list_task_specs(sub: str = "") -> list[str]:
    """Names of the specs available in :func:`spec_dirs` (``sub="runs"``: the run specs)."""
    return sorted({p.stem for d in spec_dirs() if (d / sub).is_dir() for p in (d / sub).glob("*.toml")})


def find_spec_file(name: str, sub: str = "") -> Path | None:
    """``<dir>/<sub>/<name>.toml`` in the first of :func:`spec_dirs` that has it, or None."""
    for d in spec_dirs():
        path = d / sub / f"{name}.toml"
        if path.is_file():
            return path
    return None


def parse_builtin_source(source: str) -> tuple[str, str] | None:
    """``"builtin:weather:train"`` -> ``("weather", "train")``; ``None`` for non-builtin sources.

    Raises ValueError for a malformed ``builtin:`` source, an unknown generator or an unknown split.
    """
    if not source.startswith("builtin:"):
        return None
    parts = source.split(":")
    if len(parts) != 3:
        raise ValueError(f"malformed builtin source {source!r}; expected 'builtin:<generator>:<split>'")
    _, task, split = parts
    if task not in BUILTIN_TASKS and task not in BUILTIN_GENERATION:
        raise ValueError(f"unknown builtin generator {task!r} in {source!r}; allowed: "
                         f"{sorted(BUILTIN_TASKS)} (classification), {sorted(BUILTIN_GENERATION)} (generation)")
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"unknown builtin split {split!r} in {source!r}; allowed: {list(BUILTIN_SPLITS)}")
    return task, split


def expand_source(source: str) -> str:
    """Expand ``${ADAPTBANK_DATA}`` in a source string (other sources are returned unchanged)."""
    return source.replace(DATA_VAR, str(data_dir())) if DATA_VAR in source else source


def _check_source(field: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} must be a non-empty source string, got {value!r}")
    if "\x00" in value:
        raise ValueError(f"{field} source {value!r} contains a NUL character")
    if value.startswith("builtin:"):
        parse_builtin_source(value)
        return
    leftover = _PLACEHOLDER_RE.search(value.replace(DATA_VAR, ""))
    if leftover is not None:
        raise ValueError(
            f"{field} source {value!r} uses {leftover.group(0)!r}; only {DATA_VAR} is expanded in sources"
        )


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One task: its name, kind, data sources and how to read them. See the module docstring."""

    name: str
    """Task name; a safe path component (see :func:`validate_task_name`)."""
    type: TaskType = "classification"
    """Task kind: ``"classification"`` (text -> one of ``labels``) or ``"generation"`` (text -> target text)."""
    train: str
    """Source of the training split: a path, a path with ``${ADAPTBANK_DATA}``, or ``builtin:<gen>:<split>``."""
    test: str
    """Source of the test split, same forms as ``train``."""
    text_field: str = "text"
    """Field (JSONL key / CSV column / dataset column) holding the input text."""
    label_field: str = "label"
    """Field holding the label: an index into ``labels`` or one of the label names."""
    labels: tuple[str, ...] | None = None
    """Label names in index order; ``None`` reads ``labels.json`` beside the train file (or the builtin's)."""
    format: DataFormat = "auto"
    """File format; ``"auto"`` decides by extension (.jsonl/.json, .csv) or a directory (hf-datasets)."""
    description: str = ""
    """Free-text description shown by the CLI."""
    template: str | None = None
    """Generation only: the prompt, with ``{text}`` where the input text goes (``"Review: {text}\nSentiment:"``)."""
    target_field: str | None = None
    """Generation only: the field holding the target text (a builtin generator supplies its own)."""
    pose: TaskType | None = None
    """``"generation"`` poses a classification task as generation: the target is the label name."""

    @property
    def head(self) -> Literal["classification", "generation"]:
        """The head this spec's task gets: ``generation`` for a generation task or a posed one."""
        return "generation" if "generation" in (self.type, self.pose) else "classification"

    def __post_init__(self) -> None:
        validate_task_name(self.name)
        if self.type not in get_args(TaskType):
            raise ValueError(
                f"task {self.name!r}: unknown type {self.type!r}; allowed: {list(get_args(TaskType))}"
            )
        _check_source("train", self.train)
        _check_source("test", self.test)
        builtin = [s.startswith("builtin:") for s in (self.train, self.test)]
        if any(builtin) and self.format != "auto":
            raise ValueError(f"task {self.name!r}: builtin sources need format 'auto', got {self.format!r}")
        for field in ("text_field", "label_field"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"task {self.name!r}: {field} must be a non-empty string, got {value!r}")
        if self.format not in get_args(DataFormat):
            raise ValueError(
                f"task {self.name!r}: unknown format {self.format!r}; allowed: {list(get_args(DataFormat))}"
            )
        if not isinstance(self.description, str):
            raise ValueError(f"task {self.name!r}: description must be a string, got {self.description!r}")
        if self.labels is not None:
            if isinstance(self.labels, list):  # TOML and JSON give lists; store an immutable tuple
                object.__setattr__(self, "labels", tuple(self.labels))
            _check_labels(self.labels, f"task {self.name!r}: labels")
        _check_generation(self)

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-ready dict of the fields (``labels`` as a list or ``None``)."""
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels) if self.labels is not None else None
        return d

    @classmethod
    def from_dict(
        cls, d: object, *, origin: str | None = None, base_dir: str | Path | None = None
    ) -> TaskSpec:
        """Build a spec from a flat dict of fields, rejecting unknown keys with a suggestion.

        ``origin`` names where the dict came from in error messages; ``base_dir``, when given, makes
        relative path sources absolute (relative to that directory).
        """
        where = f" in task spec {origin}" if origin else ""
        if not isinstance(d, dict):
            raise ValueError(f"task spec{where} must be a table/dict, got {type(d).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        check_keys(d, allowed, where[len(" in "):])
        for key in ("name", "train", "test"):
            if key not in d:
                raise ValueError(f"missing required key {key!r}{where}")
        kwargs = dict(d)
        if (
            "labels" in kwargs
            and kwargs["labels"] is not None
            and not isinstance(kwargs["labels"], (list, tuple))
        ):
            raise ValueError(f"labels{where} must be a list of strings, got {kwargs['labels']!r}")
        if base_dir is not None:
            for key in ("train", "test"):
                kwargs[key] = _absolutize(kwargs[key], Path(base_dir))
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise ValueError(f"{exc}{where}") from None


def _check_generation(spec: TaskSpec) -> None:
    """The generation fields: a template with ``{text}`` (and no other field) for a generation or posed
    task, a target field for a generation task read from files, none of them for plain classification."""
    what = f"task {spec.name!r}"
    if spec.pose not in (None, *get_args(TaskType)):
        raise ValueError(f"{what}: unknown pose {spec.pose!r}; allowed: {list(get_args(TaskType))} (or leave it out)")
    builtin = parse_builtin_source(spec.train)
    if spec.type == "classification" and builtin is not None and builtin[0] in BUILTIN_GENERATION:
        raise ValueError(f"{what}: builtin {builtin[0]!r} is a generation generator (text -> text); set type = "
                         "\"generation\" and a template")
    if spec.head == "classification":
        extra = [f for f in ("template", "target_field") if getattr(spec, f) is not None]
        if extra:
            raise ValueError(f"{what}: {extra[0]} is for generation tasks only; set type = \"generation\" or "
                             "pose = \"generation\", or remove it")
        return
    if spec.type == "generation" and spec.pose == "classification":
        raise ValueError(f"{what}: a generation task cannot be posed as classification (it has no labels)")
    if spec.template is None:
        raise ValueError(f"{what}: a generation task needs a prompt template with {{text}} where the input goes, "
                         "e.g. template = \"Review: {text}\\nSentiment:\"")
    if not isinstance(spec.template, str):
        raise ValueError(f"{what}: template must be a string, got {spec.template!r}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(spec.template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"{what}: template {spec.template!r} is not a valid format string ({exc}); write "
                         "literal braces as {{ and }}") from None
    if fields != ["text"]:
        raise ValueError(f"{what}: template {spec.template!r} must use the field {{text}} exactly once and no "
                         f"other field; it uses {fields}")
    if spec.type == "classification":
        if spec.target_field is not None:
            raise ValueError(f"{what}: a classification task posed as generation has its label name as target; "
                             f"remove target_field {spec.target_field!r}")
        return
    if spec.labels is not None:
        raise ValueError(f"{what}: a generation task has no labels; remove labels (its targets are texts)")
    if builtin is not None and builtin[0] in BUILTIN_TASKS:
        raise ValueError(f"{what}: builtin {builtin[0]!r} is a classification generator; pose it with type = "
                         f"\"classification\" and pose = \"generation\", or use one of {sorted(BUILTIN_GENERATION)}")
    if spec.target_field is None and builtin is None:
        raise ValueError(f"{what}: a generation task needs target_field in [data], naming the field that holds "
                         "the target text (e.g. target_field = \"target\")")
    if spec.target_field is not None and (not isinstance(spec.target_field, str) or not spec.target_field):
        raise ValueError(f"{what}: target_field must be a non-empty string, got {spec.target_field!r}")


def _check_labels(labels: object, what: str) -> None:
    if not isinstance(labels, tuple) or len(labels) < 2:
        raise ValueError(f"{what} must be a list of at least 2 label names, got {labels!r}")
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"{what}: each label must be a non-empty string, got {label!r}")
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"{what}: duplicate label names {dupes}")


def _absolutize(source: object, base: Path) -> object:
    """Make a relative path source absolute against ``base``; leave other sources as they are."""
    if not isinstance(source, str) or not source or source.startswith("builtin:") or "$" in source:
        return source
    if "\x00" in source:
        return source  # rejected with a clear message by TaskSpec validation
    p = Path(source).expanduser()
    if p.is_absolute():
        return str(p)
    try:
        return str((base / p).resolve())
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise ValueError(f"data path {source!r} (relative to {base}) cannot be resolved, e.g. a symlink loop: "
                         f"{exc}") from None


def spec_from_toml(text: str, *, origin: str = "<string>", base_dir: str | Path | None = None) -> TaskSpec:
    """Parse TOML text in the ``[data]``-table layout into a :class:`TaskSpec`."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"task spec {origin} is not valid TOML: {exc}") from None
    where = f" in task spec {origin}"
    for key in doc:
        if key in _DATA_KEYS:
            raise ValueError(f"key {key!r}{where} belongs in the [data] table, not at the top level")
    check_keys(doc, list(_TOP_KEYS), where[len(" in "):])
    data = doc.get("data", {})
    if not isinstance(data, dict):
        raise ValueError(f"'data'{where} must be a table ([data]), got {type(data).__name__}")
    check_keys(data, list(_DATA_KEYS), f"the [data] table of task spec {origin}")
    flat = {k: v for k, v in doc.items() if k != "data"}
    flat.update(data)
    return TaskSpec.from_dict(flat, origin=origin, base_dir=base_dir)


def load_task_spec(path_or_name: str | os.PathLike[str]) -> TaskSpec:
    """Load a spec from a ``.toml`` path, or from a bare name resolved as ``<tasks dir>/<name>.toml``.

    Raises :class:`SpecNotFoundError` (a ValueError and FileNotFoundError) listing the available
    names when nothing matches, and ValueError for an invalid spec.
    """
    raw = os.fspath(path_or_name)
    if not isinstance(raw, str):
        raise ValueError(f"task spec must be a str path or name, got {raw!r}")
    looks_like_path = raw.endswith(".toml") or "/" in raw or os.sep in raw or isinstance(path_or_name, Path)
    if looks_like_path:
        path: Path | None = Path(raw).expanduser()
    else:
        validate_task_name(raw)
        path = find_spec_file(raw)
    if path is None or not path.is_file():
        available = list_task_specs()
        close = difflib.get_close_matches(Path(raw).stem, available, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        where = path if path is not None else " or ".join(str(d) for d in spec_dirs())
        raise SpecNotFoundError(
            f"task spec {raw!r} not found (looked in {where}){hint} available: {', '.join(available) or '(none)'}"
        )
    text = read_small_text(path, MAX_SPEC_BYTES, "task spec")
    return spec_from_toml(text, origin=str(path), base_dir=path.resolve().parent)
