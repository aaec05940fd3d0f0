"""Task specs: every shipped spec loads, names are safe, bad specs fail with a useful message."""

from __future__ import annotations

import dataclasses
import string
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptbank.data.builtin import BUILTIN_TASKS
from adaptbank.data.specs import (
    SpecNotFoundError,
    TaskSpec,
    expand_source,
    list_task_specs,
    load_task_spec,
    spec_from_toml,
    tasks_dir,
    validate_task_name,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO_TASKS = Path(__file__).resolve().parent.parent / "tasks"
SHARED = ["ag_news", "amazon", "yelp", "dbpedia", "yahoo", "sst2", "trec", "banking77", "clinc150"]
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _spec(**kw: object) -> TaskSpec:
    base: dict[str, object] = {"name": "t", "train": "a.jsonl", "test": "b.jsonl"}
    base.update(kw)
    return TaskSpec(**base)  # type: ignore[arg-type]


# --- shipped specs -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(REPO_TASKS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_spec_loads(path: Path) -> None:
    spec = load_task_spec(path)
    assert spec.name == path.stem
    assert spec.type in ("classification", "generation")
    assert spec.head == ("generation" if spec.type == "generation" else "classification")
    assert spec.description


def test_shipped_specs_cover_shared_and_builtin_tasks() -> None:
    assert tasks_dir() == REPO_TASKS
    names = set(list_task_specs())
    assert set(SHARED) <= names
    assert set(BUILTIN_TASKS) <= names
    for name in SHARED:
        spec = load_task_spec(name)
        assert spec.train == f"${{ADAPTBANK_DATA}}/{name}/train.jsonl"
        assert spec.labels is None
    for name in BUILTIN_TASKS:
        assert load_task_spec(name).train == f"builtin:{name}:train"


RUNS = {
    "standard5-order1": ["dbpedia", "amazon", "yelp", "yahoo", "ag_news"],
    "standard5-order2": ["dbpedia", "amazon", "yelp", "ag_news", "yahoo"],
    "standard5-order3": ["yahoo", "amazon", "yelp", "ag_news", "dbpedia"],
    "all9": ["dbpedia", "amazon", "yelp", "yahoo", "ag_news", "sst2", "trec", "banking77", "clinc150"],
    "builtin": list(BUILTIN_TASKS),
}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_run_specs_name_known_tasks(run: str) -> None:
    doc = tomllib.loads((REPO_TASKS / "runs" / f"{run}.toml").read_text(encoding="utf-8"))
    assert set(doc) == {"run", "method", "train"}
    assert doc["run"]["name"] == run
    assert doc["run"]["tasks"] == RUNS[run]
    for task in doc["run"]["tasks"]:
        load_task_spec(task)
    if run == "builtin":
        assert (doc["train"]["max_train"], doc["train"]["max_test"], doc["train"]["max_length"]) == (
            300,
            100,
            48,
        )


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "ag_news", "A1b-c_d", "9lives", "x" * 100])
def test_valid_names(name: str) -> None:
    assert validate_task_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["a.b", "", "a/b", "a\\b", "..", "a..b", ".hidden", "-x", "_x", "/abs", "x" * 101, "a b", "é", "a\x00", 3, None],
)
def test_invalid_names_rejected(name: object) -> None:
    with pytest.raises(ValueError, match="task name") as info:
        validate_task_name(name)
    assert "rule" in str(info.value)
    with pytest.raises(ValueError):
        _spec(name=name)


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"type": "generation"}, "a generation task needs a prompt template"),
        ({"type": "regression"}, "unknown type 'regression'"),
        ({"format": "parquet"}, "unknown format 'parquet'"),
        ({"train": ""}, "train must be a non-empty source"),
        ({"test": 5}, "test must be a non-empty source"),
        ({"train": "builtin:nope:train"}, "unknown builtin generator 'nope'"),
        ({"train": "builtin:weather:dev"}, "unknown builtin split 'dev'"),
        ({"train": "builtin:weather"}, "malformed builtin source"),
        ({"train": "builtin:weather:train", "format": "csv"}, "builtin sources need format 'auto'"),
        ({"train": "${HOME}/x.jsonl"}, r"only \$\{ADAPTBANK_DATA\} is expanded"),
        ({"labels": ("only",)}, "at least 2"),
        ({"labels": ("a", "a")}, "duplicate label names"),
        ({"labels": ("a", "")}, "non-empty string"),
        ({"text_field": ""}, "text_field must be a non-empty string"),
        ({"description": 3}, "description must be a string"),
    ],
)
def test_bad_fields_rejected(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _spec(**kw)


def test_spec_is_frozen_and_labels_tuple() -> None:
    spec = TaskSpec.from_dict({"name": "t", "train": "a", "test": "b", "labels": ["x", "y"]})
    assert spec.labels == ("x", "y")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "u"  # type: ignore[misc]


def test_to_dict_from_dict_round_trip() -> None:
    spec = _spec(labels=("neg", "pos"), format="csv", description="d", text_field="sentence")
    d = spec.to_dict()
    assert d["labels"] == ["neg", "pos"]
    assert TaskSpec.from_dict(d) == spec


def test_unknown_key_gets_suggestion() -> None:
    with pytest.raises(
        ValueError, match=r"unknown key 'lables' in task spec tasks/x.toml; did you mean 'labels'\?"
    ):
        TaskSpec.from_dict(
            {"name": "t", "train": "a", "test": "b", "lables": ["a", "b"]}, origin="tasks/x.toml"
        )


def test_missing_required_key() -> None:
    with pytest.raises(ValueError, match="missing required key 'test'"):
        TaskSpec.from_dict({"name": "t", "train": "a"})


def test_toml_unknown_keys_at_both_levels() -> None:
    with pytest.raises(ValueError, match=r"unknown key 'descripton'.*did you mean 'description'"):
        spec_from_toml('name = "t"\ndescripton = ""\n[data]\ntrain = "a"\ntest = "b"\n')
    with pytest.raises(ValueError, match=r"unknown key 'lable_field' in the \[data\] table.*'label_field'"):
        spec_from_toml('name = "t"\n[data]\ntrain = "a"\ntest = "b"\nlable_field = "y"\n')
    with pytest.raises(ValueError, match=r"'train' .* belongs in the \[data\] table"):
        spec_from_toml('name = "t"\ntrain = "a"\ntest = "b"\n')
    with pytest.raises(ValueError, match="not valid TOML"):
        spec_from_toml('name = "t\n')


# --- loading by path / name, source resolution ---------------------------------------------------


def test_relative_sources_resolve_beside_the_spec(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "mine.toml"
    path.write_text(
        'name = "mine"\n[data]\ntrain = "d/train.jsonl"\ntest = "${ADAPTBANK_DATA}/x/test.jsonl"\n'
    )
    spec = load_task_spec(path)
    assert spec.train == str((tmp_path / "sub" / "d" / "train.jsonl").resolve())
    assert spec.test == "${ADAPTBANK_DATA}/x/test.jsonl"  # expanded only when the data is read


def test_data_var_expansion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADAPTBANK_DATA", str(tmp_path))
    assert expand_source("${ADAPTBANK_DATA}/a/train.jsonl") == f"{tmp_path}/a/train.jsonl"
    assert expand_source("builtin:weather:train") == "builtin:weather:train"


def test_bare_name_uses_adaptbank_tasks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "alpha.toml").write_text(
        'name = "alpha"\n[data]\ntrain = "builtin:topic:train"\ntest = "builtin:topic:test"\n'
    )
    monkeypatch.setenv("ADAPTBANK_TASKS", str(tmp_path))
    assert load_task_spec("alpha").name == "alpha"
    with pytest.raises(SpecNotFoundError, match=r"'alpah' not found.*did you mean 'alpha'\?.*alpha") as info:
        load_task_spec("alpah")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_missing_spec_path_and_bad_bare_name() -> None:
    with pytest.raises(SpecNotFoundError, match="nope.toml"):
        load_task_spec("no/such/dir/nope.toml")
    with pytest.raises(ValueError, match="invalid task name"):
        load_task_spec("..")


# --- fuzzing: only ValueError, never another exception type --------------------------------------

_keys = st.sampled_from(
    [
        "name",
        "type",
        "train",
        "test",
        "text_field",
        "label_field",
        "labels",
        "format",
        "description",
        "lables",
        "data",
        "x",
    ]
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(
        [
            "t",
            "classification",
            "generation",
            "auto",
            "csv",
            "builtin:weather:test",
            "${ADAPTBANK_DATA}/a.jsonl",
            "a.jsonl",
            "a/../b",
        ]
    ),
)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner), max_leaves=6
)


