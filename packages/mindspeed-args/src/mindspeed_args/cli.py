"""``mindspeed args``: validate, show, list and convert launch parameters.

Exit codes: 0 ok, 1 violations found, 2 unusable input (unknown flag, unreadable file).
"""

from __future__ import annotations

import argparse
import difflib
import sys

from mindspeed_args.convert import convert
from mindspeed_args.describe import list_line, report, show
from mindspeed_args.errors import ArgsError, UsageError
from mindspeed_args.groups import GROUPS_BY_NAME
from mindspeed_args.schema import load_schema
from mindspeed_args.validate import validate

DIALECT_CHOICES = ("megatron", "swift", "fsdp2")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="mindspeed args", description="Validate, show, list and translate launch parameters.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    v = sub.add_parser("validate", help="check a launch; flags go after --",
                       description="Check a launch: mindspeed args validate [--dialect D] [--config FILE] [-- FLAGS...]")
    v.add_argument("--dialect", choices=DIALECT_CHOICES, default="megatron")
    v.add_argument("--config", help="YAML/JSON of canonical names (fsdp2: the FSDP2 YAML)")
    v.add_argument("--world-size", type=int, help="number of processes (default: $WORLD_SIZE)")
    s = sub.add_parser("show", help="describe one parameter (any dialect spelling)")
    s.add_argument("name")
    ls = sub.add_parser("list", help="list parameters")
    ls.add_argument("--group", choices=sorted(GROUPS_BY_NAME))
    ls.add_argument("--dialect", choices=DIALECT_CHOICES + ("env",))
    c = sub.add_parser("convert", help="translate a launch to another dialect",
                       description="mindspeed args convert --from D1 --to D2 [FILE] [-- FLAGS...]")
    c.add_argument("--from", dest="src", choices=DIALECT_CHOICES, required=True)
    c.add_argument("--to", dest="dst", choices=DIALECT_CHOICES, required=True)
    c.add_argument("--world-size", type=int, help="number of devices (needed to translate batch sizes)")
    c.add_argument("file", nargs="?", help="FSDP2 YAML, or a file of launch flags")
    return ap


def run(argv: list[str]) -> int:
    ours, flags = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    if len(ours) == 2 and ours[0] == "show" and ours[1] not in ("-h", "--help"):
        return _show(load_schema(), ours[1])  # a flag spelling like --seq-length is a name here
    args = build_parser().parse_args(ours)
    schema = load_schema()
    if args.command == "validate":
        r = validate(flags, dialect=args.dialect, config=args.config, world_size=args.world_size)
        print(report(r))
        return r.exit_code
    if args.command == "show":
        return _show(schema, args.name)
    if args.command == "list":
        params = [p for p in schema.params.values()
                  if (args.group is None or p.group == args.group) and (args.dialect is None or args.dialect in p.spellings)]
        for p in params:
            print(list_line(p, args.dialect))
        print(f"{len(params)} parameters")
        return 0
    t = convert(args.src, args.dst, args.file, flags, args.world_size)
    for note in t.notes:
        print(f"note: {note}", file=sys.stderr)
    sys.stdout.write(t.text)
    return 0


def _show(schema, name: str) -> int:
    p = schema.find(name)
    if p is None:
        close = difflib.get_close_matches(name.lstrip("-").replace("-", "_"), list(schema.params), n=3)
        raise UsageError(f"unknown parameter {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    print(show(p))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for the ``mindspeed args`` command (and ``python -m mindspeed_args``)."""
    try:
        return run(list(sys.argv[1:] if argv is None else argv))
    except ArgsError as exc:
        problems = getattr(exc, "problems", [str(exc)])
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
