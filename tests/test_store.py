"""Tests for adaptbank.bank.store: round trips, atomic commits, locking, integrity checks, crash safety."""

from __future__ import annotations

import copy
import errno
import importlib.util
import json
import multiprocessing as mp
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from adaptbank import _atomic
from adaptbank.bank.store import (
    SCHEMA_VERSION,
    BankCorruptError,
    BankError,
    BankLockedError,
    BankStore,
    TaskExistsError,
    TaskNotFoundError,
)

BASE = {"name": "tiny-bert", "fingerprint": "fp-123", "revision": "abc"}
REPO = Path(__file__).resolve().parent.parent


def files_for(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors of several dtypes, including views that share storage and a non-contiguous one."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 16, generator=g)
    return {
        "adapter": {
            "l0.lora_A": torch.randn(4, 16, generator=g).to(torch.bfloat16),
            "l0.lora_B": torch.randn(16, 4, generator=g).to(torch.float16),
            "l1.w": w,
            "l1.w_t": w.t(),  # non-contiguous view of the same storage
            "l1.w_half": w[:4],  # another view sharing storage
        },
        "head": {"weight": torch.randn(3, 8, generator=g, dtype=torch.float64), "idx": torch.arange(5)},
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def mbytes(store: BankStore) -> bytes:
    return (store.path / "manifest.json").read_bytes()


def task_file(store: BankStore, name: str, rel: str) -> Path:
    return store.path / store.task_entry(name)["dir"] / rel


def errors(store: BankStore) -> list:
    return [p for p in store.verify() if p.is_error]


@pytest.fixture
def bank(tmp_path: Path) -> BankStore:
    return BankStore.create(tmp_path / "bank", base=BASE)


# ---------------------------------------------------------------- round trips and semantics
def test_round_trip_bit_exact_and_metadata(bank: BankStore) -> None:
    bank.write_task("sst2", files_for(0), {"rank": 4, "targets": ["query"]})
    reopened = BankStore.open(bank.path, expect_base_fingerprint="fp-123")
    for store in (bank, reopened):
        for check in ("fast", "full", "none"):
            for stem, want in files_for(0).items():
                assert_same(store.read_tensors("sst2", stem, check=check), want)
        assert store.read_config("sst2") == {"rank": 4, "targets": ["query"]}
        assert store.stems("sst2") == ["adapter", "head"]
    with safe_open(task_file(bank, "sst2", "adapter.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "pt" and meta["task"] == "sst2" and meta["stem"] == "adapter"
    assert isinstance(meta["adaptbank_version"], str)
    m = reopened.manifest
    assert m["schema"] == SCHEMA_VERSION and m["base"] == BASE and m["router"] is None
    assert set(m["tasks"][0]["files"]) == {"adapter.safetensors", "head.safetensors", "config.json"}
    assert bank.bytes_on_disk("sst2") == sum(r["size"] for r in m["tasks"][0]["files"].values())
    assert bank.bytes_on_disk() > bank.bytes_on_disk("sst2")
    assert bank.verify() == []


def test_manifest_property_is_a_copy(bank: BankStore) -> None:
    bank.write_task("a", files_for(0), {})
    bank.manifest["tasks"].clear()
    assert bank.tasks() == ["a"]


def test_tasks_ordered_and_replace_keeps_position(bank: BankStore) -> None:
    for i, name in enumerate(["c", "a", "b"]):
        bank.write_task(name, files_for(i), {"v": 1})
    old_dir = bank.path / bank.task_entry("a")["dir"]
    bank.write_task("a", files_for(9), {"v": 2}, replace=True)
    assert bank.tasks() == ["c", "a", "b"]
    assert not old_dir.exists() and (bank.path / bank.task_entry("a")["dir"]).is_dir()
    assert_same(bank.read_tensors("a", "head"), files_for(9)["head"])
    assert bank.read_config("a") == {"v": 2}
    assert BankStore.open(bank.path).tasks() == ["c", "a", "b"]
    assert bank.verify() == []


def test_task_exists_leaves_bank_unchanged(bank: BankStore) -> None:
    bank.write_task("a", files_for(0), {})
    before, dirs = mbytes(bank), sorted(os.listdir(bank.path / "tasks"))
    with pytest.raises(TaskExistsError, match="'a' already exists"):
        bank.write_task("a", files_for(1), {})
    assert mbytes(bank) == before and sorted(os.listdir(bank.path / "tasks")) == dirs
    assert_same(bank.read_tensors("a", "adapter"), files_for(0)["adapter"])


def test_task_exists_race_is_caught_under_the_lock(bank: BankStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer commits the same name while our files are being written (before the lock)."""
    other = BankStore.open(bank.path)
    real = BankStore._write_dir
    raced = []

    def racing_write_dir(self: BankStore, reldir: str, payload: dict) -> dict:
        if self is bank and not raced:
            raced.append(reldir)
            other.write_task("a", files_for(5), {"winner": True})
        return real(self, reldir, payload)

    monkeypatch.setattr(BankStore, "_write_dir", racing_write_dir)
    with pytest.raises(TaskExistsError):
        bank.write_task("a", files_for(0), {})
    assert raced and not (bank.path / raced[0]).exists()  # our partial dir was removed
    assert BankStore.open(bank.path).read_config("a") == {"winner": True}
    assert BankStore.open(bank.path).verify() == []


def test_remove_task(bank: BankStore) -> None:
    bank.write_task("a", files_for(0), {})
    bank.write_task("b", files_for(1), {})
    d = bank.path / bank.task_entry("a")["dir"]
    bank.remove_task("a")
    assert bank.tasks() == ["b"] and not d.exists()
    with pytest.raises(TaskNotFoundError, match="no task 'a'") as ei:
        bank.read_tensors("a", "adapter")
    assert isinstance(ei.value, KeyError) and str(ei.value).startswith(str(bank.path))
    with pytest.raises(TaskNotFoundError):
        bank.remove_task("a")
    assert bank.verify() == []


def test_shared_groups_stored_once_and_removed_with_last_task(bank: BankStore) -> None:
    shared = {"A": {"l0.A": torch.randn(4, 16), "l1.A": torch.randn(4, 16).to(torch.bfloat16)}}
    bank.write_task("a", files_for(0), {}, shared="sA", shared_files=shared)
    bank.write_task("b", files_for(1), {}, shared="sA")
    assert len(os.listdir(bank.path / "shared")) == 1
    assert bank.manifest["shared"]["sA"]["tasks"] == ["a", "b"]
    assert bank.task_entry("b")["shared"] == "sA"
    assert_same(bank.read_shared("sA", "A", check="full"), shared["A"])
    with pytest.raises(BankError, match="'sA' already exists"):
        bank.write_task("c", files_for(2), {}, shared="sA", shared_files=shared)
    with pytest.raises(BankError, match="'nope' does not exist"):
        bank.write_task("c", files_for(2), {}, shared="nope")
    with pytest.raises(ValueError, match="shared_files given without shared"):
        bank.write_task("c", files_for(2), {}, shared_files=shared)
    group_dir = bank.path / bank.manifest["shared"]["sA"]["dir"]
    bank.remove_task("a")
    assert group_dir.is_dir() and bank.manifest["shared"]["sA"]["tasks"] == ["b"]
    bank.remove_task("b")
    assert not group_dir.exists() and bank.manifest["shared"] == {}
    with pytest.raises(TaskNotFoundError, match="no shared group 'sA'"):
        bank.read_shared("sA", "A")
    assert bank.verify() == []


def test_replace_owner_of_a_shared_group_recreates_it(bank: BankStore) -> None:
    bank.write_task("a", files_for(0), {}, shared="g", shared_files={"A": {"x": torch.zeros(2)}})
    old = bank.path / bank.manifest["shared"]["g"]["dir"]
    bank.write_task("a", files_for(0), {}, shared="g", shared_files={"A": {"x": torch.ones(2)}}, replace=True)
    assert not old.exists() and torch.equal(bank.read_shared("g", "A")["x"], torch.ones(2))
    bank.write_task("a", files_for(1), {}, replace=True)  # leaves the group: it empties and goes
    assert bank.manifest["shared"] == {} and bank.verify() == []


def test_router_round_trip_with_expert_order(bank: BankStore) -> None:
    assert bank.read_router() is None and bank.router_expert_order() is None
    for name in ["x", "y", "z"]:
        bank.write_task(name, files_for(0), {})
    router = {"router": {"proj.weight": torch.randn(3, 8), "proj.bias": torch.zeros(3, dtype=torch.bfloat16)}}
    bank.write_router(router, {"kind": "learned", "top_k": 2}, ["z", "x", "y"])
    first_dir = bank.path / bank.manifest["router"]["dir"]
    files, meta = BankStore.open(bank.path).read_router()
    assert_same(files["router"], router["router"])
    assert meta == {"kind": "learned", "top_k": 2}
    assert bank.router_expert_order() == ["z", "x", "y"]
    bank.write_router(router, {"kind": "learned", "top_k": 1}, ["x"])
    assert not first_dir.exists() and bank.read_router()[1]["top_k"] == 1
    before = mbytes(bank)
    with pytest.raises(BankError, match=r"not in the bank: \['ghost'\]"):
        bank.write_router(router, {}, ["x", "ghost"])
    with pytest.raises(ValueError, match="duplicates"):
        bank.write_router(router, {}, ["x", "x"])
    assert mbytes(bank) == before and len(os.listdir(bank.path / "router")) == 1
    bank.remove_task("x")
    assert [p.kind for p in bank.verify()] == ["stale"] and not errors(bank)


def test_reader_retries_after_a_concurrent_replace(bank: BankStore) -> None:
    bank.write_task("a", files_for(0), {})
    reader = BankStore.open(bank.path)  # caches the manifest naming the old dir
    bank.write_task("a", files_for(1), {}, replace=True)  # commits, then deletes the old dir
    assert_same(reader.read_tensors("a", "head"), files_for(1)["head"])


@pytest.mark.parametrize("window", ["after the size check", "after the header check", "before the JSON read"])
def test_reader_retries_when_a_file_vanishes_between_check_and_read(bank: BankStore, monkeypatch: pytest.MonkeyPatch,
                                                                    window: str) -> None:
    # A writer's replace commits and deletes the old dir just after the reader checked a file, before it opened
    # it: the read must count the file as missing (and retry on the new version), not as an unreadable file.
    from adaptbank.bank import files as bank_files

    bank.write_task("a", files_for(0), {"v": 0})
    reader = BankStore.open(bank.path)
    fired: list[str] = []

    def replace_now() -> None:
        if not fired:
            fired.append(window)
            bank.write_task("a", files_for(1), {"v": 1}, replace=True)

    if window == "after the header check":
        real_check = bank_files.check_safetensors
        monkeypatch.setattr(bank_files, "check_safetensors", lambda path: (real_check(path), replace_now())[0])
    else:
        real_file = bank_files.BankFiles.checked_file
        monkeypatch.setattr(bank_files.BankFiles, "checked_file",
                            lambda self, *a: (real_file(self, *a), replace_now())[0])
    if window == "before the JSON read":
        assert reader.read_config("a") == {"v": 1}
    else:
        assert_same(reader.read_tensors("a", "head"), files_for(1)["head"])
    assert fired and reader.generation == bank.generation


def test_generation_counts_commits(bank: BankStore) -> None:
    assert bank.generation == 1  # create commits once
    bank.write_task("a", files_for(0), {})
    bank.write_task("a", files_for(1), {}, replace=True)
    bank.remove_task("a")
    assert bank.generation == 4 == BankStore.open(bank.path).generation
    with pytest.raises(TaskNotFoundError):
        bank.remove_task("a")  # a refused change commits nothing
    assert BankStore.open(bank.path).generation == 4
    old = json.loads(mbytes(bank))
    del old["generation"]  # a bank from before the counter reads as generation 0, and counts on from there
    (bank.path / "manifest.json").write_text(json.dumps(old))
    assert BankStore.open(bank.path).generation == 0
    bank.write_task("b", files_for(0), {})
    assert BankStore.open(bank.path).generation == 1


def test_readers_ignore_temporaries_and_orphans(bank: BankStore) -> None:
    bank.write_task("a", files_for(0), {})
    (bank.path / "tasks" / "a@000000000000").mkdir()
    (bank.path / ".tmp-manifest.json-1234").write_text("{garbage")
    reopened = BankStore.open(bank.path)
    assert reopened.tasks() == ["a"]
    assert_same(reopened.read_tensors("a", "head"), files_for(0)["head"])
    assert {p.kind for p in reopened.verify()} == {"orphan", "temporary"} and not errors(reopened)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", ["", ".hidden", "-x", "a/b", "a..b", "x" * 101, "a@b", "../up", "a b", 5, None])
def test_invalid_names_rejected(bank: BankStore, bad: object) -> None:
    with pytest.raises(ValueError, match=r"task name .*rule: 1-100 characters"):  # core.config.validate_name
        bank.write_task(bad, files_for(0), {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"stem .*rule: 1-100 characters"):
        bank.write_task("ok", {bad: {"w": torch.zeros(1)}}, {})  # type: ignore[dict-item]
    assert bank.tasks() == []


def test_bad_payloads_rejected(bank: BankStore) -> None:
    with pytest.raises(TypeError, match="'w' must map a non-empty str to a Tensor"):
        bank.write_task("a", {"adapter": {"w": [1.0]}}, {})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="config of task 'a' must be JSON-serializable"):
        bank.write_task("a", files_for(0), {"t": torch.zeros(1)})
    with pytest.raises(TypeError, match="must be a dict"):
        bank.write_task("a", files_for(0), [])  # type: ignore[arg-type]
    assert bank.tasks() == [] and os.listdir(bank.path / "tasks") == []


def test_create_and_open_refusals(tmp_path: Path, bank: BankStore) -> None:
    with pytest.raises(BankError, match="already an adaptbank bank"):
        BankStore.create(bank.path, base=BASE)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(BankError, match="not an empty directory"):
        BankStore.create(tmp_path / "junk", base=BASE)
    (tmp_path / "interrupted" / "tasks").mkdir(parents=True)  # what a create() killed early leaves
    (tmp_path / "interrupted" / ".lock").touch()
    assert BankStore.create(tmp_path / "interrupted", base=BASE).tasks() == []
    with pytest.raises(ValueError, match="'name' and 'fingerprint'"):
        BankStore.create(tmp_path / "new", base={"name": "x"})
    with pytest.raises(BankError, match="no manifest.json"):
        BankStore.open(tmp_path / "junk")
    with pytest.raises(BankError, match=r"fingerprint 'fp-123'.*'other' was expected"):
        BankStore.open(bank.path, expect_base_fingerprint="other")
    m = json.loads(mbytes(bank))
    (bank.path / "manifest.json").write_text(json.dumps(m | {"schema": SCHEMA_VERSION + 1}))
    with pytest.raises(BankError, match="newer adaptbank.*upgrade"):
        BankStore.open(bank.path)
    (bank.path / "manifest.json").write_text("{not json")
    with pytest.raises(BankCorruptError, match="not valid JSON"):
        BankStore.open(bank.path)


# ---------------------------------------------------------------- corruption detection
def test_flipped_byte_detected(bank: BankStore) -> None:
    bank.write_task("a", files_for(0), {})
    f = task_file(bank, "a", "adapter.safetensors")
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(BankCorruptError, match=r"adapter\.safetensors.*task 'a'.*sha256") as ei:
        bank.read_tensors("a", "adapter", check="full")
    assert ei.value.kind == "checksum"
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # fast: mtime differs -> hash -> caught
    with pytest.raises(BankCorruptError, match="sha256"):
        bank.read_tensors("a", "adapter", check="fast")
    [p] = bank.verify()
    assert p.kind == "checksum" and p.path.endswith("adapter.safetensors") and "task 'a'" in p.message
    assert_same(bank.read_tensors("a", "head", check="full"), files_for(0)["head"])  # others fine


def test_touched_but_intact_file_passes_fast_check(bank: BankStore) -> None:
    bank.write_task("a", files_for(0), {})
    f = task_file(bank, "a", "head.safetensors")
    os.utime(f, ns=(0, 123))
    assert_same(bank.read_tensors("a", "head"), files_for(0)["head"])


def test_truncated_and_deleted_files_detected(bank: BankStore) -> None:
    bank.write_task("a", files_for(0), {})
    f = task_file(bank, "a", "adapter.safetensors")
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(BankCorruptError, match=r"adapter\.safetensors.*truncated") as ei:
        bank.read_tensors("a", "adapter")
    assert ei.value.kind == "size"
    task_file(bank, "a", "config.json").unlink()
    with pytest.raises(BankCorruptError, match=r"config\.json.*missing"):
        bank.read_config("a")
    kinds = {Path(p.path).name: p.kind for p in bank.verify()}
    assert kinds == {"adapter.safetensors": "size", "config.json": "missing"}


def test_unreadable_header_and_extra_file_detected(bank: BankStore) -> None:
    bank.write_task("a", files_for(0), {})
    f = task_file(bank, "a", "head.safetensors")
    f.write_bytes(b"\xff" * f.stat().st_size)  # same size, garbage header
    with pytest.raises(BankCorruptError):
        bank.read_tensors("a", "head", check="none")
    (f.parent / "notes.txt").write_text("?")
    kinds = {Path(p.path).name: p.kind for p in bank.verify(full=False)}
    assert kinds["notes.txt"] == "extra" and kinds["head.safetensors"] in ("checksum", "unreadable")


@pytest.mark.parametrize("evil", ["../outside", "/tmp/adaptbank-abs", "tasks/../../outside"])
def test_manifest_paths_escaping_the_bank_detected(bank: BankStore, evil: str) -> None:
    bank.write_task("a", files_for(0), {})
    m = json.loads(mbytes(bank))
    m["tasks"][0]["dir"] = evil
    (bank.path / "manifest.json").write_text(json.dumps(m))
    store = BankStore.open(bank.path)
    with pytest.raises(BankCorruptError, match="escapes the bank") as ei:
        store.read_tensors("a", "adapter")
    assert evil in str(ei.value) and ei.value.kind == "escape"
    assert any(p.kind == "escape" and p.path == evil for p in store.verify())


def test_symlinks_pointing_outside_detected(bank: BankStore, tmp_path: Path) -> None:
    bank.write_task("a", files_for(0), {})
    bank.write_task("b", files_for(1), {})
    f = task_file(bank, "a", "adapter.safetensors")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(f.read_bytes())  # identical bytes: only the location gives it away
    f.unlink()
    f.symlink_to(outside)
    with pytest.raises(BankCorruptError, match="outside the bank"):
        bank.read_tensors("a", "adapter")
    bdir = bank.path / bank.task_entry("b")["dir"]
    moved = tmp_path / "moved-dir"
    bdir.rename(moved)
    bdir.symlink_to(moved, target_is_directory=True)
    found = {(p.kind, Path(p.path).name) for p in bank.verify()}
    assert ("escape", "adapter.safetensors") in found and ("escape", bdir.name) in found


# ---------------------------------------------------------------- locking and concurrency
def _concurrent_writer(bank: str, prefix: str, count: int, barrier: object) -> None:
    store = BankStore.open(bank)
    barrier.wait(timeout=120)  # type: ignore[attr-defined]
    for i in range(count):
        store.write_task(f"{prefix}-{i}", files_for(i), {"writer": prefix, "i": i})


def _concurrent_repairer(bank: str, barrier: object, stop: object) -> None:
    store = BankStore.open(bank)
    barrier.wait(timeout=120)  # type: ignore[attr-defined]
    while not stop.is_set():  # type: ignore[attr-defined]
        store.repair()  # must never delete the new dir of a write still in progress


@pytest.mark.parametrize("nproc", [2, 4])
def test_concurrent_writers_all_land(tmp_path: Path, nproc: int) -> None:
    """nproc writers race (the 4-writer case also races a process running repair() in a loop)."""
    store = BankStore.create(tmp_path / "bank", base=BASE)
    ctx = mp.get_context("spawn")
    with_repair = nproc == 4
    barrier, stop = ctx.Barrier(nproc + with_repair), ctx.Event()
    procs = [ctx.Process(target=_concurrent_writer, args=(str(store.path), f"w{j}", 3, barrier)) for j in range(nproc)]
    repairer = ctx.Process(target=_concurrent_repairer, args=(str(store.path), barrier, stop))
    for p in procs + [repairer] * with_repair:
        p.start()
    for p in procs:
        p.join(timeout=180)
    stop.set()
    if with_repair:
        repairer.join(timeout=60)
        assert repairer.exitcode == 0
    assert [p.exitcode for p in procs] == [0] * nproc
    store.reload()
    assert sorted(store.tasks()) == sorted(f"w{j}-{i}" for j in range(nproc) for i in range(3))
    assert store.verify(full=True) == []
    for name in store.tasks():
        assert_same(store.read_tensors(name, "head", check="full"), files_for(int(name[-1]))["head"])


def test_lock_timeout_raises_and_leaves_bank_unchanged(bank: BankStore) -> None:
    store = BankStore.open(bank.path, lock_timeout=0.2)
    before = mbytes(bank)
    with _atomic.exclusive_lock(bank.path / ".lock"):  # another open file description: conflicts
        with pytest.raises(BankLockedError, match="lock"):
            store.write_task("a", files_for(0), {})
    assert mbytes(bank) == before and os.listdir(bank.path / "tasks") == []
    store.write_task("a", files_for(0), {})
    assert store.tasks() == ["a"]


# ---------------------------------------------------------------- failures leave the bank unchanged
def _fail_on_call(monkeypatch: pytest.MonkeyPatch, module: object, attr: str, n: int, err: OSError) -> list[int]:
    """Make ``module.attr`` raise ``err`` on its ``n``-th call (0-based); count calls."""
    real, calls = getattr(module, attr), [0]

    def fake(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] - 1 == n:
            raise err
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attr, fake)
    return calls


def _write_with_group(store: BankStore) -> None:
    store.write_task("new", files_for(3), {"x": 1}, shared="g", shared_files={"A": {"a": torch.ones(3)}})


def _assert_unchanged(store: BankStore, before: bytes) -> None:
    assert mbytes(store) == before
    reopened = BankStore.open(store.path)
    assert reopened.tasks() == ["keep"] and reopened.verify() == []  # no partial dirs, no temporaries
    assert_same(reopened.read_tensors("keep", "adapter", check="full"), files_for(0)["adapter"])


@pytest.mark.parametrize("attr", ["replace", "fsync"])
def test_enospc_at_every_step(bank: BankStore, monkeypatch: pytest.MonkeyPatch, attr: str) -> None:
    bank.write_task("keep", files_for(0), {})
    scratch = BankStore.create(bank.path.parent / "scratch", base=BASE)
    with monkeypatch.context() as mpc:
        total = _fail_on_call(mpc, os, attr, -1, OSError())
        _write_with_group(scratch)
    assert total[0] >= 5
    before = mbytes(bank)
    enospc = OSError(errno.ENOSPC, "No space left on device")
    for n in range(total[0]):
        with monkeypatch.context() as mpc:
            _fail_on_call(mpc, os, attr, n, enospc)
            with pytest.raises(BankError, match="No space left on device") as ei:
                _write_with_group(bank)
        assert str(bank.path) in str(ei.value)
        if attr == "fsync" and n == total[0] - 1:  # the bank-dir fsync after the commit point
            assert "committed" in str(ei.value) and BankStore.open(bank.path).tasks() == ["keep", "new"]
            assert BankStore.open(bank.path).verify() == []
            bank.remove_task("new")
            before = mbytes(bank)
        else:
            # names the file or directory that failed, inside the bank
            assert "unchanged" in str(ei.value) and f"No space left on device: '{bank.path}/" in str(ei.value)
            _assert_unchanged(bank, before)
    _write_with_group(bank)
    assert bank.tasks() == ["keep", "new"] and bank.verify() == []


@pytest.mark.parametrize("where", ["open", "mkdir"])
def test_permission_denied_leaves_bank_unchanged(bank: BankStore, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    bank.write_task("keep", files_for(0), {})
    before = mbytes(bank)
    denied = PermissionError(errno.EACCES, "Permission denied")
    with monkeypatch.context() as mpc:
        if where == "open":

            def denied_open(*args: object, **kwargs: object) -> object:
                raise denied

            mpc.setattr(_atomic, "open", denied_open, raising=False)  # shadows the builtin in _atomic
        else:
            _fail_on_call(mpc, os, "mkdir", 0, denied)
        with pytest.raises(BankError, match="Permission denied"):
            _write_with_group(bank)
    _assert_unchanged(bank, before)


# ---------------------------------------------------------------- repair
def test_repair_removes_temporaries_and_orphans_only(bank: BankStore) -> None:
    bank.write_task("a", files_for(0), {}, shared="g", shared_files={"A": {"x": torch.ones(2)}})
    bank.write_router({"router": {"w": torch.ones(2)}}, {}, ["a"])
    # every file but .lock, which each writer (repair too) stamps with its pid while it holds the lock
    referenced = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in bank.path.rglob("*")
                  if p.is_file() and p.name != ".lock"}
    adir = bank.path / bank.task_entry("a")["dir"]
    junk = {
        "tasks/ghost@0123456789ab": "dir", "shared/g@0123456789ab": "dir", "router/ffffffffffff": "dir",
        ".tmp-manifest.json-deadbeef": "file", ".tmp-pending-aaaaaaaaaaaa": "file",
        f"{bank.task_entry('a')['dir']}/.tmp-adapter.safetensors-1234": "file",
    }
    for rel, kind in junk.items():
        if kind == "dir":
            (bank.path / rel).mkdir()
            (bank.path / rel / "adapter.safetensors").write_bytes(b"partial")
        else:
            (bank.path / rel).write_bytes(b"partial")
    fd = _atomic.hold_marker(bank.path / ".tmp-pending-cccccccccccc")  # a write in progress
    busy = bank.path / "tasks" / "busy@cccccccccccc"
    busy.mkdir()
    (adir / "notes.txt").write_text("not ours to delete")
    assert {p.kind for p in bank.verify()} == {"orphan", "temporary", "extra"}
    try:
        assert sorted(bank.repair()) == sorted(junk)
        assert busy.is_dir() and (bank.path / ".tmp-pending-cccccccccccc").exists()
    finally:
        os.close(fd)
    for p, (data, mtime) in referenced.items():
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime
    assert (adir / "notes.txt").exists()
    assert sorted(bank.repair()) == [".tmp-pending-cccccccccccc", "tasks/busy@cccccccccccc"]
    (adir / "notes.txt").unlink()
    assert bank.verify() == [] and bank.repair() == []


# ---------------------------------------------------------------- crash safety (SIGKILL)
def _crash_module() -> object:
    spec = importlib.util.spec_from_file_location("crash_store", REPO / "bench" / "crash_store.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_sigkilled_writer_leaves_task_complete_or_absent(tmp_path: Path) -> None:
    crash = _crash_module()
    counts = crash.run(trials=5, bank=tmp_path / "bank", seed=1, max_delay=0.25)
    assert counts == {"complete": counts["complete"], "absent": 5 - counts["complete"], "corrupt": 0}
    assert BankStore.open(tmp_path / "bank").verify() == []  # run() repaired after every audit


# ---------------------------------------------------------------- fuzzing manifest loading
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)


@st.composite
def _mutated(draw: st.DrawFn, valid: dict) -> str:
    m = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        node: object = m
        while isinstance(node, (dict, list)) and node:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            key = draw(st.sampled_from(keys))
            child = node[key]  # type: ignore[index]
            if isinstance(child, (dict, list)) and child and draw(st.booleans()):
                node = child
                continue
            action = draw(st.sampled_from(["replace", "delete", "path"]))
            if action == "delete":
                del node[key]  # type: ignore[arg-type, attr-defined]
            elif action == "path":
                node[key] = draw(st.sampled_from(["../x", "/etc", "", ".", "tasks", "a\x00b", "x" * 300]))  # type: ignore[index]
            else:
                node[key] = draw(_json)  # type: ignore[index]
            break
    return json.dumps(m)


_paths = st.sampled_from(["../x", "/etc", "", ".", "tasks", "manifest.json", ".lock", "a\x00b", "x" * 300]) | st.text(
    alphabet="ab./@-_", max_size=30
)


@st.composite
def _semantic(draw: st.DrawFn, valid: dict) -> str:
    """Structurally valid manifests whose paths, records and cross-references are scrambled."""
    m = copy.deepcopy(valid)
    entries = [*m["tasks"], *m["shared"].values(), m["router"]]
    for _ in range(draw(st.integers(1, 4))):
        entry = draw(st.sampled_from(entries))
        if not entry["files"]:
            continue
        rel = draw(st.sampled_from(sorted(entry["files"])))
        action = draw(st.sampled_from(["dir", "swap", "size", "sha", "mtime", "rename", "drop", "order"]))
        if action == "dir":
            entry["dir"] = draw(_paths)
        elif action == "swap":
            other = draw(st.sampled_from(entries))
            entry["dir"], other["dir"] = other["dir"], entry["dir"]
        elif action in ("size", "mtime"):
            entry["files"][rel][action + ("_ns" if action == "mtime" else "")] = draw(st.integers(0, 2**70))
        elif action == "sha":
            entry["files"][rel]["sha256"] = draw(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
        elif action == "rename":
            entry["files"][draw(st.sampled_from(["x.safetensors", "config.json", "router.json", "A.json"]))] = (
                entry["files"].pop(rel)
            )
        elif action == "drop":
            del entry["files"][rel]
        else:
            m["router"]["expert_order"] = draw(st.lists(st.sampled_from(["a", "b", "zz", "9"]), max_size=4))
    return json.dumps(m)


@pytest.fixture(scope="module")
def fuzz_bank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    store = BankStore.create(tmp_path_factory.mktemp("fuzz") / "bank", base=BASE)
    store.write_task("a", files_for(0), {"k": 1}, shared="g", shared_files={"A": {"x": torch.ones(2)}})
    store.write_task("b", files_for(1), {}, shared="g")
    store.write_router({"router": {"w": torch.ones(2)}}, {"m": 1}, ["a", "b"])
    return store.path, json.loads(mbytes(store))


def _swallow(fn: Callable[..., object], *args: object, **kwargs: object) -> None:
    try:
        fn(*args, **kwargs)
    except BankError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifest_only_raises_bank_errors(fuzz_bank: tuple[Path, dict], data: st.DataObject) -> None:
    path, valid = fuzz_bank
    text = data.draw(st.one_of(_semantic(valid), _mutated(valid), st.text(max_size=200), _json.map(json.dumps)))
    (path / "manifest.json").write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        store = BankStore.open(path)
        event("opened")
        for name in store.tasks():
            store.task_entry(name)
            _swallow(store.read_config, name)
            for stem in store.stems(name):
                _swallow(store.read_tensors, name, stem, check="full")
        for group, entry in store.manifest["shared"].items():
            for rel in entry["files"]:
                _swallow(store.read_shared, group, rel.split(".")[0])
        _swallow(store.read_router)
        event(f"verify found {len(store.verify(full=True))} problems")
        store.bytes_on_disk()
    except BankError as exc:
        event(type(exc).__name__)
    finally:
        (path / "manifest.json").write_text(json.dumps(valid))


# ---------------------------------------------------------------- manifest encoding and commit reads
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.text(max_size=8),
                       st.floats(allow_nan=False, allow_infinity=False))
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                               max_size=3), max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(tasks=st.lists(st.dictionaries(st.text(max_size=6), _json, max_size=4), max_size=5),
       shared=st.dictionaries(st.text(max_size=6), _json, max_size=3),
       extra=st.dictionaries(st.sampled_from(["meta", "base", "router", "generation"]), _json))
def test_manifest_encoding_round_trips(tasks: list, shared: dict, extra: dict) -> None:
    from adaptbank.bank.manifest import encode_manifest

    m = {"schema": 1, **extra, "tasks": tasks, "shared": shared}
    raw = encode_manifest(m)
    assert json.loads(raw) == m
    lines = raw.decode().splitlines()
    # braces, a line per key, a line per task and shared group and one closing each non-empty list
    assert len(lines) == len(m) + 2 + sum(len(m[k]) + 1 for k in ("tasks", "shared") if m[k])
    assert sum(1 for line in lines if line.startswith("  ")) == len(tasks) + len(shared)


def test_manifest_encoding_refuses_nan() -> None:
    from adaptbank.bank.manifest import encode_manifest

    with pytest.raises(ValueError, match="Out of range float"):
        encode_manifest({"meta": {"x": float("nan")}})


def test_commit_validates_a_manifest_changed_by_someone_else(bank: BankStore) -> None:
    """The store parses its own last commit without re-validating it; any other bytes are validated."""
    bank.write_task("a", files_for(0), {})
    path = bank.path / "manifest.json"
    raw = json.loads(path.read_bytes())
    raw["tasks"][0]["files"]["head.safetensors"]["sha256"] = "not-a-hash"
    path.write_text(json.dumps(raw))
    with pytest.raises(BankCorruptError, match="sha256"):
        bank.write_task("b", files_for(1), {})
    assert not list((bank.path / "tasks").glob("b@*"))  # the refused write left nothing behind


def test_commit_sees_another_writers_task(bank: BankStore) -> None:
    """The cached manifest only pre-checks; the commit reads what another store object committed."""
    other = BankStore.open(bank.path)
    bank.write_task("a", files_for(0), {})
    other.write_task("b", files_for(1), {})  # `other` cached a bank without "a"
    bank.write_task("c", files_for(2), {})
    assert BankStore.open(bank.path).tasks() == ["a", "b", "c"]
    other.remove_task("a")
    bank.write_task("a", files_for(3), {})  # bank's cache still holds "a": the pre-check re-reads, then commits
    assert BankStore.open(bank.path).tasks() == ["b", "c", "a"]
