"""`--init-from nearest` against a zero start on the nine-task sequence: runs and a report with intervals.

    python bench/init_from.py run    [--runs-dir DIR] [--budgets 64 500] [--seeds 0 1 2] [--max-test 500]
                                     [--epochs 2] [--max-length 128] [--threads N]
    python bench/init_from.py report [--runs-dir DIR] [--out bench/results/init_from]
    python bench/init_from.py few-shot --source-run DIR/n500-s0/zero [--shots 64] [--seeds 0 1 2]
                                     [--max-test 500] [--out bench/results/init_from_few_shot]

Each piece is ``adaptbank run tasks/runs/all9.toml --strategy bank --max-train N --seed S`` twice, once
with every expert starting from zero and once with ``--init-from nearest`` (each new expert starts from
the stored expert nearest in the router's feature space, ``adaptbank/bank/init_from.py``), into
``DIR/n<N>-s<S>/{zero,nearest}``, one subprocess after another (``continual_full.run_jobs``: resumable,
a finished run is skipped, every invocation logged to ``DIR/bench.jsonl``).

The bank never forgets, so its final accuracy on a task is the accuracy the task reached when it was
trained: what a start can change. The report groups the pairs by their train settings (read from each
run's config, so runs made by hand with other settings group apart) and prints, per group:

- ACC (the mean over the nine tasks) of zero and nearest starts, mean ± sd over seeds, and Δ ACC with a
  95% paired bootstrap interval over test examples (``adaptbank.report.stats.paired_bootstrap``, every
  seed's every task a stratum, so the interval covers the seeds' spread of test outcomes, not of training);
- per task: the source each nearest start took (per seed), both accuracies (mean over seeds) and Δ with
  its own paired bootstrap interval.

``few-shot`` asks the question a sequence trained at one budget cannot: a new task with few examples
(``--shots``) arriving at a bank of experts trained on more. For each target ``tasks[i]`` (i >= 1) of a
finished zero-start run (``--source-run``), that run's bank is cut back to ``tasks[:i]`` (the remove
commits, in a copy) and the target is added from zero and from its nearest stored expert, once per seed,
each into a fresh copy of the cut bank; the same report as above, over the eight targets.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from continual_full import REPO, child_env, run_jobs, state

VARIANTS = ("zero", "nearest")
SPEC = REPO / "tasks" / "runs" / "all9.toml"
SETTINGS = ("max_train", "max_test", "epochs", "max_length")


def piece(budget: int, seed: int) -> str:
    return f"n{budget}-s{seed}"


def run(args: argparse.Namespace) -> int:
    runs_dir = Path(args.runs_dir)
    jobs = []
    for budget in args.budgets:
        for seed in args.seeds:
            for variant in VARIANTS:
                run_dir = runs_dir / piece(budget, seed) / variant
                cmd = [sys.executable, "-m", "adaptbank.cli", "run", str(SPEC), "--out", str(run_dir),
                       "--strategy", "bank", "--max-train", str(budget), "--max-test", str(args.max_test),
                       "--epochs", str(args.epochs), "--max-length", str(args.max_length), "--seed", str(seed),
                       *(["--init-from", "nearest"] if variant == "nearest" else [])]
                jobs.append((f"{piece(budget, seed)}-{variant}", run_dir, cmd))
    return run_jobs(jobs, runs_dir, child_env(args.threads))


def _sources(run_dir: Path, tasks: list[str]) -> dict[str, str | None]:
    """Per task, the stored task its expert started from (None: zero), from the run's bank."""
    from adaptbank.bank.store import BankStore

    store = BankStore.open(run_dir / "bank")
    return {t: (store.read_config(t).get("init_from") or {}).get("task") for t in tasks}


def _pair(run_dir: Path) -> dict[str, Any] | None:
    """One finished (zero, nearest) pair under ``run_dir`` (``n<N>-s<S>``), or None when incomplete."""
    results = {}
    for variant in VARIANTS:
        file = run_dir / variant / "result.json"
        if state(run_dir / variant) != "finished":
            return None
        results[variant] = json.loads(file.read_text(encoding="utf-8"))
    zero, nearest = results["zero"], results["nearest"]
    if zero["tasks"] != nearest["tasks"] or zero["seed"] != nearest["seed"]:
        raise ValueError(f"{run_dir}: the zero and nearest runs differ in tasks or seed")
    train = zero["config"]["train"]
    if any(train[k] != nearest["config"]["train"][k] for k in SETTINGS):
        raise ValueError(f"{run_dir}: the zero and nearest runs differ in {SETTINGS}")
    tasks = zero["tasks"]
    return {"dir": str(run_dir), "seed": zero["seed"], "tasks": tasks, "settings": {k: train[k] for k in SETTINGS},
            "hits": {v: results[v]["hits"]["oracle"] for v in VARIANTS},
            "acc": {v: [results[v]["oracle"]["matrix"][-1][j] for j in range(len(tasks))] for v in VARIANTS},
            "sources": _sources(run_dir / "nearest", tasks)}


