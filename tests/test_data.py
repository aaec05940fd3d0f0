"""Data loading: the staged tasks, the builtin generators, and every kind of bad input."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptbank.data.builtin import BUILTIN_TASKS, DEFAULT_SIZES, generate
from adaptbank.data.load import (
    DataError,
    DataFileNotFoundError,
    DataWarning,
    Example,
    load_task,
    read_csv,
    read_jsonl,
    read_labels_json,
    subsample,
)
from adaptbank.data.specs import TaskSpec, data_dir

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LABELS = ("neg", "pos", "meh")
CLASSES = {
    "ag_news": 4,
    "amazon": 5,
    "yelp": 5,
    "dbpedia": 14,
    "yahoo": 10,
    "sst2": 2,
    "trec": 6,
    "banking77": 77,
    "clinc150": 150,
}


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _jsonl(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


GOOD = {"text": "fine", "label": 1}


# --- the staged real tasks -----------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(CLASSES))
def test_shared_task_loads(task: str) -> None:
    if not (data_dir() / task / "train.jsonl").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"staged data for {task} missing under {data_dir()} (CI=true: required)")
        pytest.skip(f"no staged data under {data_dir()}")
    data = load_task(task)
    assert (len(data.train), len(data.test)) == (2000, 500)
    assert len(data.labels) == CLASSES[task]
    assert {e.label for e in data.train} == set(range(CLASSES[task]))
    assert all(isinstance(e.text, str) and e.text.strip() for e in data.train + data.test)
    small = load_task(task, max_train=200, max_test=50, seed=3)
    assert (len(small.train), len(small.test)) == (200, 50)
    assert small == load_task(task, max_train=200, max_test=50, seed=3)
    if CLASSES[task] <= 200:
        assert {e.label for e in small.train} == set(range(CLASSES[task]))


# --- builtin generators --------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(BUILTIN_TASKS))
def test_builtin_deterministic_balanced_sized(task: str) -> None:
    k = len(BUILTIN_TASKS[task])
    for split, n in DEFAULT_SIZES.items():
        rows = generate(task, split)
        assert rows == generate(task, split) and len(rows) == n
        counts = Counter(label for _, label in rows)
        assert set(counts) == set(range(k)) and max(counts.values()) - min(counts.values()) <= 1
        assert len({text for text, _ in rows}) == n  # unique texts
    train = {t for t, _ in generate(task, "train")}
    assert not train & {t for t, _ in generate(task, "test")}
    assert len(generate(task, "train", n=37)) == 37
    data = load_task(task, max_train=300, max_test=100)
    assert (len(data.train), len(data.test), data.labels) == (300, 100, BUILTIN_TASKS[task])


def test_builtin_label_sets_distinct() -> None:
    names = [label for labels in BUILTIN_TASKS.values() for label in labels]
    assert len(BUILTIN_TASKS) >= 4 and len(names) == len(set(names))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("nope", "train"), "unknown builtin task"),
        (("weather", "dev"), "unknown builtin split"),
        (("weather", "train", 0), "n must be"),
    ],
)
def test_builtin_bad_args(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate(*args)  # type: ignore[arg-type]


# --- JSONL errors --------------------------------------------------------------------------------

BAD_JSONL = [
    ('{"text": "x", "label": 1', "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"label": 1}', "missing text field 'text'"),
    ('{"text": 5, "label": 1}', "text field 'text' must be a string"),
    ('{"text": "   ", "label": 1}', "empty text"),
    ('{"text": "x"}', "missing label field 'label'"),
    ('{"text": "x", "label": 3}', r"label 3 is not an index in \[0, 2\]"),
    ('{"text": "x", "label": -1}', "label -1 is not an index"),
    ('{"text": "x", "label": "happy"}', "label 'happy' is not an index.*label names"),
    ('{"text": "x", "label": "1"}', "label '1' is not an index"),
    ('{"text": "x", "label": true}', "label True is not an index"),
    ('{"text": "x", "label": 1.0}', "label 1.0 is not an index"),
]


@pytest.mark.parametrize(("line", "match"), BAD_JSONL)
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    path = _write(tmp_path, "d.jsonl", _jsonl(GOOD, "", line, GOOD))
    with pytest.raises(DataError, match=match) as info:
        read_jsonl(path, LABELS)
    assert f"{path}:3:" in str(info.value)


def test_jsonl_string_labels_map_to_index_and_bom(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.jsonl", b"\xef\xbb\xbf" + _jsonl({"text": "a", "label": "meh"}, GOOD).encode())
    assert read_jsonl(path, LABELS) == [Example("a", 2), Example("fine", 1)]


def test_jsonl_non_utf8(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.jsonl", _jsonl(GOOD).encode() + b'{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8"):
        read_jsonl(path, LABELS)


def test_skip_bad_lines_skips_counts_and_warns(tmp_path: Path) -> None:
    lines = [GOOD] + [line for line, _ in BAD_JSONL] + [GOOD]
    path = _write(tmp_path, "d.jsonl", _jsonl(*lines).encode() + b"\xff\xfe\n")
    with pytest.warns(DataWarning, match=f"skipped {len(BAD_JSONL) + 1} bad record"):
        assert len(read_jsonl(path, LABELS, skip_bad_lines=True)) == 2
    spec = TaskSpec(name="t", train=str(path), test=str(path), labels=LABELS)
    with pytest.warns(DataWarning):
        data = load_task(spec, skip_bad_lines=True)
    assert data.skipped == {"train": len(BAD_JSONL) + 1, "test": len(BAD_JSONL) + 1}


@pytest.mark.filterwarnings("ignore::adaptbank.data.load.DataWarning")
@pytest.mark.parametrize("content", ["", "\n\n  \n", _jsonl('{"text": "", "label": 0}')])
def test_empty_split(tmp_path: Path, content: str) -> None:
    path = _write(tmp_path, "d.jsonl", content)
    with pytest.raises(DataError, match=f"{path}.*(empty split|empty text)"):
        read_jsonl(path, LABELS, skip_bad_lines=bool(content.strip()))


def test_missing_file_names_path_and_spec(tmp_path: Path) -> None:
    good = _write(tmp_path, "ok.jsonl", _jsonl(GOOD))
    spec = TaskSpec(name="ghost", train=str(good), test=str(tmp_path / "gone.jsonl"), labels=LABELS)
    with pytest.raises(DataFileNotFoundError, match=r"gone.jsonl for task 'ghost' not found") as info:
        load_task(spec)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    with pytest.raises(DataFileNotFoundError, match="no labels.json beside"):
        load_task(TaskSpec(name="g", train=str(good), test=str(good)))


def test_labels_json_beside_train(tmp_path: Path) -> None:
    good = _write(tmp_path, "train.jsonl", _jsonl(GOOD, {"text": "b", "label": 0}))
    _write(tmp_path, "labels.json", json.dumps(["x", "y"]))
    data = load_task(TaskSpec(name="g", train=str(good), test=str(good)))
    assert data.labels == ("x", "y") and len(data.train) == 2
    for bad, match in [
        ("[1, 2]", "non-empty strings"),
        ('["a"]', "at least 2"),
        ('["a", "a"]', "duplicate"),
        ("{", "not a valid"),
    ]:
        _write(tmp_path, "labels.json", bad)
        with pytest.raises(DataError, match=match):
            read_labels_json(tmp_path / "labels.json")


def test_unknown_extension(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.txt", _jsonl(GOOD))
    with pytest.raises(DataError, match="cannot infer the format"):
        load_task(TaskSpec(name="t", train=str(path), test=str(path), labels=LABELS))
    assert load_task(TaskSpec(name="t", train=str(path), test=str(path), labels=LABELS, format="jsonl")).train


# --- CSV -----------------------------------------------------------------------------------------


def test_csv_reads_indices_names_and_multiline(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.csv", 'id,text,label\n1,hello,0\n2,"two\nlines",meh\n\n3," 2 ",1\n')
    assert read_csv(path, LABELS) == [Example("hello", 0), Example("two\nlines", 2), Example(" 2 ", 1)]


BAD_CSV = [
    ("hi,7", r"label '7' is not an index"),
    ("hi,happy", "label 'happy' is not an index"),
    ("hi,", "label '' is not an index"),
    ("hi", "missing label field"),
    ("' ',1".replace("'", '"'), "empty text"),
    ("hi,--1", "label '--1' is not an index"),
]


@pytest.mark.parametrize(("row", "match"), BAD_CSV)
def test_bad_csv_row_names_file_and_line(tmp_path: Path, row: str, match: str) -> None:
    path = _write(tmp_path, "d.csv", f'text,label\n"a\nb",0\n{row}\n')
    with pytest.raises(DataError, match=match) as info:
        read_csv(path, LABELS)
    assert f"{path}:4:" in str(info.value)


def test_csv_header_utf8_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"d.csv:1: header .* lacks column\(s\) \['label'\]"):
        read_csv(_write(tmp_path, "d.csv", "text,lab\nx,1\n"), LABELS)
    with pytest.raises(DataError, match=r"e.csv:3: not valid UTF-8"):
        read_csv(_write(tmp_path, "e.csv", b"text,label\nok,1\ncaf\xe9,0\n"), LABELS)
    with pytest.raises(DataError, match="empty split"):
        read_csv(_write(tmp_path, "f.csv", "text,label\n"), LABELS)
    with pytest.raises(DataError, match="empty split"):
        read_csv(_write(tmp_path, "g.csv", ""), LABELS)
    with pytest.warns(DataWarning, match="skipped 2"):
        assert read_csv(_write(tmp_path, "h.csv", "text,label\nok,1\nx,9\n,1\n"), LABELS, skip_bad_lines=True)


def test_csv_custom_fields_through_spec(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.csv", "sentence,y\nhello,pos\n")
    spec = TaskSpec(
        name="t", train=str(path), test=str(path), labels=LABELS, text_field="sentence", label_field="y"
    )
    assert load_task(spec).train == [Example("hello", 1)]


# --- hf-datasets without the package -------------------------------------------------------------


def test_hf_datasets_missing_package_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    (tmp_path / "ds").mkdir()
    spec = TaskSpec(name="t", train=str(tmp_path / "ds"), test=str(tmp_path / "ds"), labels=LABELS)
    with pytest.raises(DataError, match="needs the 'datasets' package"):
        load_task(spec)


# --- subsetting ----------------------------------------------------------------------------------


def test_subsample_deterministic_covers_classes() -> None:
    examples = [Example(f"t{i}", 0) for i in range(95)] + [Example(f"r{i}", i % 4 + 1) for i in range(5)]
    a = subsample(examples, 10, seed=1)
    assert a == subsample(examples, 10, seed=1) and len(a) == 10
    assert {e.label for e in a} == {0, 1, 2, 3, 4}
    assert len(subsample(examples, 3, seed=1)) == 3
    assert subsample(examples, None) == examples == subsample(examples, 1000)
    assert subsample(examples, 10, seed=2) != a


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_max_train_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="max_train must be None or a positive int"):
        load_task("weather", max_train=bad)  # type: ignore[arg-type]


# --- fuzzing: parsers raise DataError only -------------------------------------------------------

_line = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.builds(
        lambda t, y: json.dumps({"text": t, "label": y}).encode(),
        st.one_of(st.text(max_size=10), st.integers(), st.none()),
        st.one_of(st.integers(-2, 5), st.sampled_from(LABELS + ("x", "1")), st.floats(), st.none()),
    ),
    st.sampled_from(
        [b"text,label", b'"unterminated', b"\x00", b"[[[[[[", b"1e999999", b"\r", b"\xef\xbb\xbf"]
    ),
)


@FUZZ
@given(lines=st.lists(_line, max_size=8), skip=st.booleans(), header=st.booleans())
def test_fuzz_parsers_raise_only_dataerror(
    lines: list[bytes], skip: bool, header: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    d = tmp_path_factory.mktemp("fuzz")
    raw = (b"text,label\n" if header else b"") + b"\n".join(lines)
    for name, reader in (("f.jsonl", read_jsonl), ("f.csv", read_csv)):
        path = _write(d, name, raw)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DataWarning)
                out = reader(path, LABELS, skip_bad_lines=skip)
        except DataError:
            continue
        assert out and all(isinstance(e.text, str) and 0 <= e.label < len(LABELS) for e in out)
