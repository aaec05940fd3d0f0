"""Router confidence and ambiguity: the routed-vs-oracle gap split adds up exactly (property test),
ambiguous pairs are found by overlap and by shared texts, and on a real bank two tasks asked of the
same texts come out as an ambiguous pair whose inputs carry both tasks' answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptbank.routing.ambiguity import AMBIGUOUS_PAIR, ambiguous_pairs, gap_split

TASKS = ["a", "b", "c"]
outcome = st.tuples(st.integers(0, 1), st.integers(0, 1), st.sampled_from(TASKS), st.booleans())


@settings(max_examples=200, deadline=None)
@given(st.lists(outcome, min_size=1, max_size=40), st.booleans())
def test_the_gap_split_adds_up_to_routed_minus_oracle(outcomes, b_ambiguous):
    pairs = [{"tasks": ["a", "b"], "overlap": 0.3, "shared_texts": 0, "ambiguous": b_ambiguous}]
    s = gap_split(outcomes, "a", pairs)
    parts = s["oracle"] - s["loss_ambiguous"] - s["loss_other"] - s["loss_mixing"] + s["gain"]
    assert abs(parts - s["routed"]) < 1e-12 and abs(s["expert_error"] - (1 - s["oracle"])) < 1e-12
    lost_to_b = sum(o and not r and t == "b" and not right for o, r, t, right in outcomes) / len(outcomes)
    assert s["loss_ambiguous"] == (lost_to_b if b_ambiguous else 0.0)


def test_pairs_are_ambiguous_by_overlap_or_by_a_shared_text():
    mass = {"a": {"a": 0.8, "b": 0.2, "c": 0.0}, "b": {"a": 0.1, "b": 0.9, "c": 0.0},
            "c": {"a": 0.004, "b": 0.0, "c": 0.996}}
    texts = {"a": ["Great film", "dull"], "b": ["great  FILM", "x"], "c": ["y", "dull"]}
    pairs = ambiguous_pairs(mass, texts)
    assert [p["tasks"] for p in pairs] == [["a", "b"], ["a", "c"]]  # b~c: no overlap, nothing shared: not listed
    ab, ac = pairs
    assert ab["overlap"] == pytest.approx(0.15) and ab["shared_texts"] == 1 and ab["ambiguous"]
    assert ac["overlap"] < AMBIGUOUS_PAIR and ac["shared_texts"] == 1 and ac["ambiguous"]  # "dull" in both
    with pytest.raises(ValueError, match="task 'a': no test outcomes"):
        gap_split([], "a", pairs)


def _same_texts_task(tmp_path: Path, name: str, flip: int) -> Path:
    """A task over the built-in weather texts with its own labels: two such tasks ask different questions
    of the very same inputs."""
    from adaptbank.data.load import load_task

    data = load_task("weather", max_train=60, max_test=20, seed=0)
    folder = tmp_path / name
    folder.mkdir()
    for split, rows in (("train", data.train), ("test", data.test)):
        lines = [json.dumps({"text": e.text, "label": (i // flip) % 2}) + "\n" for i, e in enumerate(rows)]
        (folder / f"{split}.jsonl").write_text("".join(lines))
    spec = tmp_path / f"{name}.toml"
    spec.write_text(f'name = "{name}"\ntype = "classification"\n[data]\ntrain = "{name}/train.jsonl"\n'
                    f'test = "{name}/test.jsonl"\nlabels = ["no", "yes"]\n')
    return spec


def test_two_tasks_of_the_same_texts_are_an_ambiguous_pair_and_answer_both(tiny_bert_dir, tmp_path):
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.cli.main import main
    from adaptbank.core.config import LoRAConfig, RouterConfig, TrainConfig
    from adaptbank.routing.predict import predict

    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir), router=RouterConfig(layers=1))
    fast = TrainConfig(epochs=1, max_train=60, max_test=20, max_length=24)
    for spec in (_same_texts_task(tmp_path, "left", 1), _same_texts_task(tmp_path, "right", 2), "topic"):
        bank.add_task(spec, LoRAConfig(rank=2), fast)
    res = bank.evaluate_routed()
    pair = next(p for p in res["ambiguity"]["pairs"] if p["tasks"] == ["left", "right"])
    assert pair["ambiguous"] and pair["shared_texts"] == 20 and pair["overlap"] > 0.2, pair
    assert res["ambiguity"]["pairs"][0] is pair  # the pair of the same texts overlaps most
    assert all(p["shared_texts"] == 0 for p in res["ambiguity"]["pairs"] if "topic" in p["tasks"])
    for row in res["tasks"].values():
        s = row["gap_split"]
        assert s["oracle"] == row["oracle_accuracy"] and s["routed"] == row["routed_accuracy"]
        assert abs(s["oracle"] - s["loss_ambiguous"] - s["loss_other"] - s["loss_mixing"] + s["gain"] - s["routed"]) < 1e-12
    model = bank.load_routed()
    texts = [json.loads(line)["text"] for line in (tmp_path / "left" / "test.jsonl").read_text().splitlines()]
    mine = [(t, q) for t, q in zip(texts, predict(model, texts, max_length=24)) if q.task in ("left", "right")]
    assert mine  # (the tiny model's router sends some weather texts to topic)
    text, p = mine[0]
    assert p.ambiguous and abs(sum(p.task_probabilities.values()) - 1) < 1e-5
    alt = p.alternative
    assert alt is not None and {p.task, alt["task"]} == {"left", "right"}
    assert alt["probability"] == p.task_probabilities[alt["task"]] >= 0.2 and alt["label"] in ("no", "yes")
    oracle = predict(model, [text], task=alt["task"], max_length=24)[0]  # the runner-up's answer is its oracle one
    assert (oracle.label, round(oracle.score, 5)) == (alt["label"], round(alt["score"], 5))
    (sure,) = predict(model, ["the weather is"], max_length=24, ambiguous_at=1.0)
    assert sure.alternative is None and not sure.ambiguous
    assert sure.router_probability == max(sure.task_probabilities.values())
    (forced,) = predict(model, [text], max_length=24, ambiguous_at=1.0, explain=True)  # explain: the runner-up anyway
    assert not forced.ambiguous and forced.alternative is not None and forced.alternative["task"] == alt["task"]
    out = CliRunner().invoke(main, ["predict", str(tmp_path / "bank"), text, "--json"])
    assert out.exit_code == 0, out.output
    line = json.loads(out.output.splitlines()[-1])
    assert line["ambiguous"] and line["alternative"]["task"] in ("left", "right") and len(line["router_top"]) == 3
    shown = CliRunner().invoke(main, ["eval", str(tmp_path / "bank"), "--routed"])
    assert shown.exit_code == 0 and "left~right" in shown.output and "gap split (mean over tasks)" in shown.output


def test_unreadable_inputs_and_a_one_task_bank_are_noted(tiny_bert_dir, tmp_path):
    """Text in a script the tokenizer does not know is read as unknown tokens: the answer says its routing
    is a guess; a bank of one task routes every input to it and says that no routing happened; an empty
    input is refused naming it. Readable text in a bank of two tasks carries no note."""
    from transformers import AutoTokenizer

    from adaptbank.bank.facade import AdapterBank
    from adaptbank.cli.main import main
    from adaptbank.core.config import LoRAConfig, RouterConfig, TrainConfig
    from adaptbank.routing.predict import ONE_TASK_NOTE, input_notes, predict

    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir), router=RouterConfig(layers=1))
    bank.add_task("weather", LoRAConfig(rank=2), TrainConfig(epochs=1, max_train=40, max_test=10, max_length=24))
    foreign, plain = "東京の天気は晴れです", "the weather is sunny today"
    alone, readable = predict(bank.load_routed(), [foreign, plain], max_length=24)
    assert alone.task == readable.task == "weather"
    assert ONE_TASK_NOTE in readable.notes and len(readable.notes) == 1
    assert any("unknown to the tokenizer" in n and "guesses" in n for n in alone.notes), alone.notes
    out = CliRunner().invoke(main, ["predict", str(tmp_path / "bank"), foreign, plain, "--json"])
    assert out.exit_code == 0, out.output
    assert out.output.count(ONE_TASK_NOTE) == 3  # once on stderr, in both JSON lines
    assert "warning: input 1:" in out.output and "warning: input 2:" not in out.output
    empty = CliRunner().invoke(main, ["predict", str(tmp_path / "bank"), plain, "  "])
    assert empty.exit_code != 0 and "input 2 is empty" in empty.output

    bank.add_task("topic", LoRAConfig(rank=2), TrainConfig(epochs=1, max_train=40, max_test=10, max_length=24))
    guess, clear = predict(bank.load_routed(), [foreign, plain], max_length=24)
    assert clear.notes == [] and len(guess.notes) == 1
    (oracle,) = predict(bank.load_routed(), [foreign], task="topic", max_length=24)
    assert oracle.notes and "the answer is a guess" in oracle.notes[0]  # no routing: only the answer is

    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    the, unk, cls, sep = tok.convert_tokens_to_ids(["the", "[UNK]", "[CLS]", "[SEP]"])
    assert the != unk
    assert input_notes(tok, [cls, unk, the, the, sep], True, 2) == []  # 1 unknown of 3 real tokens: below half
    assert input_notes(tok, [cls, unk, unk, the, sep], True, 2)  # 2 of 3
    assert input_notes(tok, [cls, sep], True, 2) == []  # no real token: nothing to judge
