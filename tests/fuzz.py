"""Longer fuzz run: `python -m tests.fuzz --examples 500` runs tests/test_fuzz.py with that many examples."""

import argparse
import os
import sys

import pytest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=500)
    args = ap.parse_args(argv)
    os.environ["ZIMAGE_FUZZ_EXAMPLES"] = str(args.examples)
    return pytest.main(["-q", os.path.join(os.path.dirname(__file__), "test_fuzz.py")])


if __name__ == "__main__":
    sys.exit(main())
