"""The router as the bank grows to hundreds and a thousand tasks: fit time, routing time, memory.

For each bank size E in ``--sizes`` (10, 50, 200, 1000), on MiniLM's geometry (F = (L + 1) P D router
features: router layers L = 2, P pools, D = 384):

* **statistics and fit.** E synthetic tasks (their router features Gaussian around a random mean,
  ``--texts`` (200) per task; synthetic because nine real tasks are all there are, so nothing here is a
  task-identification figure) are added to ``RouterStats`` with the stored QR factor, as add-task does;
  then the time of adding one more task and refitting the closed-form LDA (``LDARouter.fit``: one
  F x F solve), median of ``--repeats``;
* **memory.** The router state the bank keeps (pooled scatter F x F float64, means E x F float64, LDA
  weights E x F float32), and one task's stored router memory (mean + factor, at most ``8F + 4F^2``
  bytes);
* **routing time.** all-MiniLM-L6-v2 holding E LoRA experts (q+v, r 8, B random, layers >= 2) with a
  random linear router attached (top-1; it spreads the batch over up to 64 experts, as a mixed batch would): one batch of ``--batch`` (64) texts x 128 tokens through the
  routed forward (router inside the one forward) against the same batch through one fixed expert,
  interleaved rounds, medians; the ratio is the routing cost at that bank size (target <= 1.15x).

Timing is meaningful only on a quiet machine: the load average at the start is printed and kept.

Usage::

    python bench/router_scale.py --json bench/results/router_scale.json
    python bench/router_scale.py --sizes 5 20 --repeats 2 --no-forward   # smoke
"""

from __future__ import annotations

import argparse
import time

from _common import NOISE_NOTE, announce_load, environment, interleaved, setup_torch, table, write_json


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200, 1000])
    p.add_argument("--texts", type=int, default=200, help="synthetic router feature vectors per task")
    p.add_argument("--pools", default="mean", help="RouterConfig.pools: mean or mean+rms")
    p.add_argument("--router-layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-forward", action="store_true", help="skip the MiniLM routed-forward timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p.parse_args()


def synthetic_task(g, F: int, n: int):
    """One task's router features (n, F): a random mean and a shared random covariance shape."""
    import torch

    mean = torch.randn(F, generator=g, dtype=torch.float64)
    return mean + 0.5 * torch.randn(n, F, generator=g, dtype=torch.float64)  # (n, F)


def stats_part(args: argparse.Namespace, F: int) -> list[dict]:
    import statistics

    import torch

    from adaptbank.bank.router_memory import memory_stats, task_memory
    from adaptbank.core.config import RouterConfig
    from adaptbank.routing.lda import LDARouter, RouterStats

    shrink, pools = RouterConfig().shrinkage, RouterConfig(pools=args.pools).pool_names
    g = torch.Generator().manual_seed(args.seed)
    stats = RouterStats(F)
    rows, have = [], 0
    memory = task_memory(synthetic_task(g, F, args.texts).float())  # what one task stores
    task_bytes = sum(t.numel() * t.element_size() for t in memory.values())
    for E in sorted(args.sizes):
        t0 = time.perf_counter()
        while have < E:
            mean, count, scatter = memory_stats(task_memory(synthetic_task(g, F, args.texts).float()))
            stats.add(f"t{have}", mean, count, scatter)
            have += 1
        build_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):  # one more task added and the router refitted, then taken out again
            mean, count, scatter = memory_stats(task_memory(synthetic_task(g, F, args.texts).float()))
            t1 = time.perf_counter()
            stats.add("new", mean, count, scatter)
            router = LDARouter.fit(stats, layers=args.router_layers, shrinkage=shrink, pools=pools)
            times.append(time.perf_counter() - t1)
            stats.remove("new", scatter)
        feats = torch.randn(args.batch, F)
        t2 = time.perf_counter()
        for _ in range(20):
            router(feats)
        score_ms = (time.perf_counter() - t2) / 20 * 1e3
        state = stats.scatter.numel() * 8 + E * F * 8 + router.weight.numel() * 4 + router.bias.numel() * 4
        row = {"tasks": E, "add_and_fit_s": statistics.median(times), "build_s_since_last_size": build_s,
               "score_batch_ms": score_ms, "router_state_mib": state / 2**20, "task_memory_mib": task_bytes / 2**20}
        rows.append(row)
        print(f"E={E}: add one task + refit {row['add_and_fit_s']:.3f}s, score a batch {score_ms:.3f} ms, router state "
              f"{row['router_state_mib']:.1f} MiB, one task's router memory {row['task_memory_mib']:.2f} MiB", flush=True)
    return rows


