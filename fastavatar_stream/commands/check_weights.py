"""`fastavatar-stream check-weights DIR`: is a copy of the official FastAvatar release complete?"""
from __future__ import annotations

import argparse
import json
import sys

from fastavatar_stream.errors import UserError


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "check-weights", help="check a copy of the official FastAvatar release (what is found, what is missing)",
        description="List the files of the official FastAvatar release that `--weights official:DIR` needs, found "
                    "anywhere under DIR (the release's model_zoo tree or one flat folder): model.safetensors, "
                    "DINOv2 ViT-L/14-reg4 weights (when the safetensors lacks them), FLAME 2023, the oral-cavity "
                    "mesh and FLAME's landmark embedding, each with what it must hold. Exit 0 when complete, 2 "
                    "with the list of problems.")
    p.add_argument("directory", metavar="DIR", help="the release folder")
    p.add_argument("--list-tensors", action="store_true",
                   help="also print every expected network tensor with its shape")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from engine.official_release import check_release, expected_network_tensors

    check = check_release(args.directory)
    if args.json:
        print(json.dumps({"directory": str(args.directory), "complete": check.complete,
                          "config": check.release.config().name,
                          "files": [vars(r) for r in check.rows], "problems": check.problems()}, indent=1))
    else:
        print(f"official release in {args.directory} ({check.release.config().name} network sizes)")
        for row in check.rows:
            print(f"  {row.status:<10} {row.role:<9} {row.file}  -- {row.detail}")
            for problem in row.problems[:20]:
                print(f"      {problem}")
            if len(row.problems) > 20:
                print(f"      ... {len(row.problems) - 20} more")
        if args.list_tensors:
            for name, shape in expected_network_tensors(check.release.config()).items():
                print(f"  tensor {name} {list(shape)}")
    if not check.complete:
        problems = check.problems()
        more = f" (+{len(problems) - 3} more above)" if len(problems) > 3 else ""
        sys.stdout.flush()
        raise UserError(f"{args.directory} is incomplete: " + "; ".join(problems[:3]) + more)
    return 0
