"""Continual runs of generation tasks on tiny decoder LMs (tests/_lm.py): exact match in the matrix and F1
beside it, the bank's zero forgetting (exactly) and its routed generation, seq-lora's forgetting, resume
== unbroken, the other strategies, the reports, and mixed or impossible runs refused before anything is
written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _lm import write_tiny_lm
from click.testing import CliRunner

from adaptbank.cli.continual import report, run
from adaptbank.continual.loop import TaskEnd, run_sequence
from adaptbank.continual.runspec import run_spec_from_dict
from adaptbank.metrics import AccuracyMatrix
from adaptbank.report.build import write_report

WEATHER_GEN = ('name = "weather_gen"\npose = "generation"\ntemplate = "Weather: {text}\\nAnswer:"\n[data]\n'
               'train = "builtin:weather:train"\ntest = "builtin:weather:test"\n')
# Enough steps for the tiny LLaMA to learn some of the posed weather task (above its untrained 0%), and
# for the one shared learner of seq-lora to lose it again on the next two tasks.
TRAIN = {"epochs": 4, "max_train": 160, "max_test": 24, "max_length": 32, "lr": 1e-2, "batch_size": 8}


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cont-gen")
    (root / "weather_gen.toml").write_text(WEATHER_GEN)
    # 4 layers: the bank's router reads layers 0-1 (no experts there), the experts sit in layers 2-3
    return {"root": root, "llama": write_tiny_lm(root / "llama", "llama", hidden=64, layers=4),
            "gpt2": write_tiny_lm(root / "gpt2", "gpt2", hidden=64, layers=4)}


def doc(setup: dict[str, Path], strategy: str, family: str = "llama", tasks: list[str] | None = None,
        **train: Any) -> dict[str, Any]:
    tasks = tasks or [str(setup["root"] / "weather_gen.toml"), "antonym", "copy"]
    return {"run": {"name": f"gen-{strategy}", "backbone": str(setup[family]), "tasks": tasks, "strategy": strategy,
                    "seed": 0}, "method": {"kind": "lora", "rank": 4, "alpha": 8, "targets": "all-linear"},
            "train": TRAIN | train}


_RUNS: dict[str, tuple[Path, dict[str, Any]]] = {}


@pytest.fixture(scope="module")
def unbroken(setup, tmp_path_factory):
    def get(strategy: str) -> tuple[Path, dict[str, Any]]:
        if strategy not in _RUNS:
            out = tmp_path_factory.mktemp(f"gen-{strategy}")
            _RUNS[strategy] = (out, run_sequence(run_spec_from_dict(doc(setup, strategy)), out, log=quiet))
        return _RUNS[strategy]

    yield get
    _RUNS.clear()


def _columns_constant(matrix: list[list[float | None]]) -> bool:
    return all(matrix[i][j] == matrix[j][j] for j in range(len(matrix)) for i in range(j, len(matrix)))


def test_bank_forgets_nothing_and_routes_generation(unbroken) -> None:
    out, res = unbroken("bank")
    assert res["finished"] and res["metric"] == "exact_match"
    R, b = res["oracle"]["matrix"], res["oracle"]["baseline"]
    F, fb = res["f1"]["oracle"]["matrix"], res["f1"]["oracle"]["baseline"]
    # an earlier task's expert never changes: its exact match and F1 after later tasks are the same, exactly
    assert _columns_constant(R) and _columns_constant(F)
    # a task not yet learned has no expert: the untrained model's scores
    assert all(R[i][j] == b[j] and F[i][j] == fb[j] for i in range(3) for j in range(i + 1, 3))
    assert R[0][0] >= b[0] + 0.1, (R, b)  # the posed weather task is learned
    m = AccuracyMatrix(tuple(res["tasks"]), R, b).summary()
    assert m["bwt"] == 0.0 and m["forgetting"] == 0.0
    routed, routed_f1 = res["routed"]["matrix"], res["f1"]["routed"]["matrix"]
    assert [sum(v is not None for v in row) for row in routed] == [1, 2, 3]
    assert [sum(v is not None for v in row) for row in routed_f1] == [1, 2, 3]
    # the templates differ, so the router finds every prompt's task and routed generation is the oracle's
    assert [s["router_accuracy"] for s in res["steps"]] == [1.0, 1.0, 1.0]
    assert routed[-1] == R[-1] and routed_f1[-1] == F[-1]
    assert all(0.0 <= v <= 1.0 for row in F for v in row)
    assert json.loads((out / "result.json").read_text())["f1"] == res["f1"]


def test_seq_lora_forgets_with_one_shared_learner(unbroken) -> None:
    _, res = unbroken("seq-lora")
    R, b = res["oracle"]["matrix"], res["oracle"]["baseline"]
    assert res["routed"] is None and res["f1"]["routed"] is None
    assert R[0][0] >= b[0] + 0.1, (R, b)
    assert R[2][0] < R[0][0]  # the later tasks overwrote the first one in the one learner
    assert AccuracyMatrix(tuple(res["tasks"]), R, b).summary()["bwt"] < 0
    assert b == unbroken("bank")[1]["oracle"]["baseline"]  # the same untrained model for every strategy


@pytest.mark.parametrize("fmt", ["md", "html", "json"])
def test_reports_read_generation_runs_unchanged(unbroken, fmt: str, tmp_path: Path) -> None:
    dirs = [unbroken("bank")[0], unbroken("seq-lora")[0]]
    text = write_report(dirs, fmt, tmp_path / f"r.{fmt}")  # type: ignore[arg-type]
    assert (tmp_path / f"r.{fmt}").read_text() == text
    assert "gen-bank" in text and "gen-seq-lora" in text
    if fmt == "json":
        comparison = json.loads(text)["comparison"]
        assert [c["bwt"] for c in comparison][0] == 0.0 and comparison[0]["routed_acc"] is not None


class StopAfter:
    def __init__(self, index: int) -> None:
        self.index = index

    def on_task_end(self, event: TaskEnd) -> None:
        if event.index == self.index:
            raise KeyboardInterrupt


@pytest.mark.parametrize("strategy", ["bank", "seq-lora"])
def test_resume_after_a_stop_equals_an_unbroken_run(unbroken, setup, tmp_path: Path, strategy: str) -> None:
    spec = run_spec_from_dict(doc(setup, strategy))
    with pytest.raises(KeyboardInterrupt):
        run_sequence(spec, tmp_path, callbacks=[StopAfter(0)], log=quiet)
    assert len(json.loads((tmp_path / "result.json").read_text())["oracle"]["matrix"]) == 1
    resumed = run_sequence(spec, tmp_path, log=quiet)
    whole = unbroken(strategy)[1]
    assert resumed["oracle"] == whole["oracle"] and resumed["routed"] == whole["routed"]
    assert resumed["f1"] == whole["f1"]


@pytest.mark.parametrize("strategy", ["replay", "joint", "ewc", "olora", "seq-full", "shared-a"])
def test_other_strategies_run_generation_tasks(setup, tmp_path: Path, strategy: str) -> None:
    tasks = [str(setup["root"] / "weather_gen.toml"), "antonym"]
    res = run_sequence(run_spec_from_dict(doc(setup, strategy, "gpt2", tasks, epochs=1, max_train=48,
                                              max_test=12, lr=5e-3)), tmp_path, log=quiet)
    assert res["finished"] and res["metric"] == "exact_match"
    for block in (res["oracle"], res["f1"]["oracle"]):
        assert len(block["matrix"]) == 2 and all(0.0 <= v <= 1.0 for row in block["matrix"] for v in row)
    assert res["steps"][0]["trainable_params"] > 0
    if strategy == "shared-a":
        assert [sum(v is not None for v in row) for row in res["routed"]["matrix"]] == [1, 2]


def test_mixed_runs_are_refused_naming_both_kinds(setup, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"mixes generation tasks \['antonym'\] with classification tasks "
                                         r"\['weather'\]; a run takes one kind"):
        run_spec_from_dict(doc(setup, "bank", tasks=["weather", "antonym"]))


def test_generation_run_on_an_encoder_is_refused_and_leaves_nothing(tiny_bert_dir, tmp_path: Path) -> None:
    spec = run_spec_from_dict({"run": {"name": "g", "backbone": str(tiny_bert_dir), "tasks": ["antonym", "copy"],
                                       "strategy": "seq-lora"}, "train": {"max_train": 8, "max_test": 4}})
    with pytest.raises(ValueError, match="has no LM head"):
        run_sequence(spec, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


def test_cli_run_and_report_a_generation_spec(setup, tmp_path: Path) -> None:
    spec = tmp_path / "gen.toml"
    spec.write_text(f'[run]\nname = "cli-gen"\nbackbone = "{setup["gpt2"]}"\ntasks = ["copy", "antonym"]\n'
                    'strategy = "bank"\n[train]\nepochs = 1\nmax_train = 32\nmax_test = 8\nmax_length = 32\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(run, [str(spec), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "[2/2] antonym: exact match" in res.output and "(bank, exact match): ACC" in res.output
    assert "routed ACC" in res.output
    res = CliRunner().invoke(report, [str(out), "--format", "md"])
    assert res.exit_code == 0 and "cli-gen" in res.output


def test_t5_continual_runs_bank_and_seq_lora(tmp_path: Path) -> None:
    """An encoder-decoder through the continual loop: the learner's hidden states are the encoder's and the
    decoder runs in the loss; the bank (router on encoder layers 0-1) keeps earlier tasks exactly."""
    from _lm import write_tiny_t5

    t5 = write_tiny_t5(tmp_path / "t5", layers=4)
    for strategy in ("seq-lora", "bank"):
        doc = {"run": {"name": f"t5-{strategy}", "backbone": str(t5), "tasks": ["copy", "antonym"],
                       "strategy": strategy, "seed": 0},
               "method": {"kind": "lora", "rank": 4, "alpha": 8, "targets": "all-linear"},
               "train": TRAIN | {"epochs": 1, "max_train": 48, "max_test": 12, "lr": 5e-3}}
        res = run_sequence(run_spec_from_dict(doc), tmp_path / strategy, log=quiet)
        assert res["finished"] and res["metric"] == "exact_match"
        matrix = res["oracle"]["matrix"]
        assert len(matrix) == 2 and all(0.0 <= v <= 1.0 for row in matrix for v in row)
        if strategy == "bank":
            assert matrix[1][0] == matrix[0][0]  # the first task's expert is untouched by the second
            assert res["routed"]["matrix"][1][0] is not None
