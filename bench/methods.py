"""Every method on MiniLM, adaptbank beside its peer, with full fine-tuning as the reference.

For each task (default sst2, trec, ag_news; 1,000 train / 500 test, 128 tokens, seed 0, 2 epochs,
batch 16; resumable per (task, method) through ``--json``) and each method, one row per
implementation:

=================  ==============================================================================
method             implementations (the peer is configured as adaptbank's like-for-like run)
=================  ==============================================================================
full-ft            ``transformers``: every backbone weight trainable, one head (the reference)
lora               adaptbank ``LoRAConfig(rank 8, alpha 16, dropout 0.1, qv)``; peft ``LoraConfig`` (query, value)
adapter            adaptbank ``AdapterConfig(bottleneck 64, pfeiffer-block)``; adapters ``SeqBnConfig(reduction_factor 6)``
parallel-adapter   adaptbank ``ParallelAdapterConfig(bottleneck 64, s 4, ffn-block)``; adapters ``ParBnConfig(reduction_factor 6)``
bitfit             adaptbank ``BitFitConfig(all-linear)``; ``torch``: the same linear biases set trainable in place
ia3                adaptbank ``IA3Config(k, v, ffn input)``; peft ``IA3Config`` on the same three layers
prompt             adaptbank ``PromptTuningConfig(20, vocab)``; peft ``PromptTuningConfig(20, SAMPLE_VOCAB)``
prefix             adaptbank ``PrefixConfig(20, MLP 512)``; peft ``PrefixTuningConfig(prefix_projection=True)``;
                   adapters ``PrefixTuningConfig(prefix_length 20, bottleneck_size 512)``
ptuning-v2         adaptbank ``PTuningV2Config(20)``; peft ``PrefixTuningConfig(prefix_projection=False)``
=================  ==============================================================================

Like single_task.py's like-for-like run: experts in every layer (``reserved_layers = 0``), a fresh
head (``probe_init=False``) trained with the expert's learning rate, AdamW, 6% warm-up then linear
decay (``training.loop.make_optimizer``), gradient clipping 1.0. Every peer trains on the very same
batches (the ids adaptbank's ``tokenize`` made, ``batches``/``collate`` with the same shuffle seeds)
with a mean-pool -> dropout 0.1 -> linear head. The learning rate of each method is the one in
:data:`LR`, shared by adaptbank and its peers.

Each run is a fresh subprocess (``--worker``), so memory figures are not polluted by earlier runs.
Measured per run:

* trainable %: parameters trained (the head excluded; a prefix's training-time MLP included) over the
  backbone's parameters;
* test accuracy, and accuracy relative to full fine-tuning on the same task (accuracy / full-FT accuracy);
* train ex/s: optimiser-step examples over the training loop's wall time;
* train peak MiB: how far the process's resident set (VmHWM, Linux) rose above its size just
  before training, the high-water mark being reset there (``/proc/self/clear_refs``); it counts
  activations, gradients, optimiser state and allocator caching of the training loop, not the
  frozen weights already loaded (falls back to the ``getrusage`` max-RSS delta where the reset is
  not allowed, and says so in the JSON);
* disk KiB: one task's saved files: adaptbank ``bank.expert_io.save_expert`` (expert, head, config),
  peft ``save_pretrained`` + the head as safetensors, adapters ``save_adapter(use_safetensors=True)``
  (a prefix ejected to its flat form first, as adaptbank and peft store it) + head, full FT the whole
  model's ``save_pretrained`` + head; generated model cards (README.md) are not counted.

The ``adapters`` library (1.3.0) pins transformers ~= 4.57; if it is not importable here, its rows
run with ``--adapters-python`` (a venv of its own, e.g. ``python -m venv /tmp/venv-adapters
--system-site-packages && /tmp/venv-adapters/bin/pip install adapters==1.3.0``) or are skipped with
the reason printed. Implementations of one method run back to back, their order alternating from
method to method, so machine drift hits both sides alike.

Usage::

    python bench/methods.py --adapters-python /tmp/venv-adapters/bin/python --json bench/results/methods.json
    python bench/methods.py --tasks sst2 --methods lora prompt --max-train 32 --max-test 32 --epochs 0.25  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import NOISE_NOTE, REPO, ratio, setup_torch, table, write_json

TASKS = ["sst2", "trec", "ag_news"]

LR: dict[str, float] = {
    # Devlin et al. 2019 fine-tune BERT with {2, 3, 5}e-5; the largest suits a 2-epoch budget.
    "full-ft": 5e-5,
    # Hu et al. 2021 train RoBERTa-base LoRA with 4e-4 / 5e-4; adaptbank's TrainConfig.lr and single_task.py.
    "lora": 5e-4,
    # Houlsby et al. 2019 sweep {3e-5, 3e-4, 3e-3}; 5e-4 as LoRA, a bottleneck of similar size.
    "adapter": 5e-4,
    "parallel-adapter": 5e-4,
    # Bias-only updates need a larger rate than LoRA (Ben Zaken et al. 2021 tune up to 1e-3 over many
    # more epochs); 2e-3 for the 2-epoch budget.
    "bitfit": 2e-3,
    # Liu et al. 2022 (T-Few) train (IA)^3 vectors with 3e-3.
    "ia3": 3e-3,
    # Lester et al. 2021 use 0.3 with Adafactor on T5; with AdamW peft's prompt-tuning guide (causal LM) uses 3e-2.
    "prompt": 3e-2,
    # P-Tuning v2's RoBERTa run scripts (Liu et al. 2022, THUDM/P-tuning-v2) use 5e-3 .. 1e-2 (7e-3 BoolQ,
    # 1e-2 RTE) for the directly trained prefixes. The MLP-reparameterised prefix diverged at 5e-3 for every
    # implementation (adaptbank, peft, adapters: chance on sst2 and trec); 5e-4 was chosen on a validation
    # split (--validation: the last quarter of train; sst2 73.6, trec 83.2), the test split unread.
    "prefix": 5e-4,
    "ptuning-v2": 1e-2,
}
"""Learning rate of expert and head per method, used by adaptbank and by every peer of that method."""

IMPLS: dict[str, list[str]] = {
    "full-ft": ["transformers"], "lora": ["adaptbank", "peft"], "adapter": ["adaptbank", "adapters"],
    "parallel-adapter": ["adaptbank", "adapters"], "bitfit": ["adaptbank", "torch"], "ia3": ["adaptbank", "peft"],
    "prompt": ["adaptbank", "peft"], "prefix": ["adaptbank", "peft", "adapters"], "ptuning-v2": ["adaptbank", "peft"],
}
P, BOTTLENECK, PREFIX_MLP = 20, 64, 512  # virtual tokens, adapter bottleneck, prefix reparameterisation width


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--methods", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--max-test", type=int, default=500)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adapters-python", default=sys.executable,
                   help="python that can import adapters 1.3.0 (it pins transformers ~= 4.57: a venv of its own)")
    p.add_argument("--json", default=None, help="write the figures here; (task, method) pairs in it are kept (resumable)")
    p.add_argument("--validation", action="store_true",
                   help="choose settings without the test split: train on the first 3/4 of the training examples, "
                        "score on the last 1/4 (reported in the accuracy column)")
    p.add_argument("--impls", nargs="+", default=None, help="run only these implementations (e.g. adaptbank)")
    p.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR",
                   help="override the learning rate of a method (for every implementation of it), e.g. prefix=1e-3")
    p.add_argument("--redo", action="store_true", help="measure again even what --json already has")
    p.add_argument("--prefix-positions", default="auto", choices=["auto", "from-zero", "after-prefix"],
                   help="adaptbank's PrefixConfig.positions for prefix and P-tuning v2 (auto: from-zero on MiniLM; "
                        "peft's numerics are after-prefix, the adapters library's from-zero)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one run, spec JSON path
    return p.parse_args()


# ----------------------------------------------------------------------------- measuring, inside a worker
class PeakMemory:
    """Peak resident-set growth of a code region: reset VmHWM to the current RSS on entry, read it on exit
    (``adaptbank._memory``); where the reset is refused, the ``getrusage`` max-RSS delta, flagged in ``method``."""

    def __enter__(self) -> PeakMemory:
        from adaptbank._memory import reset_peak, resident_bytes

        gc.collect()
        if reset_peak():  # Linux >= 4.0: VmHWM := VmRSS
            self.method, self.start = "VmHWM reset", resident_bytes()
        else:
            self.method, self.start = "ru_maxrss delta (no VmHWM reset)", 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc: object) -> None:
        from adaptbank._memory import peak_bytes

        end = peak_bytes() if self.method == "VmHWM reset" else 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = (end - self.start) / 2**20 if end is not None and self.start is not None else None


def disk(folder: Path) -> dict:
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
             if f.is_file() and f.name != "README.md"}  # peft and adapters write a generated model card
    return {"disk_bytes": sum(files.values()), "disk_files": files}


def save_head(head, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head[1].state_dict().items()}, str(folder / "head.safetensors"))


def train_peer(encode, params: list, head, data: dict, spec: dict, model) -> dict:
    """``encode(batch) -> (B, T, D)`` hidden states of the real tokens; trains ``params`` and ``head`` with
    ``train_task``'s batches, optimiser and schedule; evaluates with ``model`` (the module ``encode`` runs)
    and the head in eval mode (no dropout), as adaptbank evaluates; returns accuracy, speed and peak memory."""
    import torch
    import torch.nn.functional as F

    from adaptbank.core.config import TrainConfig
    from adaptbank.core.pooling import mean_pool
    from adaptbank.data.tokens import batches, collate
    from adaptbank.training.loop import make_optimizer, total_steps

    cfg = TrainConfig.from_dict(spec["train_config"])
    ids, pad = data["train"]["ids"], data["pad"]
    y_all = torch.tensor(data["train"]["labels"], dtype=torch.long)  # (N,)
    groups = [{"params": params, "lr": cfg.lr, "name": "expert"},
              {"params": list(head.parameters()), "lr": cfg.head_lr, "name": "head"}]
    everything = params + list(head.parameters())
    total = total_steps(len(ids), cfg)
    opt, sched = make_optimizer(groups, cfg, total)
    steps = seen = 0
    losses: list[float] = []
    torch.manual_seed(cfg.seed)  # dropout
    with PeakMemory() as mem:
        start = time.perf_counter()
        for epoch in range(math.ceil(cfg.epochs)):
            for chunk in batches(ids, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch):
                if steps >= total:
                    break
                batch = collate([ids[i] for i in chunk], pad)
                loss = F.cross_entropy(head(mean_pool(encode(batch), batch["attention_mask"])), y_all[chunk])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(everything, cfg.grad_clip)
                opt.step()
                sched.step()
                steps, seen = steps + 1, seen + len(chunk)
                losses.append(loss.item())
        seconds = time.perf_counter() - start
    head.eval()
    model.eval()
    test_ids, y_test = data["test"]["ids"], torch.tensor(data["test"]["labels"])
    pred = torch.empty(len(test_ids), dtype=torch.long)
    with torch.no_grad():
        for chunk in batches(test_ids, 64, shuffle=False):
            batch = collate([test_ids[i] for i in chunk], pad)
            pred[chunk] = head(mean_pool(encode(batch), batch["attention_mask"])).argmax(1)
    return {"accuracy": int((pred == y_test).sum()) / len(y_test), "train_ex_per_s": seen / seconds,
            "train_seconds": seconds, "steps": steps, "final_loss": losses[-1], "train_peak_mib": mem.mib,
            "peak_method": mem.method}


def new_head(hidden: int, n_classes: int, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Dropout(0.1), nn.Linear(hidden, n_classes))


def hf_model():
    from transformers import AutoModel

    from adaptbank.core.backbone import DEFAULT_BACKBONE, resolve_backbone

    return AutoModel.from_pretrained(resolve_backbone(DEFAULT_BACKBONE)[0], use_safetensors=True)


def count(params) -> int:
    return sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- the runs, one per worker
def adaptbank_method(method: str):
    from adaptbank.core import config as c

    return {"lora": c.LoRAConfig(rank=8, alpha=16.0, dropout=0.1, targets="qv"),
            "adapter": c.AdapterConfig(bottleneck=BOTTLENECK, targets="pfeiffer-block"),
            "parallel-adapter": c.ParallelAdapterConfig(bottleneck=BOTTLENECK, scale=4.0, targets="ffn-block"),
            "bitfit": c.BitFitConfig(targets="all-linear"), "ia3": c.IA3Config(),
            "prompt": c.PromptTuningConfig(prompt_length=P, prompt_init="vocab"),
            "prefix": c.PrefixConfig(prefix_length=P, reparam_hidden=PREFIX_MLP),
            "ptuning-v2": c.PTuningV2Config(prefix_length=P)}[method]


def run_adaptbank(spec: dict, data: dict, out: Path) -> dict:
    from adaptbank import AdaptBankModel, TrainConfig, load_backbone
    from adaptbank.bank.expert_io import save_expert
    from adaptbank.core.config import PrefixConfig
    from adaptbank.data.tokens import tokenize
    from adaptbank.training.evaluate import predict_task
    from adaptbank.training.loop import train_task

    cfg = TrainConfig.from_dict(spec["train_config"])
    model = AdaptBankModel(load_backbone())
    model.reserved_layers = 0  # experts in every layer, as the peers
    base = count(model.backbone.parameters())
    task = spec["task"]
    method = adaptbank_method(spec["method"])
    if isinstance(method, PrefixConfig):
        method = dataclasses.replace(method, positions=spec.get("prefix_positions", "auto"))
    info = model.add_task(task, method, data["labels"], seed=cfg.seed)
    trainable = count(model.expert_parameters(task))
    texts, labels = data["train"]["texts"], data["train"]["labels"]
    if tokenize(model.tokenizer, texts, cfg.max_length) != data["train"]["ids"]:
        raise RuntimeError("adaptbank's tokenizer gives other ids than the peers get")
    with PeakMemory() as mem:
        result = train_task(model, task, texts, labels, cfg)
    pred = predict_task(model, task, data["test"]["texts"], max_length=cfg.max_length).argmax(1)
    hits = sum(int(p == y) for p, y in zip(pred.tolist(), data["test"]["labels"]))
    save_expert(model, task, out / "saved")
    return {"accuracy": hits / len(pred), "train_ex_per_s": result.examples_per_second,
            "train_seconds": result.seconds, "steps": result.steps, "final_loss": result.losses[-1],
            "train_peak_mib": mem.mib, "peak_method": mem.method, "trainable_params": trainable,
            "stored_params": count(model.expert_parameters(task)), "base_params": base, **disk(out / "saved"),
            **({"positions": info.method.positions} if isinstance(info.method, PrefixConfig) else {})}


def peft_config(method: str):
    import peft

    from adaptbank.core.inject import FAMILY_ROLES

    roles = FAMILY_ROLES["bert"]
    if method == "lora":
        return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
    if method == "ia3":  # peft matches a list by name suffix, and "output.dense" would take attention.output too
        return peft.IA3Config(target_modules="|".join(f".*{roles[r]}" for r in ("k", "v", "ffn_out")),
                              feedforward_modules=f".*{roles['ffn_out']}")
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P,
                                       prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB)
    return peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P,
                                   prefix_projection=method == "prefix", encoder_hidden_size=PREFIX_MLP)


def run_peft(spec: dict, data: dict, out: Path) -> dict:
    import warnings

    from peft import get_peft_model

    warnings.simplefilter("ignore", FutureWarning)  # peft passes past_key_values=
    base_model = hf_model()
    base = count(base_model.parameters())
    import torch

    torch.manual_seed(spec["train_config"]["seed"])
    model = get_peft_model(base_model, peft_config(spec["method"]))
    skip = P if spec["method"] == "prompt" else 0  # prompt tuning returns the virtual tokens first

    def encode(batch):
        return model(**batch).last_hidden_state[:, skip:]  # (B, T, D)

    params = [p for p in model.parameters() if p.requires_grad]
    head = new_head(base_model.config.hidden_size, len(data["labels"]), spec["train_config"]["seed"])
    model.train()
    head.train()
    res = train_peer(encode, params, head, data, spec, model)
    model.eval()
    model.save_pretrained(str(out / "saved"))
    save_head(head, out / "saved")
    return res | {"trainable_params": count(params), "base_params": base, **disk(out / "saved")}


def run_adapters(spec: dict, data: dict, out: Path) -> dict:
    import adapters
    import torch

    base_model = hf_model()
    base = count(base_model.parameters())
    adapters.init(base_model)
    d = base_model.config.hidden_size
    cfg = {"adapter": adapters.SeqBnConfig(reduction_factor=d / BOTTLENECK),
           "parallel-adapter": adapters.ParBnConfig(reduction_factor=d / BOTTLENECK, scaling=4.0),
           "prefix": adapters.PrefixTuningConfig(prefix_length=P, bottleneck_size=PREFIX_MLP)}[spec["method"]]
    torch.manual_seed(spec["train_config"]["seed"])
    base_model.add_adapter("task", config=cfg)
    base_model.train_adapter("task")  # freezes everything else, activates the adapter

    def encode(batch):
        return base_model(**batch).last_hidden_state  # (B, T, D)

    params = [p for p in base_model.parameters() if p.requires_grad]
    head = new_head(d, len(data["labels"]), spec["train_config"]["seed"])
    base_model.train()
    head.train()
    res = train_peer(encode, params, head, data, spec, base_model)
    base_model.eval()
    if spec["method"] == "prefix":
        base_model.eject_prefix_tuning("task")  # the flat prefixes, as adaptbank and peft store them
    try:
        base_model.save_adapter(str(out / "saved"), "task", use_safetensors=True)
        saved_as = "safetensors"
    except RuntimeError:  # the prefix pool is shared by every layer's module, which safetensors refuses
        shutil.rmtree(out / "saved", ignore_errors=True)
        base_model.save_adapter(str(out / "saved"), "task", use_safetensors=False)
        saved_as = "torch.save (safetensors refuses the prefix pool's shared tensors)"
    save_head(head, out / "saved")
    return res | {"trainable_params": count(params), "base_params": base, "adapters": adapters.__version__,
                  "saved_as": saved_as, **disk(out / "saved")}


def run_torch(spec: dict, data: dict, out: Path) -> dict:
    """Full fine-tuning (every weight), or BitFit's biases of the all-linear layers trained in place."""
    from safetensors.torch import save_file

    from adaptbank.core.inject import FAMILY_ROLES, PRESET_ROLES

    model = hf_model()
    base = count(model.parameters())
    if spec["method"] == "full-ft":
        model.requires_grad_(True)
        params = list(model.parameters())
    else:  # bitfit: the biases adaptbank's all-linear preset targets
        roles = FAMILY_ROLES["bert"]
        pattern = re.compile("|".join(roles[r] for r in PRESET_ROLES["all-linear"]))
        model.requires_grad_(False)
        params = [m.bias for n, m in model.named_modules() if pattern.search(n) and getattr(m, "bias", None) is not None]
        for p in params:
            p.requires_grad_(True)

    def encode(batch):
        return model(**batch).last_hidden_state  # (B, T, D)

    head = new_head(model.config.hidden_size, len(data["labels"]), spec["train_config"]["seed"])
    model.train()
    head.train()
    res = train_peer(encode, params, head, data, spec, model)
    if spec["method"] == "full-ft":
        model.save_pretrained(str(out / "saved"))
    else:
        names = {id(p): n for n, p in model.named_parameters()}
        (out / "saved").mkdir(parents=True)
        save_file({names[id(p)]: p.detach().contiguous() for p in params}, str(out / "saved" / "biases.safetensors"))
    save_head(head, out / "saved")
    # Unused by mean pooling, the pooler gets no gradient: not counted as trained.
    trained = [p for p in params if p.grad is not None] if spec["method"] == "full-ft" else params
    return res | {"trainable_params": count(trained), "base_params": base, **disk(out / "saved")}


