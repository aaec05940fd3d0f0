"""The researcher's report: units on colour bars, optional router diagnostics, cost, spread and bootstrap
tables, and the figures and data written beside the HTML page (every PNG decodes and is not blank)."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from test_report import BASELINE, ORACLE, ROUTED, TASKS, make_run, write_run

from adaptbank import metrics
from adaptbank.report import figures
from adaptbank.report.build import build_report, load_run, render_html, render_markdown, write_report
from adaptbank.report.export import data_files


def _hits(rate: dict[str, float], n: int = 50, seed: int = 0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {t: [int(rng.random() < r) for _ in range(n)] for t, r in rate.items()}


def rich_run(name: str = "rich", strategy: str = "bank", seed: int = 0, better: float = 0.0) -> dict[str, Any]:
    """A run with every optional key: confusion, hits (oracle and routed), peak memory, notes."""
    run = make_run(name, strategy)
    oracle = _hits({"dbpedia": 0.9 + better / 2, "amazon": 0.55 + better, "yahoo": 0.7 + better}, seed=seed)
    routed = {t: [h if k % 10 else 0 for k, h in enumerate(v)] for t, v in oracle.items()}  # every 10th misrouted
    run["hits"] = {"oracle": oracle, "routed": routed}
    run["router_confusion"] = {"tasks": TASKS, "counts": [[45, 3, 2], [1, 47, 2], [0, 5, 45]]}
    run["router_matrix"] = [[1.0, None, None], [0.96, 0.98, None], [0.9, 0.94, 0.9]]
    run["notes"] = ["baseline b_j: chance level"]
    for i, step in enumerate(run["steps"]):
        step["peak_memory_bytes"] = (300 + 10 * i) * 2**20
        step["train_steps"] = 60
    return run


def _png_ok(data: bytes) -> tuple[int, int]:
    """Decode a PNG fully and check it is not one flat colour; return its size."""
    img = Image.open(io.BytesIO(data))
    img.load()
    lo, hi = img.convert("L").getextrema()
    assert hi - lo > 50, "the image is (nearly) blank"
    return img.size


def test_heatmap_colour_bar_is_in_the_cells_unit() -> None:
    fig = figures.heatmap_figure(TASKS, ORACLE, "t")
    ax, bar = fig.axes
    assert bar.get_ylabel() == "accuracy (%)"
    assert ax.images[0].get_clim() == (0.0, 100.0)
    assert [t.get_text() for t in ax.texts][:2] == ["95.0", "21.0"]  # cells on the same 0-100 scale
    gen = figures.heatmap_figure(TASKS, ORACLE, "t", unit="exact match")
    assert gen.axes[1].get_ylabel() == "exact match (%)"


def test_generation_run_is_labelled_exact_match(tmp_path: Path) -> None:
    md = write_report([write_run(tmp_path, make_run(metric="exact_match"))], "md", None)
    assert "## Exact match % with the true task's expert (oracle)" in md
    assert "Accuracy %" not in md


def test_optional_keys_absent_say_not_recorded(tmp_path: Path) -> None:
    report = build_report([write_run(tmp_path, make_run())])
    assert report["router_confusion"] is None and report["hits"] is None and report["error_split"] is None
    md, page = render_markdown(report), render_html(report)
    assert md.count("not recorded in result.json") == 3  # router per step, confusion and error split
    assert report["router"] is None and "router task identification per step: not recorded" in page
    assert "router confusion: not recorded" in page and "per-example hits: not recorded" in page
    assert "<h3>Steps</h3>" in page and "<h3>Cost per task</h3>" in page  # steps table in the HTML too


def test_router_diagnostics_and_cost_are_rendered(tmp_path: Path) -> None:
    report = build_report([write_run(tmp_path, rich_run())])
    split = report["error_split"]
    assert [s["task"] for s in split] == TASKS
    for s in split:
        hits_o, hits_r = report["hits"]["oracle"][s["task"]], report["hits"]["routed"][s["task"]]
        assert s["n"] == 50 and s["both_right"] == sum(a and b for a, b in zip(hits_o, hits_r, strict=True))
        assert s["routing_errors"] == sum(hits_o[::10]) and s["routed_only_right"] == 0
    assert report["peak_memory_bytes"] == 320 * 2**20
    md = render_markdown(report)
    assert "| dbpedia | 45 | 3 | 2 | 50 | 90.0 |" in md  # confusion row: counts, total, routed right %
    assert "| amazon | 13.5 s | 26.0 s | 2,468 | 8.9 KiB | 310.0 MiB | 60 |" in md  # cost per task
    assert "- note: baseline b_j: chance level" in md
    router = report["router"]  # forgetting: mean over the two earlier tasks of (best - last) = (0.1 + 0.04) / 2
    assert router["first_task"] == [1.0, 0.9] and abs(router["forgetting"] - 0.07) < 1e-12
    assert abs(router["acc"] - (0.9 + 0.94 + 0.9) / 3) < 1e-12
    assert "| after amazon | 96.0 | 98.0 | – |" in md and "| drop from best | 10.0 | 4.0 | – |" in md
    assert "_final-row mean 91.3%, forgetting 7.0 points (first-minus-last 7.0); first task 100.0% when added, " \
           "90.0% now_" in md
    page = render_html(report)
    assert "<td>drop from best</td><td>10.0</td>" in page and "first task 100.0% when added" in page
    names = [n for n in ("router-confusion", "error-split") if f'data-name="01-rich-{n}.png"' in page]
    assert names == ["router-confusion", "error-split"]
    assert page.count("<img ") == 5  # 2 heatmaps, curves, confusion, error split


@pytest.mark.parametrize(("change", "message"), [
    ({"router_confusion": {"tasks": TASKS, "counts": [[1, 2], [3, 4]]}}, r"router_confusion.counts must be a 3x3"),
    ({"router_confusion": {"tasks": ["nope"], "counts": [[1]]}}, "router_confusion.tasks must be unique names"),
    ({"hits": {"oracle": {"dbpedia": [1, 2]}}}, r"hits.oracle.dbpedia must be a non-empty list of 0/1"),
    ({"hits": {"oracle": {"dbpedia": [1, 0]}, "routed": {"dbpedia": [1]}}}, "has 1 hits but hits.oracle.dbpedia has 2"),
    ({"hits": {"oracle": {"zzz": [1]}}}, "names task 'zzz'"),
    ({"metric": "bleu"}, "'metric' = 'bleu'; allowed: accuracy, exact_match"),
    ({"router_matrix": [[1.0, None, None], [0.9, 1.5, None], [0.9, 0.9, 0.9]]},
     r"router_matrix\[1\]\[1\] = 1.5 is outside \[0, 1\]"),
    ({"router_matrix": [[1.0, None, None]]}, "router_matrix has 1 rows but the oracle matrix 3; one row per step"),
    ({"steps": [{"task": "dbpedia", "peak_memory_bytes": "1G"}]}, r"steps\[0\].peak_memory_bytes"),
])  # fmt: skip
def test_malformed_optional_keys_are_named(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_run(write_run(tmp_path, make_run(**change)))


def test_several_runs_spread_bootstrap_and_bars(tmp_path: Path) -> None:
    """Two bank runs (two "orders") form one group with mean ± sd; a seq-lora run that is 25 points
    better per task on the same test examples is 'better' with an interval above 0."""
    dirs = [write_run(tmp_path, rich_run("bank-o1")), write_run(tmp_path, rich_run("bank-o2", seed=0)),
            write_run(tmp_path, rich_run("seq-o1", "seq-lora", better=0.25))]
    order2 = json.loads((dirs[1] / "result.json").read_text())
    order2["oracle"]["matrix"] = [[v * 0.9 for v in r] for r in ORACLE]
    (dirs[1] / "result.json").write_text(json.dumps(order2))
    report = build_report(dirs)
    bank = report["groups"][0]
    assert bank["strategy"] == "bank" and bank["n"] == 2 and bank["runs"] == ["bank-o1", "bank-o2"]
    accs = [metrics.average_accuracy(ORACLE), metrics.average_accuracy([[v * 0.9 for v in r] for r in ORACLE])]
    assert bank["acc"]["mean"] == pytest.approx(sum(accs) / 2)
    assert bank["acc"]["sd"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)  # sample sd of two values
    assert report["groups"][1]["acc"]["sd"] is None  # a single run has no spread
    diffs = {(d["run"], d["kind"]): d for d in report["differences"]}
    same = diffs[("bank-o2", "oracle")]
    assert (same["diff"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)  # same hits
    better = diffs[("seq-o1", "oracle")]
    assert better["lo"] > 0 and better["n_examples"] == 150, better
    md = render_markdown(report)
    assert "## Mean ± sd over runs of one strategy" in md
    assert f"| bank | 2 | {metrics.pct(bank['acc']['mean'])} ± {metrics.pct(bank['acc']['sd'])} |" in md
    line = next(x for x in md.splitlines() if x.startswith("| seq-o1 | bank-o1 | oracle |"))
    assert "better (150 paired examples)" in line, line
    assert 'data-name="comparison-bars.png"' in render_html(report)


def test_runs_of_one_strategy_in_two_settings_are_two_groups(tmp_path: Path) -> None:
    """seq-lora with probe-initialised heads in two orders is one group; seq-lora with fresh heads (another
    train setting) is its own, labelled by what differs; the task order and the seed do not split."""
    probe = {"train": {"probe_init": True, "head_lr": 2e-3, "epochs": 2}, "method": {"rank": 8}}
    fresh = {"train": {"probe_init": False, "head_lr": 5e-4, "epochs": 2}, "method": {"rank": 8}}
    runs = [make_run("o1", "seq-lora", config={**probe, "tasks": TASKS, "seed": 0}),
            make_run("o2", "seq-lora", config={**probe, "tasks": TASKS[::-1], "seed": 1}),
            make_run("fresh", "seq-lora", config={**fresh, "tasks": TASKS, "seed": 0})]
    runs[1]["seed"] = 1
    report = build_report([write_run(tmp_path, r) for r in runs])
    groups = [(g["label"], g["n"], g["runs"]) for g in report["groups"]]
    assert groups == [("seq-lora", 2, ["o1", "o2"]),
                      ("seq-lora (train.probe_init=false, train.head_lr=0.0005)", 1, ["fresh"])], groups
    md = render_markdown(report)
    assert "| seq-lora (train.probe_init=false, train.head_lr=0.0005) | 1 |" in md
    files = data_files(report)
    rows = list(csv.DictReader(io.StringIO(files["groups.csv"].decode())))
    assert [(r["strategy"], r["label"], r["n"]) for r in rows] == [
        ("seq-lora", "seq-lora", "2"), ("seq-lora", "seq-lora (train.probe_init=false, train.head_lr=0.0005)", "1")]


def test_runs_without_hits_say_why_there_is_no_interval(tmp_path: Path) -> None:
    dirs = [write_run(tmp_path, make_run("a")), write_run(tmp_path, make_run("b", "seq-lora", routed=None))]
    (d,) = build_report(dirs)["differences"]
    assert d["diff"] is None and d["reason"] == "per-example hits not recorded (oracle)"


def test_an_unfinished_run_is_not_bootstrapped_against_a_finished_one(tmp_path: Path) -> None:
    """An unfinished run's last row is after an earlier task (later tasks at their baselines), so its ACC
    difference to a finished run says nothing about the strategies: no interval, and the reason."""
    partial = rich_run("partial", "replay", better=0.2)
    partial["oracle"]["matrix"], partial["finished"] = ORACLE[:2], False
    partial["steps"], partial["router_matrix"] = partial["steps"][:2], partial["router_matrix"][:2]
    partial["routed"]["matrix"] = partial["routed"]["matrix"][:2]
    dirs = [write_run(tmp_path, rich_run("done")), write_run(tmp_path, partial)]
    (d,) = build_report(dirs)["differences"][:1]
    assert d["run"] == "partial" and d["diff"] is None and "unfinished" in d["reason"]
    finished = build_report([dirs[0], write_run(tmp_path, rich_run("other", "replay", better=0.2))])
    assert finished["differences"][0]["diff"] is not None  # the same hits, both finished: compared


def test_html_output_writes_figures_and_data_beside_the_page(tmp_path: Path) -> None:
    dirs = [write_run(tmp_path, rich_run("bank-o1")), write_run(tmp_path, make_run("seq", "seq-lora", routed=None))]
    out = tmp_path / "out" / "page.html"
    page = write_report(dirs, "html", out)
    fig_dir, data_dir = tmp_path / "out" / "page_figures", tmp_path / "out" / "page_data"
    names = sorted(p.name for p in fig_dir.iterdir())
    assert names == sorted(["comparison-bars.png", "01-bank-o1-heatmap-oracle.png", "01-bank-o1-heatmap-routed.png",
                            "01-bank-o1-curves.png", "01-bank-o1-router-confusion.png", "01-bank-o1-error-split.png",
                            "02-seq-heatmap-oracle.png", "02-seq-curves.png"])  # fmt: skip
    for name in names:  # every figure is a real, non-blank PNG, and the same one the page embeds
        data = (fig_dir / name).read_bytes()
        w, h = _png_ok(data)
        assert w > 200 and h > 100, (name, w, h)
        assert f'data-name="{name}"' in page
    assert sorted(p.name for p in data_dir.iterdir()) == ["differences.csv", "groups.csv", "matrices.csv",
                                                          "metrics.csv", "report.json", "steps.csv"]  # fmt: skip
    assert json.loads((data_dir / "report.json").read_text()) == build_report(dirs)
    cells = list(csv.DictReader(io.StringIO((data_dir / "matrices.csv").read_text())))
    assert len(cells) == (3 * 3 + 3) * 3  # bank oracle + routed, seq oracle: 3 rows + baseline each
    first = cells[0]
    assert first == {"run": "bank-o1", "routing": "oracle", "after": "dbpedia", "task": "dbpedia", "value": "0.95"}
    assert {"run": "bank-o1", "routing": "routed", "after": "baseline", "task": "yahoo", "value": str(BASELINE[2])} in cells
    rows = list(csv.DictReader(io.StringIO((data_dir / "metrics.csv").read_text())))
    assert [r["name"] for r in rows] == ["bank-o1", "seq"] and float(rows[0]["routed_acc"]) == pytest.approx(
        metrics.average_accuracy(ROUTED))
    # Writing again replaces the folders (no stale files, no temp folders left).
    write_report(dirs[1:], "html", out)
    assert sorted(p.name for p in fig_dir.iterdir()) == ["01-seq-curves.png", "01-seq-heatmap-oracle.png"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["page.html", "page_data", "page_figures"]


def test_a_failed_report_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out" / "page.html"
    bad = write_run(tmp_path, make_run("bad", router_confusion={"tasks": TASKS, "counts": []}))
    with pytest.raises(ValueError, match="router_confusion"):
        write_report([write_run(tmp_path, make_run("ok")), bad], "html", out)
    assert not out.parent.exists()


def test_runs_sharing_a_name_are_told_apart_by_their_folder(tmp_path: Path) -> None:
    """One spec run with several strategies gives one name; the report adds each run's folder."""
    dirs = []
    for folder, strategy in (("bank-order1", "bank"), ("seq-lora-order1", "seq-lora")):
        d = tmp_path / folder
        d.mkdir()
        (d / "result.json").write_text(json.dumps(make_run("standard5-order1", strategy)))
        dirs.append(d)
    dirs.append(dirs[0] / "result.json")  # the same run twice: the position tells them apart
    names = [r["name"] for r in build_report(dirs)["comparison"]]
    assert names == ["standard5-order1 (bank-order1) #1", "standard5-order1 (seq-lora-order1)",
                     "standard5-order1 (bank-order1) #3"]
