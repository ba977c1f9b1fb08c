"""`fastavatar-stream setup-web`: install the browser viewer's modules (three.js, Spark) with npm.

Runs `npm ci` (exact versions from package-lock.json) in the package's `static/` folder, which the
daemon serves at `/vendor/...`. Needs Node.js/npm and the npm registry once; nothing is downloaded
at run time afterwards.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess

from fastavatar_stream.errors import UserError


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "setup-web", help="install the browser viewer's JavaScript modules (npm ci)",
        description="Install three.js and Spark (pinned in static/package-lock.json) into the package's static/"
                    "node_modules with `npm ci`, so `serve --http` can show the live 3D avatar view.")
    p.add_argument("--npm", default="npm", help="npm executable (default: npm on PATH)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from fastavatar_stream.webrtc_server import NODE_MODULES, STATIC_DIR, VENDOR

    npm = shutil.which(args.npm)
    if npm is None:
        raise UserError(f"{args.npm!r} not found; install Node.js and npm (e.g. apt-get install -y nodejs npm)")
    if not (STATIC_DIR / "package-lock.json").is_file():
        raise UserError(f"{STATIC_DIR / 'package-lock.json'} is missing; reinstall fastavatar-stream")
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--omit=dev"], cwd=STATIC_DIR)
    if done.returncode != 0:
        raise UserError(f"npm ci failed in {STATIC_DIR} (exit {done.returncode}); see npm's output above")
    missing = [p for p in VENDOR.values() if not (NODE_MODULES / p / "package.json").is_file()]
    if missing:
        raise UserError(f"npm ci finished but {', '.join(missing)} is missing from {NODE_MODULES}")
    print(f"browser viewer modules installed in {NODE_MODULES}")
    return 0
