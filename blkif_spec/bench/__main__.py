"""Command line: `python -m blkif_spec.bench codec|iops [--json]`."""

from __future__ import annotations

import argparse
import sys

from blkif_spec.bench import codec_bench, iops_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blkif_spec.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    codec_bench.add_parser(sub)
    iops_bench.add_parser(sub)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
