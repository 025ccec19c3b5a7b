"""The ``fusion-engine`` command line: one parser, one module per command (each ``add_parser`` + ``run``)."""

from __future__ import annotations

import argparse
import re
import sys
import warnings

import fusion_engine.cli.bench as bench
import fusion_engine.cli.compress as compress
import fusion_engine.cli.evaluate as evaluate
import fusion_engine.cli.export as export
import fusion_engine.cli.keys as keys
import fusion_engine.cli.listing as listing
import fusion_engine.cli.new_plugin as new_plugin
import fusion_engine.cli.predict as predict
import fusion_engine.cli.train as train
from fusion_engine.errors import FusionEngineError, RandomInitWarning, printable, suggest

COMMANDS = (listing, train, evaluate, predict, keys, compress, export, bench, new_plugin)


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors show a one-line usage (``fusion-engine train [options]``), the problem
    with a close match for a mistyped flag or choice, and where the full help is."""

    def short_usage(self) -> str:
        positionals, required = [], []
        for action in self._actions:
            if not action.option_strings and action.nargs != argparse.SUPPRESS:
                name = action.metavar or action.dest.upper()
                positionals.append(f"{name} ..." if action.nargs in ("*", "+", argparse.REMAINDER) else name)
            elif action.required:
                required.append(f"{action.option_strings[0]} {action.metavar or action.dest.upper()}")
        return " ".join([self.prog, *positionals, *required, "[options]"])

    def error(self, message: str):
        match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if match:
            choices = [c.strip().strip("'") for c in match.group(2).split(",")]
            message += suggest(match.group(1), choices)
        what = "command" if hasattr(self, "commands") else "option"
        self.exit(2, f"usage: {self.short_usage()}\nerror: {message}\n(`{self.prog} -h` lists every {what})\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fusion-engine", description="Fuse pretrained image backbones into one classifier.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    parser.commands = sub.choices  # name -> the command's parser, for its errors
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an argument the command does not know is reported by the command's
    parser (its usage, not the top level's), with a close match among its flags."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = parser.commands[args.command]
        flags = [s for action in command._actions for s in action.option_strings]
        unknown = next((a for a in extra if a.startswith("-")), extra[0])
        name = unknown.split("=", 1)[0]
        hint = suggest(name, flags) if name.startswith("-") else ""
        more = f" (and {len(extra) - 1} more: {' '.join(extra[1:])})" if len(extra) > 1 and not hint else ""
        command.error(f"unrecognized argument {name}{hint}{more}")
    return args


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """fusion-engine's own warnings as one ``warning: ...`` line on stderr; others as Python shows them."""
    if issubclass(category, RandomInitWarning):
        print(f"warning: {printable(str(message))}", file=sys.stderr, flush=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(parser, argv)
    args.argv = argv
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", RandomInitWarning)  # every build's warning, before its work starts
            warnings.showwarning = _show_warning
            return args.func(args)
    except FusionEngineError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 2
