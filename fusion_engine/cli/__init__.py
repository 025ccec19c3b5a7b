"""The command line: every command and parser, and nothing else (parse, call the library, print)."""

from fusion_engine.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
