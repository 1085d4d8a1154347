"""Command line: ``gpuquant demo [--out DIR]`` and ``gpuquant bench [SUITE ...] [--quick] [--out DIR]``."""
from __future__ import annotations

import argparse
import os
import shlex
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpuquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train, quantize (PTQ and QAT), run int8, report")
    p_demo.add_argument("--out", default=None, help="write DIR/demo.json (and the exported model)")
    p_bench = sub.add_parser("bench", help="benchmark suites, providers side by side")
    p_bench.add_argument("suites", nargs="*", help="suites to run (default: all)")
    p_bench.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    p_bench.add_argument("--out", default="bench/results/local", help="output folder")
    p_bench.add_argument("--save-each-case", action="store_true",
                         help="write OUT/<suite>.partial.json after every case (runs that may "
                              "be cut short)")
    p_bench.add_argument("--where", action="append", default=None, metavar="NAME=V[|V],...",
                         help="only the cases whose params match, e.g. model=resnet50,batch=64 "
                              "(repeatable: every condition holds)")
    p_bench.add_argument("--skip", action="append", default=None, metavar="PROVIDER,...",
                         help="providers to leave out (not the baseline), e.g. "
                              "torch-bf16-compile (repeatable)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import OUT_FILES, out_problem, run_demo
        why = None if args.out is None else out_problem(args.out, OUT_FILES)
        if why is not None:  # up front: the demo trains for a while before writing
            p_demo.error(f"argument --out: {why}")
        return run_demo(out=args.out)
    from ._paths import out_problem
    why = out_problem(args.out)
    if why is not None:  # up front: the suites run for minutes before writing
        p_bench.error(f"argument --out: {why}")
    from .bench import run_bench
    where = ",".join(args.where) if args.where else None  # (repeated: all conditions)
    return run_bench(args.suites, quick=args.quick, out=args.out,
                     save_each_case=args.save_each_case, where=where,
                     skip=",".join(args.skip or ()), command=_command_line(argv))


def _command_line(argv) -> str:
    """The command line to record (contract section 3: "the exact command line"): for
    ``python -m gpuquant ...`` the interpreter's own (``sys.orig_argv``: interpreter,
    options, ``-m gpuquant``, arguments); for the ``gpuquant`` console script (or arguments
    passed to :func:`main`) ``gpuquant`` and the arguments."""
    if argv is None:
        orig = getattr(sys, "orig_argv", None)  # Python >= 3.10
        if orig and os.path.basename(sys.argv[0]) == "__main__.py" and "-m" in orig:
            return shlex.join(orig)
        argv = sys.argv[1:]
    return shlex.join(["gpuquant"] + list(argv))


if __name__ == "__main__":
    sys.exit(main())
