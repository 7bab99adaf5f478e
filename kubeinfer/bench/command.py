"""`kubeinfer bench --server HOST:PORT ...`: run a load test against a server and print its report."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys

from kubeinfer.bench.workloads import WORKLOADS


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``bench`` subcommand on the ``kubeinfer`` parser."""
    p = sub.add_parser("bench", help="load-test a running server: open-loop Poisson arrivals over gRPC")
    p.add_argument("--server", required=True, help="HOST:PORT of the gRPC server")
    p.add_argument("--rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default: all at once)")
    p.add_argument("--num-requests", type=int, default=None, help="stop after this many (default 100)")
    p.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds")
    p.add_argument("--workload", default="simple", choices=WORKLOADS)
    p.add_argument("--num-prefixes", type=int, default=8, help="shared-prefix: distinct system prompts")
    p.add_argument("--prefix-words", type=int, default=250, help="shared-prefix: words per system prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="every completion is exactly --max-tokens long")
    p.add_argument("--model", default="", help="served model name (default: the server's first)")
    p.add_argument("--timeout", type=float, default=None, help="per-request deadline in seconds")
    p.add_argument("--seed", type=int, default=0, help="seeds the arrivals and the workload")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from kubeinfer.bench.loadgen import LoadSpec, run_load_at
    from kubeinfer.bench.report import format_report, summarize
    from kubeinfer.bench.workloads import make_workload
    num_requests = args.num_requests if args.num_requests is not None or args.duration else 100
    spec = LoadSpec(rate=args.rate, num_requests=num_requests, duration_s=args.duration,
                    max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos,
                    model=args.model, seed=args.seed, timeout_s=args.timeout)
    workload = make_workload(args.workload, seed=args.seed, num_prefixes=args.num_prefixes,
                             prefix_words=args.prefix_words)
    summary = summarize(asyncio.run(run_load_at(args.server, workload, spec)))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_report(summary, f"{args.workload} at {args.rate:g} req/s against {args.server}"))
    sys.stdout.flush()
    return 0 if summary["completed"] else 1  # nothing completed: the server is unreachable or refusing
