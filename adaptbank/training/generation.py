"""Generation tasks in training and evaluation: prompt + target rows, the loss on the target tokens through
the frozen shared LM head, and exact match / token F1 of greedy continuations.

Letters in shape comments: B batch, T tokens, D hidden size, V vocabulary, N target tokens of a batch.

A row is ``prompt ids + target ids + [EOS]`` (the target tokenised as ``" " + target``, without special
tokens). Training is teacher forcing with the prompt and the padding masked out (the usual ``-100``
labels)::

    labels_t = x_t  for t >= target_from (the target and its EOS),  -100 otherwise (prompt, padding)
    L = -1/N * sum_{t : labels_t != -100} log softmax(W h_{t-1})_{x_t}

where ``h`` are the adapted decoder's hidden states and ``W`` the frozen LM head: only the task's expert
trains, and only the N target positions go through ``W``. It runs in the one training loop
(``training.loop.fit`` with ``loss=generation_loss``).

On an encoder-decoder (T5) a row is the prompt ids (the encoder's input) with ``Row.target`` = target ids +
[EOS]; ``features`` are the encoder's states and the loss runs the decoder over them on the target shifted
right behind ``decoder_start_token_id`` (teacher forcing, ``core.seq2seq.seq2seq_loss``).

Evaluation (SQuAD's, Rajpurkar et al. 2016, https://arxiv.org/abs/1606.05250): texts are normalised
(lower case, punctuation removed, whitespace collapsed); exact match is equality of the normalised
texts, token F1 the harmonic mean of the precision and recall of their words (as bags).

A prompt longer than ``max_length`` tokens keeps its *last* ``max_length`` tokens (a template's cue,
"Answer:", is at its end). A target that does not fit the model's positions is an error; T5 has no position
limit, and there a target longer than ``max_length`` tokens with its EOS is the error (``core.seq2seq``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptbank.core.config import TrainConfig
from adaptbank.core.generate import Generation, generate, position_limit
from adaptbank.core.model import AdaptBankModel
from adaptbank.core.seq2seq import is_seq2seq, seq2seq_loss
from adaptbank.data.load import TaskData, generation_pairs
from adaptbank.data.tokens import batches
from adaptbank.training.evaluate import evaluate
from adaptbank.training.loop import LossTerm, Row, TrainResult, epoch_batches, fit, total_steps

__all__ = ["encode_prompts", "encode_pairs", "generation_labels", "generation_loss", "generation_features",
           "train_generation", "new_tokens_for", "generate_texts", "normalize", "exact_match", "token_f1",
           "evaluate_generation", "evaluate_task", "fit_generation_task"]


def _tokenizer(model: AdaptBankModel) -> object:
    tok = model.tokenizer
    if tok is None or getattr(tok, "eos_token_id", None) is None:
        raise ValueError(f"backbone {model.backbone_name!r} has no tokenizer with an EOS token; generation tasks "
                         "need one (it ends every target)")
    return tok


def encode_prompts(model: AdaptBankModel, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per prompt, each keeping its last ``max_length`` tokens."""
    ids = _tokenizer(model)(list(prompts))["input_ids"]  # type: ignore[operator]
    return [list(x[-max_length:]) for x in ids]


