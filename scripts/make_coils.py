"""Write the synthetic aluminium-coil dataset (MVTec AD layout) to a folder.

    python scripts/make_coils.py --root .cache/coils --seed 0 [--n-train 200] [--size 256] [--overwrite]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Let the script run from a plain checkout, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomcli.data.coils import DEFECT_TYPES, generate_coils  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(".cache/coils"), help="dataset folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=200, help="good training images")
    parser.add_argument("--n-test-good", type=int, default=40, help="good test images")
    parser.add_argument("--n-test-per-defect", type=int, default=10, help="test images per defect type")
    parser.add_argument("--size", type=int, default=256, help="image height and width in pixels")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if the manifest matches")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = generate_coils(
        args.root,
        seed=args.seed,
        n_train=args.n_train,
        n_test_good=args.n_test_good,
        n_test_per_defect=args.n_test_per_defect,
        height=args.size,
        width=args.size,
        overwrite=args.overwrite,
    )
    print(f"coils dataset at {root}")
    print(f"  train/good: {args.n_train}")
    print(f"  test/good: {args.n_test_good}")
    print(f"  test/<defect>: {args.n_test_per_defect} each of {', '.join(DEFECT_TYPES)}")


if __name__ == "__main__":
    main()
