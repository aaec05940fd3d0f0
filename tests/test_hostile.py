"""Hostile input, refused with nothing loaded: pickled or remote-code backbones, a manifest naming a base
the user never allowed, symlink loops in a bank or a spec, forged safetensors headers, half-written
expert folders, and a writer stuck behind another process's lock."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, tiny_backbone, tree_digest

from adaptbank._tensorfile import TensorFileError, check_safetensors
from adaptbank.bank import expert_io
from adaptbank.bank.facade import AdapterBank
from adaptbank.bank.store import DEFAULT_LOCK_TIMEOUT, BankCorruptError, BankError, BankLockedError, BankStore
from adaptbank.bank.trust import ALLOWED_BASES_VAR, BaseNotAllowedError, allowed_file, base_to_load, canonical
from adaptbank.cli.main import main
from adaptbank.core import backbone as backbone_module
from adaptbank.core.config import LoRAConfig
from adaptbank.core.model import AdaptBankModel
from adaptbank.data.load import DataError, load_task
from adaptbank.data.specs import load_task_spec

BASE = {"name": "tiny", "fingerprint": "fp"}
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
       "HF_HUB_OFFLINE": "1"}


class _Bomb:
    """Unpickling this creates the folder ``path``: proof that a pickle ran, if it ever were loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (self.path,)


def _no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any safetensors read fail the test: a refusal must come before tensors are materialised."""
    import safetensors.torch

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("safetensors was asked to read a file that should have been refused")

    monkeypatch.setattr(safetensors.torch, "load_file", boom)


# ---------------------------------------------------------------- backbone: safetensors only, no remote code
def test_backbone_loads_safetensors_only_without_remote_code(tiny_bert_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    seen: dict[str, dict] = {}
    for cls in (transformers.AutoModel, transformers.AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args: object, _orig=original, _name=cls.__name__, **kwargs: object) -> object:
            seen[_name] = kwargs
            return _orig(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    backbone_module.load_backbone(str(tiny_bert_dir))
    assert seen["AutoModel"]["use_safetensors"] is True and seen["AutoModel"]["trust_remote_code"] is False
    assert seen["AutoTokenizer"]["trust_remote_code"] is False


def test_folder_with_only_pickled_weights_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "model.safetensors").unlink()
    ran = tmp_path / "the-pickle-ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Bomb(ran)))
    for attempt in (lambda: backbone_module.load_backbone(str(folder)),
                    lambda: AdapterBank.init(tmp_path / "bank", base=str(folder))):
        with pytest.raises(ValueError, match=r"only safetensors weights") as err:
            attempt()
        assert str(folder) in str(err.value) and "pytorch_model.bin" in str(err.value)
    assert not ran.exists() and not (tmp_path / "bank").exists()


def test_backbone_with_a_forged_safetensors_header_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "forged"
    shutil.copytree(tiny_bert_dir, folder)
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    with pytest.raises(TensorFileError, match="header claims") as err:
        backbone_module.load_backbone(str(folder))
    assert str(weights) in str(err.value)


# ---------------------------------------------------------------- the base a manifest names
def _point_manifest_at(bank: Path, target: str, **extra: str) -> None:
    mpath = bank / "manifest.json"
    m = json.loads(mpath.read_text())
    m["base"] |= {"name": target, "path": target, "allowed_by": "init", **extra}
    mpath.write_text(json.dumps(m))


@pytest.fixture
def bank_and_copy(tiny_bert_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A bank on the tiny BERT, and an identical copy of that BERT (same fingerprint) nobody allowed."""
    AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_bert_dir, copy)
    return tmp_path / "bank", copy


