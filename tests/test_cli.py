"""The command line's own promises (issue 15): ``--help`` of infer, finetune and eval states every
option's default, --max-length above all (128 for infer, 64 for finetune and eval)."""

import argparse

import pytest

from cometpi.cli import build_parser, main


def _subparser(cmd: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[cmd]


@pytest.mark.parametrize("cmd,max_length", [("infer", 128), ("finetune", 64), ("eval", 64)])
def test_help_states_the_defaults(cmd, max_length, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps at the terminal width
    opt = text[text.index("--max-length MAX_LENGTH "):]
    assert opt[: opt.index(" --", 3)].endswith(f"(default {max_length})"), opt[:200]
    # every option with a value of its own says what it is when not given
    for action in _subparser(cmd)._actions:
        if not action.option_strings or action.required or action.default in (None, False, argparse.SUPPRESS):
            continue
        assert action.help and "default" in action.help, f"{cmd} {action.option_strings[0]}: no default in help"


def test_eval_passes_its_approximation_overrides_to_serve_as_flags():
    """`cometpi eval --smu-form segments` failed to start its server (it passed --smu_form)."""
    from cometpi.cli import build_parser
    from cometpi.evaluate import serve_flags

    flags = serve_flags(600.0, {"smu_form": "segments", "relu": "narrow", "guess": "constant"})
    parsed = build_parser().parse_args(["serve", "--model", "runs/x", "--dealer", "127.0.0.1:1", *flags])
    assert (parsed.smu_form, parsed.relu, parsed.guess) == ("segments", "narrow", "constant")
