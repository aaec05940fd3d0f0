"""The full-size continual grid on the standard five, one `adaptbank run` process after another, and its report.

    python bench/continual_full.py run    [--pieces STRATEGY:ORDER ...] [--runs-dir DIR] [--max-train N ...]
    python bench/continual_full.py status [--runs-dir DIR]
    python bench/continual_full.py report [--runs-dir DIR] [--out bench/results/continual_full]
    python bench/continual_full.py recover [--runs-dir DIR] [--from bench/results/continual_full.json]

The grid (tasks/runs/standard5-order{1,2,3}.toml: MiniLM, LoRA q+v r=8, 1,000 train / 500 test
examples per task, 2 epochs, 128 tokens, seed 0):

- order 1 (dbpedia, amazon, yelp, yahoo, ag_news): every strategy, bank shared-a seq-lora seq-full ewc
  replay olora joint;
- orders 2 (dbpedia, amazon, yelp, ag_news, yahoo) and 3 (yahoo, amazon, yelp, ag_news, dbpedia):
  bank, seq-lora, replay;
- ``seq-lora-fresh-heads`` (order 1): seq-lora in the setting of ../shared/ANCHORS.md, fresh random heads
  and one learning rate (tasks/runs/standard5-order1-fresh-heads.toml), so that the report shows where
  forgetting comes from; the report groups it apart from seq-lora (another train setting).

The orders are O-LoRA's (Wang et al. 2023; its scripts/order_{1,2,3}.sh) with yelp, which O-LoRA
merges into amazon's label space, as its own task right after amazon.

``run`` works through the pieces in grid order (or those named with ``--pieces bank:1 replay:3``),
each as ``python -m adaptbank.cli run SPEC --out DIR/<strategy>-order<N> --strategy S`` in its own
subprocess, one at a time. Resumable: a finished run (``result.json`` with ``finished: true``) is
skipped, a half-finished one is resumed by the runner itself (it continues after its last finished
task; the pass-through flags must then be the same as when it started). Every invocation appends its
command, exit status, wall time and peak RSS (``os.wait4``'s ``ru_maxrss``) to ``DIR/bench.jsonl``
and its output to ``DIR/logs/<piece>.log``. Ctrl-C stops after the runner has kept its finished tasks.

``report`` reads every run present (finished or not) and writes ``OUT.md``, ``OUT.json`` and
``OUT.html`` (with ``OUT_figures/`` and ``OUT_data/``): mean ± sample sd over the orders per
strategy for ACC, BWT, FWT, forgetting (max-based and first-minus-last), routed ACC, trainable
parameters, bank bytes and time, then the paired bootstrap against bank order 1 where the runs
carry per-example hits, then every run's matrices, figures and cost per task.

``recover`` puts back the runs that a report holds but the runs folder lost (it lives in /tmp by
default): ``OUT.json`` carries every run's matrices, steps, hits and router matrix, which is all of
``result.json`` that the report reads, so each missing piece gets a ``result.json`` rebuilt from it
(with a note saying so) and its ``bench.jsonl`` record; a later ``run`` skips the finished ones and
``report`` shows them as before. Pieces present in the folder are never overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ALL = ("bank", "shared-a", "seq-lora", "seq-full", "ewc", "replay", "olora", "joint")
VARIANTS: dict[str, tuple[str, str]] = {"seq-lora-fresh-heads": ("seq-lora", "-fresh-heads")}
"""Piece label -> (strategy, suffix of the run spec's name): a strategy in another spec's setting."""
GRID: tuple[tuple[str, int], ...] = (*((s, 1) for s in ALL), *((s, o) for o in (2, 3) for s in ("bank", "seq-lora", "replay")),
                                     ("seq-lora-fresh-heads", 1))  # fmt: skip
PASS_THROUGH = ("max_train", "max_test", "epochs", "max_length", "seed")


def piece_name(strategy: str, order: int) -> str:
    return f"{strategy}-order{order}"


def parse_piece(text: str) -> tuple[str, int]:
    strategy, _, order = text.partition(":")
    if (strategy, int(order) if order.isdigit() else -1) not in GRID:
        allowed = " ".join(f"{s}:{o}" for s, o in GRID)
        raise argparse.ArgumentTypeError(f"{text!r} is not a piece of the grid; allowed: {allowed}")
    return strategy, int(order)


def state(run_dir: Path) -> str:
    """``absent``, ``started`` (run.json only), ``k/5 tasks`` or ``finished``."""
    result = run_dir / "result.json"
    if not result.is_file():
        return "started" if (run_dir / "run.json").is_file() else "absent"
    data = json.loads(result.read_text(encoding="utf-8"))
    return "finished" if data.get("finished") else f"{len(data['oracle']['matrix'])}/{len(data['tasks'])} tasks"


def _command(label: str, order: int, run_dir: Path, args: argparse.Namespace) -> list[str]:
    strategy, suffix = VARIANTS.get(label, (label, ""))
    spec = REPO / "tasks" / "runs" / f"standard5-order{order}{suffix}.toml"
    cmd = [sys.executable, "-m", "adaptbank.cli", "run", str(spec), "--out", str(run_dir), "--strategy", strategy]
    for key in PASS_THROUGH:
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def child_env(threads: int | None) -> dict[str, str]:
    """The environment of each run's subprocess: offline, this checkout's adaptbank first (not an install),
    ``OMP_NUM_THREADS`` = ``threads`` when given."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_logged(name: str, cmd: list[str], run_dir: Path, runs_dir: Path, env: dict[str, str], before: str) -> int | None:
    """Run ``cmd`` (an ``adaptbank run`` into ``run_dir``) in its own subprocess, its output appended to
    ``runs_dir/logs/<name>.log`` and its command, exit status, wall time and peak RSS to
    ``runs_dir/bench.jsonl``; the exit status, or None when interrupted (the runner keeps its finished tasks)."""
    print(f"{name}: {before} -> running: {' '.join(cmd[1:])}", flush=True)
    (runs_dir / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(runs_dir / "logs" / f"{name}.log", "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:  # pass it on (a terminal's Ctrl-C reaches both): the runner keeps its tasks
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # SIGINT ignored (started in the background): stop it;
                proc.terminate()  # result.json is written atomically after each task, so any point is safe
                proc.wait()
            print(f"{name}: interrupted ({state(run_dir)}); run the same command again to resume", flush=True)
            return None
    rc = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    record = {"piece": name, "cmd": cmd[1:], "rc": rc, "wall_seconds": round(seconds, 1),
              "peak_rss_bytes": usage.ru_maxrss * 1024, "state_before": before, "state_after": state(run_dir),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    with open(runs_dir / "bench.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(f"{name}: rc {rc}, {seconds:.0f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB, now {record['state_after']}",
          flush=True)
    if rc != 0:
        print(f"{name}: failed; see {runs_dir / 'logs' / (name + '.log')}", file=sys.stderr)
    return rc


def run_jobs(jobs: list[tuple[str, Path, list[str]]], runs_dir: Path, env: dict[str, str]) -> int:
    """Run each ``(name, run_dir, cmd)`` in turn with :func:`run_logged`, skipping finished runs; 0 when all
    succeeded, 1 when any failed, 130 when interrupted."""
    failed = []
    for name, run_dir, cmd in jobs:
        before = state(run_dir)
        if before == "finished":
            print(f"{name}: finished, skipped")
            continue
        rc = run_logged(name, cmd, run_dir, runs_dir, env, before)
        if rc is None:
            return 130
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def run_pieces(args: argparse.Namespace) -> int:
    runs_dir = Path(args.runs_dir)
    jobs = [(piece_name(s, o), runs_dir / piece_name(s, o), _command(s, o, runs_dir / piece_name(s, o), args))
            for s, o in args.pieces or list(GRID)]
    return run_jobs(jobs, runs_dir, child_env(args.threads))


def show_status(args: argparse.Namespace) -> int:
    for strategy, order in GRID:
        print(f"{piece_name(strategy, order):28s} {state(Path(args.runs_dir) / piece_name(strategy, order))}")
    return 0


def _bench_records(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """Per piece: invocations, total wall seconds and the peak RSS over its invocations."""
    out: dict[str, dict[str, Any]] = {}
    file = runs_dir / "bench.jsonl"
    for line in file.read_text(encoding="utf-8").splitlines() if file.is_file() else []:
        r = json.loads(line)
        p = out.setdefault(r["piece"], {"invocations": 0, "wall_seconds": 0.0, "peak_rss_bytes": 0})
        p["invocations"] += 1
        p["wall_seconds"] += r["wall_seconds"]
        p["peak_rss_bytes"] = max(p["peak_rss_bytes"], r["peak_rss_bytes"])
    return out


def write_reports(args: argparse.Namespace) -> int:
    from adaptbank.report.build import build_report, write_report
    from adaptbank.report.tables import fmt_bytes, md_table, render_markdown

    runs_dir, out = Path(args.runs_dir), Path(args.out)
    present = [(s, o) for s, o in GRID if state(runs_dir / piece_name(s, o)) not in ("absent", "started")]
    if not present:
        print(f"no runs with a result.json under {runs_dir}; run `python bench/continual_full.py run` first",
              file=sys.stderr)
        return 1
    dirs = [runs_dir / piece_name(s, o) for s, o in present]
    report = build_report(dirs)
    runs = report["runs"] if "runs" in report else [report]
    changed = sorted({f"{k} = {json.dumps(v[1] if isinstance(v, list) and len(v) == 2 else v)}"
                      for r in runs if _piece_of(r)[0] not in VARIANTS  # a variant's spec changes more, on purpose
                      for k, v in r["config_changed"].items() if k != "strategy"})
    bench = _bench_records(runs_dir)
    states = {piece_name(s, o): state(runs_dir / piece_name(s, o)) for s, o in GRID}
    rows = [[name, st, str(bench.get(name, {}).get("invocations", "–")),
             f"{bench[name]['wall_seconds']:.0f} s" if name in bench else "–",
             fmt_bytes(bench[name]["peak_rss_bytes"]) if name in bench else "–"] for name, st in states.items()]
    head = ["# Continual learning, standard five, full size", "",
            "MiniLM, LoRA q+v r=8, 1,000 train / 500 test per task, 2 epochs, 128 tokens, seed 0 (the run specs "
            "tasks/runs/standard5-order{1,2,3}.toml" + (f"; changed in the runs: {', '.join(changed)}" if changed else "")
            + "; seq-lora-fresh-heads: tasks/runs/standard5-order1-fresh-heads.toml, fresh heads and one learning "
            "rate). Orders: O-LoRA's 1-3 with yelp after amazon. Spread: mean ± sample sd over the orders a strategy "
            "ran in (n in the runs column; order-1-only strategies have no sd).", "",
            "## Grid", "", *md_table(["piece", "state", "invocations", "wall time", "peak RSS (process)"], rows), ""]
    text = "\n".join(head) + "\n" + render_markdown(report).replace("# Comparison", "## Comparison", 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text(text, encoding="utf-8")
    summary = {"grid": [{"piece": k, "state": v, **bench.get(k, {})} for k, v in states.items()],
               "changed": changed, "groups": report.get("groups", []), "differences": report.get("differences", []),
               "comparison": report.get("comparison", []), "report": report}
    Path(f"{out}.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    write_report(dirs, "html", Path(f"{out}.html"))
    print(f"wrote {out}.md, {out}.json, {out}.html ({len(dirs)} of {len(GRID)} runs present)")
    return 0


def _piece_of(run: dict[str, Any]) -> tuple[str, int]:
    """(piece label, order) of a report's run, from its strategy and its spec's name ``standard5-order<N>[suffix]``."""
    name = run["name"].split(" (")[0]
    tail = name.rsplit("order", 1)[-1]
    order, suffix = tail[:1], tail[1:]
    label = next((k for k, v in VARIANTS.items() if v == (run["strategy"], suffix)), run["strategy"] if not suffix else "")
    if not order.isdigit() or (label, int(order)) not in GRID:
        raise ValueError(f"run {run['name']!r} ({run['strategy']}) is not a piece of the grid")
    return label, int(order)


def recover(args: argparse.Namespace) -> int:
    from adaptbank._atomic import atomic_write_bytes

    source = Path(args.source)
    summary = json.loads(source.read_text(encoding="utf-8"))
    runs_dir = Path(args.runs_dir)
    (runs_dir / "logs").mkdir(parents=True, exist_ok=True)
    grid = {g["piece"]: g for g in summary.get("grid", [])}
    report = summary["report"]
    restored = 0
    for run in report["runs"] if "runs" in report else [report]:
        label, order = _piece_of(run)
        strategy, name = run["strategy"], piece_name(label, order)
        run_dir = runs_dir / name
        if state(run_dir) != "absent":
            print(f"{name}: {state(run_dir)} in {runs_dir}, kept")
            continue
        if not run["finished"]:  # its state (bank, optimiser) went with the folder: run it again instead
            print(f"{name}: unfinished in {source.name}, not recovered (a run resumes from its folder only)")
            continue
        routed = run["routed"]
        result = {"schema": 1, "name": run["name"].split(" (")[0], "strategy": strategy, "tasks": run["tasks"],
                  "seed": run["seed"], "backbone": run["backbone"], "config": run["config"],
                  "config_changed": run["config_changed"],
                  "oracle": {"baseline": run["baseline"], "matrix": run["matrix"]},
                  "routed": None if routed is None else {"baseline": routed["baseline"], "matrix": routed["matrix"]},
                  "steps": run["steps"], "finished": run["finished"], "metric": run["metric"],
                  "notes": [*run["notes"], f"recovered from {source.name}: this run's folder was lost; its numbers "
                            "are those the report recorded"]}  # fmt: skip
        for key, value in (("router_confusion", run["router_confusion"]), ("hits", run["hits"]),
                           ("router_matrix", (run.get("router") or {}).get("matrix"))):
            if value is not None:
                result[key] = value
        run_dir.mkdir(parents=True)
        atomic_write_bytes(run_dir / "result.json", (json.dumps(result, allow_nan=False) + "\n").encode())
        g = grid.get(name, {})
        if "wall_seconds" in g:
            record = {"piece": name, "cmd": ["recovered", str(source)], "rc": 0, "wall_seconds": g["wall_seconds"],
                      "peak_rss_bytes": g["peak_rss_bytes"], "state_before": "absent", "state_after": state(run_dir),
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "recovered": True}  # fmt: skip
            with open(runs_dir / "bench.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        restored += 1
        print(f"{name}: recovered ({state(run_dir)})")
    print(f"{restored} run(s) recovered into {runs_dir}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # kill PID stops like Ctrl-C: the current run keeps its tasks
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("run", "status", "report", "recover"):
        p = sub.add_parser(name)
        p.add_argument("--runs-dir", default="/tmp/adaptbank-continual-full", help="one folder per piece")
        if name == "run":
            p.add_argument("--pieces", nargs="+", type=parse_piece, default=None, metavar="STRATEGY:ORDER")
            p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
        if name == "run":
            p.add_argument("--max-train", dest="max_train", type=int, default=None)
            p.add_argument("--max-test", dest="max_test", type=int, default=None)
            p.add_argument("--epochs", type=float, default=None)
            p.add_argument("--max-length", dest="max_length", type=int, default=None)
            p.add_argument("--seed", type=int, default=None)
        if name == "report":
            p.add_argument("--out", default=str(REPO / "bench" / "results" / "continual_full"),
                           help="output path without extension: OUT.md, OUT.json, OUT.html")
        if name == "recover":
            p.add_argument("--from", dest="source", default=str(REPO / "bench" / "results" / "continual_full.json"),
                           help="a report's OUT.json")
    args = ap.parse_args(argv)
    return {"run": run_pieces, "status": show_status, "report": write_reports, "recover": recover}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
