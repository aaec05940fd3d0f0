"""torch.compile for inference with a fixed set of experts: eager against compiled, in one run.

all-MiniLM-L6-v2 holding ``--experts`` (8) LoRA experts (q+v, r 8, B random) in layers >= 2, one
batch of ``--batch`` (64) test texts x 128 tokens, under ``torch.no_grad``:

* one-expert: ``route(task=...)`` + ``features``;
* mixed: ``route(task_ids=...)`` with the rows spread over every expert, + ``features``;
* routed: a nearest-prototype ``LDARouter`` over the router features (prototypes: the first rows, so the
  batch goes to every expert) attached with top-1, ``routed_features``.

Each path is compiled with ``torch.compile(fn, fullgraph=True)`` (inductor; tests/test_compile.py
checks that each traces with no graph break), its output checked against eager, then eager and
compiled are timed in interleaved rounds (medians of ``--repeats`` after ``--warmup``); the compile
time (first call) is reported beside the speed-up. Quiet machine only: the load average at the start
is printed and kept.

Usage::

    python bench/compile_speed.py --json bench/results/compile_speed.json
    python bench/compile_speed.py --experts 2 --batch 8 --repeats 2 --paths one-expert   # smoke
"""

from __future__ import annotations

import argparse
import time

from _common import NOISE_NOTE, announce_load, environment, interleaved, setup_torch, table, write_json

PATHS = ("one-expert", "mixed", "routed")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    return p.parse_args()


def main() -> None:
    args = parse()
    setup_torch(args.threads)
    import torch

    from adaptbank import AdaptBankModel, LoRAConfig, load_backbone
    from adaptbank.data.load import load_task
    from adaptbank.routing.lda import LDARouter
    from adaptbank.routing.pools import router_features

    announce_load()
    layers = 2
    model = AdaptBankModel(load_backbone())
    model.reserved_layers = layers
    names = [f"e{i}" for i in range(args.experts)]
    g = torch.Generator().manual_seed(0)
    for name in names:
        model.add_task(name, LoRAConfig(), ["a", "b"], seed=0)
        with torch.no_grad():
            for p in model.expert_parameters(name):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    texts = [e.text for e in load_task("ag_news", max_train=1, max_test=args.batch, seed=0).test]
    enc = model.tokenizer(texts, truncation=True, max_length=args.max_length, padding="max_length", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    rows = [names[i % len(names)] for i in range(args.batch)]
    with torch.no_grad():
        states = model.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        protos = router_features(states[: layers + 1], mask)[: len(names)]  # (E, F): rows 0..E-1 go to e0..
    model.attach_router(LDARouter(names, protos, -0.5 * (protos * protos).sum(1), layers=layers), top_k=1)

    def one() -> object:
        model.route(task=names[0])
        return model.features(ids, mask)

    def mixed() -> object:
        model.route(task_ids=rows)
        return model.features(ids, mask)

    def routed() -> object:
        return model.routed_features(ids, mask)[0]

    eager_fns = {"one-expert": one, "mixed": mixed, "routed": routed}
    out = {"env": environment(args.threads), "config": vars(args), "paths": {}}
    with torch.no_grad():
        for path in args.paths:
            torch._dynamo.reset()
            fn = eager_fns[path]
            if path == "one-expert":
                model.route(task=names[0])
            elif path == "mixed":
                model.route(task_ids=rows)

            def body(ids: torch.Tensor, mask: torch.Tensor, path: str = path) -> torch.Tensor:
                if path == "routed":
                    return model.routed_features(ids, mask)[0]
                return model.features(ids, mask)

            compiled = torch.compile(body, fullgraph=True)
            t0 = time.perf_counter()
            got = compiled(ids, mask)
            compile_s = time.perf_counter() - t0
            diff = float((got - fn()).abs().max())

            def comp(path: str = path, compiled: object = compiled) -> object:
                if path == "one-expert":
                    model.route(task=names[0])
                elif path == "mixed":
                    model.route(task_ids=rows)
                return compiled(ids, mask)

            t = interleaved({"eager": fn, "compiled": comp}, args.repeats, args.warmup)
            rec = {"eager_s": t["eager"], "compiled_s": t["compiled"], "speedup": t["eager"] / t["compiled"],
                   "compile_s": compile_s, "max_abs_diff": diff}
            out["paths"][path] = rec
            print(f"{path}: eager {t['eager']:.3f}s, compiled {t['compiled']:.3f}s -> {rec['speedup']:.2f}x "
                  f"(first call {compile_s:.0f}s; max |compiled - eager| {diff:.1e})", flush=True)
    print(table(["path", "eager s", "compiled s", "speed-up", "compile s", "max abs diff"],
                [[k, f"{r['eager_s']:.3f}", f"{r['compiled_s']:.3f}", f"{r['speedup']:.2f}x", f"{r['compile_s']:.0f}",
                  f"{r['max_abs_diff']:.1e}"] for k, r in out["paths"].items()]))
    print(f"\n{NOISE_NOTE}")
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
