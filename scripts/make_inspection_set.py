"""Write a synthetic industrial-inspection set (MVTec AD layout) from scikit-image textures.

    python scripts/make_inspection_set.py runs/inspection --seed 0 --size 256

Prints one summary line; bad input is one ``error:`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import NoReturn

from vprompt.anomaly.synthetic import DEFECT_KINDS, TEXTURES, write_inspection_set
from vprompt.errors import VPromptError, describe_os_error


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print the usage block too
        self.exit(2, f"error: {message}\n")


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="make_inspection_set.py", description=__doc__.splitlines()[0])
    parser.add_argument("root", metavar="ROOT", help="folder to write (empty, new, or ours)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="image side in px")
    parser.add_argument(
        "--categories",
        type=_names,
        default=list(TEXTURES),
        help=f"comma-separated, from {','.join(TEXTURES)} (default: all)",
    )
    parser.add_argument(
        "--defects",
        type=_names,
        default=list(DEFECT_KINDS),
        help=f"comma-separated, from {','.join(DEFECT_KINDS)} (default: all)",
    )
    parser.add_argument("--train", type=int, default=20, help="train images per category")
    parser.add_argument("--good-test", type=int, default=10, help="good test images per category")
    parser.add_argument(
        "--defects-per-type", type=int, default=6, help="test images per category and defect"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = write_inspection_set(
            args.root,
            categories=args.categories,
            train_per_category=args.train,
            good_test=args.good_test,
            defects_per_type=args.defects_per_type,
            size=args.size,
            seed=args.seed,
            defect_kinds=args.defects,
        )
    except VPromptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {describe_os_error(exc, 'cannot write')}", file=sys.stderr)
        return 2
    counts = (
        f"{len(summary['categories'])} categories, {summary['images']} images, "
        f"{summary['masks']} masks"
    )
    if summary["reused"]:
        print(f"{summary['root']}: already holds this set ({counts}); nothing written")
    else:
        print(f"{summary['root']}: wrote {counts} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
