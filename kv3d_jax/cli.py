"""The ``kv3d`` command line. Each subcommand is one ``_add_<name>(subparsers)`` function."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kv3d", description="Visualise what the kernels of a 3D CNN have learned."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kv3d`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"kv3d {args.command}: error: {err}", file=sys.stderr)
        return 2


_SUBCOMMANDS: list = []

if __name__ == "__main__":
    sys.exit(main())
