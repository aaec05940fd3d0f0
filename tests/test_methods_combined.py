"""Combinations of methods in one task (``CombinedConfig``: lora+adapter, bitfit+lora, prefix+lora, prompt+lora) on
tiny models of several families: a new combined task is the base model, mixed batches equal single-task
runs, parts on one layer follow the side order, merge folds the parts, a bank round trip is bit-exact,
the sizes are the sums of the parts, training on ``weather`` moves every part, and the errors."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import FAMILIES, tiny_backbone

from adaptbank import AdaptBankModel
from adaptbank.core.adapted import AdaptedLinear
from adaptbank.core.composed import ComposedExpert, expert_parts
from adaptbank.core.config import (
    AdapterConfig,
    BitFitConfig,
    CombinedConfig,
    IA3Config,
    LoRAConfig,
    PrefixConfig,
    PromptTuningConfig,
    PTuningV2Config,
    TrainConfig,
    method_from_dict,
    resolve_positions,
)
from adaptbank.core.experts import BitFitExpert, IA3Expert, IA3InputExpert, LoRAExpert
from adaptbank.core.inject import iter_adapted

PREFIX_FAMILIES = ["bert", "gpt2", "llama"]  # the families prefixes support
LABELS = ["x", "y"]
LORA = LoRAConfig(rank=3, dropout=0.0)
COMBOS = {
    "lora+adapter": CombinedConfig(parts=(LORA, AdapterConfig(bottleneck=4))),
    "bitfit+lora": CombinedConfig(parts=(BitFitConfig(), LORA)),
    "ia3+lora": CombinedConfig(parts=(IA3Config(), LORA)),
    "prefix+lora": CombinedConfig(parts=(PrefixConfig(prefix_length=3, reparam_hidden=8), LORA)),
}


def randomize(model: AdaptBankModel, name: str, seed: int = 0) -> None:
    """Non-trivial values in every part: (IA)^3 scales around 1, everything else around 0."""
    g = torch.Generator().manual_seed(seed)
    scales = {id(e.scale) for layer in model.layers_of(name).values() for _, e in expert_parts(layer.experts[name])
              if isinstance(e, (IA3Expert, IA3InputExpert))}
    with torch.no_grad():
        for p in model.expert_parameters(name):
            p.copy_((1.0 if id(p) in scales else 0.0) + torch.randn(p.shape, generator=g) * 0.3)


def features(model: AdaptBankModel, inputs: dict, task: str | None, rows: slice = slice(None)) -> torch.Tensor:
    model.route(task=task)
    return model.features(**{k: v[rows] for k, v in inputs.items()})


# ----------------------------------------------------------------------------- configs
def test_config_round_trips_and_reads_from_a_run_spec():
    from adaptbank.continual.runspec import run_spec_from_toml

    for cfg in COMBOS.values():
        assert cfg.kind == "+".join(p.kind for p in cfg.parts)
        assert method_from_dict(cfg.to_dict()) == cfg and CombinedConfig.from_dict(cfg.to_dict()) == cfg
    assert method_from_dict({"kind": "bitfit+lora"}) == CombinedConfig(parts=(BitFitConfig(), LoRAConfig()))
    spec = run_spec_from_toml('[run]\nname = "c"\ntasks = ["weather"]\n[method]\nkind = "lora+adapter"\n'
                              '[[method.parts]]\nrank = 4\n[[method.parts]]\nbottleneck = 16\n')
    assert spec.method == CombinedConfig(parts=(LoRAConfig(rank=4), AdapterConfig(bottleneck=16)))
    inline = run_spec_from_toml('[run]\nname = "c"\ntasks = ["weather"]\n[method]\n'
                                'parts = [{kind = "prefix", prefix_length = 5}, {kind = "lora"}]\n')
    assert inline.method == CombinedConfig(parts=(PrefixConfig(prefix_length=5), LoRAConfig()))
    assert spec.to_config()["method"]["parts"][1] == AdapterConfig(bottleneck=16).to_dict()


def test_config_errors_name_the_part_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"unknown part kind 'bogus' in method 'lora\+bogus'.*allowed part kinds: "
                                         r"lora, adapter, parallel-adapter, bitfit, ia3, prompt, prefix, ptuning-v2"):
        method_from_dict({"kind": "lora+bogus"})
    with pytest.raises(ValueError, match="part 1 of a combined method needs a kind from lora, adapter"):
        method_from_dict({"parts": [{"kind": "lora"}, {"kind": "bogus"}]})
    with pytest.raises(ValueError, match=r"part 0 \(lora\): rank must be a positive integer \(--rank\), got 0"):
        method_from_dict({"kind": "lora+adapter", "parts": [{"rank": 0}, {}]})
    with pytest.raises(ValueError, match=r"part 0 has kind 'adapter' but method kind 'lora\+adapter' puts 'lora'"):
        method_from_dict({"kind": "lora+adapter", "parts": [{"kind": "adapter"}, {}]})
    with pytest.raises(ValueError, match=r"parts 0 \(prefix\) and 1 \(ptuning-v2\) .* both prompt/prefix kinds"):
        CombinedConfig(parts=(PrefixConfig(), PTuningV2Config()))
    with pytest.raises(ValueError, match="at least two parts"):
        CombinedConfig(parts=(LoRAConfig(),))
    with pytest.raises(ValueError, match="is itself combined"):
        CombinedConfig(parts=(LoRAConfig(), COMBOS["bitfit+lora"]))


# ----------------------------------------------------------------------------- identity at the start
@pytest.mark.parametrize("family", FAMILIES)
def test_new_combined_task_is_bit_identical_to_the_base(family, inputs):
    model = AdaptBankModel(tiny_backbone(family))
    expected = features(model, inputs, None)
    for name in ("lora+adapter", "bitfit+lora", "ia3+lora"):
        model.add_task(name.replace("+", "-"), COMBOS[name], LABELS)
    both = [p for p, layer in iter_adapted(model.backbone)
            if "bitfit-lora" in layer.experts and isinstance(e := layer.experts["bitfit-lora"], ComposedExpert)
            and len(e.parts) == 2]
    assert both  # BitFit and LoRA really share layers (q and v)
    for task in model.tasks:
        assert torch.equal(features(model, inputs, task), expected), task
    model.route(task_ids=["lora-adapter", "bitfit-lora", "ia3-lora", "bitfit-lora"])  # the gathered path
    assert torch.equal(model.features(**inputs), expected)


# ----------------------------------------------------------------------------- mixed batches and the order
@pytest.mark.parametrize("family", PREFIX_FAMILIES)
def test_mixed_batch_rows_equal_their_single_task_runs(family, inputs):
    model = AdaptBankModel(tiny_backbone(family))
    tasks = {"la": COMBOS["lora+adapter"], "bl": COMBOS["bitfit+lora"], "pl": COMBOS["prefix+lora"], "l": LORA,
             "pr": CombinedConfig(parts=(PromptTuningConfig(prompt_length=2, prompt_init="random"), LORA))}
    for i, (name, cfg) in enumerate(tasks.items()):
        model.add_task(name, cfg, LABELS, seed=i)
        randomize(model, name, seed=i)
    model.eval()
    base = AdaptBankModel(tiny_backbone(family)).eval()
    for rows in (["pl", "la", "l", "bl"], ["pr", "pl", "bl", "pr"]):
        model.route(task_ids=rows)
        mixed = model.features(**inputs)
        for i, task in enumerate(rows):
            one = features(model, inputs, task, slice(i, i + 1))
            torch.testing.assert_close(mixed[i: i + 1], one, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(one, features(base, inputs, None, slice(i, i + 1)), atol=1e-4), task
    # top-2 with weights (1, 0) over two combined tasks: the second vanishes; the rows stay their own
    order = {n: i for i, n in enumerate(model.state.experts)}
    index = torch.tensor([[order["la"], order["bl"]], [order["bl"], order["la"]]] * 2)  # (B, 2)
    model.route(index=index, weight=torch.tensor([[1.0, 0.0]] * 4))
    got = model.features(**inputs)
    for i in range(4):
        torch.testing.assert_close(got[i: i + 1], features(model, inputs, ["la", "bl"][i % 2], slice(i, i + 1)),
                                   atol=1e-5, rtol=1e-5)


def test_routed_forward_sends_rows_to_combined_tasks_as_to_any_task(inputs):
    from adaptbank.core.pooling import mean_pool
    from adaptbank.routing.lda import LDARouter

    model = AdaptBankModel(tiny_backbone("bert")).eval()
    model.reserved_layers = 1  # the router reads the embeddings and layer 0
    for i, (name, cfg) in enumerate({"pl": COMBOS["prefix+lora"], "l": LORA, "bl": COMBOS["bitfit+lora"],
                                     "la": COMBOS["lora+adapter"]}.items()):
        model.add_task(name, cfg, LABELS, seed=i)
        randomize(model, name, seed=i)
    assert all(not p.startswith("encoder.layer.0.") for t in model.tasks.values() for p in t.paths)
    with torch.no_grad():
        hidden = model.encoder(**inputs, output_hidden_states=True).hidden_states
        feats = torch.cat([mean_pool(h, inputs["attention_mask"]) for h in hidden[:2]], -1)  # (B, 2 D)
    want = [2, 0, 3, 1]  # row b goes to task want[b]: scores = 10 * one-hot
    weight = (torch.linalg.pinv(feats) @ (10 * torch.eye(4)[want])).T  # (E, F)
    model.attach_router(LDARouter(list(model.tasks), weight, torch.zeros(4), layers=1), top_k=1)
    out = model(**inputs, routed=True)
    assert out.tasks == tuple(list(model.tasks)[w] for w in want)
    for i, task in enumerate(out.tasks):
        torch.testing.assert_close(out.pooled[i: i + 1], features(model, inputs, task, slice(i, i + 1)),
                                   atol=1e-5, rtol=0)


def test_parts_on_one_layer_follow_the_side_order():
    """ia3 + bitfit + lora + adapter on one Linear: ``up(f(down(h))) + h`` with ``h = l * (W x + b) +
    s B A x + b_task``, on the single path and as a row of a mixed batch."""
    from adaptbank.routing.state import RoutingState

    torch.manual_seed(0)
    state = RoutingState(experts=("c", "other"))
    lin = torch.nn.Linear(6, 6)
    layer = AdaptedLinear(lin, state)
    cfgs = {0: (AdapterConfig(bottleneck=3), False), 1: (LoRAConfig(rank=2, dropout=0.0), False),
            2: (BitFitConfig(), False), 3: (IA3Config(), False)}
    expert = layer.add_parts("c", cfgs)
    layer.add_expert("other", LoRAConfig(rank=2, dropout=0.0))
    with torch.no_grad():
        for key, p in layer.experts.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.4 + (1 if key.endswith("scale") else 0))
    assert list(expert.kinds.values()) == ["ia3", "lora", "bitfit", "adapter"]  # scale, input (by index), output
    ad, lo, bf, ia = (expert.parts[str(i)] for i in range(4))
    x = torch.randn(2, 5, 6)
    h = ia.scale * lin(x) + lo.scaling * (x @ lo.A.T @ lo.B.T) + bf.delta
    want = h + ad.delta(h)
    state.use("c")
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    state.route(torch.tensor([0, 1]))  # row 0: the combined task, row 1: the other
    torch.testing.assert_close(layer(x)[:1], want[:1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
@pytest.mark.parametrize("combo", ["bitfit+lora", "ia3+lora"])
def test_merge_folds_every_part_and_unmerge_restores(family, combo, inputs):
    model = AdaptBankModel(tiny_backbone(family))
    model.add_task("c", COMBOS[combo], LABELS)
    randomize(model, "c")
    objects = {p: (layer.base.weight, layer.base.bias) for p, layer in iter_adapted(model.backbone)}
    unmerged = features(model, inputs, "c")
    model.merge("c")
    torch.testing.assert_close(model.features(**inputs), unmerged, atol=1e-5, rtol=0)
    model.unmerge()
    for p, layer in iter_adapted(model.backbone):
        assert layer.base.weight is objects[p][0] and layer.base.bias is objects[p][1]
    assert torch.equal(features(model, inputs, "c"), unmerged)


# ----------------------------------------------------------------------------- sizes and storage
def _count(model: AdaptBankModel, name: str) -> int:
    return sum(p.numel() for p in model.expert_parameters(name))


@pytest.mark.parametrize("family", PREFIX_FAMILIES)
def test_trainable_parameters_are_the_sum_of_the_parts(family):
    model = AdaptBankModel(tiny_backbone(family))
    for combo, cfg in COMBOS.items():
        model.add_task(combo.replace("+", "-"), cfg, LABELS)
        for i, part in enumerate(cfg.parts):
            model.add_task(f"{combo.replace('+', '-')}-{i}", part, LABELS)
        assert _count(model, combo.replace("+", "-")) == sum(_count(model, f"{combo.replace('+', '-')}-{i}")
                                                             for i in range(len(cfg.parts)))
    if family == "bert":  # the closed forms: L layers, H hidden, F feed-forward, r rank, m bottleneck
        c = model.backbone.config
        L, H, F, r, m, P, h = c.num_hidden_layers, c.hidden_size, c.intermediate_size, 3, 4, 3, 8
        lora = L * 2 * r * (H + H)  # q and v: A (r, H) and B (H, r)
        assert _count(model, "lora-adapter") == lora + L * (m * H + m + H * m + H)  # down, up on ffn_out
        assert _count(model, "bitfit-lora") == L * (5 * H + F) + lora  # a bias delta on every linear
        assert _count(model, "ia3-lora") == L * (2 * H + F) + lora  # k, v out; ffn_out in
        assert _count(model, "prefix-lora") == P * H + H * h + h + h * L * 2 * H + L * 2 * H + lora
        model.finalize("prefix-lora")
        assert _count(model, "prefix-lora") == L * 2 * P * H + lora  # stored: the collapsed prefixes


def test_combined_tasks_round_trip_through_the_bank_bit_exact(tiny_bert_dir, tmp_path):
    from adaptbank.bank.facade import AdapterBank

    fast = TrainConfig(epochs=1, max_train=48, max_test=24, max_length=24, lr=5e-3)
    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    names = {"weather": "lora+adapter", "topic": "bitfit+lora", "intent": "prefix+lora"}
    for name, combo in names.items():
        bank.add_task(name, COMBOS[combo], fast)
    model = bank.load()
    for name, combo in names.items():
        want = resolve_positions(COMBOS[combo], decoder=False)  # a prefix part's auto positions: from-zero on BERT
        assert bank.info(name)["method"] == want.to_dict()
        assert model.tasks[name].method == want
        stored = bank.store.read_tensors(name, "adapter")
        loaded = model.export_task(name)["adapter"]
        assert set(stored) == set(loaded) and all(torch.equal(stored[k], loaded[k]) for k in stored)
        prefixes = {f"{i}.{p.kind}." for i, p in enumerate(COMBOS[combo].parts)}
        assert {k[: k.index(".", 2) + 1] for k in stored} == prefixes  # every part stored, under its prefix
        assert not any(name in k for k in stored)
        assert bank.info(name)["metrics"]["trainable_params"] == sum(v.numel() for v in stored.values())
    assert "0.prefix.prefix.key" in bank.store.read_tensors("intent", "adapter")  # collapsed, not the MLP
    assert bank.evaluate() == {t: bank.info(t)["metrics"]["test_accuracy"] for t in bank.tasks()}
    from adaptbank.bank.graph import bank_graph

    graph = bank_graph(bank)
    assert {graph.nodes[f"task:{n}"]["method"] for n in names} == set(names.values())


@pytest.mark.parametrize("family", PREFIX_FAMILIES)
def test_save_expert_and_load_expert_round_trip_bit_exact(family, tmp_path, inputs):
    from adaptbank.bank.expert_io import load_expert, save_expert

    model = AdaptBankModel(tiny_backbone(family))
    model.add_task("a", COMBOS["prefix+lora"], LABELS)
    model.add_task("b", COMBOS["ia3+lora"], LABELS)
    for name in ("a", "b"):
        randomize(model, name)
        model.finalize(name)
        save_expert(model, name, tmp_path / name)
    other = AdaptBankModel(tiny_backbone(family))
    for name in ("b", "a"):  # another order: the files do not depend on the expert order
        load_expert(other, tmp_path / name, name=f"{name}2")
    for name in ("a", "b"):
        saved, loaded = model.export_task(name), other.export_task(f"{name}2")
        for part in ("adapter", "head"):
            assert set(saved[part]) == set(loaded[part])
            assert all(torch.equal(saved[part][k], loaded[part][k]) for k in saved[part])
        assert torch.equal(features(model, inputs, name), features(other, inputs, f"{name}2"))


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("combo", ["lora+adapter", "bitfit+lora", "prefix+lora"])
def test_training_on_weather_moves_every_part_and_beats_chance(combo, tiny_bert_dir):
    from adaptbank.core.backbone import load_backbone
    from adaptbank.data.builtin import generate
    from adaptbank.training.evaluate import evaluate
    from adaptbank.training.loop import train_task

    model = AdaptBankModel(load_backbone(str(tiny_bert_dir)))
    cfg = COMBOS[combo] if combo != "prefix+lora" else CombinedConfig(parts=(PrefixConfig(prefix_length=8,
                                                                                         reparam_hidden=32), LORA))
    model.add_task("weather", cfg, ["sunny", "rainy", "snowy", "windy"], seed=0)
    base = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if ".experts." not in n}
    start = model.export_task("weather")["adapter"]
    train = generate("weather", "train", 240)
    test = generate("weather", "test", 120)
    # no probe head: training starts from a random head at chance and must learn
    tc = TrainConfig(epochs=6, lr=3e-2, head_lr=1e-1, warmup=0.0, batch_size=16, max_length=32, probe_init=False)
    train_task(model, "weather", [t for t, _ in train], [y for _, y in train], tc)
    acc = evaluate(model, "weather", [t for t, _ in test], [y for _, y in test], max_length=32)
    assert acc > 0.25 + 0.15, acc  # four balanced classes: chance is 0.25
    after = model.export_task("weather")["adapter"]
    assert set(after) == set(start)
    moved = {k for k in start if not torch.equal(start[k], after[k])}
    assert moved == set(start)  # every tensor of every part trained
    assert {k.split(".")[1] for k in moved} == {p.kind for p in cfg.parts}
    for n, p in model.backbone.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # the base weights are bit-identical


# ----------------------------------------------------------------------------- errors
def test_parts_that_cannot_compose_on_one_layer_are_refused(inputs):
    model = AdaptBankModel(tiny_backbone("bert"))
    before = {n for n, _ in model.backbone.named_modules()}
    two_loras = CombinedConfig(parts=(LoRAConfig(targets="qv"), LoRAConfig(targets="attn")))
    with pytest.raises(ValueError, match=r"parts 0 \(lora\) and 1 \(lora\) of method 'lora\+lora' both put a "
                                         r"LoRAExpert on layer encoder\.layer\.0\.attention\.self\.query"):
        model.add_task("c", two_loras, LABELS)
    two_adapters = CombinedConfig(parts=(AdapterConfig(targets="pfeiffer"), AdapterConfig(targets="houlsby")))
    with pytest.raises(ValueError, match=r"parts 0 \(adapter\) and 1 \(adapter\) .* SerialAdapterExpert on layer "
                                         r"encoder\.layer\.0\.output\.dense"):
        model.add_task("c", two_adapters, LABELS)
    assert not model.tasks and {n for n, _ in model.backbone.named_modules()} == before  # nothing wrapped
    # two LoRAs on disjoint layers compose: one task, each layer one part
    model.add_task("ok", CombinedConfig(parts=(LoRAConfig(targets="qv"), LoRAConfig(targets="ffn"))), LABELS)
    kinds = {type(e) for layer in model.layers_of("ok").values() for _, e in expert_parts(layer.experts["ok"])}
    assert kinds == {LoRAExpert}
    t5 = AdaptBankModel(tiny_backbone("t5"))  # prefixes are not supported there: the linear parts go again
    with pytest.raises(ValueError, match="do not support model family 't5'"):
        t5.add_task("pl", COMBOS["prefix+lora"], LABELS)
    assert not t5.tasks and all(not layer.experts for _, layer in iter_adapted(t5.backbone))


def test_merge_of_a_combination_that_cannot_fold_is_refused(inputs):
    model = AdaptBankModel(tiny_backbone("bert"))
    model.add_task("pl", COMBOS["prefix+lora"], LABELS)
    model.add_task("la", COMBOS["lora+adapter"], LABELS)
    with pytest.raises(TypeError, match=r"task 'pl' uses 'prefix\+lora', whose prefix part cannot be folded "
                                        r"\(a prompt/prefix acts outside the weights\)"):
        model.merge("pl")
    with pytest.raises(TypeError, match=r"whose adapter part cannot be folded"):
        model.merge("la")
    assert model.merged is None and all(layer.merged is None for _, layer in iter_adapted(model.backbone))
    with pytest.raises(ValueError, match="--share-a works with LoRA only, not 'bitfit\\+lora'"):
        model.add_task("s", COMBOS["bitfit+lora"], LABELS, shared_group="g")


def test_cli_method_takes_combinations_and_names_the_allowed_kinds(tmp_path):
    from adaptbank.cli.bank_commands import _method_config
    from adaptbank.cli.main import main

    bank = tmp_path / "bank"
    res = CliRunner().invoke(main, ["add-task", str(bank), "weather", "--method", "lora+bogus"])
    assert res.exit_code == 2, res.output
    assert "unknown part kind 'bogus'" in res.output
    assert "lora, adapter, parallel-adapter, bitfit, ia3, prompt, prefix, ptuning-v2" in res.output
    res = CliRunner().invoke(main, ["add-task", str(bank), "weather", "--method", "lora+adapter", "--targets", "qv"])
    assert res.exit_code == 2 and "--targets does not apply to the combined --method lora+adapter" in res.output
    res = CliRunner().invoke(main, ["add-task", str(bank), "weather", "--method", "bitfit+lora", "--prefix-length", "3"])
    assert res.exit_code == 2 and "--prefix-length does not apply to --method bitfit+lora" in res.output
    assert not bank.exists()
    none = {"prompt_length": None, "prompt_init": None, "prefix_length": None}
    assert _method_config("lora+adapter", None, 4, prompt=none, alpha=8.0, dropout=None) == CombinedConfig(
        parts=(LoRAConfig(rank=4, alpha=8.0), AdapterConfig()))  # --rank goes to the LoRA part
    assert _method_config("adapter+bitfit", None, 4, prompt=none, alpha=None, dropout=None) == CombinedConfig(
        parts=(AdapterConfig(bottleneck=4), BitFitConfig()))
    assert _method_config("prefix+lora", None, None, prompt=none | {"prefix_length": 6}, alpha=None,
                          dropout=None) == CombinedConfig(parts=(PrefixConfig(prefix_length=6), LoRAConfig()))


def test_cli_add_task_trains_a_combined_task(tiny_bert_dir, tmp_path):
    import json

    from adaptbank.cli.main import main

    bank = tmp_path / "bank"
    assert CliRunner().invoke(main, ["init", str(bank), "--base", str(tiny_bert_dir)]).exit_code == 0
    res = CliRunner().invoke(main, ["add-task", str(bank), "weather", "--method", "bitfit+lora", "--rank", "2",
                                    "--epochs", "1", "--max-train", "32", "--max-test", "16", "--max-length", "24",
                                    "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    listed = CliRunner().invoke(main, ["list", str(bank), "--json"])
    assert json.loads(listed.output)["tasks"][0]["method"] == "bitfit+lora"
    from adaptbank.bank.facade import AdapterBank

    method = AdapterBank.open(bank).info("weather")["method"]
    assert method == CombinedConfig(parts=(BitFitConfig(), LoRAConfig(rank=2))).to_dict()
    assert summary["trainable_params"] > 0
    assert {type(e) for layer in AdapterBank.open(bank).load().layers_of("weather").values()
            for _, e in expert_parts(layer.experts["weather"])} == {BitFitExpert, LoRAExpert}


def test_gradient_diagnostics_group_each_part_and_suggest_the_lora_rank():
    from adaptbank.training.diagnostics import parameter_groups, rank_suggestions

    model = AdaptBankModel(tiny_backbone("bert"))
    model.add_task("c", COMBOS["bitfit+lora"], LABELS)
    randomize(model, "c")
    groups = parameter_groups(model, "c")
    q = "encoder.layer.0.attention.self.query"
    assert {f"0.bitfit.{q}.delta", f"1.lora.{q}.A", f"1.lora.{q}.B", "head"} <= set(groups)
    trained = {id(p) for p in model.expert_parameters("c")}
    assert {id(p) for k, ps in groups.items() if k != "head" for p in ps} == trained  # every part, once
    ranks = rank_suggestions(model, "c")
    assert ranks is not None and ranks["rank"] == LORA.rank and f"1.lora.{q}" in ranks["per_layer"]
