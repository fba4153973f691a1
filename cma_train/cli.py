"""The `cma` command."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="cma", description="Cross-Modal Adapter for text-video retrieval on open_clip.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark the adapter op (fused vs eager vs torch.compile vs memory floor)",
                           add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options of benchmarks/bench_adapter.py (see cma bench --help)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from cma_benchmarks import bench_adapter
        bench_adapter.main(rest + args.args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
