"""Readers under load: reader processes serve routed predictions while writer processes add, replace and
remove tasks of the same bank.

Each reader holds a :class:`adaptbank.bank.live.LiveBank` and loops: per request it checks the committed
manifest's ``generation`` (one small file read, no lock), reloads the routed model when a writer committed
since (``AdapterBank.load_routed``: router and experts of one committed version), then predicts a few texts
with ``adaptbank.routing.predict.predict``.  A request that finds a new version pays for the reload, so p99
is reload-bound.  Each writer owns its task names and runs ``rounds`` rounds of: add ``w<i>-<r>``, replace it
by another task's expert (``add_task(..., replace=True)``), remove ``w<i>-<r-1>``.  Every change either lands
or is refused (``BankLockedError`` after a short ``--lock-timeout``; the driver holds the writers' lock for
``--hold-lock`` seconds now and then, as a slow writer would, so some are), and a refused one must leave the
bank as it was (the writer checks its task's manifest entry and directories right after).  Readers never take
that lock, so a held lock must not stall them.

Checked afterwards (each failure counts in ``errors``, which must be 0):

* no reader request raised, and every answer names a task of its model, with a label of that task;
* half-states: each loaded model's tasks, the manifest version it came from and the router's expert order
  are the same list (a listed task whose files are missing fails the load: a request error); and an
  auditor process, re-reading the manifest every millisecond or so, finds every file of the version that
  is current listed with its size (readers load too rarely to sample the instants right after a commit);
* linearizable per task: a request running from t0 to t1 sees each task ``X`` in a state current at some
  moment in between: that of the last change of ``X`` that landed before t0, or of a later landed change
  started by t1; never a refused change, never a version superseded before t0 (so every landed change is
  visible to every request that starts after it landed);
* the bank verifies (``AdapterBank.verify``: no errors, no leftovers) and holds what the landed changes say.

Usage::

    python bench/readers_under_load.py [--readers 4] [--writers 2] [--rounds 3] [--base DIR] [--bank DIR]

prints requests served, changes landed and refused, errors, and request latency while the writers ran, and
writes ``bench/results/readers_under_load.json``.  Latencies come from a shared machine under the load of
the writers' training (and of any other job): read them as "readers keep answering", not as serving speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TASKS = ("weather", "intent", "topic", "reviews")
SEEDS = ("weather", "intent")
"""Tasks in the bank before the readers start (named ``s-<task>``; writers never touch them)."""
LOAD_NOTE = ("latencies measured under load: the writers' training shares the CPUs with the readers, and the "
             "machine may run other jobs; re-time on a quiet machine before quoting them")


def _log(fh: Any, **rec: Any) -> None:
    fh.write(json.dumps(rec) + "\n")
    fh.flush()


def _train(args: argparse.Namespace) -> Any:
    from adaptbank.core.config import TrainConfig

    return TrainConfig(epochs=args.epochs, max_train=args.max_train, max_test=args.max_test,
                       max_length=args.max_length, batch_size=16)


# ------------------------------------------------------------------------------------------------ reader
def reader(args: argparse.Namespace) -> None:
    """Serve requests until the stop file appears; one JSON line per request and per loaded version."""
    import torch

    from adaptbank.bank.live import LiveBank
    from adaptbank.data.builtin import generate
    from adaptbank.routing.predict import predict

    torch.set_num_threads(1)
    texts = [t for task in TASKS for t, _ in generate(task, "test", n=8)]
    live = LiveBank(args.bank)
    stop = Path(args.stop)
    with open(args.log, "w") as fh:
        i = 0
        while not stop.exists():
            batch = [texts[(i * args.batch + k) % len(texts)] for k in range(args.batch)]
            t0 = time.monotonic()
            rec: dict[str, Any] = {"kind": "request", "t0": t0}
            try:
                before = live.reloads
                model = live.current()
                if live.reloads != before:
                    _log(fh, kind="version", t=time.monotonic(), **_version_facts(live, model))
                preds = predict(model, batch, max_length=args.max_length)
                bad = [p.task for p in preds if p.task not in model.tasks or p.label not in model.tasks[p.task].labels]
                rec |= {"gen": live.generation, "n": len(preds),
                        "error": f"answer names task/label outside the model: {bad}" if bad or len(preds) != len(batch)
                        else None}
            except Exception as exc:  # noqa: BLE001 - every failure of a request is the finding
                rec |= {"gen": live.generation, "error": f"{type(exc).__name__}: {exc}",
                        "trace": traceback.format_exc()[-1500:]}
            rec["t1"] = time.monotonic()
            _log(fh, **rec)
            i += 1
            time.sleep(args.think)


def auditor(args: argparse.Namespace) -> None:
    """Until the stop file appears, check the committed invariant as fast as the disk allows: every file the
    current ``manifest.json`` lists exists with its recorded size.  A file of a version that is no longer
    current may be gone (its writer deletes superseded dirs); one missing from the current version is a
    half-state (a task listed before its files exist, say).  Much cheaper than a model load, so it samples
    the instants right after each commit densely."""
    from adaptbank.bank.snapshot import disk_generation
    from adaptbank.bank.store import BankStore

    bank, stop = Path(args.bank), Path(args.stop)
    checks, problems = 0, []
    while not stop.exists():
        m = BankStore.open(bank).manifest
        groups = list(m["tasks"]) + list(m["shared"].values()) + ([m["router"]] if m["router"] else [])
        bad = []
        for e in groups:
            for rel, rec in e["files"].items():
                try:
                    ok = (bank / e["dir"] / rel).stat().st_size == rec["size"]
                except FileNotFoundError:
                    ok = False
                if not ok:
                    bad.append(f"{e['dir']}/{rel}")
        if bad and disk_generation(bank) == m["generation"]:  # still the current version: a real half-state
            problems.append(f"generation {m['generation']} lists {bad[:3]} but they are missing or of another size")
        checks += 1
        time.sleep(0.001)
    with open(args.log, "w") as fh:
        _log(fh, kind="audit", checks=checks, problems=problems[:20])


def _version_facts(live: Any, model: Any) -> dict[str, Any]:
    """The manifest version a reader's model came from, and any disagreement between the two (a half-state)."""
    m = live.bank.store.manifest
    names = [t["name"] for t in m["tasks"]]
    order = m["router"]["expert_order"] if m["router"] else None
    router = list(model.router.names) if model.router is not None else None
    problems = []  # (files missing from a listed task fail the load itself: the request's error)
    if list(model.tasks) != names or router != names or order != names:
        problems.append(f"model tasks {list(model.tasks)}, router {router}, manifest {names} / order {order}")
    return {"gen": m["generation"], "tasks": {t["name"]: t["dir"] for t in m["tasks"]}, "problems": problems}


