"""Every tool's --help: the same from `python tools/<tool>.py` as from
`main(["--help"])` (the console script's entry point), and every option
explained with its default."""

import argparse
import importlib

import pytest

from keras_vitscale.cli import common

pytestmark = pytest.mark.integration  # the tools: run once, on JAX

TOOLS = ("pretrain", "finetune", "distill", "fewshot", "scaling_study", "fit_scaling_law",
         "plan_memory", "plot_schedule", "convert", "push_to_hub")


def _module(tool):
    return importlib.import_module(f"keras_vitscale.cli.{tool}")


@pytest.mark.parametrize("tool", TOOLS)
def test_script_and_console_entry_print_the_same_help(tool, run_script, capsys):
    script = run_script(tool, "--help")
    assert script.returncode == 0, script.stderr[-2000:]
    with pytest.raises(SystemExit) as info:
        _module(tool).main(["--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out == script.stdout
    assert script.stdout.startswith(f"usage: kvs-{tool.replace('_', '-')} ")


@pytest.mark.parametrize("tool", TOOLS)
def test_every_option_has_help_and_shows_its_default(tool):
    parser = _module(tool).build_parser()
    formatter = common.HelpFormatter(parser.prog)
    for action in parser._actions:  # argparse lists its actions only here
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"kvs-{tool} {name} has no help text"
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS:
            continue
        text = formatter._expand_help(action)
        assert "default" in text, f"kvs-{tool} {name}: default {default!r} not shown: {text}"


def test_no_heading_is_printed_twice():
    for tool in TOOLS:
        text = _module(tool).build_parser().format_help()
        headings = [line for line in text.splitlines() if line.endswith(":")
                    and not line.startswith(" ")]
        assert len(headings) == len(set(headings)), (tool, headings)
