"""Router variants on the nine shared tasks, measured offline on cached features (issue 17, item 1).

    nice -n 19 python bench/routing_quality.py cache            # step 1: features + oracle hits (~30 min, 2 cores)
    nice -n 19 python bench/routing_quality.py eval --json bench/results/routing_quality.json   # step 2: seconds

**Step 1 (cache, in /tmp/router-cache, never in the repo).** For each task: masked mean-pools of the
embeddings and of every layer of the frozen bundled MiniLM (7 x 384 numbers per text, 128 tokens) for
all 2,000 train texts (with the indices of the 500-text subset the bank trains on) and the 500 test
texts; and the oracle hits: one LoRA expert per task with adaptbank's defaults (500 texts, 1 epoch),
added to a bank one by one, then ``evaluate_hits`` on the test texts with the true task's expert, and
with the expert of every other task sharing its label list (amazon and yelp: the bank's routed-hit
rule, ``routing.predict.routed_hit``, counts a right label from an identical head as right).

**Step 2 (eval).** Each router variant is fitted on the cached train features in task order (the
incremental ones one task at a time, only the new task's statistics or stored vectors added) with 500
and with 2,000 texts per task, and scored on the 4,500 test texts: task-id accuracy, routed accuracy
(right when routed to its own task and the oracle hit is 1, or to a task with the same label list whose
expert is right on it; routed anywhere else counts as wrong, which slightly under-estimates: another
task's head cannot answer with this task's labels), oracle accuracy, routed/oracle, the error split
(ambiguous pairs amazon/yelp/yahoo/sst2 and banking77/clinc150 vs elsewhere), and router forgetting: the
first task's identification right after it was added vs after the eight later additions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import setup_torch, table, write_json  # noqa: E402

TASKS = ["ag_news", "amazon", "yelp", "dbpedia", "yahoo", "sst2", "trec", "banking77", "clinc150"]
CACHE = Path(os.environ.get("ROUTER_CACHE", "/tmp/router-cache"))
HIDDEN = 384


# ----------------------------------------------------------------------------------------------- step 1
def cache(args: argparse.Namespace) -> None:
    import torch

    from adaptbank.bank.facade import AdapterBank
    from adaptbank.core.config import LoRAConfig, TrainConfig
    from adaptbank.data.load import load_task
    from adaptbank.data.sampling import subsample
    from adaptbank.data.tokens import tokenize
    from adaptbank.training.evaluate import evaluate_hits
    from adaptbank.training.features import frozen_pass

    CACHE.mkdir(parents=True, exist_ok=True)
    bank_path = CACHE / "bank"
    bank = AdapterBank.open(bank_path) if bank_path.exists() else AdapterBank.init(bank_path)
    model = bank.new_model()
    train_cfg = TrainConfig(epochs=1.0, max_train=500, max_test=500)
    layers = int(model.encoder.config.num_hidden_layers)  # all of them: embeddings + 6 layers for MiniLM
    for task in TASKS:
        out = CACHE / f"feats_{task}.pt"
        if out.exists():
            continue
        t0 = time.perf_counter()
        data = load_task(task, max_train=None, max_test=500, seed=0)
        sub = {id(e) for e in subsample(data.train, 500, 0)}
        idx500 = [i for i, e in enumerate(data.train) if id(e) in sub]
        feats = {}
        for split, exs in (("train", data.train), ("test", data.test)):
            ids = tokenize(model.tokenizer, [e.text for e in exs], 128)
            feats[split] = frozen_pass(model, ids, router_layers=layers)[1].half()  # (N, 7 * 384)
        torch.save({"train": feats["train"], "test": feats["test"], "idx500": torch.tensor(idx500),
                    "train_labels": torch.tensor([e.label for e in data.train]),
                    "test_labels": torch.tensor([e.label for e in data.test])}, out)
        print(f"{task}: features {tuple(feats['train'].shape)} + {tuple(feats['test'].shape)} "
              f"in {time.perf_counter() - t0:.0f}s", flush=True)
    for task in TASKS:
        if task not in bank.tasks():
            r = bank.add_task(task, LoRAConfig(), train_cfg)
            print(f"+{task}: oracle {100 * r.test_accuracy:.1f}% ({r.seconds:.0f}s)", flush=True)
    hits_path = CACHE / "hits.json"
    hits = json.loads(hits_path.read_text()) if hits_path.exists() else {}
    full = bank.load()
    labels_of = {t: tuple(full.tasks[t].labels) for t in TASKS}
    for task in TASKS:
        if task in hits:
            continue
        data = load_task(task, max_train=1, max_test=500, seed=0)
        texts, labels = [e.text for e in data.test], [e.label for e in data.test]
        hits[task] = {other: evaluate_hits(full, other, texts, labels) for other in TASKS
                      if labels_of[other] == labels_of[task]}
        print(f"{task}: oracle hits {sum(hits[task][task]) / len(labels):.3f}; same-label experts "
              f"{[o for o in hits[task] if o != task]}", flush=True)
        hits_path.write_text(json.dumps(hits))


# ----------------------------------------------------------------------------------------------- step 2
# A variant is (memory, combine): ``memory(X, y)`` sees one task's train features (N, F) and labels only
# and returns what the bank would keep for it; ``combine(memories)`` builds the router's score function
# (B, F) -> (B, E) from the kept memories alone. So every variant is incremental by construction: adding
# a task computes its memory once and re-runs combine; nothing of an old task's text is used again.

CLUSTERS = [{"amazon", "yelp", "yahoo", "sst2"}, {"banking77", "clinc150"}]
FEATURE_SETS = {"L2": [0, 1, 2], "L3": [0, 1, 2, 3], "all7": [0, 1, 2, 3, 4, 5, 6], "L2+max": [0, 1, 2, 7, 8, 9],
                "L2+rms": [0, 1, 2, 10, 11, 12], "L2+max+rms": [0, 1, 2, 7, 8, 9, 10, 11, 12]}
"""384-wide blocks used: 0-6 mean pools (0 the embeddings, i the output of layer i - 1), 7-9 max pools
and 10-12 root-mean-square pools of the embeddings and layers 0, 1. L2 is today's router; the L2+
sets read the same hidden states (free in the routed forward); L3 would move the first expert layer
up by one; all7 needs a full frozen pass first."""


def _shrunk(cov, a):
    import torch

    f = cov.shape[0]
    return (1 - a) * cov + a * torch.trace(cov) / f * torch.eye(f, dtype=cov.dtype)


def _stats(x, y):
    """Task mean, count, within-task scatter; per-label means, counts and the within-label scatter."""
    import torch

    mean = x.mean(0)
    c = x - mean
    labels = sorted(set(y.tolist()))
    lmeans = torch.stack([x[y == k].mean(0) for k in labels])  # (C, F)
    lcounts = torch.tensor([int((y == k).sum()) for k in labels], dtype=torch.float64)
    between = ((lmeans - mean).T * lcounts) @ (lmeans - mean)  # (F, F)
    scatter = c.T @ c
    return {"mean": mean, "n": x.shape[0], "scatter": scatter, "lmeans": lmeans, "lcounts": lcounts,
            "lscatter": scatter - between}


def lda(shrink=0.1):
    import torch

    def combine(mems):
        n = sum(m["n"] for m in mems)
        cov = _shrunk(sum(m["scatter"] for m in mems) / max(1, n - len(mems)), shrink)
        means = torch.stack([m["mean"] for m in mems])  # (E, F)
        w = torch.linalg.solve(cov, means.T).T  # (E, F)
        b = -0.5 * (w * means).sum(1)
        return lambda x: x @ w.T + b

    return _stats, combine


def sublda(shrink=0.1, agg="lse", within="label"):
    """LDA over (task, label) sub-classes sharing one covariance; a task's score is the log of its
    mixture (``lse``: logsumexp of sub-class scores + log label shares) or its best sub-class (``max``)."""
    import torch

    def combine(mems):
        n = sum(m["n"] for m in mems)
        key, k = ("lscatter", sum(len(m["lcounts"]) for m in mems)) if within == "label" else ("scatter", len(mems))
        cov = _shrunk(sum(m[key] for m in mems) / max(1, n - k), shrink)
        means = torch.cat([m["lmeans"] for m in mems])  # (S, F)
        logp = torch.cat([(m["lcounts"] / m["lcounts"].sum()).log() for m in mems])  # (S,)
        owner = torch.cat([torch.full((len(m["lcounts"]),), e) for e, m in enumerate(mems)])  # (S,)
        w = torch.linalg.solve(cov, means.T).T  # (S, F)
        b = -0.5 * (w * means).sum(1) + (logp if agg == "lse" else 0)

        def score(x):
            s = x @ w.T + b  # (B, S)
            out = torch.full((x.shape[0], len(mems)), -float("inf"), dtype=s.dtype)
            for e in range(len(mems)):
                se = s[:, owner == e]
                out[:, e] = se.logsumexp(1) if agg == "lse" else se.max(1).values
            return out

        return score

    return _stats, combine


def qda(shrink=0.1, blend=0.5):
    """Per-task covariances blended with the pooled one (regularised discriminant analysis, Friedman
    1989): ``S_e = (1 - b) C_e + b C_pooled``, then shrunk; score ``-1/2 log det S_e - 1/2 Mahalanobis``."""
    import torch

    def combine(mems):
        n = sum(m["n"] for m in mems)
        pooled = sum(m["scatter"] for m in mems) / max(1, n - len(mems))
        prec, logdet = [], []
        for m in mems:
            s = _shrunk((1 - blend) * m["scatter"] / max(1, m["n"] - 1) + blend * pooled, shrink)
            L = torch.linalg.cholesky(s)
            prec.append(L)
            logdet.append(2 * L.diagonal().log().sum())
        means = [m["mean"] for m in mems]

        def score(x):
            cols = []
            for L, mu, ld in zip(prec, means, logdet):
                z = torch.linalg.solve_triangular(L, (x - mu).T, upper=False)  # (F, B)
                cols.append(-0.5 * ld - 0.5 * (z * z).sum(0))
            return torch.stack(cols, 1)

        return score

    return _stats, combine


def replay_lr(m=200, lam=None, base="none"):
    """Each task keeps ``m`` of its train features (chosen at random, seed 0) plus its statistics; on
    every add a multinomial logistic regression over all kept vectors is refitted (features whitened
    with the pooled shrunk LDA covariance when ``base='white'``, else standardised with the kept stats).
    ``lam`` (L2) None: picked from a grid on a 20% holdout of the kept vectors (no test data)."""
    import torch

    def memory(x, y):
        g = torch.Generator().manual_seed(0)
        keep = torch.randperm(x.shape[0], generator=g)[:m]
        return {**_stats(x, y), "kept": x[keep]}

    def fit(xs, ys, E, l2):
        xs = xs.float()
        w = torch.zeros(xs.shape[1], E, requires_grad=True)
        b = torch.zeros(E, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=100, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xs @ w + b, ys) + 0.5 * l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach().double(), b.detach().double()

    def combine(mems):
        E = len(mems)
        n = sum(mm["n"] for mm in mems)
        mu = sum(mm["mean"] * mm["n"] for mm in mems) / n
        if base == "white":
            cov = _shrunk(sum(mm["scatter"] for mm in mems) / max(1, n - E), 0.1)
            T = torch.linalg.inv(torch.linalg.cholesky(cov)).T  # x -> (x - mu) T whitens
        else:
            tot = sum(mm["scatter"] + mm["n"] * torch.outer(mm["mean"] - mu, mm["mean"] - mu) for mm in mems) / n
            T = torch.diag(tot.diagonal().clamp(min=1e-12).rsqrt())
        if E == 1:
            return lambda x: torch.zeros(x.shape[0], 1, dtype=x.dtype)
        xs = torch.cat([(mm["kept"] - mu) @ T for mm in mems])
        ys = torch.cat([torch.full((len(mm["kept"]),), e) for e, mm in enumerate(mems)])
        l2 = lam
        if l2 is None:
            g = torch.Generator().manual_seed(1)
            perm = torch.randperm(len(ys), generator=g)
            hold, tr = perm[: len(ys) // 5], perm[len(ys) // 5:]
            best = None
            for cand in (1e-3, 1e-2, 1e-1):
                w, b = fit(xs[tr], ys[tr], E, cand)
                acc = float(((xs[hold].double() @ w + b).argmax(1) == ys[hold]).double().mean())
                if best is None or acc > best[0]:
                    best = (acc, cand)
            l2 = best[1]
        w, b = fit(xs, ys, E, l2)
        return lambda x: ((x - mu) @ T) @ w + b

    return memory, combine


def transformed(variant, kind):
    """``variant`` on per-example transformed features: ``l2`` scales each layer's 384-block of the pool
    to unit norm; ``sqrt`` is the signed square root (power normalisation) of every number."""

    memory, combine = variant

    def t(x):
        if kind == "l2":
            b = x.reshape(x.shape[0], -1, HIDDEN)
            return (b / b.norm(dim=-1, keepdim=True).clamp(min=1e-12)).reshape(x.shape)
        return x.sign() * x.abs().sqrt()

    def comb(mems):
        score = combine(mems)
        return lambda x: score(t(x))

    return (lambda x, y: memory(t(x), y)), comb


def knn(m=500, k=10):
    """Each task keeps ``m`` train features; a test text goes to the task with most of its ``k`` nearest
    kept vectors (cosine, after whitening with the pooled shrunk covariance)."""
    import torch

    memory = replay_lr(m)[0]

    def combine(mems):
        E, n = len(mems), sum(mm["n"] for mm in mems)
        mu = sum(mm["mean"] * mm["n"] for mm in mems) / n
        cov = _shrunk(sum(mm["scatter"] for mm in mems) / max(1, n - E), 0.1)
        T = torch.linalg.inv(torch.linalg.cholesky(cov)).T

        def emb(x):
            z = (x - mu) @ T
            return z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)

        bank = torch.cat([emb(mm["kept"]) for mm in mems])
        owner = torch.cat([torch.full((len(mm["kept"]),), e) for e, mm in enumerate(mems)])

        def score(x):
            top = (emb(x) @ bank.T).topk(min(k, len(owner)), dim=1).indices  # (B, k)
            return torch.nn.functional.one_hot(owner[top], E).sum(1).double()

        return score

    return memory, combine


def variants():
    v = {"lda a=0.1 (today)": lda(0.1)}
    for a in (0.01, 0.03, 0.3):
        v[f"lda a={a}"] = lda(a)
    v["sublda lse"] = sublda(0.1, "lse")
    v["sublda max"] = sublda(0.1, "max")
    v["sublda lse, task cov"] = sublda(0.1, "lse", within="task")
    v["qda b=0.5"] = qda(0.1, 0.5)
    v["qda b=0.9"] = qda(0.1, 0.9)
    v["replay200 lr"] = replay_lr(200)
    v["replay500 lr"] = replay_lr(500)
    v["replay200 lr white"] = replay_lr(200, base="white")
    v["replay500 lr white"] = replay_lr(500, base="white")
    v["replay500 knn10"] = knn(500, 10)
    v["lda l2-norm"] = transformed(lda(0.1), "l2")
    v["lda sqrt"] = transformed(lda(0.1), "sqrt")
    v["sublda lse l2-norm"] = transformed(sublda(0.1, "lse"), "l2")
    return v


PLAN = [("L2", v) for v in ("lda a=0.1 (today)", "lda a=0.03", "lda a=0.01", "sublda lse", "sublda lse, task cov",
                             "qda b=0.9", "replay200 lr white", "replay500 lr white", "replay500 knn10", "lda l2-norm")]
PLAN += [("L2+rms", "lda a=0.1 (today)"), ("L2+rms", "lda a=0.03"), ("L2+max+rms", "lda a=0.1 (today)"),
         ("L2+max+rms", "lda l2-norm"), ("L3", "lda a=0.1 (today)"), ("L3", "lda a=0.03"),
         ("all7", "lda a=0.1 (today)"), ("all7", "lda a=0.03"), ("all7", "sublda lse, task cov")]
"""(feature set, variant) pairs of the default run; --features / --variants filter them."""


def load_cache():
    import torch

    data = {t: torch.load(CACHE / f"feats_{t}.pt") for t in TASKS}
    for t in TASKS:
        if (CACHE / f"pools_{t}.pt").exists():
            pools = torch.load(CACHE / f"pools_{t}.pt")
            for split in ("train", "test"):
                data[t][split] = torch.cat([data[t][split], pools[split]], 1)  # (N, 13 * 384)
    hits = json.loads((CACHE / "hits.json").read_text()) if (CACHE / "hits.json").exists() else {}
    return data, hits


def run_variant(memory, combine, data, hits, cols, size):
    import torch

    mems, after = [], []
    test = {t: data[t]["test"][:, cols].double() for t in TASKS}
    for e, t in enumerate(TASKS):
        d = data[t]
        idx = d["idx500"] if size == 500 else torch.arange(d["train"].shape[0])
        mems.append(memory(d["train"][idx][:, cols].double(), d["train_labels"][idx]))
        if e == 0 or e == len(TASKS) - 1:
            score = combine(mems)
            after.append(float((score(test[TASKS[0]]).argmax(1) == 0).double().mean()))
    per, conf = {}, {}
    amb = other = 0
    for e, t in enumerate(TASKS):
        pred = score(test[t]).argmax(1)
        h = hits[t]
        right = [h[TASKS[p]][i] if TASKS[p] in h else 0 for i, p in enumerate(pred.tolist())]
        per[t] = {"router": float((pred == e).double().mean()), "routed": sum(right) / len(right),
                  "oracle": sum(h[t]) / len(h[t])}
        conf[t] = {TASKS[k]: int((pred == k).sum()) for k in range(len(TASKS)) if (pred == k).any()}
        for k, c in conf[t].items():
            if k != t:
                if any(t in cl and k in cl for cl in CLUSTERS):
                    amb += c
                else:
                    other += c
    avg = {k: sum(p[k] for p in per.values()) / len(per) for k in ("router", "routed", "oracle")}
    return {"tasks": per, "average": avg, "routed_over_oracle": avg["routed"] / avg["oracle"],
            "errors_ambiguous_pairs": amb, "errors_elsewhere": other, "confusion": conf,
            "first_task_right_after": after[0], "first_task_at_end": after[-1]}


def evaluate(args: argparse.Namespace) -> None:
    data, hits = load_cache()
    all_variants = variants()
    plan = [(fs, v) for fs, v in PLAN if (not args.features or fs in args.features)
            and (not args.variants or any(s in v for s in args.variants))]
    results, rows = {}, []
    for fs, name in plan:
        cols = [c for layer in FEATURE_SETS[fs] for c in range(layer * HIDDEN, (layer + 1) * HIDDEN)]
        memory, combine = all_variants[name]
        for size in (500, 2000):
            t0 = time.perf_counter()
            r = run_variant(memory, combine, data, hits, cols, size)
            key = f"{name} | {fs} | {size}"
            results[key] = r
            a = r["average"]
            rows.append([name, fs, size, 100 * a["router"], 100 * a["routed"], 100 * a["oracle"],
                         100 * r["routed_over_oracle"], r["errors_ambiguous_pairs"], r["errors_elsewhere"],
                         f"{100 * r['first_task_right_after']:.1f} -> {100 * r['first_task_at_end']:.1f}"])
            print(f"{key}: task-id {100 * a['router']:.2f} routed/oracle {100 * r['routed_over_oracle']:.2f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    print()
    print(table(["variant", "features", "train/task", "task-id %", "routed %", "oracle %", "routed/oracle %",
                 "err: pairs", "err: elsewhere", "first task"], rows))
    write_json(args.json, {"results": results, "tasks": TASKS, "clusters": [sorted(c) for c in CLUSTERS],
                           "feature_sets": FEATURE_SETS})


def cache_pools(args: argparse.Namespace) -> None:
    """Extra pools of the layers today's router reads (embeddings, layers 0 and 1), which the routed
    forward could compute at no extra layer: masked max over tokens and masked root-mean-square. Only
    the first two layers run (the backbone's layer list cut to two)."""
    import torch

    from adaptbank.core.backbone import load_backbone
    from adaptbank.data.load import load_task
    from adaptbank.data.tokens import batches, collate, pad_id, tokenize
    from adaptbank.routing.taps import layer_list

    bb = load_backbone()
    model, tok = bb.model, bb.tokenizer
    layers = layer_list(model)
    del layers[2:]
    for task in TASKS:
        out = CACHE / f"pools_{task}.pt"
        if out.exists():
            continue
        data = load_task(task, max_train=None, max_test=500, seed=0)
        res = {}
        for split, exs in (("train", data.train), ("test", data.test)):
            ids = tokenize(tok, [e.text for e in exs], 128)
            feats = torch.empty(len(ids), 2 * 3 * HIDDEN)
            with torch.no_grad():
                for chunk in batches(ids, 64, shuffle=False):
                    batch = collate([ids[i] for i in chunk], pad_id(tok), torch.device("cpu"))
                    hs = model(**batch, output_hidden_states=True).hidden_states[:3]
                    m = batch["attention_mask"].bool()[..., None]  # (B, T, 1)
                    n = m.sum(1).clamp(min=1)  # (B, 1)
                    mx = [h.masked_fill(~m, -float("inf")).amax(1) for h in hs]  # (B, D) each
                    rms = [((h * h * m).sum(1) / n).sqrt() for h in hs]  # (B, D) each
                    feats[chunk] = torch.cat(mx + rms, -1)
            res[split] = feats.half()
        torch.save(res, out)
        print(f"{task}: pools {tuple(res['train'].shape)}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--threads", type=int, default=2)
    c2 = sub.add_parser("cache-pools")
    c2.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("eval")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--json", default=None)
    e.add_argument("--variants", nargs="*", default=None, help="substrings of variant names to run [all]")
    e.add_argument("--features", nargs="*", default=None, choices=list(FEATURE_SETS), help="feature sets [all of PLAN]")
    args = ap.parse_args()
    setup_torch(args.threads)
    if args.cmd == "cache":
        cache(args)
    elif args.cmd == "cache-pools":
        cache_pools(args)
    else:
        evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
