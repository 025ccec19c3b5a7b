"""The ``fusion-engine`` command line: one parser, one module per command (each ``add_parser`` + ``run``)."""

from __future__ import annotations

import argparse
import sys

import fusion_engine.cli.bench as bench
import fusion_engine.cli.compress as compress
import fusion_engine.cli.evaluate as evaluate
import fusion_engine.cli.export as export
import fusion_engine.cli.keys as keys
import fusion_engine.cli.listing as listing
import fusion_engine.cli.new_plugin as new_plugin
import fusion_engine.cli.predict as predict
import fusion_engine.cli.train as train
from fusion_engine.errors import FusionEngineError, printable

COMMANDS = (listing, train, evaluate, predict, keys, compress, export, bench, new_plugin)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusion-engine", description="Fuse pretrained image backbones into one classifier."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except FusionEngineError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 2
