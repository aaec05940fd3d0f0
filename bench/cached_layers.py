"""Cached frozen layers: add-task with and without ``--cache-frozen``, side by side, and the same result.

On the bundled MiniLM (6 layers; the router reads layers 0-1, so experts start at layer 2) one real task
is added to fresh banks, in ``--rounds`` interleaved rounds whose order alternates, in four settings:

* LoRA q+v in layers 2-5 (the default), without and with ``cache_frozen``;
* LoRA q+v in the top two layers (``layers=(4, 5)``, ``--layers 4,5``), without and with it.

The timed rounds train with the defaults (dropout on), where the cache also saves the frozen layers'
dropout. After them, one round of the four settings trains with ``train_dropout=False``, where a cached
run must store the same expert as an uncached one: the script prints the largest difference between
their stored tensors and both test accuracies (and those runs' times, a second speed figure).

Each round also times what an uncached run spends below the first trained layer in training (the
embeddings and frozen layers, forward in training mode over the same batches: :func:`below_forward`), the
most any cache could remove; ``uncached / (uncached - that)`` is printed as the perfect cache's bound.

Figures: the median round of add-task's whole wall time and of its training phase
(``metrics.phase_seconds``, add-task's own profile), the speed-ups uncached / cached, and the median
profile of each setting (where add-task's time goes). Time only on a quiet machine: the load average at
the start is printed (``_common.announce_load``).

Usage::

    python bench/cached_layers.py --json bench/results/cached_layers.json
    python bench/cached_layers.py --quick      # smoke: 64 examples, 1 round
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import announce_load, environment, setup_torch, table, write_json

SETTINGS: dict[str, dict[str, Any]] = {
    "layers 2-5": {"layers": None, "cache_frozen": False},
    "layers 2-5, cached": {"layers": None, "cache_frozen": True},
    "layers 4-5": {"layers": (4, 5), "cache_frozen": False},
    "layers 4-5, cached": {"layers": (4, 5), "cache_frozen": True},
}
PAIRS = (("layers 2-5", "layers 2-5, cached"), ("layers 4-5", "layers 4-5, cached"))
BELOW = {"layers 2-5, cached": 2, "layers 4-5, cached": 4}
"""The first layer that trains in each cached setting: the cache can take away at most the forward below it."""


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="ag_news")
    p.add_argument("--max-train", type=int, default=500)
    p.add_argument("--max-test", type=int, default=200)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="64 training and 32 test examples, 1 epoch, 1 round")
    return p.parse_args()


def run_one(root: Path, args: argparse.Namespace, setting: dict[str, Any], tag: str) -> dict[str, Any]:
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.core.config import LoRAConfig, TrainConfig

    bank = AdapterBank.init(root / f"bank-{tag}")
    train = TrainConfig(epochs=args.epochs, max_train=args.max_train, max_test=args.max_test,
                        train_dropout=setting.get("dropout", True), cache_frozen=setting["cache_frozen"])
    t0 = time.perf_counter()
    r = bank.add_task(args.task, LoRAConfig(layers=setting["layers"]), train)
    wall = time.perf_counter() - t0
    info = bank.info(args.task)
    model = bank.load([args.task])
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if ".experts." in k or k.startswith("heads.")}
    return {"wall": wall, "phases": info["metrics"]["phase_seconds"], "accuracy": r.test_accuracy, "tensors": tensors}


def below_forward(args: argparse.Namespace, layer: int) -> float:
    """Seconds of what an uncached run spends below ``layer`` in training: the embeddings and layers
    ``0 .. layer-1`` run forward in training mode (dropout on, no autograd graph: nothing below ``layer``
    trains) over the same epochs of batches as add-task's training. A perfect cache removes exactly this,
    so ``uncached / (uncached - this)`` bounds the cache's add-task speed-up."""
    import torch

    from adaptbank.bank.facade import AdapterBank
    from adaptbank.core.config import TrainConfig
    from adaptbank.data.load import load_task
    from adaptbank.data.specs import load_task_spec
    from adaptbank.data.tokens import collate, pad_id, tokenize
    from adaptbank.routing.taps import layer_list
    from adaptbank.training.loop import Row, epoch_batches, total_steps

    with tempfile.TemporaryDirectory() as tmp:
        model = AdapterBank.init(Path(tmp) / "bank").new_model()
    cfg = TrainConfig(epochs=args.epochs, max_train=args.max_train, max_test=args.max_test)
    data = load_task(load_task_spec(args.task), max_train=args.max_train, max_test=args.max_test, seed=cfg.seed)
    ids = tokenize(model.tokenizer, [e.text for e in data.train], cfg.max_length)
    rows = [Row(x, e.label, args.task) for x, e in zip(ids, data.train)]
    layers = layer_list(model.encoder)
    parent, attr = next((m, n) for m in model.encoder.modules() for n, c in m.named_children() if c is layers)
    setattr(parent, attr, torch.nn.ModuleList(list(layers)[:layer]))  # the encoder runs layers 0 .. layer-1 only
    try:
        model.train(True)
        model.route()
        plan = epoch_batches(rows, cfg, cfg.seed)
        start = time.perf_counter()
        with torch.no_grad():
            for _, batch_rows in zip(range(total_steps(len(rows), cfg)), plan):
                model.features(**collate([r.ids for r in batch_rows], pad_id(model.tokenizer)))  # (B, D)
        return time.perf_counter() - start
    finally:
        setattr(parent, attr, layers)
        model.eval()


