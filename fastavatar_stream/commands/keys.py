"""`fastavatar-stream keys DIR`: make the CURVE key pairs for `serve --curve-keys` and `subscribe --curve-keys`."""
from __future__ import annotations

import argparse
from pathlib import Path

from fastavatar_stream.errors import UserError


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "keys", help="make ZeroMQ CURVE keys for an authenticated, encrypted daemon",
        description="Write server.key, server.key_secret, client.key and client.key_secret (pyzmq zmq.auth "
                    "certificates) into DIR. The daemon needs the folder with server.key_secret and the public "
                    "keys of the clients it admits (serve --curve-keys DIR); a subscriber needs server.key and "
                    "its own client.key_secret (subscribe --curve-keys DIR). Keep the *_secret files private.")
    p.add_argument("folder", metavar="DIR", type=Path, help="folder for the key files (created)")
    p.add_argument("--force", action="store_true", help="replace keys already in DIR")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fastavatar_stream.commands._common import output_dir
    from protocols.zmq_transport import KEY_FILES, make_keys

    folder = output_dir(args.folder, "DIR")
    existing = [name for name in KEY_FILES if (folder / name).exists()]
    if existing and not args.force:
        raise UserError(f"{folder} already holds {', '.join(existing)}; pass --force to replace them")
    for path in make_keys(folder):
        print(path)
    return 0
