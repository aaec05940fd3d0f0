"""bench/continual_full.py's bookkeeping: a report's JSON gives back the runs a lost runs folder held."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from conftest import REPO, bench_module
from test_report import TASKS, make_run, write_run

from adaptbank.report.build import build_report


@pytest.fixture()
def cf():  # the bench script as a module
    with bench_module("continual_full") as module:
        yield module


def _report(cf, tmp_path: Path, runs: list[dict]) -> Path:
    dirs = [write_run(tmp_path / "made", r) for r in runs]
    out = tmp_path / "report.json"
    out.write_text(json.dumps({"grid": [{"piece": "bank-order1", "state": "finished", "invocations": 1,
                                         "wall_seconds": 12.5, "peak_rss_bytes": 1024}],
                               "report": build_report(dirs)}))
    return out


def test_recover_rebuilds_what_the_report_reads(cf, tmp_path: Path) -> None:
    """Recovered runs report exactly as the runs did: same groups (seq-lora with fresh heads apart), same
    metrics; the wall time comes back into bench.jsonl; an unfinished run and a present piece are left."""
    fresh = {"train": {"probe_init": False}}
    runs = [make_run("standard5-order1", "bank", config={"train": {"probe_init": True}}),
            make_run("standard5-order1-fresh-heads", "seq-lora", config=fresh),
            make_run("standard5-order2", "replay", finished=False, oracle={"baseline": [0.1] * 3,
                     "matrix": [[0.9, 0.1, 0.1]]}, steps=[{"task": TASKS[0], "seconds": 1.0}])]
    source = _report(cf, tmp_path, runs)
    runs_dir = tmp_path / "runs"
    args = argparse.Namespace(source=str(source), runs_dir=str(runs_dir))
    assert cf.recover(args) == 0
    assert cf.state(runs_dir / "bank-order1") == "finished"
    assert cf.state(runs_dir / "seq-lora-fresh-heads-order1") == "finished"
    assert cf.state(runs_dir / "replay-order2") == "absent"  # unfinished: cannot resume without its folder
    before = json.loads(source.read_text())["report"]
    after = build_report([runs_dir / "bank-order1", runs_dir / "seq-lora-fresh-heads-order1"])
    assert [g["label"] for g in after["groups"]] == ["bank", "seq-lora"]
    for key in ("acc", "bwt", "fwt", "forgetting"):
        assert [r[key] for r in after["runs"]] == [r[key] for r in before["runs"][:2]]
    (record,) = [json.loads(line) for line in (runs_dir / "bench.jsonl").read_text().splitlines()]
    assert record["piece"] == "bank-order1" and record["wall_seconds"] == 12.5 and record["recovered"]
    note = json.loads((runs_dir / "bank-order1" / "result.json").read_text())["notes"][-1]
    assert note.startswith("recovered from report.json")
    stamp = (runs_dir / "bank-order1" / "result.json").stat().st_mtime_ns
    assert cf.recover(args) == 0  # present pieces are kept as they are
    assert (runs_dir / "bank-order1" / "result.json").stat().st_mtime_ns == stamp


def test_pieces_and_their_commands(cf, tmp_path: Path) -> None:
    assert cf.parse_piece("seq-lora-fresh-heads:1") == ("seq-lora-fresh-heads", 1)
    with pytest.raises(argparse.ArgumentTypeError, match=r"'seq-lora-fresh-heads:2' is not a piece of the grid"):
        cf.parse_piece("seq-lora-fresh-heads:2")
    args = argparse.Namespace(**dict.fromkeys(cf.PASS_THROUGH))
    cmd = cf._command("seq-lora-fresh-heads", 1, tmp_path / "x", args)
    assert cmd[4].endswith("standard5-order1-fresh-heads.toml") and cmd[-2:] == ["--strategy", "seq-lora"]
    assert all((REPO / "tasks" / "runs" / Path(cf._command(s, o, tmp_path, args)[4]).name).is_file() for s, o in cf.GRID)