def worker(path: str) -> None:
    spec = json.loads(Path(path).read_text())
    setup_torch(spec["threads"])
    import torch
    import transformers

    data = json.loads(Path(spec["data"]).read_text())
    out = Path(spec["out"]).parent
    run = {"adaptbank": run_adaptbank, "peft": run_peft, "adapters": run_adapters, "transformers": run_torch,
           "torch": run_torch}[spec["impl"]]
    res = run(spec, data, out)
    res |= {"trainable_pct": 100 * res["trainable_params"] / res["base_params"],
            "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.executable}
    Path(spec["out"]).write_text(json.dumps(res, indent=2))


# ----------------------------------------------------------------------------- the driver
def write_data(task: str, args: argparse.Namespace, folder: Path) -> tuple[Path, dict]:
    """The task's texts, labels and token ids (adaptbank's ``tokenize``), as every worker reads them."""
    from adaptbank import load_backbone
    from adaptbank.data.load import load_task
    from adaptbank.data.tokens import pad_id, tokenize

    tokenizer = load_backbone().tokenizer
    data = load_task(task, max_train=args.max_train, max_test=args.max_test, seed=args.seed)
    train, test = list(data.train), list(data.test)
    if args.validation:  # the test split is never read: the last quarter of train is held out instead
        cut = len(train) * 3 // 4
        train, test = train[:cut], train[cut:]
    split = {s: {"texts": [e.text for e in ex], "labels": [e.label for e in ex],
                 "ids": tokenize(tokenizer, [e.text for e in ex], args.max_length)}
             for s, ex in (("train", train), ("test", test))}
    blob = {"labels": list(data.labels), "pad": pad_id(tokenizer), **split}
    path = folder / f"{task}.json"
    path.write_text(json.dumps(blob))
    return path, {"classes": len(data.labels), "n_train": len(train), "n_test": len(test),
                  "scored_on": "validation (last quarter of train)" if args.validation else "test"}


def adapters_available(python: str) -> tuple[bool, str]:
    code = "import adapters, transformers, torch; print(adapters.__version__, transformers.__version__, torch.__version__)"
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, env=worker_env())
    except OSError as err:
        return False, f"--adapters-python {python} cannot run: {err}"
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"{python} cannot import adapters ({last}); give --adapters-python a venv with adapters==1.3.0"
    a, t, tv = done.stdout.split()[-3:]
    return True, f"adapters {a} with transformers {t}, torch {tv} ({python})"


