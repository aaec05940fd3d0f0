"""Continual-learning runs on the tiny BERT fixture: run specs, every strategy, the bank's zero
forgetting, resume == unbroken, and the ``run``/``report`` commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adaptbank import metrics
from adaptbank.cli.continual import register, report, run
from adaptbank.continual.loop import RunEnd, StepEnd, TaskEnd, run_sequence
from adaptbank.continual.runspec import (
    STRATEGIES,
    RunSpec,
    load_run_spec,
    run_spec_from_dict,
    run_spec_from_toml,
)
from adaptbank.report.build import load_run

TASKS = ["weather", "topic", "intent"]
# Tiny but fast; the high learning rate makes the tiny random BERT's features move visibly. The probe
# head keeps scikit-learn's C = 1 as fitted: on 40 near-random examples the default rule picks the
# strongest L2 (C = 0.01) and halves it, a near-uniform head whose predictions hide the drift of the
# features that these tests look for (seq-lora changing old tasks).
TRAIN = {"epochs": 1, "max_train": 40, "max_test": 30, "max_length": 32, "lr": 5e-2, "head_lr": 5e-2,
         "probe_c": 1.0, "probe_scale": 1.0}
ROOT = Path(__file__).resolve().parent.parent


def doc(backbone: Path | str, strategy: str = "bank", tasks: list[str] | None = None, **run: Any) -> dict[str, Any]:
    return {"run": {"name": f"tiny-{strategy}", "backbone": str(backbone), "tasks": tasks or TASKS,
                    "strategy": strategy, "seed": 0, **run},
            "method": {"kind": "lora", "rank": 4, "alpha": 8}, "train": dict(TRAIN)}


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy shared machine OpenMP's spinning threads
    made these runs 3-10x slower; the previous setting is restored for other modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_RUNS: dict[str, tuple[Path, dict[str, Any]]] = {}


@pytest.fixture(scope="module")
def unbroken(tiny_bert_dir, tmp_path_factory):
    """``unbroken(strategy)``: an uninterrupted 3-task run (made once per strategy per module)."""

    def get(strategy: str) -> tuple[Path, dict[str, Any]]:
        if strategy not in _RUNS:
            out = tmp_path_factory.mktemp(f"run-{strategy}")
            spec = run_spec_from_dict(doc(tiny_bert_dir, strategy))
            _RUNS[strategy] = (out, run_sequence(spec, out, log=quiet))
        return _RUNS[strategy]

    yield get
    _RUNS.clear()


# ------------------------------------------------------------------------------------------------ run specs
def test_shipped_run_specs_load() -> None:
    for path in sorted((ROOT / "tasks" / "runs").glob("*.toml")):
        spec = load_run_spec(path)
        assert spec.tasks and spec.strategy in STRATEGIES, path


def test_default_backbone_matches_backbone_module() -> None:
    from adaptbank.continual import runspec
    from adaptbank.core.backbone import DEFAULT_BACKBONE

    assert runspec.DEFAULT_BACKBONE == DEFAULT_BACKBONE


def _bad(**changes: Any) -> dict[str, Any]:
    d = doc("unused")
    for table, values in changes.items():
        d.setdefault(table, {}).update(values)
    return d


BAD_SPECS = [
    ("unknown task", _bad(run={"tasks": ["weather", "no_such_task"]}), "unknown task 'no_such_task'"),
    ("unknown strategy", _bad(run={"strategy": "magic"}), "unknown strategy 'magic'"),
    ("strategy list", _bad(run={"strategy": "magic"}), "seq-lora"),
    ("empty sequence", _bad(run={"tasks": []}), "task sequence is empty"),
    ("duplicate task", _bad(run={"tasks": ["weather", "topic", "weather"]}), "duplicate task(s) weather"),
    ("bad eval mode", _bad(run={"eval": ["oracle", "routd"]}), "unknown eval mode 'routd'"),
    ("unknown run key", _bad(run={"strateg": "bank"}), "did you mean 'strategy'"),
    ("unknown train key", _bad(train={"epoch": 2}), "did you mean 'epochs'"),
    ("unknown table", {**_bad(), "trian": {}}, "did you mean 'train'"),
    ("unknown option", _bad(options={"ewc_lamda": 1.0}), "did you mean 'ewc_lambda'"),
    ("seed in train", _bad(train={"seed": 3}), "put the seed in [run]"),
    ("bad train value", _bad(train={"epochs": -1}), "epochs must be a positive number"),
    ("olora needs lora", {**_bad(run={"strategy": "olora"}), "method": {"kind": "adapter"}}, "needs method kind 'lora'"),
    ("tasks not a list", _bad(run={"tasks": "weather"}), "must be a list"),
]


@pytest.mark.parametrize("case,spec,message", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_specs_fail_naming_the_problem(case: str, spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        run_spec_from_dict(spec, source="bad.toml")
    assert message in str(err.value)
    assert "bad.toml" in str(err.value)


def test_bad_spec_fails_before_anything_is_written(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text('[run]\nname = "x"\ntasks = ["weather", "weather"]\n')
    out = tmp_path / "out"
    result = CliRunner().invoke(run, [str(spec), "--out", str(out)])
    assert result.exit_code == 1 and "duplicate task(s) weather" in result.output
    assert "Traceback" not in result.output and not out.exists()
    result = CliRunner().invoke(run, [str(tmp_path / "missing.toml"), "--out", str(out)])
    assert result.exit_code == 1 and "not found" in result.output


def test_overrides_are_validated_and_recorded() -> None:
    spec = run_spec_from_toml('[run]\nname = "x"\ntasks = ["weather", "topic"]\n[train]\nepochs = 2\n')
    new = spec.with_overrides(strategy="ewc", epochs=1, max_train=10, seed=None)
    assert (new.strategy, new.train.epochs, new.train.max_train, new.seed) == ("ewc", 1, 10, 0)
    assert new.config_changed() == {"epochs": [2, 1], "max_train": [None, 10], "strategy": ["bank", "ewc"]}
    assert new.with_overrides(epochs=2).config_changed() == {"max_train": [None, 10], "strategy": ["bank", "ewc"]}
    assert new.train_config().seed == 0 and isinstance(new, RunSpec)
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        spec.with_overrides(strategy="nope")
    with pytest.raises(ValueError, match="max_train must be a positive integer"):
        spec.with_overrides(max_train=0)


# ------------------------------------------------------------------------------------------------ strategies
def test_bank_with_oracle_routing_forgets_nothing(unbroken) -> None:
    _, result = unbroken("bank")
    R, b = result["oracle"]["matrix"], result["oracle"]["baseline"]
    assert len(R) == 3 and all(len(r) == 3 for r in R)
    for i in range(3):
        for j in range(3):
            if j <= i:
                assert R[i][j] == R[j][j]
            else:
                assert R[i][j] == b[j]  # no expert yet: the base model with the initial head
    assert metrics.backward_transfer(R) == 0.0 and metrics.forgetting(R) == 0.0
    assert metrics.forward_transfer(R, b) == 0.0
    routed = result["routed"]["matrix"]
    assert routed[0][1] is None and routed[2][2] is not None
    assert all(0.0 <= s["router_accuracy"] <= 1.0 for s in result["steps"])
    assert result["steps"][0]["router_accuracy"] == 1.0  # one task: the router cannot pick a wrong one
    sizes = [s["bank_bytes"] for s in result["steps"]]
    assert sizes == sorted(sizes) and sizes[0] > 0


def test_bank_results_do_not_depend_on_the_order(unbroken, tiny_bert_dir, tmp_path: Path) -> None:
    """Data subsets and the bank's training use the run seed, not the position: other orders compare."""
    _, forward = unbroken("bank")
    spec = run_spec_from_dict(doc(tiny_bert_dir, "bank", tasks=["intent", "weather"]))
    backward = run_sequence(spec, tmp_path, log=quiet)
    R, F = backward["oracle"]["matrix"], forward["oracle"]["matrix"]
    assert (R[0][0], R[1][1]) == (F[2][2], F[0][0])


