"""The `hap` command line: one sub-command per module under `hierarchical_ap.commands`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hierarchical_ap.commands import advise as advise_command
from hierarchical_ap.commands import cluster as cluster_command
from hierarchical_ap.commands import plan as plan_command
from hierarchical_ap.commands import profile as profile_command
from hierarchical_ap.commands import show as show_command
from hierarchical_ap.commands import simulate as simulate_command
from hierarchical_ap.commands import submit as submit_command
from hierarchical_ap.errors import HapError

COMMANDS = (
    profile_command,
    plan_command,
    simulate_command,
    advise_command,
    show_command,
    cluster_command,
    submit_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hap",
        description="hierarchical-ap: automatic pipeline + intra-operator parallelism for PyTorch.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except HapError as exc:
        print(f"hap: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
