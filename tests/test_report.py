"""Reports from fixture run directories: JSON values equal the metrics, Markdown/HTML content, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from adaptbank import metrics
from adaptbank.report.build import (
    build_report,
    load_run,
    render_html,
    render_markdown,
    summarize_run,
    write_report,
)

TASKS = ["dbpedia", "amazon", "yahoo"]
ORACLE = [[0.95, 0.21, 0.1], [0.94, 0.5, 0.12], [0.9, 0.55, 0.7]]
ROUTED = [[0.9, 0.1, 0.05], [0.93, 0.48, 0.1], [0.88, 0.52, 0.66]]
BASELINE = [0.07, 0.2, 0.1]


def make_run(name: str = "standard3-order1", strategy: str = "bank", **overrides: Any) -> dict[str, Any]:
    """A schema-1 result.json as the continual runner writes it."""
    run: dict[str, Any] = {
        "schema": 1,
        "name": name,
        "strategy": strategy,
        "tasks": TASKS,
        "seed": 0,
        "backbone": "sentence-transformers/all-MiniLM-L6-v2",
        "config": {"epochs": 1, "lr": 1e-3},
        "config_changed": {"epochs": [2, 1]},
        "oracle": {"baseline": BASELINE, "matrix": ORACLE},
        "routed": {"baseline": BASELINE, "matrix": ROUTED},
        "steps": [
            {
                "task": t,
                "router_accuracy": 1.0 - 0.05 * i,
                "trainable_params": 1234 * (i + 1),
                "bank_bytes": 4567 * (i + 1),
                "seconds": 12.5 + i,
            }  # fmt: skip
            for i, t in enumerate(TASKS)
        ],
        "finished": True,
    }
    run.update(overrides)
    return run


def write_run(root: Path, run: dict[str, Any] | str) -> Path:
    """Write ``run`` (a dict, or raw text) as ``root/<name>/result.json`` and return the run dir."""
    run_dir = root / (run["name"] if isinstance(run, dict) else "raw")
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(run, indent=2) if isinstance(run, dict) else run
    (run_dir / "result.json").write_text(text, encoding="utf-8")
    return run_dir


def test_summary_values_equal_metrics(tmp_path: Path) -> None:
    report = build_report([write_run(tmp_path, make_run())])
    assert report["name"] == "standard3-order1" and report["strategy"] == "bank" and report["tasks"] == TASKS
    assert report["matrix"] == ORACLE and report["baseline"] == BASELINE
    assert report["acc"] == metrics.average_accuracy(ORACLE)
    assert report["bwt"] == metrics.backward_transfer(ORACLE)
    assert report["fwt"] == metrics.forward_transfer(ORACLE, BASELINE)
    assert report["forgetting"] == metrics.forgetting(ORACLE)
    assert report["forgetting_last"] == metrics.forgetting_last(ORACLE)
    assert report["learning_accuracy"] == metrics.learning_accuracy(ORACLE)
    routed = report["routed"]
    assert routed["matrix"] == ROUTED
    assert routed["acc"] == metrics.average_accuracy(ROUTED)
    assert routed["fwt"] == metrics.forward_transfer(ROUTED, BASELINE)
    assert report["total_seconds"] == pytest.approx(12.5 + 13.5 + 14.5)
    assert report["trainable_params"] == 1234 * 3 and report["bank_bytes"] == 4567 * 3
    assert report["config_changed"] == {"epochs": [2, 1]}
    assert len(report["steps"]) == 3
    # The JSON output is the same dict, serialised.
    assert json.loads(write_report([tmp_path / "standard3-order1"], "json", None)) == report


def test_in_progress_run_without_routing(tmp_path: Path) -> None:
    run = make_run(routed=None, finished=False, steps=make_run()["steps"][:2],
                   oracle={"baseline": None, "matrix": ORACLE[:2]})  # fmt: skip
    summary = summarize_run(load_run(write_run(tmp_path, run)))
    assert summary["routed"] is None and summary["fwt"] is None and not summary["finished"]
    assert summary["acc"] == metrics.average_accuracy(ORACLE[:2])
    md = render_markdown(summary)
    assert "in progress (2/3 tasks)" in md and "learned router" not in md
    html = render_html(summary)
    assert html.count('<img src="data:image/png;base64,') == 2  # heatmap + curves


def test_markdown_contains_the_tables(tmp_path: Path) -> None:
    md = write_report([write_run(tmp_path, make_run())], "md", None)
    assert md.startswith("# standard3-order1\n")
    assert "| after dbpedia | 95.0 | 21.0 | 10.0 |" in md  # oracle matrix
    assert "| after yahoo | 88.0 | 52.0 | 66.0 |" in md  # routed matrix
    assert "| baseline | 7.0 | 20.0 | 10.0 |" in md
    acc = f"{100 * metrics.average_accuracy(ORACLE):.1f}"  # (0.9 + 0.55 + 0.7) / 3 = 71.7
    routed_acc = f"{100 * metrics.average_accuracy(ROUTED):.1f}"  # (0.88 + 0.52 + 0.66) / 3 = 68.7
    assert acc == "71.7" and f"| acc | {acc} | {routed_acc} |" in md
    bwt = f"{100 * metrics.backward_transfer(ORACLE):.1f}"  # ((0.9-0.95) + (0.55-0.5)) / 2 = 0.0
    assert f"| bwt | {bwt} |" in md and bwt == "0.0"  # float noise must not print "-0.0"
    assert "epochs = 1 (default 2)" in md
    assert "| amazon | 95.0 | 2,468 | 8.9 KiB | 13.5 s |" in md  # steps table


def test_two_runs_comparison(tmp_path: Path) -> None:
    dirs = [
        write_run(tmp_path, make_run("a-bank")),
        write_run(tmp_path, make_run("b-seq", "sequential", routed=None)),
    ]
    report = build_report(dirs)
    assert [r["name"] for r in report["runs"]] == ["a-bank", "b-seq"]
    rows = report["comparison"]
    assert set(rows[0]) == {"name", "strategy", "acc", "bwt", "fwt", "forgetting", "routed_acc",
                            "trainable_params", "bank_bytes", "seconds", "bwt_interval"}  # fmt: skip
    assert rows[0]["bwt_interval"] is None  # made-up runs carry no per-step hits
    assert rows[0]["routed_acc"] == metrics.average_accuracy(ROUTED) and rows[1]["routed_acc"] is None
    assert rows[1]["strategy"] == "sequential" and rows[1]["seconds"] == pytest.approx(40.5)

    md = render_markdown(report)
    assert md.index("# Comparison") < md.index("# a-bank") < md.index("# b-seq")
    assert "| a-bank | bank | 71.7 | 0.0 | " in md and "| b-seq | sequential | 71.7 |" in md

    out = tmp_path / "reports" / "cmp.html"
    html = write_report(dirs, "html", out)
    assert out.read_text(encoding="utf-8") == html
    # the temp files and folders were renamed, not left behind: the page, its figures, its data
    assert sorted(p.name for p in out.parent.iterdir()) == ["cmp.html", "cmp_data", "cmp_figures"]
    assert html.count('<img src="data:image/png;base64,') >= 2 * 2
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert html.count("<h2>") == 3 and "Comparison" in html


def test_html_escapes_strings(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    run = make_run("x<y>", tasks=["a&b", evil, "$x$_{"], steps=[], config_changed={evil: [1, 2]})
    html = render_html(summarize_run(run))
    assert "<script>" not in html and "&lt;script&gt;" in html and "x&lt;y&gt;" in html and "a&amp;b" in html


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema": 2}, "schema 2 is not supported"),
        ({"oracle": {"baseline": None, "matrix": [[0.5, 0.5, 1.5]]}}, r"oracle: R\[0\]\[2\] = 1.5"),
        ({"routed": {"matrix": ORACLE, "base": BASELINE}}, "routed has unknown key.*base"),
        ({"steps": [{"task": "nope"}]}, r"steps\[0\]"),
        ({"tasks": "dbpedia"}, "'tasks' must be a non-empty list"),
        (
            {"oracle": {"baseline": None, "matrix": ORACLE[:1]}},
            "'finished' is true but oracle.matrix has 1 of 3",
        ),
    ],
)
def test_malformed_runs_name_the_file(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    run_dir = write_run(tmp_path, make_run(**change))
    with pytest.raises(ValueError, match=message) as err:
        load_run(run_dir)
    assert str(run_dir / "result.json") in str(err.value)


def test_missing_keys_are_named(tmp_path: Path) -> None:
    run = make_run()
    del run["oracle"], run["steps"]
    with pytest.raises(ValueError, match="missing key.*oracle, steps"):
        load_run(write_run(tmp_path, run))


def test_missing_result_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "result.json"))):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="result.json"):
        build_report([tmp_path / "nowhere"])


def test_invalid_json_gives_the_line(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, '{\n  "schema": 1,\n  "name": oops\n}')
    with pytest.raises(ValueError, match=r"result\.json: invalid JSON at line 3") as err:
        load_run(run_dir)
    assert str(run_dir / "result.json") in str(err.value)
    assert (
        load_run(write_run(tmp_path, make_run()) / "result.json")["name"] == "standard3-order1"
    )  # file path too


def test_write_report_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fmt must be one of md, html, json, got 'pdf'"):
        write_report([write_run(tmp_path, make_run())], "pdf", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one run"):
        build_report([])
