"""Run the speed and memory benchmarks one after another and write ``BENCHMARKS.md`` from their results.

Every step is one of the side-by-side scripts in this folder (each interleaves adaptbank and its peer in
one run and writes JSON); this script runs them in fresh processes, one at a time, and renders every
figure with the command that produced it, the versions, the thread count and the load average at the
step's start. Before each step of a full run it waits (up to ``--quiet-wait`` seconds) for the one-minute
load average to drop below ``--quiet-below`` (1.0); a step that started above it is marked NOT QUIET in
the report, and its figures are not results.

* ``python bench/run_all.py`` runs every step (about 45 minutes on two cores) into ``bench/results/all/``
  and writes ``BENCHMARKS.md`` at the repository root; a step whose JSON is there already is kept
  (``--force`` re-runs it; ``--only NAME ...`` runs some), so a long run can be done in pieces;
* ``python bench/run_all.py --render`` only rewrites ``BENCHMARKS.md`` from the JSON there;
* ``python bench/run_all.py --quick --out DIR`` is the smoke run (tiny sizes, no waiting; the test suite
  runs it, ``tests/test_bench_quick.py``): every step and the renderer run, the figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    render: Callable[[dict[str, Any]], list[str]]


def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(c if isinstance(c, str) else _f(c) for c in row) + " |" for row in rows]
    return out


# ----------------------------------------------------------------------------- renderers, one per step's JSON
def r_inference(d: dict[str, Any]) -> list[str]:
    s, over = d["seconds"], d["over_base"]
    added = d.get("added_op_share", {})
    rows = [[k, s[k], d["args"]["batch"] / s[k], f"{over[k]:.3f}x", f"{100 * added[k]:.1f}%" if k in added else "-"]
            for k in s]
    lines = _table(["variant", "s per batch", "ex/s", "time over base", "added ops over base"], rows)
    ratios = ", ".join(f"{label}: {s[f'adaptbank {label}'] / s[f'peft {label}']:.3f}" for label in ("q+v", "all-linear"))
    return lines + ["", f"adaptbank / peft time (unmerged): {ratios} (< 1: adaptbank faster); outputs agree to "
                    + ", ".join(f"{k} {v:.1e}" for k, v in d["max_abs_diff"].items()) + ". Added ops over base: "
                    "the self time of the aten calls a variant makes beyond the base forward's (median of three profiled forwards "
                    "each), over the base forward's op time: the expert's own cost, free of the round-to-round noise "
                    "of the matmuls it does not touch."]


def r_train_speed(d: dict[str, Any]) -> list[str]:
    rows = [[m, r["peer"], r["ms_per_step"]["adaptbank"], r["ms_per_step"][r["peer"]], f"{r['speed_ratio']:.3f}x"]
            for m, r in d["runs"].items()]
    return _table(["method", "peer", "adaptbank ms/step", "peer ms/step", "throughput adaptbank / peer"], rows) + [
        "", f"{d['task']}, {d['steps']} optimiser steps of {d['batch_size']} rows per round and side, {d['rounds']} "
        "interleaved rounds (median); > 1: adaptbank faster."]


def r_train_memory(d: dict[str, Any]) -> list[str]:
    rows = []
    for m, r in d["memory"].items():
        peer = next(k for k in r if k not in ("adaptbank", "peak_ratio"))
        mib = {k: (r[k]["peak_rss"] / 2**20, (r[k]["peak_rss"] - r[k]["rss_after_setup"]) / 2**20) for k in ("adaptbank", peer)}
        rows.append([m, peer, mib["adaptbank"][0], mib[peer][0], f"{r['peak_ratio']:.3f}x", mib["adaptbank"][1], mib[peer][1]])
    return _table(["method", "peer", "adaptbank peak RSS MiB", "peer peak RSS MiB", "peak adaptbank / peer",
                   "adaptbank rise MiB", "peer rise MiB"], rows) + [
        "", f"Each side in a process of its own, {d['steps']} steps twice; rise: peak minus the RSS after set-up."]


def r_cached(d: dict[str, Any]) -> list[str]:
    def rows_of(med: dict[str, Any], pairs: dict[str, Any]) -> list[list[Any]]:
        out = []
        for k, m in med.items():
            p = pairs.get(k)
            out.append([k, m["wall"], m["training"], 100 * m["accuracy"],
                        f"{p['add_task_speedup']:.2f}x" if p else "", f"{p['training_speedup']:.2f}x" if p else "",
                        f"{p['max_abs_diff']:.1e}" if p else "",
                        f"{p['below_seconds']:.2f}" if p and "below_seconds" in p else "",
                        f"{p['bound']:.2f}x" if p and "bound" in p else ""])
        return out

    heads = ["setting", "add-task s", "training s", "test acc", "add-task speed-up", "training speed-up",
             "max abs diff of stored tensors", "forward below s", "perfect cache's bound"]
    a = d["args"]
    lines = [f"{a['task']}, {a['max_train']} training / {a['max_test']} test texts, {a['epochs']:g} epochs; defaults "
             f"(dropout on), median of {a['rounds']} interleaved rounds:", ""]
    lines += _table(heads, rows_of(d["median"], d["pairs"]))
    if any("bound" in p for p in d["pairs"].values()):
        lines += ["", "Forward below: the seconds an uncached run spends below the first trained layer in training (the "
                  "embeddings and the frozen layers, forward in training mode over the same batches; nothing below "
                  "trains, so there is no backward there), measured in each round; a perfect cache removes exactly that, "
                  "so uncached / (uncached - forward below) bounds the add-task speed-up a cache can give."]
    lines += ["", "Dropout off (`--no-train-dropout`), one round, where a cached run must store the uncached expert:", ""]
    lines += _table(heads, rows_of(d["dropout_off"]["median"], d["dropout_off"]["pairs"]))
    order = ["data", "model", "tokenise", "frozen pass", "router memory", "probe", "training", "evaluation"]
    first = next(iter(d["median"].values()))["phases"]
    names = sorted(first, key=lambda p: order.index(p) if p in order else len(order))
    lines += ["", "Where add-task's time goes (`metrics.phase_seconds`, median seconds):", ""]
    lines += _table(["setting", *names], [[k, *(m["phases"][p] for p in names)] for k, m in d["median"].items()])
    return lines


def r_mixed(d: dict[str, Any]) -> list[str]:
    rows = [[r["n"], r["distinct_experts_in_batch"], r["ex_per_s"]["ab_mixed"], r["ex_per_s"].get("peft_mixed"),
             f"{r['ab_over_peft_mixed']:.2f}" if r["ab_over_peft_mixed"] else "-",
             f"{r['ab_mixed_over_ab_single']:.2f}", r["add_ms_recent"]["adaptbank"], r["add_ms_recent"]["peft"]]
            for r in d["results"]]
    return _table(["N held", "distinct in batch", "adaptbank mixed ex/s", "peft mixed ex/s", "adaptbank / peft",
                   "adaptbank mixed / single", "ms per add, adaptbank", "ms per add, peft"], rows) + [
        "", f"Batch {d['batch_shape'][0]} x {d['batch_shape'][1]}; peft mixed '-': peft not held at that N "
        "(`--peft-max-n`); ms per add, peft '-': past `--peft-max-n` peft's experts were added per LoRA layer "
        "(`--peft-fast-add`: its `update_layer`, not the model-wide `add_adapter`), so its add time is not "
        "measured there; its mixed forward is peft's own."]


def r_bank(d: dict[str, Any]) -> list[str]:
    b, med, reads = d["build"], d["median_seconds"], d["in_process_reads"]
    rows = [[d["tasks"], med["list_cli"], med["startup_import_cli"], reads["load_cold"]["seconds"],
             reads["load_warm"]["seconds"] if reads.get("load_warm") else None, b["write_task_ms_first_10"],
             b["write_task_ms_last_10"], b.get("commit_with_router_ms"), b.get("add_task_seconds"),
             b.get("add_task_bank_overhead_seconds"),
             " / ".join(f"{x:.2f}" for x in b["add_task_overheads"]) if b.get("add_task_overheads") else None,
             b["bytes_per_task"]]]
    return _table(["tasks", "`list --json` s", "python + import s", "load one task, new bank object s",
                   "load one task, same bank s", "commit ms, first 10", "commit ms, last 10",
                   "add-task commit with router update ms", "real add-task s", "its bank overhead s",
                   "overhead of each run s", "bytes per task"], rows) + [
        "", "Commits write the task straight through the store (no router); the add-task commit adds the router "
        "update that `add-task` commits with the task (the statistics; the LDA is solved when a router is loaded, "
        "no longer per commit), on a router fitted over the bank. "
        "The real add-task (`--add-task`): sst2, 1 epoch, 64 tokens, added and removed again; its bank overhead "
        "is its time minus tokenise, frozen pass, probe, training and evaluation (the task's own work); it runs "
        "`--add-task-repeats` times (3) and the run with the median overhead is shown."]


def r_bytes(d: dict[str, Any]) -> list[str]:
    rows = [[k, v["files"].get("adapter", 0), v["files"].get("head", 0), v["files"].get("memory", 0),
             v["files"].get("config", 0), v["total"], v["trainable_params"]] for k, v in d["tasks"].items()]
    return _table(["method", "expert bytes", "head", "router memory", "config", "total", "trainable expert params"],
                  rows) + ["", f"Router memory from {d['args']['max_train']} training texts of {d['args']['task']}."]


def r_compile(d: dict[str, Any]) -> list[str]:
    rows = [[k, p["eager_s"], p["compiled_s"], f"{p['speedup']:.2f}x", p["compile_s"], f"{p['max_abs_diff']:.1e}"]
            for k, p in d["paths"].items()]
    return _table(["path", "eager s", "compiled s", "speed-up", "first call (compile) s", "max abs diff"], rows)


STEPS: list[Step] = [
    Step("inference", "Inference: base vs unmerged vs merged LoRA, adaptbank beside peft", "inference_speed.py",
         (), ("--quick",), r_inference),
    Step("train_speed", "Training step throughput: adaptbank vs peft LoRA and torch full fine-tuning", "train_speed.py",
         ("--methods", "lora", "lora-all", "full-ft"), ("--quick",), r_train_speed),
    Step("train_memory", "Training peak memory, a process per side", "train_speed.py",
         ("--memory", "--methods", "lora", "lora-all", "full-ft", "--steps", "20"),
         ("--memory", "--methods", "lora", "--steps", "2"), r_train_memory),
    Step("cached_layers", "Cached frozen layers (`--cache-frozen`, `--layers`) and add-task's profile",
         "cached_layers.py", ("--rounds", "3"), ("--quick",), r_cached),
    Step("mixed_batch", "Mixed batch with N experts held, adaptbank vs peft `adapter_names=`", "mixed_batch.py",
         ("--n", "1", "32", "128", "1024", "--peft-max-n", "128", "--peft-fast-add", "--repeats", "5"),
         ("--n", "1", "4", "--repeats", "1", "--warmup", "0", "--batch", "8", "--max-length", "32"), r_mixed),
    *(Step(f"bank_{n}", f"The bank with {n} task(s): list, one-task load, commit cost", "bank_scale.py",
           ("--tasks", str(n)), ("--tasks", str(min(n, 5)), "--repeats", "1", "--no-strace"), r_bank)
      for n in (1, 100, 1000)),
    *(Step(f"bank_minilm_{n}", f"The bank with {n} MiniLM-sized task(s): the add-task commit with its router update",
           "bank_scale.py", ("--tasks", str(n), "--base", "minilm", "--repeats", "1", "--no-strace", "--add-task", "sst2",
                             "--add-task-texts", "200"),
           ("--tasks", "2", "--base", "minilm", "--repeats", "1", "--no-strace", "--router-commits", "2", "--add-task",
            "sst2", "--add-task-texts", "16", "--add-task-repeats", "1"), r_bank)
      for n in (1, 100, 1000)),
    Step("task_bytes", "Bytes on disk per task, every method", "task_bytes.py", (), ("--quick",), r_bytes),
    Step("compile", "torch.compile speed-up (one expert, mixed, routed)", "compile_speed.py", (),
         ("--experts", "2", "--batch", "4", "--max-length", "16", "--repeats", "1", "--warmup", "1", "--paths",
          "one-expert"), r_compile),
]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke sizes, no waiting for a quiet machine")
    p.add_argument("--out", default=None, help="results folder [bench/results/all; quick: required]")
    p.add_argument("--md", default=None, help="where to write the report [BENCHMARKS.md; quick: OUT/BENCHMARKS.md]")
    p.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], default=None)
    p.add_argument("--force", action="store_true", help="re-run steps whose JSON exists")
    p.add_argument("--render", action="store_true", help="only write the report from the JSON there")
    p.add_argument("--quiet-below", type=float, default=1.0)
    p.add_argument("--quiet-wait", type=float, default=900.0, help="seconds to wait for the load to drop per step")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one step may take")
    return p.parse_args()


def wait_quiet(below: float, patience: float) -> tuple[float, ...]:
    start = time.monotonic()
    while os.getloadavg()[0] >= below and time.monotonic() - start < patience:
        time.sleep(10)
    return os.getloadavg()


def run_step(step: Step, args: argparse.Namespace, out: Path, log: dict[str, Any]) -> None:
    target = out / f"{step.name}.json"
    cmd = [sys.executable, str(HERE / step.script), *(step.quick if args.quick else step.full), "--json", str(target)]
    load = os.getloadavg() if args.quick else wait_quiet(args.quiet_below, args.quiet_wait)
    shown = "python bench/" + " ".join([step.script, *(step.quick if args.quick else step.full)])
    print(f"[{step.name}] load {load[0]:.2f}: {shown}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=HERE, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}, capture_output=True, text=True,
        timeout=args.timeout)
    (out / f"{step.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"step {step.name} failed ({done.returncode}); see {out / (step.name + '.log')}:\n"
                         + "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:]))
    log[step.name] = {"command": shown, "load_at_start": list(load), "quiet": load[0] < args.quiet_below,
                      "seconds": time.perf_counter() - t0}
    (out / "run_all.json").write_text(json.dumps(log, indent=2) + "\n")


def render(out: Path, md: Path, log: dict[str, Any], quick: bool) -> None:
    import platform

    versions = {}
    for mod in ("torch", "transformers", "peft"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "not installed"
    lines = ["# Benchmarks", "",
             "Written by `python bench/run_all.py`" + (" --quick (smoke sizes: these figures mean nothing)" if quick else "")
             + f"; Python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in versions.items())
             + f", {os.cpu_count()} CPU cores. Every comparison ran side by side in one run (interleaved rounds, or "
             "alternating processes where stated); each section gives its command, the load average (1, 5, 15 min) at "
             "its start and the thread count. A step that started at a load of 1.0 or more is marked NOT QUIET: its "
             "figures are not results.", ""]
    for step in STEPS:
        path = out / f"{step.name}.json"
        if not path.is_file():
            lines += [f"## {step.title}", "", "not run yet", ""]
            continue
        data = json.loads(path.read_text())
        meta = log.get(step.name, {})
        env = data.get("environment") or data.get("env") or {}
        load = meta.get("load_at_start") or env.get("loadavg_at_start")
        quiet = meta.get("quiet", load is not None and load[0] < 1.0)
        lines += [f"## {step.title}", "", f"`{meta.get('command', 'python bench/' + step.script)}`; threads "
                  f"{env.get('threads', '-')}; load at start {', '.join(f'{x:.2f}' for x in load) if load else '-'}"
                  + ("" if quiet else " **NOT QUIET**") + (f"; {meta['seconds']:.0f} s" if meta.get("seconds") else ""),
                  ""]
        args_given = (meta.get("command") or "").split()
        if "--tasks" in args_given:  # bank_scale's JSON does not name its task count; the command does
            data = {**data, "tasks": int(args_given[args_given.index("--tasks") + 1])}
        lines += step.render(data)
        lines.append("")
    md.write_text("\n".join(lines))
    print(f"wrote {md}")


def main() -> None:
    args = parse()
    if args.quick and not args.out:
        raise SystemExit("--quick needs --out DIR (it must not overwrite the real results)")
    out = Path(args.out) if args.out else HERE / "results" / "all"
    md = Path(args.md) if args.md else (out / "BENCHMARKS.md" if args.quick else REPO / "BENCHMARKS.md")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "run_all.json"
    log: dict[str, Any] = json.loads(log_path.read_text()) if log_path.is_file() else {}
    if not args.render:
        for step in STEPS:
            if args.only and step.name not in args.only:
                continue
            if (out / f"{step.name}.json").is_file() and not args.force and not args.quick:
                print(f"[{step.name}] kept ({out / (step.name + '.json')})")
                continue
            run_step(step, args, out, log)
    render(out, md, log, args.quick)


if __name__ == "__main__":
    main()
