"""A bank with many tasks: listing cost, and that loading one task reads only that task's files.

Creates a bank (``AdapterBank.init``) on a tiny saved BERT (``tests/conftest.py::_write_tiny_bert``;
``--base minilm`` uses the bundled all-MiniLM-L6-v2 so the tensors have a real task's size) and
writes ``--tasks`` (200) tasks straight through ``bank.store.write_task(name, {"adapter", "head",
"memory"}, config)``: no training; each task's tensors are shaped exactly like a real task's (taken
from ``model.export_task`` of a LoRA q+v task on that backbone, then randomised) and its config has
the fields ``AdapterBank.add_task`` writes. Then:

* ``adaptbank list BANK --json`` in a subprocess (median of ``--repeats``), beside the cost of just
  starting Python and importing ``adaptbank.cli``;
* in-process ``AdapterBank.open(path).tasks()``;
* in-process ``AdapterBank.open(path).load([one task])`` (cold: includes loading and fingerprinting
  the backbone) and a second task on the same opened bank (warm);
* the bank files each of these reads: an ``strace -f -e trace=openat`` of a child process doing the
  operation (when strace works here), and in-process a ``sys.addaudithook`` on ``open`` plus a
  wrapper on ``adaptbank.store.load_file`` (safetensors opens its files in Rust, outside Python's
  audit events).

Usage::

    python bench/bank_scale.py --json bench/results/bank_scale.json
    python bench/bank_scale.py --tasks 20 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import NOISE_NOTE, REPO, environment, setup_torch, table, write_json

_OPENS: list[str] = []
_WATCH: dict[str, object] = {"root": None}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--labels", type=int, default=4, help="classes per task (head size)")
    p.add_argument("--base", choices=["tiny", "minilm"], default="tiny")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bank", default=None, help="bank directory (default: a temporary one, deleted after)")
    p.add_argument("--keep", action="store_true", help="keep the temporary bank")
    p.add_argument("--no-strace", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--add-task", default=None, metavar="SPEC",
                   help="after the router commits: one real add-task of this task spec (e.g. sst2) into the bank, then "
                        "removed; reports its profile and the bank's overhead (its time minus the task's own work)")
    p.add_argument("--add-task-texts", type=int, default=64, help="training and test texts of that add-task")
    p.add_argument("--add-task-repeats", type=int, default=3, help="real add-tasks run; the median overhead is kept")
    p.add_argument("--router-commits", type=int, default=10,
                   help="after building: fit the router, then time this many add-task commits with the router update")
    p.add_argument("--json", default=None)
    p.add_argument("--probe", choices=["tasks", "load"], help=argparse.SUPPRESS)
    p.add_argument("--probe-task", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


# ----------------------------------------------------------------------------------------- probes
def _probe(op: str, bank: str, task: str | None) -> None:
    """The operation alone, for a traced child process."""
    from adaptbank.bank.facade import AdapterBank

    if op == "tasks":
        print(len(AdapterBank.open(bank).tasks()))
    elif op == "load":
        model = AdapterBank.open(bank).load([task])
        print(list(model.tasks))


def _strace(args: list[str], bank: Path) -> dict:
    """Files under ``bank`` opened by the command (``openat`` via strace), and how many others."""
    with tempfile.NamedTemporaryFile(suffix=".strace", delete=False) as f:
        log = f.name
    try:
        proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat,open", "-o", log, *args],
                              capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
        inside, outside = [], 0
        root = str(bank.resolve())
        for line in Path(log).read_text().splitlines():
            m = re.search(r'open(?:at)?\((?:AT_FDCWD|\d+), "([^"]+)".*= (-?\d+)', line)
            if not m or int(m.group(2)) < 0:
                continue
            path = os.path.realpath(m.group(1))
            if path.startswith(root + os.sep) or path == root:
                rel = os.path.relpath(path, root)
                if not os.path.isdir(path):
                    inside.append(rel)
            else:
                outside += 1
        return {"bank_files": inside, "bank_file_count": len(inside), "other_files_opened": outside}
    finally:
        os.unlink(log)


def _audit(event: str, args: tuple) -> None:
    root = _WATCH["root"]
    if root is None or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.realpath(os.fsdecode(args[0]))
    if path.startswith(str(root) + os.sep) and not os.path.isdir(path):
        _OPENS.append(os.path.relpath(path, str(root)))


def _watched(fn, root: Path) -> tuple[object, list[str], float]:
    """Run ``fn`` recording bank files opened from Python and loaded by safetensors."""
    _OPENS.clear()
    _WATCH["root"] = root.resolve()
    t0 = time.perf_counter()
    try:
        value = fn()
    finally:
        seconds = time.perf_counter() - t0
        _WATCH["root"] = None
    return value, list(_OPENS), seconds


# ----------------------------------------------------------------------------------------- main
def build(args: argparse.Namespace, bank_dir: Path, work: Path) -> tuple[dict, list[str]]:
    import torch

    from adaptbank import LoRAConfig, TrainConfig, __version__
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.bank.router_memory import task_memory

    if args.base == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import _write_tiny_bert  # noqa: E402

        base = str(_write_tiny_bert(work / "tiny-bert"))
    else:
        base = "sentence-transformers/all-MiniLM-L6-v2"
    t0 = time.perf_counter()
    bank = AdapterBank.init(bank_dir, base=base)
    init_s = time.perf_counter() - t0
    model = bank.new_model()
    labels = [f"class{j}" for j in range(args.labels)]
    method = LoRAConfig()
    model.add_task("template", method, labels)
    template = model.export_task("template")
    model.remove_task("template")
    dim = (bank.router_layers + 1) * model.hidden_size
    memory = task_memory(torch.randn(1000, dim, generator=torch.Generator().manual_seed(1)))
    shapes = {part: {k: list(v.shape) for k, v in t.items()} for part, t in template.items()}
    names = [f"task{i:04d}" for i in range(args.tasks)]
    g = torch.Generator().manual_seed(0)
    write_s = []
    for i, name in enumerate(names):
        files = {part: {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in t.items()}
                 for part, t in template.items()}
        files["memory"] = {key: torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v
                           for key, v in memory.items()}  # mean and packed scatter factor of 1000 examples
        config = {"adaptbank_version": __version__, "name": name, "type": "classification", "method": method.to_dict(),
                  "spec": {"name": name, "type": "classification", "train": f"data/{name}/train.jsonl",
                           "test": f"data/{name}/test.jsonl", "text_field": "text", "label_field": "label",
                           "labels": None, "format": "jsonl", "description": "synthetic bank_scale task"},
                  "labels": labels, "parent": None, "created": "2025-01-01T00:00:00+00:00", "shared_group": None,
                  "owns_shared": False, "share_reason": None, "train": TrainConfig().to_dict(),
                  "metrics": {"test_accuracy": 0.5 + 0.4 * (i % 10) / 10, "n_train": 1000, "n_test": 500,
                              "probe_accuracy": None, "train_seconds": 0.0, "examples_per_second": 0.0,
                              "steps": 0, "trainable_params": sum(v.numel() for v in template["adapter"].values()),
                              "head_params": sum(v.numel() for v in template["head"].values()), "final_loss": None}}
        t1 = time.perf_counter()
        bank.store.write_task(name, files, config)
        write_s.append(time.perf_counter() - t1)
    bank.store.reload()
    per_task_bytes = bank.store.bytes_on_disk(names[0])
    router_ms = _router_commits(bank, template, memory, config, args.router_commits)
    if args.add_task:
        router_ms |= _real_add_task(bank, args.add_task, args.add_task_texts, args.add_task_repeats)
    info = {"base": base, "init_seconds": init_s, "tensor_shapes": shapes, "bytes_per_task": per_task_bytes,
            "bank_bytes": bank.store.bytes_on_disk(), "write_task_ms_median": 1000 * statistics.median(write_s),
            "write_task_ms_last_10": 1000 * statistics.mean(write_s[-10:]),
            "write_task_ms_first_10": 1000 * statistics.mean(write_s[:10]), "write_seconds_total": sum(write_s),
            **router_ms}
    print(f"wrote {args.tasks} tasks ({per_task_bytes} bytes each) in {sum(write_s):.1f}s; write_task ms: first 10 "
          f"{info['write_task_ms_first_10']:.1f}, last 10 {info['write_task_ms_last_10']:.1f}", flush=True)
    if router_ms:
        print(f"router fitted over {args.tasks} tasks in {router_ms['router_fit_seconds']:.2f}s; add-task's commit "
              f"(task + router update) {router_ms['commit_with_router_ms']:.1f} ms", flush=True)
    return info, names


# the phases of add-task that depend only on the new task's own data, not on the bank
_OWN_WORK = ("tokenise", "frozen pass", "probe", "training", "evaluation")


def _real_add_task(bank, spec: str, texts: int, repeats: int) -> dict:
    """``repeats`` real ``add-task`` runs of ``spec`` (``texts`` training and test texts, 1 epoch, 64 tokens) into
    this bank, each removed again: the profile of each, and the bank's overhead = its time minus the phases that
    depend only on the task's own data (tokenise, frozen pass, probe, training, evaluation); the figures kept are
    those of the run with the median overhead."""
    from adaptbank import TrainConfig

    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = bank.add_task(spec, train=TrainConfig(max_train=texts, max_test=texts, epochs=1, max_length=64),
                               name="zz-real-add")
        total = time.perf_counter() - t0
        assert bank.store.router_expert_order()[-1] == "zz-real-add"
        bank.remove("zz-real-add")
        phases = dict(result.phase_seconds or {})
        own = sum(phases.get(k, 0.0) for k in _OWN_WORK)
        print(f"add-task {spec} ({texts} texts) into the bank: {total:.2f}s, of which the bank's overhead "
              f"{total - own:.2f}s (commit {phases.get('commit', 0):.2f}s); phases {phases}", flush=True)
        runs.append({"seconds": total, "phases": phases, "overhead": total - own})
    mid = sorted(runs, key=lambda r: r["overhead"])[len(runs) // 2]
    return {"add_task_spec": spec, "add_task_texts": texts, "add_task_seconds": mid["seconds"],
            "add_task_phases": mid["phases"], "add_task_bank_overhead_seconds": mid["overhead"],
            "add_task_overheads": [r["overhead"] for r in runs]}


def _router_commits(bank, template: dict, memory: dict, config: dict, k: int) -> dict:
    """The bank's part of an add-task at this bank size: fit the router over the bank once (``router fit``),
    then ``k`` commits of a new task with its router update, exactly as add-task commits (task files, the
    router's statistics with the task added, the LDA refitted, one manifest commit); then undo them."""
    from adaptbank.bank import router_memory

    if k <= 0:
        return {}
    t0 = time.perf_counter()
    bank.fit_router()
    fit_s = time.perf_counter() - t0
    stats = router_memory.memory_stats(memory)
    times = []
    for i in range(k):
        name = f"zz-added{i:02d}"
        files = {part: dict(t) for part, t in template.items()} | {"memory": memory}
        t1 = time.perf_counter()
        bank.store.write_task(name, files, config | {"name": name}, router=bank._router_update(add=(name, stats)))
        times.append(time.perf_counter() - t1)
    order = bank.store.router_expert_order()
    assert order is not None and order[-k:] == [f"zz-added{i:02d}" for i in range(k)], order  # the router grew
    router_bytes = sum(r["size"] for r in bank.store.section("router")["files"].values())
    for i in range(k):
        bank.remove(f"zz-added{i:02d}")
    return {"router_fit_seconds": fit_s, "commit_with_router_ms": 1000 * statistics.median(times),
            "router_bytes": router_bytes}


def main() -> None:
    args = parse()
    if args.probe:
        _probe(args.probe, args.bank, args.probe_task)
        return
    setup_torch(args.threads)
    sys.addaudithook(_audit)
    from adaptbank.bank.facade import AdapterBank

    work = Path(tempfile.mkdtemp(prefix="adaptbank-bank-scale-"))
    bank_dir = Path(args.bank) if args.bank else work / "bank"
    out: dict = {"env": environment(args.threads)}
    try:
        info, names = build(args, bank_dir, work)
        out["build"] = info
        cli = shutil.which("adaptbank")
        list_cmd = [cli] if cli else [sys.executable, "-c", "import sys; from adaptbank.cli.main import main; main()"]
        list_cmd = [*list_cmd, "list", str(bank_dir), "--json"]
        startup_cmd = [sys.executable, "-c", "import adaptbank.cli.main"]
        imports_cmd = [sys.executable, "-c", "import adaptbank.cli.main, adaptbank.bank"]  # what `list` imports
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}

        def run(cmd: list[str]) -> str:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                raise RuntimeError(f"{cmd} failed: {proc.stderr[-800:]}")
            return proc.stdout

        listed = json.loads(run(list_cmd))
        assert len(listed["tasks"]) == len(names), (len(listed["tasks"]), len(names))
        times = {"list_cli": [], "startup_import_cli": [], "startup_import_bank": [], "open_tasks": []}
        for _ in range(args.repeats):
            for key, cmd in (("list_cli", list_cmd), ("startup_import_cli", startup_cmd),
                             ("startup_import_bank", imports_cmd)):
                t0 = time.perf_counter()
                run(cmd)
                times[key].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            n = len(AdapterBank.open(bank_dir).tasks())
            times["open_tasks"].append(time.perf_counter() - t0)
            assert n == len(names)
        med = {k: statistics.median(v) for k, v in times.items()}

        # in-process reads: open + tasks(), cold load of one task, warm load of another
        _, open_files, _ = _watched(lambda: AdapterBank.open(bank_dir).tasks(), bank_dir)
        opened = AdapterBank.open(bank_dir)
        target, other = names[len(names) // 2], names[-1]
        import safetensors.torch as store_mod  # the store imports load_file from here at each read

        real_load_file = store_mod.load_file
        loaded: list[str] = []

        def counting_load_file(path, *a, **kw):
            loaded.append(os.path.relpath(os.path.realpath(path), str(bank_dir.resolve())))
            return real_load_file(path, *a, **kw)

        store_mod.load_file = counting_load_file
        try:
            _, cold_py, cold_s = _watched(lambda: opened.load([target]), bank_dir)
            cold_st = list(loaded)
            loaded.clear()
            _, warm_py, warm_s = _watched(lambda: opened.load([other]), bank_dir)
            warm_st = list(loaded)
        finally:
            store_mod.load_file = real_load_file
        in_process = {"open_tasks": {"python_opens": open_files},
                      "load_cold": {"task": target, "seconds": cold_s, "python_opens": cold_py, "safetensors_loads": cold_st},
                      "load_warm": {"task": other, "seconds": warm_s, "python_opens": warm_py, "safetensors_loads": warm_st}}

        traced: dict = {}
        if not args.no_strace and shutil.which("strace"):
            me = [sys.executable, str(Path(__file__).resolve()), "--bank", str(bank_dir)]
            traced["open_tasks"] = _strace([*me, "--probe", "tasks"], bank_dir)
            traced["load_one"] = _strace([*me, "--probe", "load", "--probe-task", target], bank_dir)
            traced["list_cli"] = _strace(list_cmd, bank_dir)
        else:
            traced["skipped"] = "strace not available or --no-strace"

        out.update({"median_seconds": med, "all_seconds": times, "in_process_reads": in_process, "strace": traced,
                    "list_minus_startup_seconds": med["list_cli"] - med["startup_import_cli"],
                    "list_minus_imports_seconds": med["list_cli"] - med["startup_import_bank"]})
    finally:
        if args.bank is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            print(f"kept {work}")

    def files(x: dict | None) -> str:
        if not x or "bank_files" not in x:
            return (x or {}).get("error", "-")
        counts: dict[str, int] = {}
        for f in x["bank_files"]:
            key = re.sub(r"@[0-9a-f]+", "@<id>", f)
            counts[key] = counts.get(key, 0) + 1
        shown = [f"{k}{f' x{n}' if n > 1 else ''}" for k, n in sorted(counts.items())]
        return (f"{x['bank_file_count']} opens of {len(counts)} files: {', '.join(shown[:5])}"
                f"{' ...' if len(shown) > 5 else ''}")

    st = out["strace"]
    ip = out["in_process_reads"]
    print()
    print(table(["operation", "seconds (median)", "bank files read (strace)"], [
        [f"adaptbank list --json ({args.tasks} tasks, subprocess)", med["list_cli"], files(st.get("list_cli"))],
        ["python -c 'import adaptbank.cli.main' (startup only)", med["startup_import_cli"], "-"],
        ["python -c 'import adaptbank.cli.main, adaptbank.bank' (list's imports)", med["startup_import_bank"], "-"],
        ["AdapterBank.open(path).tasks() (in-process)", med["open_tasks"], files(st.get("open_tasks"))],
        [f"load([{ip['load_cold']['task']}]) on a fresh open (in-process, incl. backbone load)", ip["load_cold"]["seconds"],
         files(st.get("load_one"))],
        [f"load([{ip['load_warm']['task']}]) warm (same opened bank)", ip["load_warm"]["seconds"], "-"],
    ]))
    print(f"\nlist minus interpreter+import startup: {out['list_minus_startup_seconds']:.3f}s; minus the imports "
          f"list needs (torch, transformers via adaptbank.bank): {out['list_minus_imports_seconds']:.3f}s")

    def strip(fs: list[str]) -> list[str]:
        return sorted(set(re.sub(r"@[0-9a-f]+", "@<id>", f) for f in fs))

    print(f"in-process, open+tasks(): python opens {strip(ip['open_tasks']['python_opens'])}")
    for key in ("load_cold", "load_warm"):
        r = ip[key]
        print(f"in-process, load([{r['task']}]) {key.split('_')[1]}: python opens {strip(r['python_opens'])}, "
              f"safetensors loads {strip(r['safetensors_loads'])}")
    only = all(r["task"] in f or f == "manifest.json" for key in ("load_cold", "load_warm")
               for r in [ip[key]] for f in r["python_opens"] + r["safetensors_loads"])
    print(f"loading one task touched only that task's files (+ manifest): {'yes' if only else 'NO'}")
    out["load_reads_only_its_task"] = only
    print(NOISE_NOTE)
    write_json(args.json, out)


if __name__ == "__main__":
    main()
