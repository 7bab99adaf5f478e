"""`kubeinfer serve`: run the application on a local Ray (started on demand) or an existing cluster."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from kubeinfer.serve.config import (DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, GRPC_SERVICER_FUNCTIONS, POLICY_NAMES,
                                    AppConfig, ModelSpec, RouterSettings)
from kubeinfer.serve.autoscaling import POLICIES, PolicySettings, ray_policy

DEFAULT_MODEL_URI = "builtin://smollm2-135m"
# serve's words for flags whose meaning differs for a Ray replica; the rest are EngineConfig's help.
_HELP = {
    "model": "Hugging Face folder, GGUF file or builtin://smollm2-135m (default: the bundled SmolLM2-135M-Instruct)",
    "device": "where each replica runs its engine: auto means cuda with --gpus-per-replica > 0 and cpu without "
              "(a replica uses no GPU Ray did not reserve for it); cuda reserves one GPU per replica unless "
              "--gpus-per-replica says otherwise",
    "kv_cache_memory_bytes": "memory for each replica's paged KV cache (default: 1 GiB on a CPU; on a GPU, what "
                             "--gpu-memory-utilization leaves after the weights and activations)",
    "num_threads": "torch intra-op threads of each replica (default: its --cpus-per-replica)",
}


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from kubeinfer.cli import add_engine_args
    p = sub.add_parser("serve", help="serve a model over gRPC and OpenAI-compatible HTTP with Ray Serve")
    p.add_argument("--name", default=None, help="the model name clients send (default: from the model)")
    p.add_argument("--replicas", type=int, default=None, help="fixed number of worker replicas (default 1)")
    p.add_argument("--min-replicas", type=int, default=None, help="autoscaling: lower bound (0 scales to zero)")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscaling: upper bound")
    p.add_argument("--target-ongoing-requests", type=float, default=None, help="autoscaling target per replica")
    p.add_argument("--autoscaling-policy", default=None, choices=POLICIES,
                   help="autoscaling: what the replica count follows (default ongoingRequests, Ray's own policy)")
    p.add_argument("--target-kv-cache-usage", type=float, default=None,
                   help="autoscaling policy kvCache: mean KV-cache usage to hold, in (0, 1] (default 0.7)")
    p.add_argument("--target-queue-length", type=float, default=None,
                   help="autoscaling policy queue: waiting requests per replica to stay under (default 2)")
    p.add_argument("--ttft-seconds", type=float, default=None,
                   help="autoscaling policy latency: p90 time-to-first-token SLO in seconds (default 1)")
    p.add_argument("--upscale-delay-s", type=float, default=None, help="autoscaling: Ray's upscale_delay_s")
    p.add_argument("--downscale-delay-s", type=float, default=None, help="autoscaling: Ray's downscale_delay_s")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs each replica reserves from Ray (default: 1 with --device cuda, or with --device "
                        "auto on a local Ray where torch sees a GPU; else 0)")
    p.add_argument("--policy", default="power_of_two", choices=POLICY_NAMES)
    p.add_argument("--batch-window-ms", type=float, default=0.0, help="router micro-batching window (0: off)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-in-flight", type=int, default=None,
                   help="requests the router runs on replicas at once; more wait in its queue (default: what "
                        "the replicas run at once, max_num_seqs x replicas, at least 256)")
    p.add_argument("--max-queued", type=int, default=None,
                   help="requests waiting beyond which the router says 429 (default: twice the replicas' capacity)")
    p.add_argument("--max-queue-wait-s", type=float, default=30.0,
                   help="a request still queued after this long gets 429 / RESOURCE_EXHAUSTED with a retry hint")
    p.add_argument("--max-capacity-wait-s", type=float, default=60.0,
                   help="a request whose call reaches no replica within this long (e.g. while a model scaled to "
                        "zero starts one) gets 503 / UNAVAILABLE with a retry hint")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longest prompt in characters, refused before tokenizing (default: 32 x max-model-len)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest HTTP body / gRPC message (default: room for the longest prompt, plus 1 MiB)")
    p.add_argument("--address", default=None,
                   help="an existing Ray cluster (ray://host:10001 or auto); default: start a local Ray")
    p.add_argument("--host", default="127.0.0.1", help="where the HTTP proxy listens")
    p.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    p.add_argument("--app-name", default="kubeinfer")
    add_engine_args(p, _HELP)  # the same engine flags and defaults as generate, bench and eval
    p.set_defaults(func=cmd_serve)


# --flag -> (PolicySettings field, the policies that read it); as the CRD's targets.
_POLICY_TARGETS = {"target_kv_cache_usage": ("kvCache",), "target_queue_length": ("queue",),
                   "ttft_seconds": ("latency",)}


def _autoscaling_policy(args: argparse.Namespace) -> dict | None:
    """``autoscaling_config.policy`` from the flags (None: Ray's default); ValueError naming the flag."""
    policy = args.autoscaling_policy or "ongoingRequests"
    kwargs = {"policy": policy}
    for name, readers in _POLICY_TARGETS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if policy not in readers:
            raise ValueError(f"--{name.replace('_', '-')} is only read by --autoscaling-policy "
                             f"{' or '.join(readers)}, not {policy}")
        kwargs[name] = value
    if policy == "ongoingRequests":
        return None
    try:
        return ray_policy(PolicySettings(**kwargs))
    except ValueError as e:  # PolicySettings names the field; the user typed the flag
        raise ValueError(f"--{str(e).replace('_', '-')}") from None


def app_config_from_args(args: argparse.Namespace) -> AppConfig:
    autoscaling = None
    auto_flags = (args.min_replicas, args.max_replicas, args.target_ongoing_requests, args.autoscaling_policy,
                  args.upscale_delay_s, args.downscale_delay_s)
    if any(v is not None for v in auto_flags):
        if args.replicas is not None:
            raise ValueError("give --replicas or the autoscaling flags, not both")
        autoscaling = {"min_replicas": 1 if args.min_replicas is None else args.min_replicas,
                       "max_replicas": args.max_replicas or max(1, args.min_replicas or 1)}
        for key in ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"):
            if getattr(args, key) is not None:
                autoscaling[key] = getattr(args, key)
        autoscaling["policy"] = _autoscaling_policy(args)
        if autoscaling["policy"] is None:
            del autoscaling["policy"]
    elif any(getattr(args, name) is not None for name in _POLICY_TARGETS):
        raise ValueError("the autoscaling policy targets need --autoscaling-policy")
    from kubeinfer.cli import engine_kwargs_from_args
    engine = engine_kwargs_from_args(args)
    uri = engine.pop("model") or DEFAULT_MODEL_URI
    quantization, max_model_len = engine.pop("quantization"), engine.pop("max_model_len")
    # Unset (None) settings are left to the engine's defaults for the replica's device; ModelSpec
    # refuses a setting it does not pass to replicas (ENGINE_KEYS), and a test keeps the two in step.
    engine = {k: v for k, v in engine.items() if v is not None}
    name = args.name or _default_name(uri)
    gpus = args.gpus_per_replica
    if gpus is None:  # what a user on a GPU machine expects: the GPU, without a second flag
        gpus = 1.0 if args.device.startswith("cuda") or (args.device == "auto" and args.address is None
                                                         and _local_cuda()) else 0.0
    if gpus < 0:
        raise ValueError(f"--gpus-per-replica must be >= 0, got {gpus:g}")
    actor = {"num_cpus": args.cpus_per_replica}
    if gpus:
        actor["num_gpus"] = gpus
    model = ModelSpec(name=name, uri=uri, quantization=quantization, max_model_len=max_model_len, engine=engine,
                      num_replicas=args.replicas, autoscaling=autoscaling, ray_actor_options=actor)
    # The device each replica gets follows its GPU reservation; refuse one it cannot have before Ray starts.
    model.engine["device"] = model.replica_engine_kwargs()["device"]
    router = RouterSettings(policy=args.policy, batch_window_ms=args.batch_window_ms,
                            max_batch_size=args.max_batch_size, max_in_flight=args.max_in_flight,
                            max_queued=args.max_queued,
                            max_queue_wait_s=args.max_queue_wait_s, max_prompt_chars=args.max_prompt_chars,
                            max_body_bytes=args.max_body_bytes, max_capacity_wait_s=args.max_capacity_wait_s)
    return AppConfig(models=[model], router=router)


def _local_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _default_name(uri: str) -> str:
    if uri.startswith("builtin://"):
        return uri.removeprefix("builtin://")
    base = os.path.basename(os.path.normpath(uri))
    return os.path.splitext(base)[0][:63] or "model"


def cmd_serve(args: argparse.Namespace) -> int:
    app = app_config_from_args(args)  # bad flags fail before Ray starts
    device = app.models[0].engine["device"]
    if args.address is None and device.startswith("cuda"):
        # A local Ray has this machine's GPUs or none: without one the replica would wait for ever.
        from kubeinfer.worker.config import EngineConfig
        EngineConfig(device=device).resolve_device()
    # Local runs need no token auth (Ray 2.60 turns it on by default); a cluster keeps its own setting.
    if args.address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from kubeinfer.serve.app import build_app
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.http_port},
                    grpc_options=gRPCOptions(port=args.grpc_port,
                                             grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS)))
        serve.run(build_app(app.to_dict()), name=args.app_name, route_prefix="/", blocking=False)
        model = app.models[0].name
        print(f"kubeinfer: serving {model!r} on {app.models[0].engine['device']}\n"
              f"  gRPC  {args.host}:{args.grpc_port}   (kubeinfer generate --server {args.host}:{args.grpc_port} "
              f"\"Hello\")\n"
              f"  HTTP  http://{args.host}:{args.http_port}/v1   (OpenAI-compatible; /health, /metrics)\n"
              "Ctrl-C stops it.", flush=True)
        stop.wait()
        print("kubeinfer: shutting down (finishing requests in flight)", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