def summary(runs: dict[str, list[dict[str, Any]]], below: dict[str, list[float]] | None = None
            ) -> tuple[dict[str, Any], dict[str, Any], list[list[Any]]]:
    """Medians per setting, the uncached/cached pairs, and the table's rows; with ``below`` (seconds of
    :func:`below_forward` per cached setting and round) each pair also gets the perfect cache's bound."""
    med = {k: {"wall": statistics.median(r["wall"] for r in v),
               "training": statistics.median(r["phases"]["training"] for r in v), "accuracy": v[0]["accuracy"],
               "phases": {p: statistics.median(r["phases"][p] for r in v) for p in v[0]["phases"]}}
           for k, v in runs.items()}
    rows, pairs = [], {}
    for plain, cached in PAIRS:
        a, b = runs[plain][0]["tensors"], runs[cached][0]["tensors"]
        diff = max(float((a[n] - b[n]).abs().max()) for n in a)
        pairs[cached] = {"add_task_speedup": med[plain]["wall"] / med[cached]["wall"],
                         "training_speedup": med[plain]["training"] / med[cached]["training"], "max_abs_diff": diff,
                         "accuracies": [med[plain]["accuracy"], med[cached]["accuracy"]]}
        if below:
            cut = statistics.median(below[cached])
            pairs[cached].update(below_seconds=cut, bound=med[plain]["wall"] / (med[plain]["wall"] - cut))
        for k in (plain, cached):
            rows.append([k, med[k]["wall"], med[k]["training"], med[k]["accuracy"] * 100,
                         f"{pairs[cached]['add_task_speedup']:.2f}x" if k == cached else "",
                         f"{pairs[cached]['training_speedup']:.2f}x" if k == cached else "",
                         f"{diff:.1e}" if k == cached else "",
                         f"{pairs[cached]['below_seconds']:.2f}" if k == cached and below else "",
                         f"{pairs[cached]['bound']:.2f}x" if k == cached and below else ""])
    return med, pairs, rows


HEADERS = ["setting", "add-task s", "training s", "test acc", "add-task speed-up", "training speed-up",
           "max |diff| of the stored tensors", "forward below s", "perfect cache's bound"]


def main() -> None:
    args = parse()
    if args.quick:
        args.max_train, args.max_test, args.epochs, args.rounds = 64, 32, 1.0, 1
    setup_torch(args.threads)
    quiet = announce_load()
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in SETTINGS}
    exact: dict[str, list[dict[str, Any]]] = {k: [] for k in SETTINGS}
    below: dict[str, list[float]] = {k: [] for k in BELOW}
    with tempfile.TemporaryDirectory() as tmp:
        warm = argparse.Namespace(**{**vars(args), "max_train": 32, "max_test": 16, "epochs": 1.0})
        for k in SETTINGS:  # untimed: imports, first calls, allocator warm-up
            run_one(Path(tmp), warm, SETTINGS[k], f"warmup-{_tag(k)}")
        for rnd in range(args.rounds):
            order = list(SETTINGS) if rnd % 2 == 0 else list(reversed(SETTINGS))
            for k in order:
                got = run_one(Path(tmp), args, SETTINGS[k], f"{rnd}-{_tag(k)}")
                runs[k].append(got)
                print(f"round {rnd + 1} {k}: add-task {got['wall']:.1f} s, training {got['phases']['training']:.1f} s, "
                      f"accuracy {got['accuracy']:.3f}", flush=True)
            for k, layer in BELOW.items():
                below[k].append(below_forward(args, layer))
                print(f"round {rnd + 1}: forward below layer {layer} in training {below[k][-1]:.1f} s", flush=True)
        for k in SETTINGS:
            got = run_one(Path(tmp), args, {**SETTINGS[k], "dropout": False}, f"exact-{_tag(k)}")
            exact[k].append(got)
            print(f"dropout off, {k}: add-task {got['wall']:.1f} s, training {got['phases']['training']:.1f} s, "
                  f"accuracy {got['accuracy']:.3f}", flush=True)
    med, pairs, rows = summary(runs, below)
    med_exact, pairs_exact, rows_exact = summary(exact)
    print(f"\ndefaults (dropout on), median of {args.rounds} rounds (the first round's tensors compared):")
    print(table(HEADERS, rows))
    print("\ndropout off (--no-train-dropout), one round: a cached run must store the same expert:")
    print(table(HEADERS, rows_exact))
    order = ["data", "model", "tokenise", "frozen pass", "router memory", "probe", "training", "evaluation"]
    names = sorted(next(iter(med.values()))["phases"], key=lambda p: order.index(p) if p in order else len(order))
    print("\nwhere add-task's time goes (defaults; median seconds per phase, metrics.phase_seconds):")
    print(table(["setting", *names], [[k, *(m["phases"][p] for p in names)] for k, m in med.items()]))
    write_json(args.json, {"environment": environment(args.threads), "quiet_start": quiet, "args": vars(args),
                           "median": med, "pairs": pairs, "dropout_off": {"median": med_exact, "pairs": pairs_exact},
                           "rounds": {k: [{"wall": r["wall"], "phases": r["phases"]} for r in v] for k, v in runs.items()},
                           "below_seconds": below})


def _tag(setting: str) -> str:
    return setting.replace(" ", "_").replace(",", "")


if __name__ == "__main__":
    main()
