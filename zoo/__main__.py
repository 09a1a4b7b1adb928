"""python -m zoo list [--json] | publish DIR ENTRY TAG | checkpoints [--json]"""
from __future__ import annotations

import argparse
import json
import sys

from zoo.hub import add_hub_commands
from zoo.registry import entries


def cmd_list(args: argparse.Namespace) -> int:
    rows = [e.as_dict() for e in entries()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("name", "kind", "status", "arxiv", "paper")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns[:-1]}
    print("  ".join(c.upper().ljust(widths.get(c, 0)) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths.get(c, 0)) for c in columns))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo", description="The model zoo's registry and store.")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="the registered papers")
    listing.add_argument("--json", action="store_true", help="print JSON objects")
    listing.set_defaults(func=cmd_list)
    add_hub_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
