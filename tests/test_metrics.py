"""Continual-learning metrics on hand-made matrices (arithmetic in comments), properties, diagnostics."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adaptbank.metrics import (
    AccuracyMatrix,
    average_accuracy,
    backward_transfer,
    confusion_table,
    expert_usage,
    forgetting,
    forgetting_last,
    forward_transfer,
    gate_entropy,
    learning_accuracy,
)

# Each case: (id, R, baseline, expected metrics). Arithmetic worked out by hand in the comments.
CASES = [
    (
        "3x3",
        [[0.9, 0.1, 0.2], [0.8, 0.7, 0.3], [0.6, 0.65, 0.8]],
        [0.1, 0.2, 0.25],
        {
            "acc": (0.6 + 0.65 + 0.8) / 3,  # last row, j <= 2: 2.05 / 3 = 0.68333
            "bwt": ((0.6 - 0.9) + (0.65 - 0.7)) / 2,  # (-0.30 - 0.05) / 2 = -0.175
            "fwt": ((0.1 - 0.2) + (0.3 - 0.25)) / 2,  # R[0][1]-b1, R[1][2]-b2: (-0.10 + 0.05) / 2 = -0.025
            "forgetting": ((0.9 - 0.6) + (0.7 - 0.65)) / 2,  # max(0.9, 0.8)=0.9 -> 0.30; 0.7 -> 0.05; = 0.175
            "forgetting_last": ((0.9 - 0.6) + (0.7 - 0.65)) / 2,  # same as above here: 0.175
            "learning_accuracy": (0.9 + 0.7 + 0.8) / 3,  # diagonal: 0.8
        },
    ),
    (
        # Task 0 rises (0.5 -> 0.9) then falls (0.4): best-earlier forgetting sees the 0.9, first-minus-last
        # does not. Task 1 improves (0.6 -> 0.7), so its forgetting is negative.
        "rise-then-fall",
        [[0.5, 0.3, 0.1], [0.9, 0.6, 0.2], [0.4, 0.7, 0.8]],
        [0.3, 0.3, 0.3],
        {
            "acc": (0.4 + 0.7 + 0.8) / 3,  # 1.9 / 3 = 0.6333
            "bwt": ((0.4 - 0.5) + (0.7 - 0.6)) / 2,  # (-0.1 + 0.1) / 2 = 0.0
            "fwt": ((0.3 - 0.3) + (0.2 - 0.3)) / 2,  # (0.0 - 0.1) / 2 = -0.05
            "forgetting": ((0.9 - 0.4) + (0.6 - 0.7)) / 2,  # max(0.5, 0.9)-0.4 = 0.5; 0.6-0.7 = -0.1; = 0.2
            "forgetting_last": ((0.5 - 0.4) + (0.6 - 0.7)) / 2,  # (0.1 - 0.1) / 2 = 0.0
            "learning_accuracy": (0.5 + 0.6 + 0.8) / 3,  # 1.9 / 3
        },
    ),
    (
        "1x1",  # t == 0: no earlier tasks, so every transfer/forgetting term is 0.0
        [[0.42]],
        [0.1],
        {
            "acc": 0.42,
            "bwt": 0.0,
            "fwt": 0.0,
            "forgetting": 0.0,
            "forgetting_last": 0.0,
            "learning_accuracy": 0.42,
        },
    ),
    (
        "partial-2-of-3",  # run in progress: t = 1, the third task not learned yet
        [[0.9, 0.1, 0.2], [0.8, 0.7, 0.3]],
        [0.1, 0.2, 0.25],
        {
            "acc": (0.8 + 0.7) / 2,  # 0.75
            "bwt": 0.8 - 0.9,  # -0.1
            "fwt": 0.1 - 0.2,  # R[0][1] - b1 = -0.1
            "forgetting": 0.9 - 0.8,  # 0.1
            "forgetting_last": 0.9 - 0.8,  # 0.1
            "learning_accuracy": (0.9 + 0.7) / 2,  # 0.8
        },
    ),
]
FUNCS = {
    "acc": average_accuracy,
    "bwt": backward_transfer,
    "forgetting": forgetting,
    "forgetting_last": forgetting_last,
    "learning_accuracy": learning_accuracy,
}


@pytest.mark.parametrize(("R", "b", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hand_made_matrices(R, b, expected) -> None:
    for key, fn in FUNCS.items():
        assert fn(R) == pytest.approx(expected[key], abs=1e-12), key
    assert forward_transfer(R, b) == pytest.approx(expected["fwt"], abs=1e-12)
    summary = AccuracyMatrix(tuple(f"t{j}" for j in range(len(R[0]))), R, b).summary()
    assert summary == pytest.approx(expected, abs=1e-12)


def test_max_forgetting_differs_from_first_minus_last() -> None:
    R = CASES[1][1]
    assert forgetting(R) == pytest.approx(0.2)
    assert forgetting_last(R) == pytest.approx(0.0)


def test_average_accuracy_at_earlier_step() -> None:
    R = CASES[0][1]
    assert average_accuracy(R, step=0) == pytest.approx(0.9)  # R[0][0]
    assert average_accuracy(R, step=1) == pytest.approx((0.8 + 0.7) / 2)
    for bad in (-1, 3, 1.0, True):
        with pytest.raises(ValueError, match=f"got {bad!r}"):
            average_accuracy(R, step=bad)


def test_isolated_experts_have_exactly_zero_bwt() -> None:
    # R[i][j] == R[j][j] for i >= j: each task keeps its own expert, nothing can interfere.
    R = [[0.91, 0.13, 0.27], [0.91, 0.77, 0.31], [0.91, 0.77, 0.83]]
    assert backward_transfer(R) == 0.0
    assert forgetting(R) == 0.0
    assert forgetting_last(R) == 0.0


def test_unevaluated_future_entries() -> None:
    R = [[0.9, None, None], [0.8, 0.7, None]]
    assert average_accuracy(R) == pytest.approx(0.75)
    assert backward_transfer(R) == pytest.approx(-0.1)
    with pytest.raises(ValueError, match=r"R\[0\]\[1\] is None"):
        forward_transfer(R, [0.1, 0.2, 0.3])
    m = AccuracyMatrix(("a", "b", "c"), R, (0.1, 0.2, 0.3))
    assert m.summary()["fwt"] is None
    assert "| after b | 80.0 | 70.0 | – |" in m.to_markdown()


BAD_MATRICES = [
    ([], "empty"),
    ([[]], r"R\[0\] is empty"),
    ("abc", "str"),
    ([[0.5, 0.5], [0.5]], r"R\[1\] has 1 entries, expected 2"),
    ([[0.5], [0.5]], "2 rows but only 1 tasks"),
    ([[1.5]], r"R\[0\]\[0\] = 1.5 is outside \[0, 1\]"),
    ([[-0.1]], "-0.1"),
    ([[95.0]], "95.0 is outside"),
    ([[float("nan")]], "NaN"),
    ([[float("inf")]], "inf"),
    ([["0.5"]], "'0.5' is not a number"),
    ([[True]], "True is not a number"),
    ([[0.5, None], [None, 0.5]], r"R\[1\]\[0\] is None"),
]


@pytest.mark.parametrize(("R", "message"), BAD_MATRICES)
@pytest.mark.parametrize("fn", [*FUNCS.values(), lambda R: forward_transfer(R, [0.0] * 2)])
def test_bad_matrices_raise_naming_the_value(R, message, fn) -> None:
    with pytest.raises(ValueError, match=message):
        fn(R)


@pytest.mark.parametrize(
    ("baseline", "message"),
    [([0.1], "baseline has 1 entries, expected 2"), ([0.1, 2.0], r"baseline\[1\] = 2.0"), (None, "None")],
)
def test_bad_baseline(baseline, message) -> None:
    with pytest.raises(ValueError, match=message):
        forward_transfer([[0.5, 0.5], [0.5, 0.5]], baseline)


# --- properties --------------------------------------------------------------------------------------


@st.composite
def matrices(draw: st.DrawFn) -> list[list[float]]:
    n_tasks = draw(st.integers(1, 6))
    n_rows = draw(st.integers(1, n_tasks))
    acc = st.floats(0.0, 1.0, allow_nan=False)
    return [[draw(acc) for _ in range(n_tasks)] for _ in range(n_rows)]


@given(matrices())
def test_properties(R: list[list[float]]) -> None:
    assert 0.0 <= average_accuracy(R) <= 1.0
    assert 0.0 <= learning_accuracy(R) <= 1.0
    assert -1.0 <= backward_transfer(R) <= 1.0
    # The max over l in [j, t-1] includes l = j, so best-earlier forgetting >= first-minus-last.
    assert forgetting(R) >= forgetting_last(R)
    assert -1.0 <= forgetting(R) <= 1.0
    # forgetting_last sums the negated BWT terms, and IEEE negation/summation are sign-symmetric.
    assert forgetting_last(R) == -backward_transfer(R)


@given(matrices(), st.data())
def test_fwt_bounded_and_round_trip(R: list[list[float]], data: st.DataObject) -> None:
    b = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(R[0]), max_size=len(R[0])))
    assert -1.0 <= forward_transfer(R, b) <= 1.0
    m = AccuracyMatrix(tuple(f"task{j}" for j in range(len(R[0]))), R, b)
    assert AccuracyMatrix.from_dict(json.loads(json.dumps(m.to_dict()))) == m


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6))
def test_isolated_experts_property(diag: list[float]) -> None:
    T = len(diag)
    R = [[diag[j] if j <= i else 0.5 for j in range(T)] for i in range(T)]
    assert backward_transfer(R) == 0.0
    assert forgetting(R) == 0.0


# --- AccuracyMatrix -----------------------------------------------------------------------------------


def test_accuracy_matrix_normalises_and_is_frozen() -> None:
    m = AccuracyMatrix(["a", "b"], [[0.5, 0.25]], [0, 1])  # lists and ints, as from JSON
    assert m.tasks == ("a", "b") and m.rows == ((0.5, 0.25),) and m.baseline == (0.0, 1.0)
    assert m.step == 0 and not m.finished
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.rows = ()  # type: ignore[misc]


def test_accuracy_matrix_markdown() -> None:
    m = AccuracyMatrix(("dbpedia", "amazon"), ((0.95, 0.21), (0.95, 0.5)), (0.07, 0.2))
    assert m.to_markdown() == (
        "| | dbpedia | amazon |\n"
        "|---|---:|---:|\n"
        "| after dbpedia | 95.0 | 21.0 |\n"
        "| after amazon | 95.0 | 50.0 |\n"
        "| baseline | 7.0 | 20.0 |\n"
    )
    assert "baseline" not in AccuracyMatrix(("a",), ((0.5,),)).to_markdown()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": (), "rows": ((0.5,),)}, "non-empty"),
        ({"tasks": ("a", "a"), "rows": ((0.5, 0.5),)}, "repeated: a"),
        ({"tasks": ("a", ""), "rows": ((0.5, 0.5),)}, r"tasks\[1\] = ''"),
        ({"tasks": ("a", "b"), "rows": ((0.5,),)}, r"R\[0\] has 1 entries, expected 2"),
        ({"tasks": ("a",), "rows": ((0.5,),), "baseline": (0.5, 0.5)}, "baseline has 2 entries"),
    ],
)
def test_accuracy_matrix_validation(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        AccuracyMatrix(**kwargs)


def test_from_dict_rejects_unknown_and_missing_keys() -> None:
    with pytest.raises(ValueError, match="unknown key 'row'.*did you mean 'rows'"):
        AccuracyMatrix.from_dict({"tasks": ["a"], "row": [[0.5]]})
    with pytest.raises(ValueError, match="missing key.*rows"):
        AccuracyMatrix.from_dict({"tasks": ["a"]})
    assert AccuracyMatrix.from_dict({"tasks": ["a"], "rows": [[0.5]]}).summary()["fwt"] is None


# --- router diagnostics -------------------------------------------------------------------------------


def test_gate_entropy() -> None:
    assert gate_entropy([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]) == 0.0  # one-hot rows: 0 ln 0 = 0
    assert gate_entropy([[0.25] * 4]) == pytest.approx(math.log(4))  # uniform over E = 4: ln 4
    assert gate_entropy([[0.5, 0.5], [1.0, 0.0]]) == pytest.approx(math.log(2) / 2)  # (ln 2 + 0) / 2
    assert gate_entropy([[0.25] * 4], normalize=True) == pytest.approx(1.0)
    assert gate_entropy([[1.0]], normalize=True) == 0.0


@pytest.mark.parametrize(
    ("gates", "message"),
    [
        ([], "non-empty"),
        ([[0.5, 0.6]], "sums to"),
        ([[1.5, -0.5]], r"gates\[0\]\[1\] = -0.5"),
        ([[0.5, 0.5], [1.0]], r"gates\[1\] has 1 entries, expected 2"),
        ([[float("nan"), 1.0]], "nan"),
    ],
)
def test_gate_entropy_errors(gates, message) -> None:
    with pytest.raises(ValueError, match=message):
        gate_entropy(gates)


def test_expert_usage() -> None:
    usage = expert_usage(["a", "a", "b"], ["a", "b", "c"])
    assert usage == pytest.approx({"a": 2 / 3, "b": 1 / 3, "c": 0.0})
    assert list(usage) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="chosen\\[1\\] = 'z' is not an expert"):
        expert_usage(["a", "z"], ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        expert_usage(["a"], ["a", "a"])
    with pytest.raises(ValueError, match="non-empty"):
        expert_usage([], ["a"])


def test_confusion_table() -> None:
    table = confusion_table(["a", "a", "b"], ["a", "b", "b"])
    assert table == {"a": {"a": 1, "b": 1}, "b": {"a": 0, "b": 1}}
    assert confusion_table(["a"], ["a"], labels=["b", "a"]) == {"b": {"b": 0, "a": 0}, "a": {"b": 0, "a": 1}}
    with pytest.raises(ValueError, match="true has 2 labels but pred has 1"):
        confusion_table(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="pred\\[0\\] = 'c' is not in labels"):
        confusion_table(["a"], ["c"], labels=["a", "b"])