def summarise(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group of train settings: ACC of both starts over seeds, Δ ACC and per-task Δ with intervals."""
    from adaptbank.report.stats import mean_sd, paired_bootstrap

    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for p in pairs:
        groups.setdefault(tuple(p["settings"][k] for k in SETTINGS), []).append(p)
    out = []
    for key, members in sorted(groups.items()):
        members.sort(key=lambda p: p["seed"])
        tasks = members[0]["tasks"]
        if any(p["tasks"] != tasks for p in members):
            raise ValueError(f"settings {key}: the pairs cover different task sequences")
        strata = {v: {f"s{p['seed']}/{t}": p["hits"][v][t] for p in members for t in tasks} for v in VARIANTS}
        diff, lo, hi = paired_bootstrap(strata["nearest"], strata["zero"])
        accs = {v: [sum(p["acc"][v]) / len(tasks) for p in members] for v in VARIANTS}
        per_task = []
        for j, t in enumerate(tasks):
            d, tlo, thi = paired_bootstrap({f"s{p['seed']}": p["hits"]["nearest"][t] for p in members},
                                           {f"s{p['seed']}": p["hits"]["zero"][t] for p in members})
            per_task.append({"task": t, "sources": [p["sources"][t] for p in members],
                             "zero": mean_sd([p["acc"]["zero"][j] for p in members])[0],
                             "nearest": mean_sd([p["acc"]["nearest"][j] for p in members])[0],
                             "diff": d, "lo": tlo, "hi": thi})
        out.append({"settings": dict(zip(SETTINGS, key, strict=True)), "seeds": [p["seed"] for p in members],
                    "acc": {v: mean_sd(accs[v])[:2] for v in VARIANTS}, "acc_per_seed": accs,
                    "diff": diff, "lo": lo, "hi": hi, "per_task": per_task})
    return out


def _pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _sd(x: float | None) -> str:
    return "" if x is None else f" ± {100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def markdown(groups: list[dict[str, Any]], title: str = "the nine-task sequence") -> str:
    lines = [f"# `--init-from nearest` against a zero start: {title} (bench/init_from.py)", "",
             "MiniLM, LoRA q+v r=8, strategy bank, tasks/runs/all9.toml (dbpedia amazon yelp yahoo ag_news sst2 trec "
             "banking77 clinc150). Δ = nearest − zero, in points, with its 95% paired bootstrap interval over test "
             "examples (10,000 resamples, every seed's every task a stratum).", ""]
    for g in groups:
        s = g["settings"]
        (zm, zsd), (nm, nsd) = g["acc"]["zero"], g["acc"]["nearest"]
        lines += [f"## {s['max_train']} train / {s['max_test']} test per task, {s['epochs']:g} epochs, "
                  f"{s['max_length']} tokens; seeds {', '.join(map(str, g['seeds']))}", "",
                  f"ACC zero {_pct(zm)}{_sd(zsd)}, nearest {_pct(nm)}{_sd(nsd)}: **Δ {_signed(g['diff'])} "
                  f"[{_signed(g['lo'])}, {_signed(g['hi'])}]**", "",
                  "| task | started from (per seed) | zero % | nearest % | Δ [95%] |", "|---|---|---:|---:|---|"]
        for r in g["per_task"]:
            src = ", ".join(x or "zero" for x in r["sources"])
            lines.append(f"| {r['task']} | {src} | {_pct(r['zero'])} | {_pct(r['nearest'])} | "
                         f"{_signed(r['diff'])} [{_signed(r['lo'])}, {_signed(r['hi'])}] |")
        lines.append("")
    return "\n".join(lines)


def report(args: argparse.Namespace) -> int:
    runs_dir = Path(args.runs_dir)
    pairs = [p for d in sorted(runs_dir.glob("n*-s*")) if (p := _pair(d)) is not None]
    if not pairs:
        print(f"no finished (zero, nearest) pair under {runs_dir}; run `python bench/init_from.py run` first",
              file=sys.stderr)
        return 1
    groups = summarise(pairs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(groups)
    Path(f"{out}.md").write_text(text, encoding="utf-8")
    Path(f"{out}.json").write_text(json.dumps({"groups": groups, "pairs": [
        {k: p[k] for k in ("dir", "seed", "settings", "acc", "sources")} for p in pairs]}, indent=1) + "\n",
        encoding="utf-8")
    print(text)
    print(f"wrote {out}.md and {out}.json ({len(pairs)} pairs)")
    return 0


def few_shot(args: argparse.Namespace) -> int:
    """Few-shot targets over well-trained sources: for target ``tasks[i]`` (i >= 1) of a finished zero-start
    run, that run's bank cut back to ``tasks[:i]`` (trained at the run's budget), and the target added with
    ``--shots`` examples, from zero and with ``--init-from nearest``, once per seed, each into a fresh copy.
    Resumable: every finished add is kept in ``OUT.json`` and skipped when run again."""
    import dataclasses
    import shutil
    import tempfile

    import torch

    from adaptbank.bank.facade import AdapterBank
    from adaptbank.core.config import TrainConfig, stored_method
    from adaptbank.data.specs import TaskSpec

    torch.set_num_threads(args.threads or 1)
    source = Path(args.source_run)
    result = json.loads((source / "result.json").read_text(encoding="utf-8"))
    if not result.get("finished") or result["strategy"] != "bank" or result["config"]["options"]["init_from"]:
        raise SystemExit(f"{source}: --source-run must be a finished bank run with zero starts")
    tasks = result["tasks"]
    out = Path(f"{args.out}.json")
    done: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))["adds"] if out.is_file() else {}
    work = Path(tempfile.mkdtemp(prefix="adaptbank-few-shot-"))
    try:
        for i in range(1, len(tasks)):
            target, base = tasks[i], work / f"base-{i}"
            shutil.copytree(source / "bank", base)
            cut = AdapterBank.open(base)
            cfg = cut.store.read_config(target)
            for name in reversed(tasks[i:]):
                cut.remove(name)
            spec, method = TaskSpec.from_dict(cfg["spec"]), stored_method(cfg["method"])
            for seed in args.seeds:
                train = dataclasses.replace(TrainConfig.from_dict(cfg["train"]), max_train=args.shots,
                                            max_test=args.max_test, seed=seed)
                for variant in VARIANTS:
                    key = f"{target}/s{seed}/{variant}"
                    if key in done:
                        continue
                    bank_dir = work / "bank"
                    shutil.rmtree(bank_dir, ignore_errors=True)
                    shutil.copytree(base, bank_dir)
                    bank = AdapterBank.open(bank_dir)
                    added = bank.add_task(spec, method, train, init_from="nearest" if variant == "nearest" else None)
                    done[key] = {"task": target, "seed": seed, "variant": variant, "accuracy": added.test_accuracy,
                                 "hits": added.test_hits, "source": (added.init_from or {}).get("task"),
                                 "seconds": added.seconds}
                    print(f"{key}: {100 * added.test_accuracy:.1f}% (from {done[key]['source'] or 'zero'})", flush=True)
                    _write_json(out, {"source_run": str(source), "shots": args.shots, "adds": done})
            shutil.rmtree(base)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    settings = {"max_train": args.shots, "max_test": args.max_test, "epochs": result["config"]["train"]["epochs"],
                "max_length": result["config"]["train"]["max_length"]}
    groups = summarise(few_shot_pairs(done, tasks[1:], settings))
    text = markdown(groups, title=f"few-shot targets ({args.shots} examples) over sources trained at "
                    f"{result['config']['train']['max_train']} (`{source}`)")
    Path(f"{args.out}.md").write_text(text, encoding="utf-8")
    _write_json(out, {"source_run": str(source), "shots": args.shots, "adds": done, "groups": groups})
    print(text)
    return 0


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as ``path``, atomically: the resume record is whole after any interruption."""
    from adaptbank._atomic import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data) + "\n").encode())


