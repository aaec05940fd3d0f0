"""CLI options against the config dataclasses: every option that maps onto a config field (the table
``adaptbank.cli.options.CONFIG_FLAGS``) defaults to None, documents the field and shows the field's
current default, and is named ``--<field>`` or a documented alias; no config field is silently left
without a flag."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import subprocess
import sys
import typing

import click
import pytest
from click.testing import CliRunner
from conftest import REPO

from adaptbank.cli.main import main
from adaptbank.cli.options import CONFIG_FLAGS, NOT_CONFIG, UNFLAGGED, ConfigFlag, ConfigOption
from adaptbank.core import config as config_module
from adaptbank.core import settings as settings_module
from adaptbank.core.config import AdapterConfig, LoRAConfig, ParallelAdapterConfig, RouterConfig, TrainConfig

CLASSES = (LoRAConfig, AdapterConfig, ParallelAdapterConfig, TrainConfig, RouterConfig, config_module.PromptTuningConfig,
           config_module.PrefixConfig, config_module.BitFitConfig, config_module.IA3Config)


def _walk(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    out: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        out[path] = command
        if isinstance(command, click.Group):
            out |= _walk(command, path + " ")
    return out


COMMANDS = _walk(main)
ROWS = [(command, flag, row) for command, table in CONFIG_FLAGS.items() for flag, row in table.items()]


def _docs() -> dict[tuple[str, str], str]:
    """(class name, field) -> attribute docstring, read from the source files of the config modules."""
    out = {}
    classes = [n for module in (config_module, settings_module)
               for n in ast.parse(inspect.getsource(module)).body if isinstance(n, ast.ClassDef)]
    for cls in classes:
        for node, nxt in zip(cls.body, cls.body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                out[(cls.name, node.target.id)] = " ".join(str(nxt.value.value).split())
    return out


DOCS = _docs()


def _option(command: str, flag: str) -> click.Option:
    for param in COMMANDS[command].params:
        if isinstance(param, click.Option) and flag in param.opts:
            return param
    raise AssertionError(f"`adaptbank {command}` has no option {flag}")


def _default(cls: type, name: str) -> object:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_the_walk_reaches_subcommands_and_the_table_names_real_commands():
    assert {"init", "add-task", "eval", "predict", "router", "router fit", "run"} <= set(COMMANDS)
    assert set(CONFIG_FLAGS) <= set(COMMANDS)
    assert {command for command, _ in NOT_CONFIG} <= set(COMMANDS)


@pytest.mark.parametrize("command, flag, row", ROWS, ids=[f"{c}:{f}" for c, f, _ in ROWS])
def test_config_option_matches_its_field(command: str, flag: str, row: ConfigFlag):
    opt = _option(command, flag)
    doc = DOCS[(row.cls.__name__, row.field)]
    default = _default(row.cls, row.field)
    assert isinstance(opt, ConfigOption) and (opt.config_cls, opt.config_field) == (row.cls, row.field)
    assert opt.default is None, f"{command} {flag}: default must be None (the dataclass default), got {opt.default!r}"
    assert opt.name == row.field  # the parameter is named after the field: given(**kw) builds the config
    assert opt.help is not None and opt.help.startswith(doc), opt.help
    if row.default_from:
        assert opt.help.endswith(f"[default: {row.default_from}, where it defaults to {default}]"), opt.help
    else:
        assert opt.help.endswith(f"[default: {default}]"), opt.help
    hint = typing.get_type_hints(row.cls)[row.field]
    if typing.get_origin(hint) is typing.Literal:  # a choice field: the same choices, nothing else
        assert isinstance(opt.type, click.Choice) and list(opt.type.choices) == [str(a) for a in typing.get_args(hint)]
    else:
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if typing.get_args(hint) else hint
        assert opt.type is {int: click.INT, float: click.FLOAT, str: click.STRING, bool: click.BOOL}[base]
        if base is bool:  # a switch pair whose off side is --no-<field>
            assert opt.secondary_opts == ["--no-" + flag[2:]], opt.secondary_opts
    if row.alias:  # an alias must differ from the rule and be the flag the field's docstring names
        assert flag != _dashed(row.field) and f"({flag}" in doc, (flag, doc)
    else:
        assert flag == _dashed(row.field), f"{command} {flag} maps onto {row.field}: name it {_dashed(row.field)}"
    for cls, field in row.also:
        assert f"({flag} " in DOCS[(cls.__name__, field)] or f"({flag})" in DOCS[(cls.__name__, field)]
        assert f"{cls.kind} {_default(cls, field)}" in opt.help, opt.help


@pytest.mark.parametrize("command", sorted(CONFIG_FLAGS))
def test_rendered_help_shows_every_default(command: str):
    res = CliRunner().invoke(main, [*command.split(), "--help"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for flag, row in CONFIG_FLAGS[command].items():
        default = _default(row.cls, row.field)
        shown = f"{row.default_from}, where it defaults to {default}" if row.default_from else str(default)
        assert f"{flag} " in text and f"[default: {shown}]" in text, (flag, text)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_generated_option_is_in_the_table(command: str):
    for param in COMMANDS[command].params:
        if isinstance(param, ConfigOption):
            assert param.opts[0] in CONFIG_FLAGS.get(command, {}), f"{command} {param.opts[0]} is not in CONFIG_FLAGS"


def test_options_named_like_a_config_field_are_generated_or_explained():
    field_flags = {_dashed(f.name) for cls in CLASSES for f in dataclasses.fields(cls)}
    field_flags |= {flag for table in CONFIG_FLAGS.values() for flag, row in table.items() if row.alias}
    for command, cmd in COMMANDS.items():
        for param in cmd.params:
            if not isinstance(param, click.Option) or isinstance(param, ConfigOption):
                continue
            for flag in set(param.opts) & field_flags:
                assert NOT_CONFIG.get((command, flag)), \
                    f"{command} {flag} looks like a config field's flag: generate it or say why in NOT_CONFIG"
    for (command, flag), reason in NOT_CONFIG.items():
        assert reason and not isinstance(_option(command, flag), ConfigOption)


def test_flags_named_in_field_docstrings_exist():
    flags = {o for cmd in COMMANDS.values() for p in cmd.params if isinstance(p, click.Option)
             for o in p.opts + p.secondary_opts}
    named = {m for doc in DOCS.values() for m in re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", doc)}
    assert named, "the config docstrings name their flags"
    assert named <= flags, f"docstrings name flags no command has: {sorted(named - flags)}"


def _mapped(command: str, cls: type) -> set[str]:
    return {row.field for row in CONFIG_FLAGS[command].values() if row.cls is cls}


@pytest.mark.parametrize("command, cls", [("add-task", TrainConfig), ("add-task", LoRAConfig), ("init", RouterConfig),
                                          ("add-task", config_module.PromptTuningConfig),
                                          ("add-task", config_module.PrefixConfig),
                                          ("add-task", config_module.BitFitConfig), ("add-task", config_module.IA3Config)])
def test_every_field_has_a_flag_or_a_reason(command: str, cls: type):
    fields = {f.name for f in dataclasses.fields(cls)}
    unflagged = {field for (c, field), reason in UNFLAGGED.items() if c is cls and reason}
    assert unflagged <= fields and not unflagged & _mapped(command, cls)
    assert fields - unflagged == _mapped(command, cls), f"{cls.__name__} fields without a flag on {command}"


def test_every_router_field_is_an_init_flag():
    assert _mapped("init", RouterConfig) == {f.name for f in dataclasses.fields(RouterConfig)}
    assert not [key for key in UNFLAGGED if key[0] is RouterConfig]


def test_init_stores_the_router_options(tiny_bert_dir, tmp_path):
    from adaptbank.bank.facade import AdapterBank

    r = CliRunner()
    res = r.invoke(main, ["init", str(tmp_path / "b1"), "--base", str(tiny_bert_dir), "--top-k", "2",
                          "--router-shrinkage", "0.2"])
    assert res.exit_code == 0, res.output
    assert AdapterBank.open(tmp_path / "b1").router_config == RouterConfig(top_k=2, shrinkage=0.2)
    assert (RouterConfig().top_k, RouterConfig().shrinkage) != (2, 0.2)  # the flags, not the defaults, set them
    res = r.invoke(main, ["init", str(tmp_path / "b2"), "--base", str(tiny_bert_dir), "--router-layers", "1",
                          "--temperature", "0.5", "--share-distance", "2.5"])
    assert res.exit_code == 0, res.output
    assert AdapterBank.open(tmp_path / "b2").router_config == RouterConfig(layers=1, temperature=0.5,
                                                                           share_distance=2.5)
    assert r.invoke(main, ["init", str(tmp_path / "b3"), "--base", str(tiny_bert_dir)]).exit_code == 0
    assert AdapterBank.open(tmp_path / "b3").router_config == RouterConfig()


def test_init_rejects_a_bad_router_value_and_writes_nothing(tmp_path):
    res = CliRunner().invoke(main, ["init", str(tmp_path / "bank"), "--router-shrinkage", "1.5"])
    assert res.exit_code == 1 and "shrinkage must be in [0, 1] (--router-shrinkage), got 1.5" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "bank").exists()


def test_python_dash_m_runs_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "adaptbank.cli", "init", "--help"], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert f"[default: {RouterConfig().layers}]" in " ".join(out.stdout.split())


@pytest.mark.parametrize("method, flags, named", [
    ("bitfit", ["--rank", "4"], "--rank"),
    ("prompt", ["--alpha", "8"], "--alpha"),
    ("lora", ["--prompt-length", "4"], "--prompt-length"),
    ("ia3", ["--prefix-length", "4"], "--prefix-length"),
    ("lora", ["--prefix-positions", "from-zero"], "--prefix-positions"),
])
def test_add_task_refuses_a_flag_the_method_does_not_take(tmp_path, method, flags, named):
    bank = tmp_path / "bank"
    res = CliRunner().invoke(main, ["add-task", str(bank), "weather", "--method", method, *flags])
    assert res.exit_code == 2, res.output
    assert named in res.output and f"--method {method}" in res.output and "it takes" in res.output
    assert not bank.exists()  # nothing was created


def test_prefix_positions_reach_the_prefix_part_of_a_method():
    from adaptbank.cli.bank_commands import _method_config

    flags = {"prompt_length": None, "prompt_init": None, "prefix_length": 5, "prefix_positions": "after-prefix"}
    assert _method_config("ptuning-v2", None, None, prompt=flags) == config_module.PTuningV2Config(
        prefix_length=5, positions="after-prefix")
    both = _method_config("prefix+lora", None, 4, prompt=flags, alpha=None, dropout=None)
    assert both.parts == (config_module.PrefixConfig(prefix_length=5, positions="after-prefix"),
                          config_module.LoRAConfig(rank=4))
    assert _method_config("prefix", None, None, prompt={**flags, "prefix_positions": None}).positions == "auto"


def test_a_bad_prefix_positions_value_names_the_allowed_ones(tmp_path):
    res = CliRunner().invoke(main, ["add-task", str(tmp_path / "bank"), "weather", "--method", "prefix",
                                    "--prefix-positions", "zero"])
    assert res.exit_code == 2 and "'zero' is not one of 'auto', 'from-zero', 'after-prefix'" in res.output
    assert not (tmp_path / "bank").exists()


def test_method_choices_are_every_method_kind():
    opt = next(p for p in COMMANDS["add-task"].params if p.name == "method")
    assert list(opt.type.choices) == list(config_module.METHOD_KINDS)
    assert {"lora", "adapter", "parallel-adapter", "bitfit", "ia3", "prompt", "prefix", "ptuning-v2"} == set(opt.type.choices)
