"""`kubeinfer bench`: run a load test and print its report.

With ``--server HOST:PORT`` it loads a running server over gRPC. Without it, it runs the whole
stack in this process (the engine built from the engine flags, the router and a loopback gRPC
server; ``kubeinfer.local.router``) and loads that, so one command measures an engine on a given
``--device`` without deploying anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys

from kubeinfer.bench.workloads import WORKLOADS


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``bench`` subcommand on the ``kubeinfer`` parser."""
    from kubeinfer.cli import _add_engine_args
    p = sub.add_parser("bench", help="load-test a server (or an in-process engine): open-loop Poisson "
                                     "arrivals over gRPC")
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="the gRPC server to load; without it, the engine flags build an engine, router and "
                        "gRPC server in this process and the load goes there")
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
    p.add_argument("--timeout", type=float, default=None, help="per-request deadline in seconds")
    p.add_argument("--seed", type=int, default=0, help="seeds the arrivals and the workload")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_engine_args(p, model_help="with --server: the served model's name (default: the server's first); "
                                   "without: the weights to load, as for generate (default: the bundled "
                                   "SmolLM2-135M-Instruct)")
    p.set_defaults(func=cmd_bench)


def in_process_app(args: argparse.Namespace):
    """The one-model application an in-process bench serves, from the engine flags. The engine's
    configuration (its device included) is checked first, so a bad flag or a missing GPU is one line
    of error before any weights load."""
    from kubeinfer.cli import engine_config_from_args, engine_kwargs_from_args
    from kubeinfer.serve.config import ENGINE_KEYS, AppConfig, ModelSpec
    device = str(engine_config_from_args(args).resolve_device())  # "auto" made concrete, for the report
    kwargs = engine_kwargs_from_args(args)
    engine = {k: v for k, v in kwargs.items() if k in ENGINE_KEYS and v is not None}
    engine["device"] = device
    model = ModelSpec(name="bench", uri=args.model or "builtin://smollm2-135m", quantization=args.quantization,
                      max_model_len=args.max_model_len, engine=engine, num_replicas=1)
    return AppConfig(models=[model])


async def _load_in_process(router, workload, spec):
    from kubeinfer.bench.loadgen import run_load_at
    from kubeinfer.router.grpc_service import start_grpc_server
    server, port = await start_grpc_server(router, "127.0.0.1:0")
    try:
        return await run_load_at(f"127.0.0.1:{port}", workload, spec)
    finally:
        await server.stop(None)


def cmd_bench(args: argparse.Namespace) -> int:
    from kubeinfer.bench.loadgen import LoadSpec, run_load_at
    from kubeinfer.bench.report import format_report, summarize
    from kubeinfer.bench.workloads import make_workload
    num_requests = args.num_requests if args.num_requests is not None or args.duration else 100
    spec = LoadSpec(rate=args.rate, num_requests=num_requests, duration_s=args.duration,
                    max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos,
                    model=(args.model or "") if args.server else "", seed=args.seed, timeout_s=args.timeout)
    workload = make_workload(args.workload, seed=args.seed, num_prefixes=args.num_prefixes,
                             prefix_words=args.prefix_words)
    if args.server:
        records = asyncio.run(run_load_at(args.server, workload, spec))
        target = args.server
    else:
        app = in_process_app(args)  # bad flags fail before the model loads
        from kubeinfer.local.router import build_local_router, shutdown_local_router
        router = build_local_router(app)
        try:
            # The dtype the engines resolved (dtype auto decides at start), not the flag's value.
            replica = next(iter(router.models[app.models[0].name].pool.replicas.values()))
            dtype = replica.engine.engine.config.dtype
            records = asyncio.run(_load_in_process(router, workload, spec))
        finally:
            shutdown_local_router(router)
        target = (f"an in-process engine ({args.model or 'the bundled model'}, device "
                  f"{app.models[0].engine['device']}, {dtype})")
    summary = summarize(records)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_report(summary, f"{args.workload} at {args.rate:g} req/s against {target}"))
    sys.stdout.flush()
    return 0 if summary["completed"] else 1  # nothing completed: the server is unreachable or refusing
