"""The command line through click's CliRunner: help everywhere, the bank commands, clean errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import tree_digest

from adaptbank.cli.main import main

COMMANDS = ["init", "add-task", "list", "show", "remove", "eval", "verify", "graph", "predict", "router", "demo",
            "run", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    res = CliRunner().invoke(main, [command, "--help"])
    assert res.exit_code == 0 and "Usage:" in res.output


def test_bank_commands_end_to_end(tiny_bert_dir, tmp_path):
    r = CliRunner()
    bank = str(tmp_path / "bank")
    fast = ["--epochs", "1", "--max-train", "80", "--max-test", "40", "--max-length", "32"]

    def ok(*args: str):
        res = r.invoke(main, list(args))
        assert res.exit_code == 0, res.output
        return res

    ok("init", bank, "--base", str(tiny_bert_dir))
    added = json.loads(ok("add-task", bank, "weather", "--rank", "4", "--json", *fast).stdout)
    assert added["task"] == "weather" and added["trainable_params"] > 0 and added["bytes_on_disk"] > 0
    ok("add-task", bank, "topic", "--method", "adapter", "--rank", "8", *fast)
    ok("add-task", bank, "intent", "--method", "parallel-adapter", "--rank", "8", "--parent", "topic", *fast)
    listed = json.loads(ok("list", bank, "--json").stdout)
    assert [t["task"] for t in listed["tasks"]] == ["weather", "topic", "intent"]
    assert [t["method"] for t in listed["tasks"]] == ["lora", "adapter", "parallel-adapter"]
    shown = json.loads(ok("show", bank, "intent", "--json").stdout)
    assert shown["parent"] == "topic" and shown["method"]["bottleneck"] == 8
    assert json.loads(ok("eval", bank, "weather", "--json").stdout)["oracle"]["weather"] == added["test_accuracy"]
    assert json.loads(ok("verify", bank, "--json").stdout)["ok"] is True
    ok("graph", bank, "-o", str(tmp_path / "g.graphml"))
    assert (tmp_path / "g.graphml").is_file()
    ok("remove", bank, "topic")
    assert [t["task"] for t in json.loads(ok("list", bank, "--json").stdout)["tasks"]] == ["weather", "intent"]
    ok("router", "fit", bank)


@pytest.mark.parametrize("args, message", [
    (["list", "/nonexistent/bank"], "not an adaptbank bank"),
    (["add-task", "BANK", "no_such_task"], "no_such_task"),
    (["add-task", "BANK", "weather", "--targets", "qkv"], "'qkv' matches no linear layer (presets: qv, attn"),
    (["add-task", "BANK", "weather", "--rank", "0"], "rank must be a positive integer"),
    (["add-task", "BANK", "weather", "--name", "../up"], "task name"),
    (["add-task", "BANK", "weather", "--share-a", "g", "--method", "adapter"], "--share-a works with"),
    (["show", "BANK", "nope"], "nope"),
    (["remove", "BANK", "nope"], "nope"),
    (["init", "BANK"], "already"),
    (["graph", "BANK", "-o", "x.txt"], ".graphml, .json or .png"),
])
def test_errors_are_one_clean_line(tiny_bert_dir, tmp_path, args, message):
    r = CliRunner()
    bank = str(tmp_path / "bank")
    assert r.invoke(main, ["init", bank, "--base", str(tiny_bert_dir)]).exit_code == 0
    before = tree_digest(tmp_path / "bank")
    assert "manifest.json" in before
    res = r.invoke(main, [a.replace("BANK", bank) for a in args])
    assert res.exit_code != 0
    assert message in res.output, res.output
    assert "Traceback" not in res.output
    assert tree_digest(tmp_path / "bank") == before  # the same paths, each file with the same bytes


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_on_the_embedded_default(tmp_path):
    """Built-in tasks into a bank one by one, router, continual evaluation, report: no data needed."""
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "demo" / "report.html").read_text().count("data:image/png;base64,") >= 2
    assert "BWT 0.0%" in res.output  # frozen, isolated experts: nothing is forgotten
    result = json.loads((tmp_path / "demo" / "run" / "result.json").read_text())
    baseline, final = result["oracle"]["baseline"], result["oracle"]["matrix"][-1]
    assert result["finished"] and len(final) == 4
    assert all(f > b + 0.3 for f, b in zip(final, baseline))  # every task learned well above its untrained head
    routed = result["routed"]["matrix"][-1]
    assert sum(routed) / 4 > 0.9 * sum(final) / 4  # no task ids, still close to oracle
