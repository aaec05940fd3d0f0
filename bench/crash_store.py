"""Crash-safety trials for ``adaptbank.bank.store``: SIGKILL a writer at a random moment, then audit.

Each trial forks a child that runs an endless cycle of bank operations (write a task that creates
or joins a shared group, replace a "hot" task, rewrite the router, remove an older task), logging
``b <op>`` before and ``d <op>`` after each one.  The parent kills it with SIGKILL after a random
delay and audits the bank:

* ``verify(full=True)`` reports no errors (leftover temporaries / orphan dirs are warnings);
* every stored task, shared group and router holds exactly the tensors its tag says (bit-exact),
  so nothing is torn;
* every finished operation is visible, tasks of earlier trials are unchanged, and the operation
  in flight at the kill is either fully visible ("complete") or not at all ("absent"); a kill
  between two operations counts as "complete";
* ``repair()`` then leaves a bank whose ``verify()`` is empty.

Usage::

    python bench/crash_store.py [--trials 30] [--seed 0] [--max-delay 0.3] [--bank DIR]

prints ``N trials: M complete, K absent, 0 corrupt`` and exits non-zero on any corruption.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adaptbank.bank.store import BankError, BankStore  # noqa: E402

BASE = {"name": "crash-test-base", "fingerprint": "0" * 16}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CrashAuditError(AssertionError):
    """The audit found a torn, lost or altered object."""


def tensors_for(tag: str, stems: tuple[str, ...] = ("adapter", "head")) -> dict[str, dict[str, torch.Tensor]]:
    """Deterministic tensors for ``tag`` (small: below torch's parallel grain, so fork-safe)."""
    g = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    return {
        stem: {f"{stem}.w{i}": torch.randn(32, 64, generator=g).to(_DTYPES[i]) for i in range(3)}
        | {f"{stem}.idx": torch.randint(0, 1000, (64,), generator=g)}
        for stem in stems
    }


def _ops(trial: int, i: int) -> tuple[str, str, int]:
    """Operation ``i`` of a trial's endless cycle: (kind, task name, version)."""
    k, phase = divmod(i, 4)
    return (("write", "replace", "router", "remove")[phase], f"t{trial}-{k}", k)


def _apply(store: BankStore, trial: int, i: int) -> None:
    kind, name, k = _ops(trial, i)
    if kind == "write":
        tag = f"{name}:v0"
        if k % 2 == 0:  # even tasks create a shared group, odd ones join the previous one
            group = f"g{trial}-{k}"
            store.write_task(name, tensors_for(tag), {"tag": tag}, shared=group, shared_files=tensors_for(group, ("A",)))
        else:
            store.write_task(name, tensors_for(tag), {"tag": tag}, shared=f"g{trial}-{k - 1}")
    elif kind == "replace":
        tag = f"hot{trial}:v{k}"
        store.write_task(f"hot{trial}", tensors_for(tag), {"tag": tag}, replace=True)
    elif kind == "router":
        tag = f"router{trial}:v{k}"
        store.write_router(tensors_for(tag, ("router",)), {"tag": tag}, [name])
    elif k >= 2 and k % 2 == 0:  # remove an even (group-creating) task; its group keeps the odd one
        store.remove_task(f"t{trial}-{k - 2}")


def _child(bank: Path, trial: int, progress: Path) -> None:
    """Run operations forever, logging each; the parent SIGKILLs us."""
    status = 1
    try:
        fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        store = BankStore.open(bank)
        for i in range(100_000):
            os.write(fd, f"b {i}\n".encode())
            _apply(store, trial, i)
            os.write(fd, f"d {i}\n".encode())
        status = 0
    except BaseException as exc:  # noqa: BLE001 - report, then leave without running parent code
        os.write(2, f"crash child failed: {exc!r}\n".encode())
    finally:
        os._exit(status)


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    if got.keys() != want.keys() or any(got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k]) for k in want):
        raise CrashAuditError(f"{what}: stored tensors differ from what was written")


