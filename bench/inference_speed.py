"""Inference cost of unmerged and merged experts over the base forward: adaptbank beside peft, one run.

all-MiniLM-L6-v2, one batch of ``--batch`` (64) texts padded to ``--max-length`` (128) tokens, under
``torch.no_grad``; every variant is its own copy of the same frozen weights holding one LoRA (r 8, alpha
16, B random so the update is not zero) in every layer:

* ``base``: the plain transformers model;
* ``adaptbank q+v`` / ``adaptbank all-linear``: the expert unmerged, ``route(task=...)`` then the
  encoder's forward; ``adaptbank merged``: ``merge`` of the q+v expert, then the same forward;
* ``peft q+v`` / ``peft all-linear``: ``get_peft_model`` with the same targets, unmerged;
  ``peft merged``: ``merge_and_unload()`` of the q+v model.

Every side computes the last hidden states of the same inputs (no pooling, no head); the script checks
that adaptbank and peft agree (the same A and B are copied into both) before timing. Variants are
timed round-robin (``_common.interleaved``: medians of ``--repeats`` after ``--warmup`` rounds), and the
table gives each one's cost over ``base``. Quiet machine only (``_common.announce_load``).

Wall time on this machine varies by a few percent between rounds, more than the q+v expert costs,
so the script also accounts for the expert's work op by op: three rounds of one forward per variant
under ``torch.profiler`` (the median is reported), and for every aten op the calls beyond the base forward's times that op's mean
self time (the LoRA ``mm``/``addmm_``, peft's ``linear``/``mul``/``add``...). "added ops over base" is
that sum over the base forward's total op time: what the expert adds, without the noise of the big
matmuls it does not touch.

Usage::

    python bench/inference_speed.py --json bench/results/inference_speed.json
    python bench/inference_speed.py --quick      # smoke: batch 8, 32 tokens, 2 repeats
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

from _common import announce_load, environment, interleaved, setup_torch, table, write_json

TARGETS = {"q+v": "qv", "all-linear": "all-linear"}
"""Label -> adaptbank's target preset; peft gets the very modules adaptbank wrapped."""


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="batch 8, 32 tokens, 2 repeats, 1 warm-up")
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.quick:
        args.batch, args.max_length, args.repeats, args.warmup = 8, 32, 2, 1
    setup_torch(args.threads)
    import torch
    from peft import LoraConfig, get_peft_model

    from adaptbank import AdaptBankModel, LoRAConfig, load_backbone
    from adaptbank.core.backbone import Backbone

    quiet = announce_load()
    base = load_backbone()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.max_length), generator=g)  # (B, T)
    mask = torch.ones_like(ids)  # (B, T)
    fns: dict[str, Any] = {}
    outputs: dict[str, torch.Tensor] = {}

    def plain(model: torch.nn.Module) -> Any:
        return lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, D)

    def routed(ab: AdaptBankModel) -> Any:
        def run() -> torch.Tensor:
            ab.route(task="t")
            return ab.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, D)
        return run

    def holding(preset: str) -> AdaptBankModel:
        ab = AdaptBankModel(Backbone(base.name, copy.deepcopy(base.model), base.tokenizer, base.path)).eval()
        ab.add_task("t", LoRAConfig(targets=preset), ["a", "b"], seed=0)
        return ab

    fns["base"] = plain(copy.deepcopy(base.model))  # a copy like every other variant's weights
    for label, preset in TARGETS.items():
        ab = holding(preset)
        with torch.no_grad():
            for layer in ab.layers_of("t").values():
                layer.experts["t"].B.normal_(0, 0.02, generator=g)
        fns[f"adaptbank {label}"] = routed(ab)
        pm = get_peft_model(copy.deepcopy(base.model), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                                  target_modules=list(ab.layers_of("t"))))
        pm.eval()
        with torch.no_grad():  # the same A and B in both libraries, on the same modules
            for path, layer in ab.layers_of("t").items():
                mod = pm.get_submodule(f"base_model.model.{path}")
                mod.lora_A["default"].weight.copy_(layer.experts["t"].A)
                mod.lora_B["default"].weight.copy_(layer.experts["t"].B)
        fns[f"peft {label}"] = plain(pm)
        if label == "q+v":
            merged = holding(preset)
            merged.load_state_dict(ab.state_dict())
            merged.merge("t")
            fns["adaptbank merged"] = routed(merged)
            fns["peft merged"] = plain(copy.deepcopy(pm).merge_and_unload())
    with torch.no_grad():
        for k, fn in fns.items():
            outputs[k] = fn()
        agree = {label: float((outputs[f"adaptbank {label}"] - outputs[f"peft {label}"]).abs().max()) for label in TARGETS}
        agree["merged"] = float((outputs["adaptbank merged"] - outputs["adaptbank q+v"]).abs().max())
        effect = {label: float((outputs[f"adaptbank {label}"] - outputs["base"]).abs().max()) for label in TARGETS}
        print("max |adaptbank - peft| of the outputs:", {k: f"{v:.1e}" for k, v in agree.items()},
              "; max |expert - base| (the experts do change the output):", {k: f"{v:.1e}" for k, v in effect.items()},
              flush=True)
        times = interleaved(fns, args.repeats, args.warmup)
        added = added_op_share(fns)
    rows = [[k, times[k], args.batch / times[k], times[k] / times["base"], added[k]] for k in fns]
    print(table(["variant", "s per batch", "ex/s", "cost over base", "added ops over base"], rows))
    for label in TARGETS:
        print(f"{label}: adaptbank / peft time {times[f'adaptbank {label}'] / times[f'peft {label}']:.3f}")
    write_json(args.json, {"environment": environment(args.threads), "quiet_start": quiet, "args": vars(args),
                           "seconds": times, "over_base": {k: times[k] / times["base"] for k in fns},
                           "max_abs_diff": agree, "expert_effect": effect, "added_op_share": added})


def added_op_share(fns: dict[str, Any], rounds: int = 3) -> dict[str, float]:
    """Per variant: the self time of its aten ops beyond the base forward's calls (extra calls of an op
    times that op's mean self time in the variant), over the base forward's total self time; the median
    over ``rounds`` profiled forwards of every variant, round-robin."""
    import statistics

    from torch.profiler import ProfilerActivity, profile

    shares: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        stats: dict[str, dict[str, tuple[int, float]]] = {}
        for k, fn in fns.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            stats[k] = {e.key: (e.count, e.self_cpu_time_total) for e in prof.key_averages() if e.key.startswith("aten::")}
        base = stats["base"]
        total = sum(t for _, t in base.values())
        for k, ops in stats.items():
            extra = sum(max(0, n - base.get(op, (0, 0.0))[0]) * t / n for op, (n, t) in ops.items() if n)
            shares[k].append(extra / total)
    return {k: statistics.median(v) for k, v in shares.items()}


if __name__ == "__main__":
    main()