@FUZZ
@given(d=st.dictionaries(st.one_of(_keys, st.text(max_size=8), st.integers()), _values, max_size=9))
def test_fuzz_from_dict_raises_only_valueerror(d: dict[object, object]) -> None:
    try:
        spec = TaskSpec.from_dict(d)
    except ValueError:
        return
    assert TaskSpec.from_dict(spec.to_dict()) == spec


_toml_line = st.one_of(
    st.text(alphabet=string.printable, max_size=40),
    st.builds(
        lambda k, v: f'{k} = "{v}"', _keys, st.text(alphabet=string.ascii_letters + "_.:/${}", max_size=20)
    ),
    st.builds(
        lambda k, v: f"{k} = {v}", _keys, st.sampled_from(["1", "true", "[]", '["a", "b"]', "{}", "1.5"])
    ),
    st.sampled_from(
        [
            "[data]",
            "[data.x]",
            "[[data]]",
            "[other]",
            'name = "ok"',
            'train = "builtin:intent:train"',
            'test = "builtin:intent:test"',
        ]
    ),
)


@FUZZ
@given(lines=st.lists(_toml_line, max_size=8))
def test_fuzz_toml_text_raises_only_valueerror(
    lines: list[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    text = "\n".join(lines)
    try:
        spec_from_toml(text)
    except ValueError:
        pass
    path = tmp_path_factory.mktemp("fuzz") / "spec.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_task_spec(path)
    except ValueError:
        pass


@FUZZ
@given(raw=st.binary(max_size=200))
def test_fuzz_spec_file_bytes(raw: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("fuzzb") / "spec.toml"
    path.write_bytes(raw)
    try:
        load_task_spec(path)
    except ValueError:
        pass
