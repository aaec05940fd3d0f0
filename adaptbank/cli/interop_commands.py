"""The interop commands: ``export`` (adaptbank's own expert folder, a peft adapter folder, or a merged
transformers checkpoint) and ``import`` (a peft adapter folder into a bank). The work is done by
``adaptbank.bank.interop``; a failed command writes nothing and leaves the bank as it was."""

from __future__ import annotations

from typing import Any

import click

from adaptbank.cli.errors import friendly
from adaptbank.cli.options import HEAD_TRAIN, config_option, given, lock_timeout_option
from adaptbank.cli.output import emit, pct
from adaptbank.core.config import TrainConfig

__all__ = ["export", "import_", "register"]

_friendly = friendly()
_BANK = click.argument("bank", type=click.Path(file_okay=False))


@click.command()
@_BANK
@click.argument("task")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Folder to write (new or empty).")
@click.option("--format", "fmt", type=click.Choice(["adaptbank", "peft"]), default="adaptbank", show_default=True,
              help="adaptbank: the task's own expert folder (any method); peft: adapter_config.json + "
              "adapter_model.safetensors for PeftModel.from_pretrained (LoRA, ia3, prompt, prefix, ptuning-v2).")
@click.option("--merged", is_flag=True, help="A transformers checkpoint with the task folded into the base weights, "
              "loadable with AutoModel.from_pretrained alone (LoRA, bitfit, ia3; a quantised base is dequantised).")
@click.option("--replace", is_flag=True, help="Replace OUT if it exists and is not empty.")
@_friendly
def export(bank: str, task: str, out: str, fmt: str, merged: bool, replace: bool) -> None:
    """Write TASK of BANK to the folder OUT, with its classification head (adaptbank_head.safetensors + .json)."""
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.bank.interop import export_merged, export_peft

    b = AdapterBank.open(bank)
    if merged and fmt == "peft":
        raise click.UsageError("--merged writes a transformers checkpoint; it does not combine with --format peft")
    if merged:
        path, what = export_merged(b, task, out, replace=replace), "merged transformers checkpoint"
    elif fmt == "peft":
        path, what = export_peft(b, task, out, replace=replace), "peft adapter"
    else:
        from adaptbank.bank.expert_io import save_expert

        path, what = save_expert(b.load([task]), task, out, replace=replace), "adaptbank expert folder"
    quant, note = b.base.get("quantize"), ""
    if quant and merged:
        note = f" (the bank's base is {quant}-quantised: the checkpoint holds its dequantised weights)"
    elif quant and fmt == "peft":
        note = (f" (the bank's base is {quant}-quantised: on the full-precision base peft's outputs differ from the "
                "bank's by the quantisation error)")
    click.echo(f"wrote {task} as a {what} to {path}{note}")


@click.command("import")
@_BANK
@click.argument("src", metavar="DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--task", "name", required=True, help="Name of the new task in the bank.")
@click.option("--spec", default=None, help="Task spec (file or shipped name) whose training split fits the head, when "
              "DIR has no adaptbank_head.safetensors, and gives the router memory [the spec the head file carries].")
@click.option("--allow-other-base", is_flag=True, help="Accept an adapter whose base_model_name_or_path names another "
              "model than the bank's base (the module names and shapes are still checked).")
@config_option(TrainConfig, "max_length", default_from=HEAD_TRAIN)
@config_option(TrainConfig, "max_train", default_from=HEAD_TRAIN)
@config_option(TrainConfig, "max_test", default_from=HEAD_TRAIN)
@config_option(TrainConfig, "seed", default_from=HEAD_TRAIN)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@lock_timeout_option
@_friendly
def import_(bank: str, src: str, name: str, spec: str | None, allow_other_base: bool, as_json: bool,
            lock_timeout: float, **train: Any) -> None:
    """Read the peft adapter folder DIR (LORA, IA3, PROMPT_TUNING, PREFIX_TUNING) into BANK as task --task."""
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.bank.interop import import_peft

    b = AdapterBank.open(bank, lock_timeout=lock_timeout)
    r = import_peft(b, src, name, spec=spec, train=given(**train),
                    allow_other_base=allow_other_base, log=lambda msg: click.echo(msg, err=True))
    summary = {"task": r.name, "method": r.method, "head": r.head, "test_accuracy": r.test_accuracy,
               "n_train": r.n_train, "n_test": r.n_test}
    emit(summary, as_json, lambda: click.echo(
        f"imported {r.name} ({r.method}, head from {'the head file' if r.head == 'file' else 'a probe fit'}): "
        f"test accuracy {pct(r.test_accuracy)} on {r.n_test} examples; the router was refitted"))


def register(group: click.Group) -> None:
    """Add the interop commands to a click group (the ``adaptbank`` CLI)."""
    for command in (export, import_):
        group.add_command(command)