def forward_part(args: argparse.Namespace, F: int) -> list[dict]:
    import torch

    from adaptbank import AdaptBankModel, LoRAConfig, load_backbone
    from adaptbank._memory import resident_bytes
    from adaptbank.core.config import RouterConfig
    from adaptbank.data.load import load_task
    from adaptbank.routing.lda import LDARouter

    pools = RouterConfig(pools=args.pools).pool_names
    model = AdaptBankModel(load_backbone())
    model.reserved_layers = args.router_layers
    texts = [e.text for e in load_task("ag_news", max_train=1, max_test=args.batch, seed=args.seed).test]
    enc = model.tokenizer(texts, truncation=True, max_length=args.max_length, padding="max_length", return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    g = torch.Generator().manual_seed(args.seed + 1)
    rows, have = [], 0
    for E in sorted(args.sizes):
        t0 = time.perf_counter()
        while have < E:
            name = f"t{have}"
            model.add_task(name, LoRAConfig(), ["a", "b"], seed=have)
            with torch.no_grad():
                for p in model.expert_parameters(name):
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
            have += 1
        add_s = time.perf_counter() - t0
        # a random linear router over the model's tasks: it spreads the batch over many experts, as a bank
        # of real tasks would for a mixed batch; the routing arithmetic, not its accuracy, is what is timed
        router = LDARouter([f"t{i}" for i in range(E)], torch.randn(E, F, generator=g), torch.zeros(E),
                           layers=args.router_layers, pools=pools)
        model.attach_router(router, top_k=1)
        model.eval()
        with torch.no_grad():
            distinct = len(set(model.routed_features(**batch)[1][:, 0].tolist()))

            def routed() -> object:
                return model.routed_features(**batch)

            def single() -> object:
                model.route(task="t0")
                return model.features(**batch)

            t = interleaved({"routed": routed, "single": single}, args.repeats, args.warmup)
        rss = (resident_bytes() or float("nan")) / 2**20
        row = {"tasks": E, "routed_s": t["routed"], "single_s": t["single"], "routed_over_single": t["routed"] / t["single"],
               "distinct_experts_in_batch": distinct, "process_rss_mib": rss, "add_tasks_s": add_s}
        rows.append(row)
        print(f"E={E}: routed {t['routed']:.3f}s, one expert {t['single']:.3f}s -> {row['routed_over_single']:.3f}x "
              f"({distinct} distinct experts in the batch; RSS {rss:.0f} MiB)", flush=True)
    return rows


def main() -> None:
    args = parse()
    setup_torch(args.threads)
    from adaptbank.core.config import RouterConfig
    from adaptbank.routing.pools import feature_dim

    announce_load()
    F = feature_dim(args.router_layers, 384, RouterConfig(pools=args.pools).pool_names)
    out = {"env": environment(args.threads), "config": vars(args), "feature_dim": F, "stats": stats_part(args, F)}
    if not args.no_forward:
        out["forward"] = forward_part(args, F)
    print("\nrouter statistics and fit (synthetic tasks):")
    print(table(["tasks", "add + refit s", "score 64 ms", "router state MiB", "one task's memory MiB"],
                [[r["tasks"], f"{r['add_and_fit_s']:.3f}", f"{r['score_batch_ms']:.3f}", f"{r['router_state_mib']:.1f}",
                  f"{r['task_memory_mib']:.2f}"] for r in out["stats"]]))
    if "forward" in out:
        print("\nrouted forward vs one expert (MiniLM, batch 64 x 128):")
        print(table(["tasks", "routed s", "one expert s", "routed / one", "distinct experts", "RSS MiB"],
                    [[r["tasks"], f"{r['routed_s']:.3f}", f"{r['single_s']:.3f}", f"{r['routed_over_single']:.3f}",
                      r["distinct_experts_in_batch"], f"{r['process_rss_mib']:.0f}"] for r in out["forward"]]))
    print(f"\n{NOISE_NOTE}")
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
