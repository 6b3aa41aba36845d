"""The ``mindspeed`` console script."""

from __future__ import annotations

import sys

from mindspeed_cli.plugins import KNOWN, installed, mindspeed_distributions


def _help() -> str:
    cmds = installed()
    lines = ["usage: mindspeed <command> [args...]   (mindspeed <command> --help for details)", "",
             "commands:"]
    for name in sorted(cmds):
        purpose = KNOWN.get(name, (None, "(no description)"))[1]
        lines.append(f"  {name:12s} {purpose}")
    missing = {n: v for n, v in KNOWN.items() if n not in cmds}
    if missing:
        lines += ["", "not installed:"]
        lines += [f"  {n:12s} {purpose}  (pip install {dist})" for n, (dist, purpose) in sorted(missing.items())]
    lines += ["", "options: --help, --version"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0 if argv else 2
    if argv[0] == "--version":
        for name, version in mindspeed_distributions().items():
            print(f"{name} {version}")
        return 0
    cmds = installed()
    name = argv[0]
    if name not in cmds:
        hint = f"; install {KNOWN[name][0]}" if name in KNOWN else "; see mindspeed --help"
        print(f"mindspeed: unknown command {name!r}{hint}", file=sys.stderr)
        return 2
    try:
        func = cmds[name].load()
    except Exception as exc:  # a broken plugin must not take the others down
        print(f"mindspeed: command {name!r} ({cmds[name].dist}) failed to import: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return int(func(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