def encode_pairs(model: AdaptBankModel, name: str, prompts: Sequence[str], targets: Sequence[str],
                 max_length: int) -> list[Row]:
    """Training rows of task ``name``: ``prompt + " " target + EOS``, ``target_from`` at the target. A
    target that leaves no position for the prompt is an error naming the example and both lengths; a
    prompt is cut from the left to fit what the target leaves. On an encoder-decoder: the prompt, with
    ``target`` = ``" " target + EOS`` (:func:`_seq2seq_rows`)."""
    if len(prompts) != len(targets):
        raise ValueError(f"task {name!r}: {len(prompts)} prompts but {len(targets)} targets")
    tok = _tokenizer(model)
    eos = int(tok.eos_token_id)  # type: ignore[attr-defined]
    limit = position_limit(model)
    tgt = tok([" " + t.strip() for t in targets], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    if is_seq2seq(model):
        return _seq2seq_rows(name, encode_prompts(model, prompts, max_length), tgt, eos, max_length)
    rows = []
    for i, (p, t) in enumerate(zip(encode_prompts(model, prompts, max_length), tgt)):
        t = [*t, eos]
        if limit is not None and len(t) >= limit:
            raise ValueError(f"task {name!r}: the target of example {i + 1} is {len(t)} tokens long with its EOS, "
                             f"but the model has {limit} positions and the prompt needs at least one; targets "
                             f"must stay below {limit - 1} tokens")
        if limit is not None:
            p = p[-(limit - len(t)):]
        rows.append(Row(p + t, 0, name, target_from=len(p)))
    return rows


def _seq2seq_rows(name: str, prompts: list[list[int]], targets: list[list[int]], eos: int,
                  max_length: int) -> list[Row]:
    """Encoder-decoder rows: the prompt for the encoder, the target and its EOS for the decoder, which
    reads at most ``max_length`` tokens (T5 has no position limit; see ``core.seq2seq``)."""
    rows = []
    for i, (p, t) in enumerate(zip(prompts, targets)):
        if len(t) + 1 > max_length:
            raise ValueError(f"task {name!r}: the target of example {i + 1} is {len(t) + 1} tokens long with its EOS, "
                             f"above max_length {max_length} (--max-length), the limit on the decoder's side too "
                             "(T5 has no position limit; a cut target would teach it to stop early); raise "
                             "--max-length or shorten the target")
        rows.append(Row(p, 0, name, target=(*t, eos)))
    return rows


def generation_labels(rows: Sequence[Row], width: int) -> Tensor:
    """``labels (B, T)``: the target tokens of each row at their positions, -100 on prompt and padding."""
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        if r.target_from is None:
            raise ValueError(f"row {b} of task {r.task!r} is not a generation row (no target_from)")
        labels[b, r.target_from: len(r.ids)] = torch.tensor(r.ids[r.target_from:])
    return labels


def generation_loss(model: AdaptBankModel, rows: Sequence[Row], hidden: Tensor) -> Tensor:
    """Mean cross-entropy of the target tokens given the hidden states ``(B, T, D)`` of right-padded rows
    (see the module docstring); token t is predicted from position t - 1. On an encoder-decoder the hidden
    states are the encoder's and the loss is ``core.seq2seq.seq2seq_loss`` on the rows' targets."""
    if is_seq2seq(model):
        lengths = torch.tensor([len(r.ids) for r in rows], device=hidden.device)  # (B,)
        mask = (torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]).long()  # (B, T) right-padded
        bad = next((b for b, r in enumerate(rows) if r.target is None), None)
        if bad is not None:
            raise ValueError(f"row {bad} of task {rows[bad].task!r} is not an encoder-decoder generation row (no target)")
        return seq2seq_loss(model, hidden, mask, [r.target for r in rows])  # type: ignore[misc]
    labels = generation_labels(rows, hidden.shape[1]).to(hidden.device)[:, 1:]  # (B, T - 1) shifted
    b, t = (labels != -100).nonzero(as_tuple=True)  # (N,), (N,)
    logits = model.lm_head(hidden[:, :-1][b, t])  # type: ignore[misc]  # (N, V)
    return F.cross_entropy(logits.float(), labels[b, t])


def generation_features(model: AdaptBankModel, task: str) -> Callable[[dict[str, Tensor]], Tensor]:
    """``features(batch) -> (B, T, D)``: the decoder's hidden states with task ``task``'s expert on (an
    encoder-decoder's: its encoder's, ``model.encoder``; the decoder runs in :func:`generation_loss`)."""

    def features(batch: dict[str, Tensor]) -> Tensor:
        model.route(task=task)
        return model.encoder(**batch).last_hidden_state  # (B, T, D)

    return features


def train_generation(model: AdaptBankModel, name: str, prompts: Sequence[str], targets: Sequence[str],
                     cfg: TrainConfig, *, on_step: Callable[[int, float], None] | None = None,
                     loss_terms: Sequence[LossTerm] = ()) -> TrainResult:
    """Train generation task ``name``'s expert on ``prompts`` -> ``targets`` (its only parameters: the LM
    head is frozen and shared)."""
    if not prompts:
        raise ValueError(f"task {name!r} has no training examples")
    if model.tasks[name].head != "generation":
        raise TypeError(f"task {name!r} is a classification task; train it with training.loop.train_task")
    rows = encode_pairs(model, name, prompts, targets, cfg.max_length)
    groups = [{"params": model.expert_parameters(name), "lr": cfg.lr, "name": "expert"}]
    result = fit(model, epoch_batches(rows, cfg, cfg.seed), steps=total_steps(len(rows), cfg), groups=groups,
                 cfg=cfg, features=generation_features(model, name), seed=cfg.seed, what=f"task {name!r}",
                 loss_terms=loss_terms, on_step=on_step, loss=generation_loss, dropout=cfg.train_dropout)
    model.finalize(name)
    return result