def audit(bank: Path) -> dict[str, str]:
    """Check the whole bank; return {task: tag}. Raise CrashAuditError on any corruption."""
    store = BankStore.open(bank)
    errors = [p for p in store.verify(full=True) if p.is_error]
    if errors:
        raise CrashAuditError(f"verify() errors: {errors}")
    tags = {}
    for name in store.tasks():
        tag = store.read_config(name, check="full")["tag"]
        for stem, want in tensors_for(tag).items():
            _same(store.read_tensors(name, stem, check="full"), want, f"task {name} ({tag}) {stem}")
        tags[name] = tag
    for group in store.manifest["shared"]:
        _same(store.read_shared(group, "A", check="full"), tensors_for(group, ("A",))["A"], f"group {group}")
    router = store.read_router(check="full")
    if router is not None:
        files, meta = router
        _same(files["router"], tensors_for(meta["tag"], ("router",))["router"], f"router {meta['tag']}")
    return tags


def _visible(tags: dict[str, str], router_tag: str | None, trial: int, i: int) -> bool:
    """Whether the effect of operation ``i`` shows in the audited state."""
    kind, name, k = _ops(trial, i)
    if kind == "write":
        return name in tags
    if kind == "replace":
        return tags.get(f"hot{trial}") == f"hot{trial}:v{k}"
    if kind == "router":
        return router_tag == f"router{trial}:v{k}"
    return not (k >= 2 and k % 2 == 0) or f"t{trial}-{k - 2}" not in tags


def run_trial(bank: Path, trial: int, delay: float, before: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Fork a writer, SIGKILL it after ``delay`` s, audit; return (outcome, tags after repair)."""
    progress = bank.parent / f"progress-{trial}.log"
    pid = os.fork()
    if pid == 0:
        _child(bank, trial, progress)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        raise CrashAuditError(f"trial {trial}: writer exited on its own (status {status}); see stderr")
    words = progress.read_text().split() if progress.exists() else []
    log = list(zip(words[::2], map(int, words[1::2]), strict=False))
    begun = [i for t, i in log if t == "b"]
    done = {i for t, i in log if t == "d"}
    tags = audit(bank)
    store = BankStore.open(bank)
    router = store.read_router()
    router_tag = None if router is None else router[1]["tag"]
    for name, tag in before.items():  # earlier trials: untouched
        if tags.get(name) != tag:
            raise CrashAuditError(f"trial {trial}: task {name} of an earlier trial changed: {tags.get(name)!r} != {tag!r}")
    for i in done:  # finished operations stay visible unless a later (begun) one may have undone them
        kind, name, k = _ops(trial, i)
        undone = kind == "write" and k % 2 == 0 and 4 * (k + 2) + 3 in begun
        superseded = kind in ("replace", "router") and 4 * (k + 1) + ("replace", "router").index(kind) + 1 in begun
        if not (undone or superseded or _visible(tags, router_tag, trial, i)):
            raise CrashAuditError(f"trial {trial}: finished operation {i} {_ops(trial, i)} is not visible")
    in_flight = begun[-1] if begun and begun[-1] not in done else None
    outcome = "complete" if in_flight is None or _visible(tags, router_tag, trial, in_flight) else "absent"
    store.repair()
    leftover = store.verify(full=True)
    if leftover and not all(p.kind == "stale" for p in leftover):
        raise CrashAuditError(f"trial {trial}: verify() after repair(): {leftover}")
    return outcome, audit(bank)


def run(trials: int, bank: Path, seed: int = 0, max_delay: float = 0.3) -> dict[str, int]:
    """Run ``trials`` crash trials on a new bank at ``bank``; return outcome counts."""
    rng = random.Random(seed)
    BankStore.create(bank, base=BASE)
    counts = {"complete": 0, "absent": 0, "corrupt": 0}
    tags: dict[str, str] = {}
    for trial in range(trials):
        try:
            outcome, tags = run_trial(bank, trial, rng.uniform(0.01, max_delay), tags)
        except (CrashAuditError, BankError) as exc:
            print(f"trial {trial}: CORRUPT: {exc}", file=sys.stderr)
            counts["corrupt"] += 1
            tags = {}
            continue
        counts[outcome] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=0.3, help="longest random delay before SIGKILL, seconds")
    ap.add_argument("--bank", type=Path, default=None, help="directory for the bank (default: a temp dir)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crash-store-") as tmp:
        bank = args.bank if args.bank is not None else Path(tmp) / "bank"
        c = run(args.trials, bank, args.seed, args.max_delay)
    print(f"{args.trials} trials: {c['complete']} complete, {c['absent']} absent, {c['corrupt']} corrupt")
    return 1 if c["corrupt"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