def few_shot_pairs(adds: dict[str, Any], targets: list[str], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The few-shot adds as one pair per seed (the shape :func:`summarise` reads), seeds with every add only."""
    seeds = sorted({a["seed"] for a in adds.values()})
    pairs = []
    for seed in seeds:
        got = {(t, v): adds.get(f"{t}/s{seed}/{v}") for t in targets for v in VARIANTS}
        if any(a is None for a in got.values()):
            continue
        pairs.append({"seed": seed, "tasks": targets, "settings": settings,
                      "hits": {v: {t: got[t, v]["hits"] for t in targets} for v in VARIANTS},
                      "acc": {v: [got[t, v]["accuracy"] for t in targets] for v in VARIANTS},
                      "sources": {t: got[t, "nearest"]["source"] for t in targets}})
    return pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("run", "report", "few-shot"):
        p = sub.add_parser(name)
        if name != "few-shot":
            p.add_argument("--runs-dir", default="/tmp/adaptbank-init-from", help="one folder per budget and seed")
        if name == "few-shot":
            p.add_argument("--source-run", required=True, help="a finished zero-start bank run (its bank and config)")
            p.add_argument("--shots", type=int, default=64, help="training examples of each target")
            p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
            p.add_argument("--max-test", dest="max_test", type=int, default=500)
            p.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
            p.add_argument("--out", default=str(REPO / "bench" / "results" / "init_from_few_shot"),
                           help="output path without extension: OUT.md, OUT.json (also the resume record)")
        elif name == "run":
            p.add_argument("--budgets", nargs="+", type=int, default=[64, 500], help="training examples per task")
            p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
            p.add_argument("--max-test", dest="max_test", type=int, default=500)
            p.add_argument("--epochs", type=float, default=2)
            p.add_argument("--max-length", dest="max_length", type=int, default=128)
            p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
        if name == "report":
            p.add_argument("--out", default=str(REPO / "bench" / "results" / "init_from"),
                           help="output path without extension: OUT.md, OUT.json")
    args = ap.parse_args(argv)
    return {"run": run, "report": report, "few-shot": few_shot}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
