"""What task-agnostic routing costs at inference, measured in one run.

**Part 1, MiniLM (target: routed <= 1.15x the time of a single-expert forward).** all-MiniLM-L6-v2
with five LoRA experts (q+v, r=8, random non-zero B; training does not change the cost) in layers
>= 2 (``reserved_layers = 2``). An ``LDARouter`` is fitted from ``RouterStats`` on router features
of ``--router-texts`` training texts per task (``training.frozen_pass``), and attached with
``top_k=2``. One batch of 64 test texts (mixed over the tasks, truncated and padded to 128 tokens)
is timed under ``torch.no_grad``: ``model.routed_features`` (router inside the one forward) against
``route(task=...)`` + ``features`` (one fixed expert) and the bare backbone. The router's task-id
accuracy on held-out test texts is printed beside it (context; the experts are untrained).

**Part 2, tiny LLaMA (target: adaptbank >= 1.5x X-LoRA's throughput).** ``LlamaForCausalLM`` with
``hidden_size=64``, ``--llama-layers`` (2) layers. ``--experts`` (5) LoRA adapters (q_proj+v_proj,
r=8, alpha 16, random non-zero B) are saved with peft to temporary folders. Both sides hold exactly
these experts in exactly the same layers: the adapters use ``layers_to_transform`` = layers >=
``--llama-router-layers`` (1), the layers adaptbank keeps free for its router's features.

* peft X-LoRA: ``XLoraConfig(hidden_size=64, adapters={...}, top_k_lora=2)`` + ``get_peft_model``;
  its forward runs a scaling pass with adapters off, its classifier, then a pass with every expert.
* adaptbank: ``AdaptBankModel(Backbone("tiny-llama", model.model, tokenizer=None, path=""))`` with the
  same expert tensors imported, an ``LDARouter`` fitted on synthetic token "tasks" (expert i <->
  token ids from the i-th slice of the vocabulary), ``attach_router(top_k=2)``, ``routed_features``.

The LM head is replaced by ``nn.Identity`` on the X-LoRA side (``--keep-lm-head`` to keep it), so
both sides run the transformer body only (adaptbank pools features and has no LM head). Variants are
timed round-robin; medians of ``--repeats`` after ``--warmup``.

Usage::

    python bench/routing_cost.py --json bench/results/routing_cost.json
    python bench/routing_cost.py --router-texts 32 --eval-texts 16 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
import traceback

from _common import NOISE_NOTE, environment, interleaved, ratio, setup_torch, table, write_json


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["ag_news", "amazon", "yelp", "dbpedia", "yahoo"])
    p.add_argument("--router-layers", type=int, default=2)
    p.add_argument("--router-texts", type=int, default=300, help="training texts per task for the router")
    p.add_argument("--eval-texts", type=int, default=100, help="held-out texts per task for task-id accuracy")
    p.add_argument("--top-k", type=int, nargs="+", default=[2, 1], help="router top-k values to time (first = main)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dynamic-padding", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--skip-xlora", action="store_true")
    p.add_argument("--experts", type=int, default=5, help="LoRA experts on the tiny LLaMA")
    p.add_argument("--llama-layers", type=int, default=2)
    p.add_argument("--llama-router-layers", type=int, default=1)
    p.add_argument("--llama-tokens", type=int, default=128)
    p.add_argument("--llama-repeats", type=int, default=20)
    p.add_argument("--xlora-top-k", type=int, default=2, help="X-LoRA top_k_lora (0: dense softmax over all)")
    p.add_argument("--keep-lm-head", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    return p.parse_args()


def randomise_B(model, name: str, seed: int, scale: float = 0.05) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers_of(name).values():
            B = layer.experts[name].B
            B.copy_(torch.randn(B.shape, generator=g) * scale)


# ----------------------------------------------------------------------------------------- part 1
def minilm_part(args: argparse.Namespace) -> dict:
    import torch

    from adaptbank import AdaptBankModel, LoRAConfig, load_backbone
    from adaptbank.core.config import RouterConfig
    from adaptbank.data.load import load_task
    from adaptbank.data.tokens import tokenize
    from adaptbank.routing.lda import LDARouter, RouterStats
    from adaptbank.training.features import frozen_pass

    model = AdaptBankModel(load_backbone())
    model.reserved_layers = args.router_layers
    stats = RouterStats((args.router_layers + 1) * model.hidden_size)
    held_out: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    for i, task in enumerate(args.tasks):
        data = load_task(task, max_train=args.router_texts, max_test=args.eval_texts, seed=args.seed)
        torch.manual_seed(args.seed + i)
        model.add_task(task, LoRAConfig(), data.labels)
        randomise_B(model, task, args.seed + i)
        ids = tokenize(model.tokenizer, [e.text for e in data.train], args.max_length)
        _, feats = frozen_pass(model, ids, router_layers=args.router_layers)  # (N, F)
        mean, scatter = RouterStats.task_stats(feats)
        stats.add(task, mean, len(ids), scatter)
        held_out[task] = [e.text for e in data.test]
    router = LDARouter.fit(stats, layers=args.router_layers, shrinkage=RouterConfig().shrinkage)
    fit_s = time.perf_counter() - t0
    print(f"router fitted on {args.router_texts} texts x {len(args.tasks)} tasks in {fit_s:.1f}s "
          f"(features + fit)", flush=True)

    # task-id accuracy of the router on held-out texts (frozen features == what the taps see)
    correct = total = 0
    per_task = {}
    for j, task in enumerate(args.tasks):
        ids = tokenize(model.tokenizer, held_out[task], args.max_length)
        _, feats = frozen_pass(model, ids, router_layers=args.router_layers)
        hit = int((router(feats).argmax(1) == j).sum())
        per_task[task] = hit / len(ids)
        correct, total = correct + hit, total + len(ids)
    print(f"router task-id accuracy on held-out texts: {100 * correct / total:.1f}% {per_task}", flush=True)

    texts, truth = [], []
    k = 0
    while len(texts) < args.batch:
        task = args.tasks[k % len(args.tasks)]
        pool = held_out[task]
        texts.append(pool[(k // len(args.tasks)) % len(pool)])
        truth.append(k % len(args.tasks))
        k += 1
    enc = model.tokenizer(texts, truncation=True, max_length=args.max_length, return_tensors="pt",
                          padding="longest" if args.dynamic_padding else "max_length")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    first = args.tasks[0]
    out: dict = {"router_fit_seconds": fit_s, "router_task_accuracy": correct / total,
                 "router_task_accuracy_per_task": per_task, "batch_shape": list(batch["input_ids"].shape),
                 "by_top_k": {}}
    model.eval()
    with torch.no_grad():
        for top_k in args.top_k:
            model.attach_router(router, top_k=top_k)

            def routed() -> torch.Tensor:
                return model.routed_features(**batch)

            def single() -> torch.Tensor:
                model.route(task=first)
                return model.features(**batch)

            def base() -> torch.Tensor:
                model.route()
                return model.features(**batch)

            scores = model.routed_features(**batch)[3]  # (B, E)
            batch_acc = float((scores.argmax(1) == torch.tensor(truth)).float().mean())
            t = interleaved({"routed": routed, "single": single, "base": base}, args.repeats, args.warmup)
            rec = {"median_s": t, "ex_per_s": {k2: args.batch / s for k2, s in t.items()},
                   "routed_time_over_single": t["routed"] / t["single"],
                   "routed_time_over_base": t["routed"] / t["base"], "batch_router_accuracy": batch_acc}
            out["by_top_k"][top_k] = rec
            print(f"top_k={top_k}: {rec}", flush=True)
    return out


# ----------------------------------------------------------------------------------------- part 2
def llama_part(args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig, XLoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    from adaptbank import AdaptBankModel, LoRAConfig
    from adaptbank.core.backbone import Backbone
    from adaptbank.routing.lda import LDARouter, RouterStats
    from adaptbank.training.features import frozen_pass

    vocab = 512
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=args.llama_layers, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=128, vocab_size=vocab,
                      max_position_embeddings=max(256, args.llama_tokens), use_cache=False)
    torch.manual_seed(args.seed)
    base = LlamaForCausalLM(cfg).eval()
    layers = list(range(args.llama_router_layers, args.llama_layers))
    lcfg = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], layers_to_transform=layers)
    names = [f"e{i}" for i in range(args.experts)]
    weights: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    tmp = tempfile.TemporaryDirectory(prefix="adaptbank-xlora-")
    paths = {}
    for i, name in enumerate(names):
        torch.manual_seed(args.seed + 100 + i)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", **lcfg))
        weights[name] = {}
        with torch.no_grad():
            for mod_name, mod in pm.named_modules():
                if isinstance(mod, LoraLayer):
                    mod.lora_B["default"].weight.normal_(0, 0.05)
                    path = mod_name.removeprefix("base_model.model.model.")
                    weights[name][path] = (mod.lora_A["default"].weight.clone(), mod.lora_B["default"].weight.clone())
        paths[name] = f"{tmp.name}/{name}"
        pm.save_pretrained(paths[name])
    out: dict = {"config": {"hidden_size": 64, "layers": args.llama_layers, "expert_layers": layers,
                            "experts": args.experts, "tokens": args.llama_tokens, "batch": args.batch,
                            "lm_head": "kept" if args.keep_lm_head else "identity (both sides: body only)"}}

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch, args.llama_tokens), generator=g)
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask}

    # adaptbank over the LlamaModel body, same experts, LDA router on synthetic per-expert token slices
    ab_base = copy.deepcopy(base)
    ab = AdaptBankModel(Backbone("tiny-llama", ab_base.model, tokenizer=None, path=""))
    ab.reserved_layers = args.llama_router_layers
    for name in names:
        ab.add_task(name, LoRAConfig(rank=8, alpha=16.0, dropout=0.0, targets="qv"), ["a", "b"])
        with torch.no_grad():
            held = ab.layers_of(name)
            if set(held) != set(weights[name]):
                raise RuntimeError(f"expert placement differs: adaptbank {sorted(held)} vs peft {sorted(weights[name])}")
            for path, layer in held.items():
                A, B = weights[name][path]
                layer.experts[name].A.copy_(A)
                layer.experts[name].B.copy_(B)
    stats = RouterStats((args.llama_router_layers + 1) * ab.hidden_size)
    slice_ = vocab // len(names)
    rg = random.Random(args.seed)
    for i, name in enumerate(names):
        seqs = [[rg.randrange(i * slice_, (i + 1) * slice_) for _ in range(rg.randint(16, args.llama_tokens))]
                for _ in range(200)]
        _, feats = frozen_pass(ab, seqs, router_layers=args.llama_router_layers)
        mean, scatter = RouterStats.task_stats(feats)
        stats.add(name, mean, len(seqs), scatter)
    router = LDARouter.fit(stats, layers=args.llama_router_layers, shrinkage=0.1)
    ab.attach_router(router, top_k=2)
    ab.eval()

    fns = {}
    with torch.no_grad():
        fns["ab_routed"] = lambda: ab.routed_features(**batch)

        def ab_single() -> torch.Tensor:
            ab.route(task=names[0])
            return ab.features(**batch)

        fns["ab_single"] = ab_single
        plain = copy.deepcopy(base)
        if not args.keep_lm_head:
            plain.lm_head = nn.Identity()
        fns["base_body"] = lambda: plain(**batch)

        xlora_error = None
        try:
            xbase = copy.deepcopy(base)
            if not args.keep_lm_head:
                xbase.lm_head = nn.Identity()
            xkw = {"top_k_lora": args.xlora_top_k} if args.xlora_top_k else {}
            # X-LoRA loads adapter i under the name str(i) but then activates the dict's keys, so the keys
            # must be "0", "1", ... (other names fail with KeyError in disable_adapter_layers).
            adapters = {str(i): paths[name] for i, name in enumerate(names)}
            xcfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=64, adapters=adapters, xlora_depth=1, **xkw)
            xm = get_peft_model(xbase, xcfg).eval()
            xm(**batch)  # check it runs before timing
            fns["xlora"] = lambda: xm(**batch)
        except Exception as err:  # noqa: BLE001 - report why X-LoRA did not run, keep the rest
            xlora_error = f"{type(err).__name__}: {err}"
            print(f"X-LoRA did not run: {xlora_error}\n{traceback.format_exc()}", flush=True)
        t = interleaved(fns, args.llama_repeats, args.warmup)
    tmp.cleanup()
    eps = {k: args.batch / s for k, s in t.items()}
    out.update({"median_s": t, "ex_per_s": eps, "xlora_error": xlora_error,
                "ab_routed_over_xlora": ratio(eps["ab_routed"], eps.get("xlora")),
                "ab_routed_time_over_single": t["ab_routed"] / t["ab_single"]})
    print(f"tiny LLaMA: {out}", flush=True)
    return out


def main() -> None:
    args = parse()
    setup_torch(args.threads)
    result: dict = {"env": environment(args.threads)}
    if not args.skip_minilm:
        result["minilm"] = minilm_part(args)
    if not args.skip_xlora:
        result["tiny_llama"] = llama_part(args)

    print()
    if "minilm" in result:
        m = result["minilm"]
        rows = [[k, r["ex_per_s"]["routed"], r["ex_per_s"]["single"], r["ex_per_s"]["base"],
                 r["routed_time_over_single"], "yes" if r["routed_time_over_single"] <= 1.15 else "NO",
                 100 * r["batch_router_accuracy"]] for k, r in m["by_top_k"].items()]
        print(f"MiniLM, {len(args.tasks)} experts in layers >= {args.router_layers}, batch {m['batch_shape']}; "
              f"router task-id accuracy {100 * m['router_task_accuracy']:.1f}% on held-out texts")
        print(table(["top_k", "routed ex/s", "single expert ex/s", "no expert ex/s", "routed/single time",
                     "<= 1.15", "batch routing acc %"], rows))
    if "tiny_llama" in result:
        x = result["tiny_llama"]
        e = x["ex_per_s"]
        print(f"\ntiny LLaMA (hidden 64, {args.llama_layers} layers, {args.experts} experts in layers "
              f"{x['config']['expert_layers']}), batch {args.batch} x {args.llama_tokens} tokens, LM head: "
              f"{x['config']['lm_head']}")
        print(table(["adaptbank routed ex/s", "adaptbank single ex/s", "body, no experts ex/s", "X-LoRA ex/s",
                     "adaptbank/X-LoRA", ">= 1.5"],
                    [[e["ab_routed"], e["ab_single"], e["base_body"], e.get("xlora"), x["ab_routed_over_xlora"],
                      None if x["ab_routed_over_xlora"] is None else ("yes" if x["ab_routed_over_xlora"] >= 1.5 else "NO")]]))
        if x["xlora_error"]:
            print(f"X-LoRA did not run: {x['xlora_error']}")
    print(f"\n{NOISE_NOTE}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
