"""The `fastavatar-stream` command line.

Each subcommand lives in its own module under `fastavatar_stream.commands` and exposes
`register(subparsers) -> argparse.ArgumentParser` (which sets `func`). Problems a user can fix
end as one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import Sequence

from engine.errors import InputError

log = logging.getLogger("fastavatar_stream")

EXIT_USER_ERROR = 2


def _load_commands() -> list:
    import fastavatar_stream.commands as pkg

    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"{pkg.__name__}.{name}") for name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastavatar-stream",
        description=(
            "Streaming 3D Gaussian head-avatar reconstruction (FastAvatar). Frames from a video file, "
            "a camera or a WebRTC peer are tracked, grouped into sliding windows and fused into one "
            "animatable avatar that improves with every window."
        ),
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="how much to log on stderr (default: info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _load_commands():
        module.register(sub)
    return parser



def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the exact command, recorded in checkpoints and reports
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        result = args.func(args)
    except (InputError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"fastavatar-stream {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"fastavatar-stream {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: keep the traceback in the log, one line for the person
        log.debug("unhandled error", exc_info=True)
        protocol_error = _protocol_error_type()
        if protocol_error is not None and isinstance(exc, protocol_error):
            print(f"fastavatar-stream {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"fastavatar-stream {args.command}: internal error: {exc.__class__.__name__}: {_one_line(exc)} "
              f"(run with --log-level debug for details)", file=sys.stderr)
        return 1
    return int(result or 0)


def _protocol_error_type():
    from protocols.errors import ProtocolError

    return ProtocolError


if __name__ == "__main__":
    raise SystemExit(main())
