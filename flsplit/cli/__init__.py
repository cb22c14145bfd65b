"""The ``flsplit`` command: ``flsplit report RUN...``, ``flsplit plan ...`` and ``flsplit make-certs DIR``."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``flsplit`` console script."""
    parser = argparse.ArgumentParser(prog="flsplit", description="flsplit: split learning on Flower")
    commands = parser.add_subparsers(dest="command", required=True)

    # Imported here, not above: `flsplit --help` and one subcommand need not load them all.
    from flsplit.cli import make_certs, partition, plan, report

    report.add_arguments(commands.add_parser("report", help=report.__doc__.splitlines()[0]))
    plan.add_arguments(commands.add_parser("plan", help=plan.__doc__.splitlines()[0]))
    make_certs.add_arguments(commands.add_parser("make-certs", help=make_certs.__doc__.splitlines()[0]))
    partition.add_arguments(commands.add_parser("partition", help=partition.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)