def test_seq_lora_changes_old_tasks(unbroken) -> None:
    _, result = unbroken("seq-lora")
    R = result["oracle"]["matrix"]
    assert result["finished"] and len(R) == 3 and all(len(r) == 3 for r in R)
    assert result["routed"] is None
    assert any(R[i][j] != R[j][j] for i in range(3) for j in range(i)), R


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_and_writes_a_valid_result(unbroken, strategy: str) -> None:
    out, result = unbroken(strategy)
    stored = load_run(out)
    assert stored["finished"] and stored["strategy"] == strategy and stored["tasks"] == TASKS
    assert stored["oracle"] == result["oracle"]
    assert (stored["routed"] is not None) == (strategy in ("bank", "shared-a"))
    assert [s["task"] for s in stored["steps"]] == TASKS
    assert stored["steps"][0]["trainable_params"] > 0 and stored["steps"][-1]["bank_bytes"] > 0
    if strategy == "joint":  # trained once, in step 0: every row is the same model's evaluation
        assert stored["oracle"]["matrix"][0] == stored["oracle"]["matrix"][2]
        assert stored["steps"][1]["trainable_params"] == stored["steps"][2]["trainable_params"] == 0
    if strategy == "shared-a":  # later tasks train B only: fewer parameters than the group's first task
        assert stored["steps"][1]["trainable_params"] < stored["steps"][0]["trainable_params"]
    if strategy == "seq-full":  # the whole backbone trains
        assert stored["steps"][0]["trainable_params"] > 10 * unbroken("seq-lora")[1]["steps"][0]["trainable_params"]