def new_tokens_for(model: AdaptBankModel, targets: Sequence[str]) -> int:
    """The decoding length limit of a task whose training targets are ``targets``: twice the longest
    target's tokens plus its EOS and 2 spare (decoding stops at EOS; the limit only bounds a run-on)."""
    tgt = _tokenizer(model)([" " + t.strip() for t in targets], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return 2 * max(len(t) for t in tgt) + 3


def generate_texts(model: AdaptBankModel, prompts: Sequence[str], *, task: str | None = None,
                   task_ids: Sequence[str] | None = None, routed: bool = False, experts: Sequence[str] | None = None,
                   max_length: int = 128, max_new_tokens: int = 16,
                   batch_size: int = 32) -> tuple[list[str], list[str]]:
    """Greedy continuations of ``prompts`` as texts, and the task each was generated under (batched by
    length, returned in the order of ``prompts``); one of ``task``, ``task_ids`` (per prompt), ``routed`` or
    ``experts`` (those on together, weight 1 each; ``()``: the base model), as in :func:`generate`."""
    tok = _tokenizer(model)
    ids = encode_prompts(model, prompts, max_length)
    texts, tasks = [""] * len(ids), [""] * len(ids)
    for chunk in batches(ids, batch_size, shuffle=False):
        rows = [task_ids[i] for i in chunk] if task_ids is not None else None
        out: Generation = generate(model, [ids[i] for i in chunk], task=task, task_ids=rows, routed=routed,
                                   experts=experts, max_new_tokens=max_new_tokens)
        for i, toks, t in zip(chunk, out.tokens, out.tasks):
            texts[i], tasks[i] = tok.decode(toks, skip_special_tokens=True).strip(), t  # type: ignore[attr-defined]
    return texts, tasks


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> list[str]:
    """Lower case, punctuation removed, split on whitespace (SQuAD's normalisation, articles kept)."""
    return _PUNCT.sub(" ", text.lower()).split()


def exact_match(prediction: str, target: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalize(prediction) == normalize(target))


def token_f1(prediction: str, target: str) -> float:
    """Harmonic mean of word precision and recall of the normalised texts (1.0 when both are empty)."""
    p, t = normalize(prediction), normalize(target)
    if not p or not t:
        return float(p == t)
    common = sum((Counter(p) & Counter(t)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def evaluate_generation(model: AdaptBankModel, name: str, prompts: Sequence[str], targets: Sequence[str], *,
                        max_length: int = 128, max_new_tokens: int = 16, batch_size: int = 32) -> dict[str, float]:
    """``{"exact_match", "f1"}`` (means over the examples) of task ``name``'s greedy continuations of
    ``prompts`` against ``targets``, with the true task id."""
    if not prompts:
        raise ValueError(f"task {name!r} has no test examples")
    texts, _ = generate_texts(model, prompts, task=name, max_length=max_length, max_new_tokens=max_new_tokens,
                              batch_size=batch_size)
    return {"exact_match": sum(map(exact_match, texts, targets)) / len(texts),
            "f1": sum(map(token_f1, texts, targets)) / len(texts)}


def fit_generation_task(model: AdaptBankModel, name: str, data: TaskData, cfg: TrainConfig, *,
                        on_step: Callable[[int, float], None] | None = None) -> tuple[TrainResult, dict[str, float]]:
    """The bank's use of the above for a loaded generation task: train on the train split, then score the
    test split; returns the training result and ``{"test_exact_match", "test_f1", "max_new_tokens"}``
    (the decoding limit from :func:`new_tokens_for`, kept with the task for later evaluations)."""
    prompts, targets = generation_pairs(data, "train")
    result = train_generation(model, name, prompts, targets, cfg, on_step=on_step)
    limit = new_tokens_for(model, targets)
    scores = evaluate_generation(model, name, *generation_pairs(data, "test"), max_length=cfg.max_length,
                                 max_new_tokens=limit)
    return result, {"test_exact_match": scores["exact_match"], "test_f1": scores["f1"], "max_new_tokens": limit}


def evaluate_task(model: AdaptBankModel, name: str, data: TaskData, *, max_length: int = 128,
                  max_new_tokens: int = 16) -> dict[str, float]:
    """The test-split scores of any task with the true task id: ``{"accuracy"}`` for a classification
    task, ``{"exact_match", "f1"}`` for a generation task (decoding at most ``max_new_tokens``)."""
    if model.tasks[name].head == "generation":
        return evaluate_generation(model, name, *generation_pairs(data, "test"), max_length=max_length,
                                   max_new_tokens=max_new_tokens)
    return {"accuracy": evaluate(model, name, [e.text for e in data.test], [e.label for e in data.test],
                                 max_length=max_length)}