def worker_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def run_worker(python: str, spec: dict, folder: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{spec['method']}-{spec['impl']}-", dir=folder))
    spec = spec | {"out": str(run_dir / "result.json")}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(run_dir / "spec.json")],
                          capture_output=True, text=True, env=worker_env())
    if done.returncode:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Interrupt)\b", line)]
        return {"error": f"exit {done.returncode}: {(raised or lines or ['no output'])[-1]}"}
    return json.loads((run_dir / "result.json").read_text())


def main() -> None:
    args = parse()
    if args.worker:
        return worker(args.worker)
    from _common import environment

    from adaptbank import TrainConfig

    for item in args.lr:
        method, _, value = item.partition("=")
        if method not in LR or not value:
            raise SystemExit(f"--lr {item!r}: expected METHOD=LR with METHOD one of {', '.join(LR)}")
        LR[method] = float(value)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    have_adapters, adapters_note = adapters_available(args.adapters_python)
    print(("" if have_adapters else "skipping the adapters rows: ") + adapters_note, flush=True)
    previous = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else {}
    out = {"env": environment(args.threads) | {"adapters": adapters_note}, "learning_rates": LR,
           "runs": previous.get("runs", {})}
    rows, ratio_rows = [], []
    with tempfile.TemporaryDirectory(prefix="methods-bench-") as tmp:
        folder = Path(tmp)
        for task in args.tasks:
            data_path, shape = write_data(task, args, folder)
            print(f"== {task}: {shape['classes']} classes, {shape['n_train']} train / {shape['n_test']} test", flush=True)
            done = out["runs"].setdefault(task, {})
            for i, method in enumerate(args.methods):
                wanted = [m for m in IMPLS[method] if args.impls is None or m in args.impls]
                if all(m in done.get(method, {}) for m in wanted) and not args.redo:  # resumable per (task, method, impl)
                    print(f"   {method}: kept from {args.json}", flush=True)
                    continue
                cfg = TrainConfig(epochs=args.epochs, lr=LR[method], head_lr=LR[method], probe_init=False,
                                  seed=args.seed, max_length=args.max_length, batch_size=args.batch_size)
                impls = IMPLS[method] if i % 2 == 0 else IMPLS[method][::-1]  # alternate who goes first
                impls = [m for m in impls if args.impls is None or m in args.impls]
                res: dict = {}
                for impl in impls:
                    if impl == "adapters" and not have_adapters:
                        res[impl] = {"skipped": adapters_note}
                    else:
                        python = args.adapters_python if impl == "adapters" else sys.executable
                        spec = {"task": task, "method": method, "impl": impl, "train_config": cfg.to_dict(),
                                "threads": args.threads, "data": str(data_path),
                                "prefix_positions": args.prefix_positions}
                        res[impl] = run_worker(python, spec, folder) | shape
                    shown = {k: v for k, v in res[impl].items() if k not in ("disk_files", "python")}
                    print(f"   {method:16} {impl:12} {shown}", flush=True)
                merged = done.get(method, {}) | res
                done[method] = {impl: merged[impl] for impl in IMPLS[method] if impl in merged}
                write_json(args.json, out, quiet=True)
            summarise(task, done, args.methods, rows, ratio_rows)
    print("\nrows: trainable % of the backbone's parameters (head excluded); accuracy on the test split; "
          "rel. full FT = accuracy / full fine-tuning's; train peak = resident-set rise over the pre-training "
          "size during training; disk = one task's saved files (head included, model cards excluded)")
    print(table(["task", "method", "impl", "lr", "trainable %", "accuracy %", "rel. full FT", "train ex/s",
                 "train peak MiB", "disk KiB", "note"], rows))
    print("\nadaptbank beside each peer (same run, same batches):")
    print(table(["task", "method", "peer", "adaptbank - peer (pts)", "ex/s ab/peer", "peak ab/peer",
                 "disk ab/peer"], ratio_rows))
    print(f"\n{NOISE_NOTE}")
    write_json(args.json, out)


