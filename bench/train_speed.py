"""Training-step speed of every method, adaptbank beside its peer, measured side by side.

For one real task (default trec: 1,000 training texts, batch 16, up to 128 tokens) the same
``--steps`` optimiser steps over the very same length-grouped batches are timed for adaptbank (its one
training loop, ``training.loop.fit``) and for the peer (the loop of ``bench/methods.py``: collate,
mean pool, dropout + linear head, AdamW with the same schedule, clipping 1.0), in ``--rounds``
interleaved rounds whose order alternates; the figure is the median round, as ms per step, and the
ratio adaptbank / peer of examples per second (> 1: adaptbank faster).

* peft (LoRA q+v, LoRA all-linear, (IA)^3, prompt, prefix, P-tuning v2) and torch (BitFit, full
  fine-tuning) run **in one process** with adaptbank: both models are loaded once, and rounds alternate.
* the ``adapters`` library (serial and parallel bottleneck adapters) pins transformers ~= 4.57, so it
  runs in its own venv (``--adapters-python``) and cannot share a process with adaptbank (transformers
  5). Rounds then alternate **processes** (adaptbank's, then adapters', or the reverse), and every
  process also times a *control* in the same interleaved way: the frozen backbone's own forward and
  backward (only the embedding LayerNorm trains, so the backward runs through every layer, as an
  adapter's does). The raw ratio mixes in the speed of two transformers versions; the control-normalised
  ratio ``(adaptbank / its control) / (adapters / its control)`` compares the adapters' own costs.

The configurations are those of ``bench/methods.py`` (``adaptbank_method``, ``peft_config``,
``BOTTLENECK``, ``P``, ``PREFIX_MLP``), with experts in every layer (``reserved_layers = 0``).
Time only on a quiet machine: the load average at the start is printed and stored, and a start at
1.5 or above is flagged as "not quiet" (such figures are not results).

Usage::

    python bench/train_speed.py --adapters-python /tmp/venv-adapters/bin/python --json bench/results/train_speed.json
    python bench/train_speed.py --quick     # smoke: 3 steps, 2 rounds, lora and bitfit
    python bench/train_speed.py --memory --methods lora lora-all full-ft --json bench/results/train_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import REPO, announce_load, setup_torch, table, write_json

PEERS = {"lora": "peft", "lora-all": "peft", "ia3": "peft", "prompt": "peft", "prefix": "peft", "ptuning-v2": "peft",
         "bitfit": "torch", "full-ft": "torch", "adapter": "adapters", "parallel-adapter": "adapters"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="trec")
    p.add_argument("--methods", nargs="+", default=list(PEERS), choices=list(PEERS))
    p.add_argument("--steps", type=int, default=30, help="optimiser steps per round and side")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adapters-python", default=sys.executable,
                   help="a python that imports adapters 1.3.0 (its own venv: it pins transformers ~= 4.57)")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 2 rounds, lora and bitfit only")
    p.add_argument("--memory", action="store_true",
                   help="peak memory instead of speed: each side of each method (peft/torch peers) trains --steps "
                        "steps in a process of its own; peak RSS (VmHWM) and its rise over the set-up")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: adapters-library process
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)  # internal: one side's peak memory
    return p.parse_args()


# ----------------------------------------------------------------------------- the steps, one closure per side
def plan_of(task: str, steps: int, batch_size: int, max_length: int) -> tuple[list, list[str], int]:
    """The first ``steps`` batches of one training epoch (adaptbank's plan), the labels and the pad id."""
    from adaptbank import AdaptBankModel, TrainConfig, load_backbone
    from adaptbank.data.load import load_task
    from adaptbank.data.tokens import pad_id, tokenize
    from adaptbank.training.loop import Row, epoch_batches

    data = load_task(task, max_train=1000, max_test=1, seed=0)
    tok = AdaptBankModel(load_backbone()).tokenizer
    ids = tokenize(tok, [e.text for e in data.train], max_length)
    rows = [Row(x, e.label, task) for x, e in zip(ids, data.train, strict=True)]
    cfg = TrainConfig(epochs=1, batch_size=batch_size, max_length=max_length, probe_init=False)
    plan = list(epoch_batches(rows, cfg, 0))
    return (plan * (1 + steps // len(plan)))[:steps], list(data.labels), pad_id(tok)


def adaptbank_steps(method: str, plan: list, labels: list[str]) -> Callable[[], None]:
    """``run()``: adaptbank's ``fit`` over ``plan`` (a fresh optimiser each call, as a new task would get)."""
    from methods import LR, adaptbank_method

    from adaptbank import AdaptBankModel, TrainConfig, load_backbone
    from adaptbank.core.config import LoRAConfig
    from adaptbank.training.features import task_features
    from adaptbank.training.loop import fit

    model = AdaptBankModel(load_backbone())
    model.reserved_layers = 0  # experts in every layer, as the peers
    task = plan[0][0].task
    if method == "full-ft":
        model.add_head(task, labels)
        params, feats = list(model.backbone.parameters()), task_features(model, None)
    else:
        cfg = (LoRAConfig(rank=8, alpha=16.0, dropout=0.1, targets="all-linear") if method == "lora-all"
               else adaptbank_method(method))
        model.add_task(task, cfg, labels, seed=0)
        params, feats = model.expert_parameters(task), task_features(model, task)
    lr = LR["lora" if method == "lora-all" else method]
    train = TrainConfig(epochs=1, batch_size=len(plan[0]), lr=lr, head_lr=lr, probe_init=False)
    groups = [{"params": params, "lr": lr, "name": "expert"},
              {"params": list(model.heads[task].parameters()), "lr": lr, "name": "head"}]

    def run() -> None:
        fit(model, plan, steps=len(plan), groups=groups, cfg=train, features=feats, seed=0, what=task)

    return run


def peer_model(method: str):
    """The peer's module and its trainable parameters (peft or plain torch), on the bench's configuration."""
    import peft
    from methods import hf_model, peft_config

    from adaptbank.core.inject import FAMILY_ROLES, PRESET_ROLES

    roles = FAMILY_ROLES["bert"]  # adaptbank's all-linear preset, as full module-name patterns
    all_linear = re.compile(".*(" + "|".join(roles[r] for r in PRESET_ROLES["all-linear"]) + ")")
    model = hf_model()
    if method in ("bitfit", "full-ft"):
        if method == "full-ft":
            model.requires_grad_(True)
            return model, list(model.parameters()), 0
        model.requires_grad_(False)
        biases = [m.bias for n, m in model.named_modules() if all_linear.search(n) and getattr(m, "bias", None) is not None]
        for b in biases:
            b.requires_grad_(True)
        return model, biases, 0
    if method == "lora-all":
        cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=all_linear.pattern)
    else:
        cfg = peft_config(method)
    wrapped = peft.get_peft_model(model, cfg)
    from methods import P

    return wrapped, [p for p in wrapped.parameters() if p.requires_grad], P if method == "prompt" else 0


def peer_steps(method: str, plan: list, labels: list[str], pad: int) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F
    from methods import LR, new_head

    from adaptbank import TrainConfig
    from adaptbank.core.pooling import mean_pool
    from adaptbank.data.tokens import collate
    from adaptbank.training.loop import make_optimizer

    model, params, skip = peer_model(method)
    head = new_head(384, len(labels), 0)
    lr = LR["lora" if method == "lora-all" else method]
    cfg = TrainConfig(epochs=1, batch_size=len(plan[0]), lr=lr, head_lr=lr, probe_init=False)
    everything = params + list(head.parameters())

    def run() -> None:
        opt, sched = make_optimizer([{"params": params, "lr": lr, "name": "expert"},
                                     {"params": list(head.parameters()), "lr": lr, "name": "head"}], cfg, len(plan))
        model.train()
        head.train()
        for rows in plan:
            batch = collate([r.ids for r in rows], pad)
            y = torch.tensor([r.label for r in rows])  # (B,)
            hidden = model(**batch).last_hidden_state[:, skip:]  # (B, T, D)
            loss = F.cross_entropy(head(mean_pool(hidden, batch["attention_mask"])), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(everything, 1.0)
            opt.step()
            sched.step()
            loss.item()
        model.eval()

    return run


def interleaved(sides: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each side per round, after one untimed warm-up call each; the order alternates per round."""
    for run in sides.values():
        run()
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------- the adapters library: a process per side
def control_steps(plan: list, pad: int) -> Callable[[], None]:
    """The frozen backbone's forward and backward (only the embedding LayerNorm trains), same loop otherwise."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(os.environ["BENCH_BACKBONE_DIR"], use_safetensors=True)
    model.requires_grad_(False)
    params = list(model.embeddings.LayerNorm.parameters())
    for p in params:
        p.requires_grad_(True)
    return _plain_loop(model, params, plan, pad, lr=5e-4)


def _plain_loop(model, params, plan, pad, lr):
    import torch
    import torch.nn.functional as F

    head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(model.config.hidden_size, 6))

    def run() -> None:
        opt = torch.optim.AdamW(params + list(head.parameters()), lr=lr)
        model.train()
        for rows in plan:
            ids = [r["ids"] if isinstance(r, dict) else r.ids for r in rows]
            width = max(map(len, ids))
            x = torch.tensor([i + [pad] * (width - len(i)) for i in ids])  # (B, T)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])  # (B, T)
            h = model(input_ids=x, attention_mask=mask).last_hidden_state  # (B, T, D)
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, D)
            y = torch.tensor([(r["label"] if isinstance(r, dict) else r.label) % 6 for r in rows])  # (B,)
            loss = F.cross_entropy(head(pooled), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            loss.item()
        model.eval()

    return run


def adapters_worker(spec_path: str) -> None:
    """In the adapters venv: the adapters library's adapter and the control, interleaved; prints JSON."""
    import adapters
    from transformers import AutoModel

    spec = json.loads(Path(spec_path).read_text())
    setup_torch(spec["threads"])
    plan = spec["plan"]
    model = AutoModel.from_pretrained(os.environ["BENCH_BACKBONE_DIR"], use_safetensors=True)
    adapters.init(model)
    d, m = model.config.hidden_size, spec["bottleneck"]
    cfg = {"adapter": adapters.SeqBnConfig(reduction_factor=d / m),
           "parallel-adapter": adapters.ParBnConfig(reduction_factor=d / m, scaling=4.0)}[spec["method"]]
    model.add_adapter("task", config=cfg)
    model.train_adapter("task")
    params = [p for p in model.parameters() if p.requires_grad]
    sides = {"adapted": _plain_loop(model, params, plan, spec["pad"], lr=5e-4), "control": control_steps(plan, spec["pad"])}
    print(json.dumps(interleaved(sides, spec["rounds"])))


def ours_worker(spec: dict) -> dict[str, list[float]]:
    plan_rows, labels = spec["rows"], spec["labels"]
    run = adaptbank_steps(spec["method"], plan_rows, labels)
    return interleaved({"adapted": run, "control": control_steps(plan_rows, spec["pad"])}, spec["rounds"])


def adapters_pair(method: str, plan: list, labels: list[str], pad: int, args: argparse.Namespace,
                  folder: Path) -> dict[str, Any]:
    """Rounds alternating an adaptbank process and an adapters process; each times its adapter and the control."""
    from methods import BOTTLENECK

    spec = {"method": method, "plan": [[{"ids": r.ids, "label": r.label} for r in rows] for rows in plan],
            "pad": pad, "threads": args.threads, "rounds": 2, "bottleneck": BOTTLENECK}
    path = folder / f"{method}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_BACKBONE_DIR": backbone_dir(), "TOKENIZERS_PARALLELISM": "false"}
    out: dict[str, list[float]] = {"adaptbank": [], "adaptbank_control": [], "adapters": [], "adapters_control": []}
    for r in range(max(1, args.rounds // 2)):
        order = ["ours", "theirs"] if r % 2 == 0 else ["theirs", "ours"]
        for who in order:
            python = sys.executable if who == "ours" else args.adapters_python
            flag = "--ours-worker" if who == "ours" else "--worker"
            done = subprocess.run([python, str(Path(__file__).resolve()), flag, str(path), "--task", args.task],
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                raise RuntimeError(f"{who} worker for {method} failed: {done.stderr.strip().splitlines()[-1:]}")
            times = json.loads(done.stdout.strip().splitlines()[-1])
            key = "adaptbank" if who == "ours" else "adapters"
            out[key] += times["adapted"]
            out[f"{key}_control"] += times["control"]
    return out


def backbone_dir() -> str:
    from adaptbank.core.backbone import DEFAULT_BACKBONE, resolve_backbone

    return str(resolve_backbone(DEFAULT_BACKBONE)[0])


# ----------------------------------------------------------------------------- peak memory, a process per side
def memory_worker(side: str, args: argparse.Namespace) -> None:
    """One side of one method: set up, then train ``--steps`` steps twice; prints JSON with the RSS after
    set-up and the peak RSS (``VmHWM``) of the whole process."""
    from adaptbank._memory import peak_bytes, resident_bytes

    setup_torch(args.threads)
    method = args.methods[0]
    plan, labels, pad = plan_of(args.task, args.steps, args.batch_size, args.max_length)
    run = adaptbank_steps(method, plan, labels) if side == "adaptbank" else peer_steps(method, plan, labels, pad)
    setup = resident_bytes()
    run()
    run()
    print(json.dumps({"rss_after_setup": setup, "peak_rss": peak_bytes()}))


def memory_main(args: argparse.Namespace) -> None:
    """Peak memory per method and side, each in a fresh process (sides alternate first per method)."""
    from _common import environment

    quiet = announce_load()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    out: dict[str, Any] = {"env": environment(args.threads) | {"quiet_at_start": quiet}, "task": args.task,
                           "steps": args.steps, "batch_size": args.batch_size, "memory": {}}
    rows = []
    for i, method in enumerate(m for m in args.methods if PEERS[m] != "adapters"):
        sides = ["adaptbank", PEERS[method]] if i % 2 == 0 else [PEERS[method], "adaptbank"]
        got = {}
        for side in sides:
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-worker", side,
                                   "--methods", method, "--task", args.task, "--steps", str(args.steps),
                                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                                   "--threads", str(args.threads)], capture_output=True, text=True, env=env)
            if done.returncode:
                raise RuntimeError(f"{side} memory worker for {method} failed: {done.stderr.strip().splitlines()[-1:]}")
            got[side] = json.loads(done.stdout.strip().splitlines()[-1])
        peer = PEERS[method]
        out["memory"][method] = got | {"peak_ratio": got["adaptbank"]["peak_rss"] / got[peer]["peak_rss"]}
        mib = {k: (v["peak_rss"] / 2**20, (v["peak_rss"] - v["rss_after_setup"]) / 2**20) for k, v in got.items()}
        rows.append([method, peer, mib["adaptbank"][0], mib[peer][0], out["memory"][method]["peak_ratio"],
                     mib["adaptbank"][1], mib[peer][1]])
        print(f"  {method:16} peak RSS adaptbank {mib['adaptbank'][0]:.0f} MiB, {peer} {mib[peer][0]:.0f} MiB", flush=True)
    print()
    print(table(["method", "peer", "adaptbank peak MiB", "peer peak MiB", "peak ab/peer", "adaptbank rise MiB",
                 "peer rise MiB"], rows))
    print("\nrise: peak RSS minus the RSS after loading the model and building the side (what training adds)")
    if args.json:
        write_json(args.json, out)


# ----------------------------------------------------------------------------- main
def main() -> None:
    if "--ours-worker" in sys.argv:  # internal: adaptbank's side of an adapters comparison
        spec = json.loads(Path(sys.argv[sys.argv.index("--ours-worker") + 1]).read_text())
        setup_torch(spec["threads"])
        from adaptbank.training.loop import Row

        task = sys.argv[sys.argv.index("--task") + 1]
        rows = [[Row(r["ids"], r["label"], task) for r in batch] for batch in spec["plan"]]
        labels = [str(i) for i in range(1 + max(r.label for b in rows for r in b))]
        print(json.dumps(ours_worker({"method": spec["method"], "rows": rows, "labels": labels, "pad": spec["pad"],
                                      "rounds": spec["rounds"]})))
        return
    args = parse()
    if args.worker:
        return adapters_worker(args.worker)
    if args.memory_worker:
        return memory_worker(args.memory_worker, args)
    if args.quick:
        args.steps, args.rounds, args.methods = 3, 2, [m for m in args.methods if m in ("lora", "bitfit")] or ["lora"]
    setup_torch(args.threads)
    os.environ.setdefault("BENCH_BACKBONE_DIR", backbone_dir())
    if args.memory:
        return memory_main(args)
    import tempfile

    from _common import environment

    quiet = announce_load()
    plan, labels, pad = plan_of(args.task, args.steps, args.batch_size, args.max_length)
    tokens = sum(len(r.ids) for rows in plan for r in rows) / sum(len(rows) for rows in plan)
    print(f"{args.task}: {args.steps} steps of {args.batch_size} rows ({tokens:.1f} tokens per row on average), "
          f"{args.rounds} rounds", flush=True)
    out: dict[str, Any] = {"env": environment(args.threads) | {"quiet_at_start": quiet}, "task": args.task,
                           "steps": args.steps, "rounds": args.rounds, "batch_size": args.batch_size, "runs": {}}
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        for method in args.methods:
            peer = PEERS[method]
            if peer == "adapters":
                times = adapters_pair(method, plan, labels, pad, args, Path(tmp))
            else:
                t = interleaved({"adaptbank": adaptbank_steps(method, plan, labels),
                                 peer: peer_steps(method, plan, labels, pad)}, args.rounds)
                times = {"adaptbank": t["adaptbank"], peer: t[peer]}
            ms = {k: 1000 * statistics.median(v) / args.steps for k, v in times.items()}
            res: dict[str, Any] = {"ms_per_step": ms, "seconds": times, "peer": peer,
                                   "speed_ratio": ms[peer] / ms["adaptbank"]}
            if peer == "adapters":
                res["control_normalised_ratio"] = ((ms["adapters"] / ms["adapters_control"])
                                                   / (ms["adaptbank"] / ms["adaptbank_control"]))
            out["runs"][method] = res
            rows_out.append([method, peer, ms["adaptbank"], ms[peer], res["speed_ratio"],
                             res.get("control_normalised_ratio")])
            print(f"  {method:16} adaptbank {ms['adaptbank']:7.1f} ms/step   {peer} {ms[peer]:7.1f} ms/step   "
                  f"ratio {res['speed_ratio']:.3f}" + (f"   control-normalised {res['control_normalised_ratio']:.3f}"
                                                       if peer == "adapters" else ""), flush=True)
    out["loadavg_at_end"] = os.getloadavg()
    print()
    print(table(["method", "peer", "adaptbank ms/step", "peer ms/step", "speed ab/peer", "control-normalised"], rows_out))
    print(f"\nload average at start {out['env']['loadavg_at_start']}, at end {out['loadavg_at_end']}; ratio > 1: adaptbank faster")
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
