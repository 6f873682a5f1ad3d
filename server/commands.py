"""The `funasr-nano` command: `serve` (server.http) on top of the library's commands (asr.cli)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        from .http import main as serve

        serve(args[1:])
        return 0
    from asr.cli import main as cli

    return cli(args)


if __name__ == "__main__":
    raise SystemExit(main())
