"""Resource limits (issue 15, item 5): ``predict --input`` is streamed in chunks (so its memory does not
grow with the file; measured by ``bench/predict_memory.py``), and specs and data files larger than what
adaptbank reads whole into memory are refused before they are read, naming size and limit."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from adaptbank.bank.facade import AdapterBank
from adaptbank.cli import routing_commands
from adaptbank.cli.inputs import iter_jsonl_texts
from adaptbank.cli.main import main
from adaptbank.core.config import LoRAConfig, TrainConfig
from adaptbank.data.load import DataError, read_jsonl

FAST = TrainConfig(epochs=1, max_train=60, max_test=30, max_length=32, lr=5e-3)
TEXTS = ["snow all night in the hills", "wake me at seven", "sunny and warm", "play some jazz", "heavy rain",
         "what time is it"]


@pytest.fixture
def bank(tiny_bert_dir, tmp_path) -> AdapterBank:
    b = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    for task in ("weather", "intent"):
        b.add_task(task, LoRAConfig(rank=4), FAST)
    return b


def test_predict_input_is_streamed_in_chunks_and_equals_one_call(bank, tmp_path, monkeypatch):
    runner = CliRunner()
    whole = runner.invoke(main, ["predict", str(bank.path), *TEXTS, "--json"])
    assert whole.exit_code == 0, whole.output
    good = tmp_path / "in.jsonl"
    good.write_text("".join(json.dumps({"text": t}) + "\n" + ("\n" if i == 2 else "") for i, t in enumerate(TEXTS)))
    monkeypatch.setattr(routing_commands, "PREDICT_CHUNK", 4)  # six inputs: chunks of 4 and 2
    streamed = runner.invoke(main, ["predict", str(bank.path), "--input", str(good), "--json"])
    assert streamed.exit_code == 0, streamed.output
    assert [json.loads(r) for r in streamed.stdout.splitlines()] == [json.loads(r) for r in whole.stdout.splitlines()]
    # a bad line late in the file: the chunks before it were answered (streamed), then a clear error
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(t) + "\n" for t in TEXTS[:5]) + "{not json\n")
    res = runner.invoke(main, ["predict", str(bank.path), "--input", str(bad), "--json"])
    assert res.exit_code != 0 and f"{bad}:6: invalid JSON" in res.output and "Traceback" not in res.output
    assert len(res.stdout.splitlines()) == 4  # the first chunk's 4 rows came out before line 6 was read
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    res = runner.invoke(main, ["predict", str(bank.path), "--input", str(blank)])
    assert res.exit_code != 0 and "no inputs" in res.output


def test_input_lines_are_read_lazily_and_a_huge_line_is_refused(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('"first"\n' + "x" * 200 + "\n")
    texts = iter_jsonl_texts(path, max_line=64)
    assert next(texts) == "first"  # the over-long second line has not been read yet
    with pytest.raises(Exception, match=r"in.jsonl:2: line longer than 64 bytes"):
        next(texts)


def test_a_data_file_over_the_limit_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(50)))
    assert len(read_jsonl(path, ("a", "b"))) == 50
    monkeypatch.setenv("ADAPTBANK_MAX_DATA_BYTES", "100")
    size = path.stat().st_size
    with pytest.raises(DataError, match=rf"data file .*train.jsonl is {size:,} bytes, more than the 100 .*"
                                        r"ADAPTBANK_MAX_DATA_BYTES"):
        read_jsonl(path, ("a", "b"))
    monkeypatch.setenv("ADAPTBANK_MAX_DATA_BYTES", "lots")
    with pytest.raises(ValueError, match=r"ADAPTBANK_MAX_DATA_BYTES must be a positive integer .*'lots'"):
        read_jsonl(path, ("a", "b"))


def test_task_and_run_specs_over_one_mib_are_refused(tmp_path):
    from adaptbank.continual.runspec import load_run_spec
    from adaptbank.data.specs import load_task_spec

    padding = "# " + "x" * 1000 + "\n"
    task = tmp_path / "big.toml"
    task.write_text('name = "big"\n' + padding * 1100)
    with pytest.raises(ValueError, match=r"task spec .*big.toml is 1,1\d\d,\d\d\d bytes, more than the 1,048,576"):
        load_task_spec(task)
    run = tmp_path / "bigrun.toml"
    run.write_text(padding * 1100)
    with pytest.raises(ValueError, match=r"run spec .*bigrun.toml is .* bytes, more than the 1,048,576"):
        load_run_spec(run)