def test_manifest_naming_an_unallowed_base_is_refused_before_loading(
        bank_and_copy: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    bank, copy = bank_and_copy
    _point_manifest_at(bank, str(copy))  # the manifest even claims the user allowed it: it cannot
    before = tree_digest(bank)
    loads: list[str] = []
    monkeypatch.setattr("adaptbank.bank.facade.load_backbone", lambda name, **kw: loads.append(name))
    monkeypatch.delenv(ALLOWED_BASES_VAR, raising=False)
    with pytest.raises(BaseNotAllowedError) as err:
        AdapterBank.open(bank).new_model()
    message = str(err.value)
    assert str(copy) in message and f"export {ALLOWED_BASES_VAR}={copy.parent}" in message
    assert isinstance(err.value, BankError) and loads == [] and tree_digest(bank) == before
    res = CliRunner().invoke(main, ["eval", str(bank)])
    assert res.exit_code != 0 and ALLOWED_BASES_VAR in res.output and "Traceback" not in res.output
    monkeypatch.undo()
    monkeypatch.setenv(ALLOWED_BASES_VAR, os.pathsep.join(["/nonexistent", str(copy.parent.parent)]))
    assert AdapterBank.open(bank).new_model().base_fingerprint() == AdapterBank.open(bank).base["fingerprint"]


def test_symlink_into_an_allowed_folder_is_judged_by_its_target(bank_and_copy: tuple[Path, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bank, copy = bank_and_copy
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "model").symlink_to(copy, target_is_directory=True)  # looks allowed, leads outside
    monkeypatch.setenv(ALLOWED_BASES_VAR, str(allowed))
    _point_manifest_at(bank, str(allowed / "model"))
    with pytest.raises(BaseNotAllowedError, match="resolved"):
        AdapterBank.open(bank).new_model()


def test_default_names_and_the_path_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOWED_BASES_VAR, raising=False)
    assert base_to_load({"name": "default"}, "B") == "default"
    with pytest.raises(BaseNotAllowedError, match=str(tmp_path)):  # the path field is what would be loaded
        base_to_load({"name": "default", "path": str(tmp_path)}, "B")
    with pytest.raises(BaseNotAllowedError, match="usable"):
        base_to_load({"name": "x", "path": 3}, "B")


def test_a_new_process_loads_a_base_only_when_this_user_allowed_it(tiny_bert_dir: Path, tmp_path: Path) -> None:
    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    assert canonical(str(tiny_bert_dir)) in allowed_file().read_text()  # recorded for later processes
    other_user = {**ENV, "ADAPTBANK_CONFIG_DIR": str(tmp_path / "empty-config")}
    other_user.pop(ALLOWED_BASES_VAR, None)
    code = "import sys; from adaptbank.bank.facade import AdapterBank; AdapterBank.open(sys.argv[1]).new_model()"
    done = subprocess.run([sys.executable, "-c", code, str(bank.path)], env=other_user, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "BaseNotAllowedError" in done.stderr and ALLOWED_BASES_VAR in done.stderr


# ---------------------------------------------------------------- symlink loops
def test_symlink_loop_inside_a_task_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BankStore.create(tmp_path / "bank", base=BASE)
    store.write_task("t", {"adapter": {"w": torch.ones(2)}}, {})
    target = store.path / store.task_entry("t")["dir"] / "adapter.safetensors"
    target.unlink()
    target.symlink_to(target.name)  # a link to itself
    before = sorted(p.name for p in store.path.rglob("*"))  # (tree_digest would try to read the loop)
    _no_tensor_reads(monkeypatch)
    with pytest.raises(BankCorruptError, match="(?i)symlink loop") as err:
        store.read_tensors("t", "adapter")
    assert str(target) in str(err.value)
    problems = [p for p in store.verify() if p.is_error]
    assert problems and "adapter.safetensors" in problems[0].path
    assert sorted(p.name for p in store.path.rglob("*")) == before


def _spec(folder: Path, train: str, test: str) -> Path:
    path = folder / "loopy.toml"
    path.write_text(f'name = "loopy"\ntype = "classification"\n[data]\nlabels = ["a", "b"]\n'
                    f'train = "{train}"\ntest = "{test}"\n')
    return path


def test_spec_whose_data_path_is_a_symlink_loop_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(ValueError, match="(?i)symlink loop"):  # relative: refused when the spec is read
        load_task_spec(_spec(tmp_path, "loop", "loop"))
    absolute = str(tmp_path / "loop")
    spec = load_task_spec(_spec(tmp_path, absolute, absolute))
    with pytest.raises(DataError, match="symlink") as err:
        load_task(spec)
    assert absolute in str(err.value)
    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    before = tree_digest(bank.path)
    with pytest.raises(DataError, match="symlink"):
        bank.add_task(spec, LoRAConfig(rank=2))
    assert tree_digest(bank.path) == before


# ---------------------------------------------------------------- forged safetensors files
def _file(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


_F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_FILES = {
    "too short": (b"\x01\x02", "too short"),
    "length beyond the file": (_file({"w": _F32x2}, b"\0" * 8, length=10_000), "header claims 10000 bytes"),
    "header bomb": (_file(b"{}", length=1 << 40), "header bomb"),
    "nested JSON": (_file(b'{"w": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"), "nested too deeply"),
    "not JSON": (_file(b"\xff{"), "not valid UTF-8 JSON"),
    "dtype": (_file({"w": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype 'U8'"),
    "unknown dtype": (_file({"w": {"dtype": "PY_OBJECT", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
                      "dtype 'PY_OBJECT'"),
    "special key": (_file({"w": _F32x2, "__loader__": {"x": 1}}, b"\0" * 8), "unexpected key '__loader__'"),
    "extra field": (_file({"w": _F32x2 | {"code": "x"}}, b"\0" * 8), "exactly the fields"),
    "offsets past the data": (_file({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
                              "outside the 8 data bytes"),
    "shape disagrees": (_file({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
                        "needs 12 bytes"),
    "overlap": (_file({"a": _F32x2, "b": _F32x2}, b"\0" * 8), "overlap"),
    "metadata": (_file({"__metadata__": {"k": ["nested"]}, "w": _F32x2}, b"\0" * 8), "__metadata__"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_forged_safetensors_file_is_refused_naming_file_and_problem(case: str, tmp_path: Path) -> None:
    blob, problem = BAD_FILES[case]
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    with pytest.raises(TensorFileError) as err:
        check_safetensors(path)
    assert str(path) in str(err.value) and problem in str(err.value), str(err.value)


def test_a_valid_file_passes_and_unexpected_names_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save

    path = tmp_path / "ok.safetensors"
    path.write_bytes(save({"w": torch.ones(2, 3), "n": torch.arange(4), "h": torch.zeros(2, dtype=torch.bfloat16)}))
    assert set(check_safetensors(path)) == {"w", "n", "h"}
    with pytest.raises(TensorFileError, match=r"unexpected \['h', 'n'\]"):
        check_safetensors(path, keys={"w"})


@pytest.mark.parametrize("case", ["length beyond the file", "header bomb", "dtype", "special key", "overlap"])
def test_bank_refuses_a_forged_tensor_file_before_reading_it(case: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile bank whose manifest agrees with the forged file (size and sha256): the header check stops it."""
    store = BankStore.create(tmp_path / "bank", base=BASE)
    store.write_task("t", {"adapter": {"w": torch.ones(2)}}, {})
    entry = store.task_entry("t")
    target = store.path / entry["dir"] / "adapter.safetensors"
    target.write_bytes(BAD_FILES[case][0])
    m = json.loads((store.path / "manifest.json").read_text())
    import hashlib

    st = target.stat()
    m["tasks"][0]["files"]["adapter.safetensors"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                     "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
    (store.path / "manifest.json").write_text(json.dumps(m))
    before = tree_digest(store.path)
    _no_tensor_reads(monkeypatch)
    with pytest.raises(BankCorruptError) as err:
        BankStore.open(store.path).read_tensors("t", "adapter", check="full")
    assert str(target) in str(err.value) and BAD_FILES[case][1] in str(err.value)
    assert tree_digest(store.path) == before


def test_bank_refuses_to_store_dtypes_it_would_not_read_back(tmp_path: Path) -> None:
    store = BankStore.create(tmp_path / "bank", base=BASE)
    with pytest.raises(TypeError, match="torch.uint8"):
        store.write_task("t", {"adapter": {"w": torch.ones(2, dtype=torch.uint8)}}, {})
    assert store.tasks() == []


# ---------------------------------------------------------------- expert folders: whole or absent
@pytest.fixture
def model() -> AdaptBankModel:
    m = AdaptBankModel(tiny_backbone("bert"))
    m.add_task("a", LoRAConfig(rank=2), ["x", "y"])
    return m


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def test_save_expert_refuses_a_non_empty_target_unless_replace(model: AdaptBankModel, tmp_path: Path) -> None:
    out = tmp_path / "experts" / "a"
    expert_io.save_expert(model, "a", out)
    with pytest.raises(FileExistsError, match="replace=True"):
        expert_io.save_expert(model, "a", out)
    (out / "stale.txt").write_text("from the old folder")
    expert_io.save_expert(model, "a", out, replace=True)
    assert not (out / "stale.txt").exists() and _siblings(out) == ["a"]
    empty = tmp_path / "experts" / "empty"
    empty.mkdir()
    expert_io.save_expert(model, "a", empty)  # an empty folder is no expert to lose
    assert (empty / "adapter_config.json").is_file()


@pytest.mark.parametrize("replace", [False, True])
def test_a_save_that_dies_midway_leaves_no_half_folder(model: AdaptBankModel, tmp_path: Path, replace: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "experts" / "a"
    if replace:
        expert_io.save_expert(model, "a", out)
    before = tree_digest(out.parent)
    real = expert_io.atomic_write_bytes
    calls = []

    def dies_after_the_first_file(path: Path, data: bytes, **kw: object) -> None:
        calls.append(path)
        if len(calls) > 1:
            raise KeyboardInterrupt("killed")  # not an Exception: the cleanup must still run
        real(path, data, **kw)

    monkeypatch.setattr(expert_io, "atomic_write_bytes", dies_after_the_first_file)
    with pytest.raises(KeyboardInterrupt):
        expert_io.save_expert(model, "a", out, replace=replace)
    assert len(calls) == 2 and tree_digest(out.parent) == before  # no temporary, the old folder intact
    other = AdaptBankModel(tiny_backbone("bert"))
    if replace:
        assert expert_io.load_expert(other, out).name == "a"
    else:
        assert not out.exists()
        with pytest.raises(FileNotFoundError, match="adapter_config.json"):
            expert_io.load_expert(other, out)
        assert other.tasks == {}


def test_load_expert_refuses_incomplete_or_forged_folders(model: AdaptBankModel, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = expert_io.save_expert(model, "a", tmp_path / "a")
    other = AdaptBankModel(tiny_backbone("bert"))
    _no_tensor_reads(monkeypatch)
    (out / "head.safetensors").rename(tmp_path / "head.safetensors")
    with pytest.raises(FileNotFoundError, match="head.safetensors"):
        expert_io.load_expert(other, out)
    (out / "head.safetensors").symlink_to(tmp_path / "head.safetensors")  # a link out of the folder
    with pytest.raises(ValueError, match="outside the expert folder"):
        expert_io.load_expert(other, out)
    (out / "head.safetensors").unlink()
    (out / "head.safetensors").write_bytes(BAD_FILES["dtype"][0])
    with pytest.raises(TensorFileError, match="head.safetensors.*dtype 'U8'"):
        expert_io.load_expert(other, out)
    (out / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="adapter_config.json: expected an object"):
        expert_io.load_expert(other, out)
    (out / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        expert_io.load_expert(other, out)
    assert other.tasks == {}


# ---------------------------------------------------------------- the writers' lock
_HOLD = ("import sys, time\nfrom adaptbank._atomic import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n")


@pytest.fixture
def held_bank(tmp_path: Path):
    """A bank with one task whose lock a child process holds; yields (store, child)."""
    store = BankStore.create(tmp_path / "bank", base=BASE)
    store.write_task("t", {"adapter": {"w": torch.ones(2)}}, {})
    child = subprocess.Popen([sys.executable, "-c", _HOLD, str(store.path / ".lock")], env=ENV,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        yield store, child
    finally:
        child.kill()
        child.wait()


def test_writer_times_out_naming_the_holder_pid(held_bank: tuple[BankStore, subprocess.Popen]) -> None:
    store, child = held_bank
    assert store.lock_timeout == DEFAULT_LOCK_TIMEOUT == 300
    before = tree_digest(store.path)
    writer = BankStore.open(store.path, lock_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(BankLockedError) as err:
        writer.write_task("u", {"adapter": {"w": torch.ones(2)}}, {})
    assert time.monotonic() - start < 3
    assert f"process {child.pid}" in str(err.value) and err.value.holder_pid == child.pid
    with pytest.raises(BankLockedError, match=str(child.pid)):
        writer.remove_task("t")
    assert tree_digest(store.path) == before and BankStore.open(store.path).tasks() == ["t"]


def test_cli_writers_take_lock_timeout(held_bank: tuple[BankStore, subprocess.Popen]) -> None:
    store, child = held_bank
    for command in (["add-task"], ["remove"], ["router", "fit"], ["verify"]):
        assert "--lock-timeout" in CliRunner().invoke(main, [*command, "--help"]).output, command
    before = tree_digest(store.path)
    for args in (["remove", str(store.path), "t"], ["verify", str(store.path), "--repair"]):
        res = CliRunner().invoke(main, [*args, "--lock-timeout", "0.3"])
        assert res.exit_code == 1 and str(child.pid) in res.output and "Traceback" not in res.output, res.output
    assert tree_digest(store.path) == before