# ------------------------------------------------------------------------------------------------ writer
def writer(args: argparse.Namespace) -> None:
    """``rounds`` rounds of add / replace / remove on this writer's own task names; one JSON line per change."""
    import torch

    from adaptbank.bank.facade import AdapterBank
    from adaptbank.bank.store import BankLockedError
    from adaptbank.core.config import LoRAConfig

    torch.set_num_threads(1)
    bank = AdapterBank.open(args.bank, lock_timeout=args.lock_timeout)
    train, method = _train(args), LoRAConfig(rank=4)
    w = args.id
    bank.new_model()  # start-up (imports, the backbone) before the go, so that all of it overlaps the readers'
    Path(args.log).with_suffix(".ready").touch()
    while not Path(args.go).exists():
        time.sleep(0.05)
    with open(args.log, "w") as fh:
        for r in range(args.rounds):
            plan = [("add", f"w{w}-{r}", TASKS[(w + r) % len(TASKS)]),
                    ("replace", f"w{w}-{r}", TASKS[(w + r + 1) % len(TASKS)])]
            if r >= 1:
                plan.append(("remove", f"w{w}-{r - 1}", None))
            for op, name, task in plan:
                bank.store.reload()
                before = _entry(bank, name)
                rec: dict[str, Any] = {"op": op, "name": name, "task": task, "t_start": time.monotonic()}
                try:
                    if op == "remove":
                        bank.remove(name)
                    else:
                        bank.add_task(task, method, train, name=name, replace=op == "replace")
                    bank.store.reload()
                    rec |= {"status": "landed", "dir": (_entry(bank, name) or {}).get("dir")}
                except BankLockedError as exc:
                    bank.store.reload()
                    after = _entry(bank, name)
                    dirs = sorted(p.name for p in (bank.path / "tasks").glob(f"{name}@*"))
                    want = [Path(before["dir"]).name] if before else []
                    unchanged = after == before and dirs == want
                    rec |= {"status": "refused", "dir": (before or {}).get("dir"), "message": str(exc)[:300],
                            "error": None if unchanged else f"refused change altered the bank: {before} -> {after}, "
                                                            f"dirs {dirs}"}
                except Exception as exc:  # noqa: BLE001
                    rec |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                            "trace": traceback.format_exc()[-1500:]}
                rec["t_end"] = time.monotonic()
                rec["gen_after"] = bank.store.generation
                _log(fh, **rec)


