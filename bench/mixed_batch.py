"""Mixed-batch inference with N LoRA experts held: adaptbank vs peft ``adapter_names=``, in one run.

One batch of 64 real texts (the longest test texts of ``--texts-from``, truncated and padded to 128
tokens), all-MiniLM-L6-v2, LoRA q+v r=8 alpha 16. Both models hold the same N experts (identical,
random non-zero A and B); the rows use ``min(N, 64)`` distinct experts (a seeded sample of the N,
row i -> expert i mod k). Timed under ``torch.no_grad``, eval mode, median of ``--repeats`` after
``--warmup``, with the variants interleaved round-robin so machine noise hits all of them alike:

* ``ab mixed``: ``model.route(task_ids=rows)`` then ``model.features(...)``;
* ``peft mixed``: ``peft_model(..., adapter_names=rows)`` then the same mean-pool;
* ``ab single``: ``model.route(task=first)`` then ``features`` (one expert for the batch);
* ``peft single``: ``set_adapter(first)`` once, then a plain forward (context only).

Experts are added one by one up to the largest N (peft ``add_adapter``, adaptbank ``add_task``);
each add is timed, and the table reports ms per add in the last stretch before each N. peft's
``add_adapter`` walks the whole model and every parameter (about 1.3 ms more per expert already held,
so holding 1,024 takes over ten minutes); past ``--peft-max-n`` experts peft's are added with
``--peft-fast-add``: each LoRA layer's own ``update_layer`` (the per-module call that ``add_adapter``
ends in) and the config entry, which builds the same ``lora_A``/``lora_B`` modules, so its mixed forward
is peft's unchanged; those adds are not counted as peft's add time ('-' in the table). A check
compares the pooled features of both mixed forwards (max |difference|): both compute the same thing.

Usage::

    python bench/mixed_batch.py --json bench/results/mixed_batch.json
    python bench/mixed_batch.py --n 1 8 --repeats 2
    python bench/mixed_batch.py --n 1 32 128 1024 --peft-max-n 128     # peft held up to 128 experts
    python bench/mixed_batch.py --n 1 32 128 1024 --peft-max-n 128 --peft-fast-add   # and to 1,024
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import zlib

from _common import NOISE_NOTE, environment, interleaved, ratio, setup_torch, table, write_json


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1, 8, 32, 128, 512], help="numbers of experts held")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--texts-from", default="yelp", help="task whose test texts fill the batch")
    p.add_argument("--dynamic-padding", action="store_true", help="pad to the longest text, not to --max-length")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--skip-peft-single", action="store_true")
    p.add_argument("--peft-max-n", type=int, default=None,
                   help="hold at most this many experts in peft (its add_adapter takes seconds each past a few "
                        "hundred); larger N are timed for adaptbank alone unless --peft-fast-add")
    p.add_argument("--peft-fast-add", action="store_true",
                   help="past --peft-max-n, add peft's experts per LoRA layer (update_layer) so that its mixed "
                        "forward is timed at every N; those adds are not timed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    return p.parse_args()


def main() -> None:
    args = parse()
    setup_torch(args.threads)
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModel

    from adaptbank import AdaptBankModel, LoRAConfig, load_backbone
    from adaptbank.data.load import load_task

    ns = sorted(set(args.n))
    texts = sorted((e.text for e in load_task(args.texts_from).test), key=len, reverse=True)[: args.batch]
    ab = AdaptBankModel(load_backbone())
    enc = ab.tokenizer(texts, truncation=True, max_length=args.max_length, return_tensors="pt",
                       padding="longest" if args.dynamic_padding else "max_length")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    mask = batch["attention_mask"].float()[..., None]
    print(f"batch {tuple(batch['input_ids'].shape)}, {int(batch['attention_mask'].sum())} real tokens", flush=True)

    base = AutoModel.from_pretrained(load_backbone().path).eval()
    lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.1, target_modules=["query", "value"])
    acfg = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=0.1, targets="qv")
    pm = None
    lora_layers: dict[str, LoraLayer] = {}
    names: list[str] = []
    add_ms = {"peft": [], "adaptbank": []}

    def expert_weights(i: int, path: str, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(zlib.crc32(f"{args.seed}/{i}/{path}".encode()))
        A = torch.randn(args.rank, d_in, generator=g) / d_in ** 0.5  # (r, I)
        B = torch.randn(d_out, args.rank, generator=g) * 0.05  # (O, r), non-zero
        return A, B

    def add_expert(i: int) -> None:
        nonlocal pm, lora_layers
        name = f"e{i}"
        timed = args.peft_max_n is None or i < args.peft_max_n
        in_peft = timed or args.peft_fast_add
        t0 = time.perf_counter()
        if pm is None:
            pm = get_peft_model(base, lcfg, adapter_name=name)
        elif timed:
            pm.add_adapter(name, lcfg)
        elif in_peft:  # the per-module half of add_adapter, without its walk over the model
            pm.peft_config[name] = lcfg
            for layer in lora_layers.values():
                layer.update_layer(name, lcfg.r, lcfg.lora_alpha, config=lcfg)
        if timed:
            add_ms["peft"].append(1000 * (time.perf_counter() - t0))
        if not lora_layers:
            lora_layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
                           if isinstance(m, LoraLayer)}
        t0 = time.perf_counter()
        torch.manual_seed(i)
        ab.add_task(name, acfg, ["a", "b"])
        add_ms["adaptbank"].append(1000 * (time.perf_counter() - t0))
        with torch.no_grad():
            for path, layer in ab.layers_of(name).items():
                A, B = expert_weights(i, path, layer.d_in, layer.d_out)
                layer.experts[name].A.copy_(A)
                layer.experts[name].B.copy_(B)
                if in_peft:
                    lora_layers[path].lora_A[name].weight.copy_(A)
                    lora_layers[path].lora_B[name].weight.copy_(B)
        names.append(name)

    def pool(h: torch.Tensor) -> torch.Tensor:
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    results = []
    rows = []
    with torch.no_grad():
        for n in ns:
            t0 = time.perf_counter()
            while len(names) < n:
                add_expert(len(names))
            grow_s = time.perf_counter() - t0
            pm.eval()
            ab.eval()
            k = min(n, args.batch)
            chosen = random.Random(args.seed).sample(names, k)
            rows_ids = [chosen[i % k] for i in range(args.batch)]

            def ab_mixed(rows_ids: list[str] = rows_ids) -> torch.Tensor:
                ab.route(task_ids=rows_ids)
                return ab.features(**batch)

            def peft_mixed(rows_ids: list[str] = rows_ids) -> torch.Tensor:
                return pool(pm(**batch, adapter_names=rows_ids).last_hidden_state)

            def ab_single() -> torch.Tensor:
                ab.route(task=names[0])
                return ab.features(**batch)

            def peft_single() -> torch.Tensor:
                return pool(pm(**batch).last_hidden_state)

            with_peft = args.peft_max_n is None or n <= args.peft_max_n or args.peft_fast_add
            peft_timed_adds = args.peft_max_n is None or n <= args.peft_max_n
            pm.set_adapter(names[0])
            pm.eval()
            mixed_features = ab_mixed()
            diff = float((mixed_features - peft_mixed()).abs().max()) if with_peft else float("nan")
            mixed_vs_single = float((mixed_features - ab_single()).abs().max())  # > 0 once rows use other experts
            diff_single = float((ab_single() - peft_single()).abs().max())
            ab.route()
            base_features = ab.features(**batch)
            base_diff = float((ab_single() - base_features).abs().max())  # the expert changes the output
            fns = {"ab_mixed": ab_mixed, "peft_mixed": peft_mixed, "ab_single": ab_single}
            if not with_peft:
                del fns["peft_mixed"]
            if not args.skip_peft_single:
                fns["peft_single"] = peft_single
            t = interleaved(fns, args.repeats, args.warmup)
            eps = {key: args.batch / s for key, s in t.items()}

            def recent(side: str, n: int = n, timed: bool = peft_timed_adds) -> float | None:
                if side == "peft" and not timed:
                    return None
                return statistics.mean(add_ms[side][max(0, n // 2): n]) if n > 1 else add_ms[side][0]

            rec = {"n": n, "distinct_experts_in_batch": k, "ex_per_s": eps, "median_s": t,
                   "ab_over_peft_mixed": ratio(eps["ab_mixed"], eps.get("peft_mixed")),
                   "ab_mixed_over_ab_single": ratio(eps["ab_mixed"], eps["ab_single"]),
                   "peft_mixed_over_peft_single": ratio(eps.get("peft_mixed"), eps.get("peft_single")),
                   "max_abs_diff_mixed": diff, "max_abs_diff_single": diff_single,
                   "expert_effect_max_abs": base_diff, "mixed_vs_single_max_abs": mixed_vs_single,
                   "add_ms_recent": {"peft": recent("peft"), "adaptbank": recent("adaptbank")},
                   "grow_seconds": grow_s, "peft_held": with_peft,
                   "peft_adds_timed": peft_timed_adds}
            results.append(rec)
            rows.append([n, k, eps["ab_mixed"], eps.get("peft_mixed"), rec["ab_over_peft_mixed"], eps["ab_single"],
                         eps.get("peft_single"), rec["ab_mixed_over_ab_single"], rec["add_ms_recent"]["adaptbank"],
                         rec["add_ms_recent"]["peft"], f"{diff:.1e}"])
            print(f"N={n}: {rec}", flush=True)

    last = results[-1]
    summary = {
        "largest_n": last["n"],
        "ab_over_peft_mixed_at_largest_n": last["ab_over_peft_mixed"],
        "ab_mixed_at_largest_n_over_ab_single": last["ab_mixed_over_ab_single"],
        "add_ms_first": {"peft": add_ms["peft"][0], "adaptbank": add_ms["adaptbank"][0]},
        "add_ms_at_largest_n": {side: statistics.mean(v[-min(16, len(v)):]) for side, v in add_ms.items()},
    }
    print()
    print(table(["N", "distinct/batch", "ab mixed ex/s", "peft mixed ex/s", "ab/peft", "ab single ex/s",
                 "peft single ex/s", "ab mixed/single", "ab add ms", "peft add ms", "max|diff|"], rows))
    print(f"\nadaptbank mixed at N={last['n']} / adaptbank single: {summary['ab_mixed_at_largest_n_over_ab_single']:.3f}")
    print(f"ms per add (mean of the last {min(16, len(add_ms['peft']))} adds up to N={last['n']}): "
          f"adaptbank add_task {summary['add_ms_at_largest_n']['adaptbank']:.1f}, "
          f"peft add_adapter {summary['add_ms_at_largest_n']['peft']:.1f} "
          f"(first add: {summary['add_ms_first']['adaptbank']:.1f} / {summary['add_ms_first']['peft']:.1f})")
    print("'ab add ms'/'peft add ms': mean ms per add over adds N/2..N; max|diff|: pooled features of the two "
          "mixed forwards (same experts, so ~1e-6 is expected).")
    print(NOISE_NOTE)
    write_json(args.json, {"env": environment(args.threads), "batch_shape": list(batch["input_ids"].shape),
                           "results": results, "summary": summary, "add_ms_all": add_ms})


if __name__ == "__main__":
    main()
