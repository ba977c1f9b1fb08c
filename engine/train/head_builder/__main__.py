"""python -m engine.train.head_builder --out engine/data/default_head"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import build_head, write_head


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.train.head_builder",
                                     description="Generate the embedded default FLAME-format head model.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "data" / "default_head")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = write_head(build_head(), args.out)
    for p in paths:
        print(f"{p}  {p.stat().st_size / 1e6:.2f} MB")
    print(f"built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
