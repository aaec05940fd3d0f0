"""Loading a task's examples from its :class:`~adaptbank.data.specs.TaskSpec` (loading only; no tokenizing).

Formats: JSONL (one object per line), CSV (header row names the fields), a directory written by
``datasets.Dataset.save_to_disk`` (``datasets`` is imported lazily), and ``builtin:<generator>:<split>``.

Every bad record is an error naming ``file:line`` and the bad value: malformed JSON, bytes that are not
UTF-8, a missing or non-string text, an empty text, a label that is neither an index into the label list
nor one of its names. With ``skip_bad_lines=True`` bad records are skipped instead, counted, and reported
once per file with ``warnings.warn`` (a :class:`DataWarning`). An empty split is an error.

A generation task's records hold a target text (``target_field``, a non-empty string) instead of a label;
its examples carry ``target`` and label 0, and its :class:`TaskData` has no labels. :func:`generation_pairs`
turns either kind of generation task (a posed classification task too) into prompts and targets.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptbank._limits import check_size, max_data_bytes
from adaptbank.data.builtin import BUILTIN_TASKS, generate
from adaptbank.data.builtin_text import BUILTIN_GENERATION, generate_pairs
from adaptbank.data.sampling import subsample
from adaptbank.data.specs import TaskSpec, expand_source, load_task_spec, parse_builtin_source

__all__ = [
    "DataError",
    "DataFileNotFoundError",
    "DataWarning",
    "Example",
    "TaskData",
    "generation_pairs",
    "load_task",
    "read_csv",
    "read_jsonl",
    "read_labels_json",
    "subsample",
]

log = logging.getLogger(__name__)
_INT_RE = re.compile(r"-?[0-9]{1,18}")


class DataError(ValueError):
    """Task data that cannot be read: the message names the file (and line) and the bad value."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file named by a task spec does not exist."""


class DataWarning(UserWarning):
    """Bad records were skipped (``skip_bad_lines=True``)."""


@dataclass(frozen=True)
class Example:
    """One labelled example."""

    text: str
    label: int
    """Index into :attr:`TaskData.labels` (0 for a generation task's examples)."""
    target: str | None = None
    """The target text of a generation task's example; None for classification."""


@dataclass(frozen=True)
class TaskData:
    """A loaded task: its spec, label names and the two splits."""

    spec: TaskSpec
    labels: tuple[str, ...]
    train: list[Example]
    test: list[Example]
    skipped: dict[str, int] = field(default_factory=dict)
    """Number of bad records skipped per split (only with ``skip_bad_lines=True``)."""