def _entry(bank: Any, name: str) -> dict[str, Any] | None:
    return next((t for t in bank.store.manifest["tasks"] if t["name"] == name), None)


# ------------------------------------------------------------------------------------------------ driver
def _child(role: str, args: argparse.Namespace, i: int, log: Path, stop: Path, go: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(HERE), "--role", role, "--id", str(i), "--bank", str(args.bank), "--log", str(log),
           "--stop", str(stop), "--go", str(go), "--think", str(args.think), "--rounds", str(args.rounds), "--epochs", str(args.epochs),
           "--max-train", str(args.max_train), "--max-test", str(args.max_test),
           "--max-length", str(args.max_length), "--batch", str(args.batch), "--lock-timeout", str(args.lock_timeout)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log.with_suffix(".err"), "w"))


def _read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Seed the bank, run readers and writers, check everything; the summary (``errors`` must be 0)."""
    from adaptbank._atomic import exclusive_lock
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.core.config import LoRAConfig

    work = Path(args.work or tempfile.mkdtemp(prefix="readers-under-load-"))
    work.mkdir(parents=True, exist_ok=True)
    args.bank = str(Path(args.bank or work / "bank").absolute())
    # a --base folder is allowed (bank.trust) in this run's own config dir, which the children inherit
    os.environ.setdefault("ADAPTBANK_CONFIG_DIR", str(work / "config"))
    bank = AdapterBank.init(args.bank, **({"base": args.base} if args.base else {}))
    for task in SEEDS:
        bank.add_task(task, LoRAConfig(rank=4), _train(args), name=f"s-{task}")
    stop, go = work / "stop", work / "go"
    stop.unlink(missing_ok=True)
    go.unlink(missing_ok=True)
    readers = [_child("reader", args, i, work / f"reader{i}.jsonl", stop, go) for i in range(args.readers)]
    writers = [_child("writer", args, i, work / f"writer{i}.jsonl", stop, go) for i in range(args.writers)]
    auditors = [_child("auditor", args, i, work / f"auditor{i}.jsonl", stop, go) for i in range(args.auditors)]
    deadline = time.monotonic() + args.start_timeout
    while not (all(any(r["kind"] == "request" for r in _read_log(work / f"reader{i}.jsonl"))
                   for i in range(args.readers)) and all((work / f"writer{i}.ready").exists()
                                                         for i in range(args.writers))):
        if time.monotonic() > deadline or any(p.poll() is not None for p in readers + writers):
            stop.touch()
            go.touch()
            raise RuntimeError(f"readers or writers did not start; see {work}/*.err")
        time.sleep(0.2)  # every reader served once, every writer loaded its backbone: go
    go.touch()
    t_start = time.monotonic()
    holds: list[tuple[float, float]] = []
    while any(p.poll() is None for p in writers):  # now and then hold the writers' lock, as a slow writer would
        time.sleep(0.2)
        if args.hold_lock > 0 and time.monotonic() - t_start > (len(holds) + 1) * args.hold_every:
            with exclusive_lock(Path(args.bank) / ".lock"):
                t_hold = time.monotonic()
                time.sleep(args.hold_lock)
                holds.append((t_hold, time.monotonic()))
    t_end = time.monotonic()
    final_gen = AdapterBank.open(args.bank).store.generation
    deadline = time.monotonic() + args.start_timeout  # readers must catch up with the final version
    while not all(any(r.get("gen", -1) >= final_gen and r["kind"] == "request" and r["t0"] > t_end
                      for r in _read_log(work / f"reader{i}.jsonl")) for i in range(args.readers)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in readers):
            break
        time.sleep(0.2)
    stop.touch()
    for p in readers + auditors:
        p.wait(timeout=120)
    reader_logs = [_read_log(work / f"reader{i}.jsonl") for i in range(args.readers)]
    changes = [c for i in range(args.writers) for c in _read_log(work / f"writer{i}.jsonl")]
    audits = [r for i in range(args.auditors) for r in _read_log(work / f"auditor{i}.jsonl")]
    out = summarize(args, reader_logs, changes, t_start, t_end, final_gen, work,
                    [p.returncode for p in readers + writers + auditors])
    from adaptbank.bank.snapshot import disk_generation

    check_s = []
    for _ in range(200):  # the per-request cost of noticing a new version, on the final bank
        t0 = time.perf_counter()
        disk_generation(args.bank)
        check_s.append(time.perf_counter() - t0)
    found = [f"auditor: {p}" for a in audits for p in a["problems"]]
    held = sorted(r["t1"] - r["t0"] for log in reader_logs for r in log if r["kind"] == "request"
                  and any(a <= r["t0"] and r["t1"] <= b for a, b in holds))  # requests served while the lock was held
    return out | {"lock_holds": len(holds), "requests_while_lock_held": len(held),
                  "latency_ms_while_lock_held_p50": round(statistics.median(held) * 1000, 1) if held else None,
                  "audit_checks": sum(a["checks"] for a in audits),
                  "generation_check_ms_p50": round(statistics.median(check_s) * 1000, 3),
                  "errors": out["errors"] + len(found), "error_samples": (out["error_samples"] + found)[:20]}


def allowed_states(changes: list[dict[str, Any]], name: str, lo: float, hi: float,
                   initial: str | None) -> set[str | None]:
    """States (task dir, None: absent) task ``name`` may show to a request running from ``lo`` to ``hi``:
    the states current at some moment in between, i.e. after the last change that landed (returned) before
    ``lo``, or after a later landed change that had started by ``hi``.  (The request's generation check runs
    inside that span and its model's version was current at that check.)"""
    landed = sorted((c for c in changes if c["name"] == name and c["status"] == "landed"), key=lambda c: c["t_start"])
    done = [c for c in landed if c["t_end"] < lo]
    states = {done[-1]["dir"] if done else initial}
    return states | {c["dir"] for c in landed[len(done):] if c["t_start"] < hi}


def summarize(args: argparse.Namespace, reader_logs: list[list[dict[str, Any]]], changes: list[dict[str, Any]],
              t_start: float, t_end: float, final_gen: int, work: Path, codes: list[int | None]) -> dict[str, Any]:
    from adaptbank.bank.facade import AdapterBank

    errors: list[str] = [f"process exited {c}" for c in codes if c != 0]
    errors += [f"writer: {c['op']} {c['name']}: {c['error']}" for c in changes if c.get("error")]
    bank = AdapterBank.open(args.bank)
    seeds = {t["name"]: t["dir"] for t in bank.store.manifest["tasks"] if t["name"].startswith("s-")}
    names = {c["name"] for c in changes} | set(seeds)
    requests, latencies, stale = 0, [], 0
    for i, log in enumerate(reader_logs):
        version: dict[str, Any] | None = None
        for rec in log:
            if rec["kind"] == "version":
                version = rec
                errors += [f"reader {i}: half-state: {p}" for p in rec["problems"]]
                continue
            requests += 1
            if t_start <= rec["t0"] <= t_end:
                latencies.append(rec["t1"] - rec["t0"])
            if rec.get("error"):
                errors.append(f"reader {i}: request at {rec['t0'] - t_start:.2f}s: {rec['error']}")
                continue
            assert version is not None and version["gen"] == rec["gen"], "a request ran on a version never logged"
            for name in names:
                seen = version["tasks"].get(name)
                ok = allowed_states(changes, name, rec["t0"], rec["t1"], seeds.get(name))
                if seen not in ok:
                    stale += 1
                    errors.append(f"reader {i}: request at {rec['t0'] - t_start:.2f}s (generation {rec['gen']}) "
                                  f"sees {name!r} as {seen}, allowed {sorted(map(str, ok))}")
    unseen = [f"{c['op']} {c['name']}" for c in changes if c["status"] == "landed"
              and not all(any(r["kind"] == "request" and r["t0"] > c["t_end"] and not r.get("error") for r in log)
                          for log in reader_logs)]  # the checks above hold only for requests that ran after it
    errors += [f"landed change {u} was followed by no request of some reader" for u in unseen]
    problems = bank.verify(full=True)
    errors += [f"verify: {p.kind}: {p.path}: {p.message}" for p in problems]
    expect = dict(seeds)
    for c in sorted((c for c in changes if c["status"] == "landed"), key=lambda c: c["t_end"]):
        expect[c["name"]] = c["dir"]
    expect = {k: v for k, v in expect.items() if v is not None}
    final = {t["name"]: t["dir"] for t in bank.store.manifest["tasks"]}
    if final != expect:
        errors.append(f"final bank {final} differs from the landed changes {expect}")
    lat = sorted(latencies)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else None

    versions = sum(1 for log in reader_logs for r in log if r["kind"] == "version")
    return {
        "readers": args.readers, "writers": args.writers, "rounds": args.rounds, "base": args.base or "bundled MiniLM",
        "hold_lock_s": args.hold_lock, "think_s": args.think, "train": {"epochs": args.epochs, "max_train": args.max_train, "max_test": args.max_test,
                  "max_length": args.max_length}, "batch": args.batch, "lock_timeout_s": args.lock_timeout,
        "requests_served": requests, "requests_while_writing": len(lat), "versions_loaded": versions,
        "changes_landed": sum(c["status"] == "landed" for c in changes),
        "changes_refused": sum(c["status"] == "refused" for c in changes),
        "final_generation": final_gen, "errors": len(errors), "stale_or_unknown_states": stale,
        "landed_changes_unseen": len(unseen),
        "error_samples": errors[:20], "latency_ms_while_writing": {"p50": pct(0.5), "p99": pct(0.99),
                                                                   "mean": round(statistics.mean(lat) * 1000, 1) if lat else None},
        "writers_seconds": round(t_end - t_start, 1), "note": LOAD_NOTE, "work": str(work),
        "loadavg_at_end": os.getloadavg(),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--auditors", type=int, default=1, help="processes checking, between the readers' loads, "
                    "that every file of the current manifest exists")
    ap.add_argument("--base", default=None, help="a tiny model folder (default: the bundled MiniLM)")
    ap.add_argument("--bank", default=None, help="bank folder to create (default: a temporary one)")
    ap.add_argument("--work", default=None, help="folder for logs (default: a temporary one)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-train", type=int, default=48)
    ap.add_argument("--max-test", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4, help="texts per reader request")
    ap.add_argument("--think", type=float, default=0.0, help="seconds a reader pauses between requests")
    ap.add_argument("--lock-timeout", type=float, default=0.5, help="writers' lock timeout (s): short, so some "
                    "changes are refused")
    ap.add_argument("--hold-lock", type=float, default=1.5, help="seconds the driver holds the writers' lock "
                    "each time (0: never)")
    ap.add_argument("--hold-every", type=float, default=8.0, help="seconds between the driver's lock holds")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--out", default=str(HERE.parent / "results" / "readers_under_load.json"))
    ap.add_argument("--role", choices=["reader", "writer", "auditor"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--id", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--log", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stop", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--go", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.role == "reader":
        reader(args)
        return 0
    if args.role == "writer":
        writer(args)
        return 0
    if args.role == "auditor":
        auditor(args)
        return 0
    out = run(args)
    lat = out["latency_ms_while_writing"]
    print(f"{out['readers']} readers, {out['writers']} writers x {out['rounds']} rounds "
          f"({out['writers_seconds']} s of writing, final generation {out['final_generation']})")
    print(f"requests served: {out['requests_served']} ({out['requests_while_writing']} while writers ran), "
          f"versions loaded by readers: {out['versions_loaded']}")
    print(f"changes landed: {out['changes_landed']}, refused whole: {out['changes_refused']} "
          f"(driver held the lock {out['lock_holds']} times); auditor checks of the current manifest: {out['audit_checks']}")
    print(f"errors: {out['errors']}")
    for e in out["error_samples"]:
        print(f"  {e}")
    print(f"request latency while writers ran: p50 {lat['p50']} ms, p99 {lat['p99']} ms; "
          f"{out['requests_while_lock_held']} requests served inside the lock holds "
          f"(p50 {out['latency_ms_while_lock_held_p50']} ms: readers never wait for the lock)")
    print(f"noticing a new version (disk_generation, per request): p50 {out['generation_check_ms_p50']} ms")
    print(f"note: {LOAD_NOTE}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if out["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