# ------------------------------------------------------------------------------------------------ resume
class KillAfter:
    """Raises KeyboardInterrupt at the end of task ``index`` (after its row and checkpoint are written)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.events: list[object] = []

    def on_step_end(self, event: StepEnd) -> None:
        self.events.append(event)

    def on_task_end(self, event: TaskEnd) -> None:
        self.events.append(event)
        if event.index == self.index:
            raise KeyboardInterrupt


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_after_a_kill_equals_an_unbroken_run(unbroken, tiny_bert_dir, tmp_path: Path, strategy: str) -> None:
    spec = run_spec_from_dict(doc(tiny_bert_dir, strategy))
    kill = KillAfter(1)
    with pytest.raises(KeyboardInterrupt):
        run_sequence(spec, tmp_path, callbacks=[kill], log=quiet)
    partial = load_run(tmp_path)
    assert not partial["finished"] and len(partial["oracle"]["matrix"]) == 2
    assert any(isinstance(e, StepEnd) for e in kill.events)
    messages: list[str] = []
    resumed = run_sequence(spec, tmp_path, log=messages.append)
    assert any("resuming" in m for m in messages)
    _, whole = unbroken(strategy)
    assert resumed["oracle"] == whole["oracle"] and resumed["routed"] == whole["routed"]
    assert [s["trainable_params"] for s in resumed["steps"]] == [s["trainable_params"] for s in whole["steps"]]


def test_task_learned_but_not_evaluated_is_evaluated_not_relearned(unbroken, tiny_bert_dir, tmp_path: Path) -> None:
    src, whole = unbroken("seq-lora")
    out = tmp_path / "run"
    shutil.copytree(src, out)
    partial = json.loads((out / "result.json").read_text())
    partial["oracle"]["matrix"].pop()
    partial["steps"].pop()
    partial["finished"] = False
    (out / "result.json").write_text(json.dumps(partial))
    events: list[object] = []

    class Spy:
        def on_step_end(self, event: StepEnd) -> None:
            events.append(event)

        def on_run_end(self, event: RunEnd) -> None:
            events.append(event)

    resumed = run_sequence(run_spec_from_dict(doc(tiny_bert_dir, "seq-lora")), out, callbacks=[Spy()], log=quiet)
    assert resumed["oracle"] == whole["oracle"]
    assert not any(isinstance(e, StepEnd) for e in events)  # nothing was trained again
    end = events[-1]
    assert isinstance(end, RunEnd) and end.finished
    again = run_sequence(run_spec_from_dict(doc(tiny_bert_dir, "seq-lora")), out, log=quiet)
    assert again["oracle"] == whole["oracle"]


def test_resume_with_other_settings_is_refused(unbroken, tiny_bert_dir) -> None:
    out, _ = unbroken("bank")
    spec = run_spec_from_dict(doc(tiny_bert_dir, "bank")).with_overrides(epochs=2)
    with pytest.raises(ValueError, match="other settings .*train.epochs"):
        run_sequence(spec, out, log=quiet)


def test_foreign_output_directory_is_refused(tiny_bert_dir, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an adaptbank run directory"):
        run_sequence(run_spec_from_dict(doc(tiny_bert_dir, "bank")), tmp_path, log=quiet)


def test_a_new_run_that_fails_to_start_leaves_nothing_behind(tiny_bert_dir, tmp_path: Path) -> None:
    bad = doc(tmp_path / "no-such-backbone", "seq-lora", tasks=["weather", "topic"])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no-such-backbone"):
        run_sequence(run_spec_from_dict(bad), out, log=quiet)
    assert not out.exists()  # so the corrected spec starts cleanly instead of being refused as "other settings"


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_run_then_report(tiny_bert_dir, tmp_path: Path) -> None:
    import click

    group = click.Group()
    register(group)
    assert set(group.commands) == {"run", "report"}
    spec = tmp_path / "tiny.toml"
    spec.write_text(f'[run]\nname = "tiny"\nbackbone = "{tiny_bert_dir}"\ntasks = ["weather", "topic"]\n'
                    'strategy = "bank"\n[method]\nrank = 4\n[train]\nepochs = 2\nmax_length = 32\n')
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(group, ["run", str(spec), "--out", str(out), "--strategy", "seq-lora", "--epochs", "1",
                                   "--max-train", "30", "--max-test", "20", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "[2/2] topic" in result.output and "ACC" in result.output
    stored = load_run(out)
    assert stored["strategy"] == "seq-lora" and stored["seed"] == 3
    assert stored["config_changed"] == {"epochs": [2, 1], "max_train": [None, 30], "max_test": [None, 20],
                                        "strategy": ["bank", "seq-lora"], "seed": [0, 3]}
    md = runner.invoke(report, [str(out), "--format", "md"])
    assert md.exit_code == 0 and "# tiny" in md.output and "epochs = 1 (default 2)" in md.output
    js = runner.invoke(report, [str(out), "--format", "json"])
    assert js.exit_code == 0 and json.loads(js.output)["strategy"] == "seq-lora"
    page = tmp_path / "r.html"
    html = runner.invoke(report, [str(out), str(out), "--format", "html", "-o", str(page)])
    assert html.exit_code == 0 and page.read_text().startswith("<!DOCTYPE html>")
    missing = runner.invoke(report, [str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "no such file" in missing.output and "Traceback" not in missing.output


@pytest.mark.parametrize("kind", ["ia3", "prompt"])
def test_bank_run_with_another_method_kind(tiny_bert_dir, tmp_path: Path, kind: str) -> None:
    """A run spec's [method] kind selects any expert kind; the bank strategy trains, routes and scores it."""
    spec = tmp_path / "k.toml"
    extra = "prompt_length = 3\n" if kind == "prompt" else ""
    spec.write_text(f'[run]\nname = "k"\nbackbone = "{tiny_bert_dir}"\ntasks = ["weather", "topic"]\n'
                    f'strategy = "bank"\n[method]\nkind = "{kind}"\n{extra}[train]\nepochs = 1\nmax_length = 16\n'
                    'max_train = 24\nmax_test = 12\n')
    out = tmp_path / "out"
    result = CliRunner().invoke(run, [str(spec), "--out", str(out)])
    assert result.exit_code == 0, result.output
    stored = load_run(out)
    assert stored["config"]["method"]["kind"] == kind and stored["finished"]
    for mode in ("oracle", "routed"):  # the bank of this kind was evaluated after each task, with and without ids
        assert stored[mode], f"no {mode} results"
    bank_cfg = json.loads(next((out / "bank").rglob("config.json")).read_text())
    assert bank_cfg["method"]["kind"] == kind