def read_labels_json(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Read a ``labels.json`` list of label names (index order); DataError if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError(f"labels file {path} not found (the spec sets no 'labels')")
    try:
        names = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not a valid UTF-8 JSON list of label names: {exc}") from None
    if not isinstance(names, list) or len(names) < 2:
        raise DataError(f"{path}: expected a JSON list of at least 2 label names, got {names!r:.200}")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise DataError(f"{path}: label names must be non-empty strings, got {bad[0]!r}")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate label names in {names!r:.200}")
    return tuple(names)


class _Checker:
    """Turns raw (text, label) values into Examples, raising or counting bad records."""

    def __init__(self, path: Path, labels: tuple[str, ...], text_field: str, label_field: str, skip: bool,
                 target_field: str | None = None):
        self.path, self.labels, self.skip = path, labels, skip
        self.text_field, self.label_field, self.target_field = text_field, label_field, target_field
        self.index = {name: i for i, name in enumerate(labels)}
        self.skipped = 0
        self.first_error: str | None = None

    def bad(self, line: int, msg: str) -> None:
        full = f"{self.path}:{line}: {msg}"
        if not self.skip:
            raise DataError(full)
        self.skipped += 1
        self.first_error = self.first_error or full

    def example(self, line: int, record: dict[Any, Any], *, csv_ints: bool = False) -> Example | None:
        """The record as an Example, or None after reporting it (raises unless skipping)."""
        problem = self._problem(record, csv_ints)
        if isinstance(problem, str):
            self.bad(line, problem)
            return None
        return problem

    def _problem(self, record: dict[Any, Any], csv_ints: bool) -> Example | str:
        fields = sorted(map(str, record))
        if self.text_field not in record:
            return f"missing text field {self.text_field!r}; fields: {fields}"
        text = record[self.text_field]
        if not isinstance(text, str):
            return f"text field {self.text_field!r} must be a string, got {text!r:.100}"
        if not text.strip():
            return f"empty text in field {self.text_field!r}: {text!r:.100}"
        if self.target_field is not None:
            target = record.get(self.target_field)
            if not isinstance(target, str) or not target.strip():
                return (f"target field {self.target_field!r} must hold a non-empty string, got {target!r:.100}; "
                        f"fields: {fields}")
            return Example(text=text, label=0, target=target)
        if self.label_field not in record or record[self.label_field] is None:
            return f"missing label field {self.label_field!r}; fields: {fields}"
        label = self._label(record[self.label_field], csv_ints)
        if label is None:
            return (
                f"label {record[self.label_field]!r:.100} is not an index in [0, {len(self.labels) - 1}] "
                f"nor one of the {len(self.labels)} label names {list(self.labels)!r:.200}"
            )
        return Example(text=text, label=label)

    def _label(self, value: object, csv_ints: bool) -> int | None:
        if isinstance(value, bool):
            return None
        if isinstance(value, str):
            if value in self.index:
                return self.index[value]
            if not csv_ints or _INT_RE.fullmatch(value.strip()) is None:
                return None
            value = int(value.strip())
        if isinstance(value, int) and 0 <= value < len(self.labels):
            return value
        return None

    def finish(self, examples: list[Example]) -> list[Example]:
        if self.skipped:
            msg = f"{self.path}: skipped {self.skipped} bad record(s); first: {self.first_error}"
            warnings.warn(msg, DataWarning, stacklevel=2)
            log.warning(msg)
        if not examples:
            raise DataError(f"{self.path}: no usable examples (empty split)")
        return examples


def _open_checked(path: Path) -> None:
    """A data file that exists, is a file and is not larger than the data limit (``adaptbank._limits``)."""
    try:
        check_size(path, max_data_bytes(), "data file", "cut or sample it first, or raise ADAPTBANK_MAX_DATA_BYTES")
    except FileNotFoundError:
        raise DataFileNotFoundError(f"data file {path} not found") from None
    except ValueError as err:
        raise DataError(str(err)) from None
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected a file")


def _read_bytes(path: Path) -> bytes:
    _open_checked(path)
    return path.read_bytes()


def _lines(path: Path) -> Iterable[bytes]:
    """The file's lines, read one at a time (without their newline)."""
    _open_checked(path)
    with path.open("rb") as fh:
        for raw in fh:
            yield raw[:-1] if raw.endswith(b"\n") else raw


def _jsonl(path: Path, check: _Checker) -> list[Example]:
    out: list[Example] = []
    for lineno, raw in enumerate(_lines(path), start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # UTF-8 byte-order mark
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            check.bad(
                lineno, f"not valid UTF-8 (byte {raw[exc.start : exc.start + 1]!r} at column {exc.start + 1})"
            )
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            check.bad(lineno, f"malformed JSON ({exc}): {line.strip()!r:.120}")
            continue
        if not isinstance(record, dict):
            check.bad(lineno, f"expected a JSON object, got {type(record).__name__}: {line.strip()!r:.120}")
            continue
        ex = check.example(lineno, record)
        if ex is not None:
            out.append(ex)
    return out


def _csv(path: Path, check: _Checker) -> list[Example]:
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{lineno}: not valid UTF-8 (byte {raw[exc.start : exc.start + 1]!r})"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    out: list[Example] = []
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: no usable examples (empty split, no header row)")
        missing = [f for f in (check.text_field, check.label_field) if f not in header]
        if missing:
            raise DataError(f"{path}:1: header {header!r:.200} lacks column(s) {missing}")
        start = reader.line_num + 1
        for row in reader:
            lineno, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            record = dict(zip(header, row, strict=False))  # short rows lack fields; extra cells are dropped
            ex = check.example(lineno, record, csv_ints=True)
            if ex is not None:
                out.append(ex)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None
    return out


def read_jsonl(
    path: str | os.PathLike[str],
    labels: tuple[str, ...],
    *,
    text_field: str = "text",
    label_field: str = "label",
    skip_bad_lines: bool = False,
) -> list[Example]:
    """Read a JSONL file of ``{text_field: str, label_field: int | label name}`` objects."""
    return _read_checked(_jsonl, path, labels, text_field, label_field, skip_bad_lines)


def read_csv(
    path: str | os.PathLike[str],
    labels: tuple[str, ...],
    *,
    text_field: str = "text",
    label_field: str = "label",
    skip_bad_lines: bool = False,
) -> list[Example]:
    """Read a CSV file whose header row names the fields; labels may be indices or label names."""
    return _read_checked(_csv, path, labels, text_field, label_field, skip_bad_lines)


def _read_checked(parse: Callable[[Path, _Checker], list[Example]], path: str | os.PathLike[str],
                  labels: tuple[str, ...], text_field: str, label_field: str, skip_bad_lines: bool) -> list[Example]:
    check = _Checker(Path(path), labels, text_field, label_field, skip_bad_lines)
    return check.finish(parse(Path(path), check))


def _hf(path: Path, role: str, spec: TaskSpec, check: _Checker) -> list[Example]:
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported only when needed
    except ImportError:
        raise DataError(
            f"task {spec.name!r}: reading {path} (format 'hf-datasets') needs the 'datasets' package; "
            "install it with `pip install datasets`"
        ) from None
    if not path.exists():
        raise DataFileNotFoundError(f"dataset directory {path} for task {spec.name!r} not found")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several unrelated types for unreadable directories
        raise DataError(f"{path}: not a dataset saved with save_to_disk: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if role not in ds:
            raise DataError(f"{path}: DatasetDict has no split {role!r}; splits: {sorted(ds)}")
        ds = ds[role]
    return [ex for i, rec in enumerate(ds) if (ex := check.example(i + 1, rec)) is not None]


def _format_of(path: Path, spec: TaskSpec) -> str:
    if spec.format != "auto":
        return spec.format
    if path.is_dir():
        return "hf-datasets"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise DataError(
        f"task {spec.name!r}: cannot infer the format of {path} from its extension; "
        "use .jsonl/.json/.csv, a save_to_disk directory, or set format in the [data] table"
    )


def _spec_labels(spec: TaskSpec) -> tuple[str, ...]:
    if spec.type == "generation":
        return ()
    if spec.labels is not None:
        return spec.labels
    builtin = parse_builtin_source(spec.train)
    if builtin is not None:
        return BUILTIN_TASKS[builtin[0]]
    train = Path(expand_source(spec.train)).expanduser()
    candidates = [train / "labels.json"] if train.is_dir() else []  # a save_to_disk directory
    candidates.append(train.parent / "labels.json")
    for candidate in candidates:
        if candidate.is_file():
            return read_labels_json(candidate)
    raise DataFileNotFoundError(
        f"task {spec.name!r}: no 'labels' in the spec and no labels.json beside {train}"
    )


def _read_split(
    spec: TaskSpec, role: str, labels: tuple[str, ...], skip_bad_lines: bool
) -> tuple[list[Example], int]:
    source = getattr(spec, role)
    builtin = parse_builtin_source(source)
    if builtin is not None:
        task, split = builtin
        if task in BUILTIN_GENERATION:
            return [Example(text=t, label=0, target=y) for t, y in generate_pairs(task, split)], 0
        if len(labels) != len(BUILTIN_TASKS[task]):
            raise DataError(
                f"task {spec.name!r}: {len(labels)} labels {labels!r} but builtin {task!r} has "
                f"{len(BUILTIN_TASKS[task])}: {BUILTIN_TASKS[task]!r}"
            )
        return [Example(text=t, label=y) for t, y in generate(task, split)], 0
    path = Path(expand_source(source)).expanduser()
    if not path.exists() and os.path.lexists(path):  # a dangling link or a loop: say which
        try:
            path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{role} data {path} for task {spec.name!r} cannot be opened: it is a symlink that "
                            f"leads nowhere or loops ({exc})") from None
    if not path.exists():
        raise DataFileNotFoundError(
            f"{role} data {path} for task {spec.name!r} not found (source {source!r})"
        )
    check = _Checker(path, labels, spec.text_field, spec.label_field, skip_bad_lines,
                     spec.target_field if spec.type == "generation" else None)
    fmt = _format_of(path, spec)
    if fmt == "jsonl":
        examples = _jsonl(path, check)
    elif fmt == "csv":
        examples = _csv(path, check)
    else:
        examples = _hf(path, role, spec, check)
    return check.finish(examples), check.skipped


def _check_max(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or a positive int, got {value!r}")


def load_task(
    spec: TaskSpec | str | os.PathLike[str],
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    skip_bad_lines: bool = False,
) -> TaskData:
    """Load both splits of a task (a spec, a spec path or a bare spec name).

    ``max_train``/``max_test`` take a deterministic, class-covering subset (see :func:`subsample`).
    """
    _check_max("max_train", max_train)
    _check_max("max_test", max_test)
    if not isinstance(spec, TaskSpec):
        spec = load_task_spec(spec)
    labels = _spec_labels(spec)
    splits: dict[str, list[Example]] = {}
    skipped: dict[str, int] = {}
    for role, limit in (("train", max_train), ("test", max_test)):
        examples, n_bad = _read_split(spec, role, labels, skip_bad_lines)
        if n_bad:
            skipped[role] = n_bad
        splits[role] = subsample(examples, limit, seed)
    return TaskData(spec=spec, labels=labels, train=splits["train"], test=splits["test"], skipped=skipped)


def generation_pairs(data: TaskData, split: str) -> tuple[list[str], list[str]]:
    """Prompts and targets of split ``split`` (``train`` / ``test``) of a generation task: the prompt is
    the spec's template with the text in, the target the example's target text or, for a classification
    task posed as generation, its label name."""
    if data.spec.head != "generation" or data.spec.template is None:
        raise ValueError(f"task {data.spec.name!r} is a classification task; pose it as generation with "
                         "pose = \"generation\" and a template")
    examples = getattr(data, split)
    prompts = [data.spec.template.format(text=e.text) for e in examples]
    return prompts, [e.target if e.target is not None else data.labels[e.label] for e in examples]
