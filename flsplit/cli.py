"""The ``flsplit`` command: ``flsplit report RUN...``, ``flsplit plan ...`` and ``flsplit make-certs DIR``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``flsplit`` console script."""
    parser = argparse.ArgumentParser(prog="flsplit", description="flsplit: split learning on Flower")
    commands = parser.add_subparsers(dest="command", required=True)

    from flsplit import deploy_keys, partition_command, plan_command, report

    report.add_arguments(commands.add_parser("report", help=report.__doc__.splitlines()[0]))
    plan_command.add_arguments(commands.add_parser("plan", help=plan_command.__doc__.splitlines()[0]))
    deploy_keys.add_arguments(commands.add_parser("make-certs", help=deploy_keys.__doc__.splitlines()[0]))
    partition_command.add_arguments(commands.add_parser("partition", help=partition_command.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