def summarise(task: str, done: dict, methods: list[str], rows: list, ratio_rows: list) -> None:
    full = done.get("full-ft", {}).get("transformers", {}).get("accuracy")
    for method in methods:
        res = done.get(method, {})
        for impl, r in res.items():
            if "accuracy" not in r:
                note = str(r.get("skipped") or r.get("error"))
                rows.append([task, method, impl, f"{LR[method]:g}", None, None, None, None, None, None,
                             note if len(note) <= 70 else note[:67] + "..."])
                continue
            rows.append([task, method, impl, f"{LR[method]:g}", r["trainable_pct"], 100 * r["accuracy"],
                         ratio(r["accuracy"], full), r["train_ex_per_s"], r["train_peak_mib"], r["disk_bytes"] / 1024,
                         "" if r.get("saved_as", "safetensors") == "safetensors" else "disk: torch.save"])
        ab = res.get("adaptbank", {})
        for impl, r in res.items():
            if impl == "adaptbank" or "accuracy" not in r or "accuracy" not in ab:
                continue
            ratio_rows.append([task, method, impl, 100 * (ab["accuracy"] - r["accuracy"]),
                               ratio(ab["train_ex_per_s"], r["train_ex_per_s"]),
                               ratio(ab["train_peak_mib"], r["train_peak_mib"]), ratio(ab["disk_bytes"], r["disk_bytes"])])


if __name__ == "__main__":
    main()
