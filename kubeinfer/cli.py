"""The `kubeinfer` command."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from kubeinfer.serve.config import KERNEL_BACKENDS


def _add_engine_args(p: argparse.ArgumentParser, model_help: str | None = None) -> None:
    p.add_argument("--model", default=None, help=model_help or
                   "Hugging Face folder or GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where the engine runs: auto is the first CUDA GPU when torch sees one, else the CPU")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default=None, choices=["int8", "int4"],
                   help="weight-only quantization at load time (GGUF Q8_0/Q4_x load directly)")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 or 128 (default 32)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"])
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="memory for the paged KV cache (default: 1 GiB on a CPU; on a GPU, what "
                        "--gpu-memory-utilization leaves after the weights and activations)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="on a GPU: the fraction of its memory the engine may use (default 0.9)")
    p.add_argument("--enforce-eager", action="store_true", help="on a GPU: no CUDA graphs for decode steps")
    p.add_argument("--kernel-backend", default="auto", choices=KERNEL_BACKENDS,
                   help="the kernels of every layer: auto picks the fastest for the device and dtype; "
                        "torch is the reference path")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile decode steps (faster decode; the first step compiles for tens of seconds)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def engine_kwargs_from_args(args: argparse.Namespace) -> dict:
    """The EngineConfig keywords the engine flags set (validated by EngineConfig)."""
    kv_bytes = None
    if args.kv_cache_memory_gb is not None:
        if not args.kv_cache_memory_gb > 0:
            raise ValueError(f"--kv-cache-memory-gb must be > 0, got {args.kv_cache_memory_gb:g}")
        kv_bytes = int(args.kv_cache_memory_gb * (1 << 30))
    return dict(model=args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
                quantization_group_size=args.group_size, kv_cache_dtype=args.kv_cache_dtype,
                kernel_backend=args.kernel_backend, max_model_len=args.max_model_len,
                kv_cache_memory_bytes=kv_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=not args.no_prefix_caching, num_threads=args.threads,
                enforce_eager=args.enforce_eager, compile=args.compile)


def engine_config_from_args(args: argparse.Namespace):
    """The EngineConfig of the engine flags. Its device is checked here, so that asking for a GPU
    that is not there is one line of error before anything loads."""
    from kubeinfer.worker import EngineConfig
    config = EngineConfig(**engine_kwargs_from_args(args))
    config.resolve_device()
    return config


def sampling_params_from_args(args: argparse.Namespace):
    from kubeinfer.worker import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def generate_from_server(args: argparse.Namespace) -> int:
    """`generate --server`: stream from a running server; --model names a served model there."""
    from kubeinfer.client import Client, ServerError
    prompt = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                    presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                    seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    with Client(args.server, application=args.application) as client:
        try:
            for delta in client.stream(**prompt, model=args.model or "", **sampling):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        except ServerError as e:
            sys.stdout.write("\n")
            print(f"kubeinfer: error: {e}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.server:
        return generate_from_server(args)
    from kubeinfer.worker import Engine
    params = sampling_params_from_args(args)  # bad flags fail before the model loads
    engine = Engine(engine_config_from_args(args))
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    engine.add_request("cli", prompt=prompt, params=params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
            if out.finished:
                sys.stdout.write("\n")
                if out.error:
                    print(f"error: {out.error}", file=sys.stderr)
                    return 1
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """SRC (HF folder or GGUF) -> DST folder: config.json, tokenizer files, one quantized safetensors."""
    import json
    import os

    import torch

    from kubeinfer.worker import quant
    from kubeinfer.worker.models.loader import load_model
    scheme = quant.get_scheme(args.scheme, args.group_size)
    if os.path.exists(args.dst) and os.listdir(args.dst):
        raise ValueError(f"{args.dst} exists and is not empty")
    loaded = load_model(args.src, torch.float32)
    quant.quantize_model(loaded.model, scheme)
    os.makedirs(args.dst, exist_ok=True)
    quant.save_quantized(loaded.model, os.path.join(args.dst, "model.safetensors"), scheme)
    with open(os.path.join(args.dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(loaded.config.to_hf_dict(), f, indent=2)
    loaded.tokenizer.save(args.dst)
    size = os.path.getsize(os.path.join(args.dst, "model.safetensors"))
    print(f"wrote {args.dst} ({scheme.describe()}, {size / 1e6:.1f} MB)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kubeinfer.worker import Engine
    from kubeinfer.worker.evaluation import builtin_corpus, perplexity
    engine = Engine(engine_config_from_args(args))
    text = open(args.corpus, encoding="utf-8").read() if args.corpus else builtin_corpus()
    ids = engine.tokenizer.encode(text)[: args.max_eval_tokens]
    ppl, n = perplexity(engine, ids, window=args.window, chunk=args.chunk)
    print(f"perplexity {ppl:.4f} over {n} tokens (window {args.window}; model {engine.model_name}, "
          f"dtype {args.dtype}, quantization {args.quantization or 'none'}, kv cache {args.kv_cache_dtype})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubeinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt, streaming tokens as they come")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--server", default=None, metavar="HOST:PORT",
                     help="stream from a running server instead of loading the model here")
    gen.add_argument("--application", default=None,
                     help="with --server: the Serve application, when the cluster runs several")
    _add_engine_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    qz = sub.add_parser("quantize", help="write a quantized checkpoint that loads without re-quantizing")
    qz.add_argument("src", help="Hugging Face folder or GGUF file")
    qz.add_argument("dst", help="output folder (created)")
    qz.add_argument("--scheme", required=True, choices=["int8", "int4"])
    qz.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 or 128")
    qz.set_defaults(func=cmd_quantize)

    ev = sub.add_parser("eval", help="measure quality")
    ev_sub = ev.add_subparsers(dest="metric", required=True)
    ppl = ev_sub.add_parser("ppl", help="perplexity on a text corpus (default: Python's own docstrings)")
    ppl.add_argument("--corpus", default=None, help="a UTF-8 text file instead of the built-in corpus")
    ppl.add_argument("--max-eval-tokens", type=int, default=8192)
    ppl.add_argument("--window", type=int, default=512)
    ppl.add_argument("--chunk", type=int, default=32, help="tokens per prefill step (keys come from the cache)")
    _add_engine_args(ppl)
    ppl.set_defaults(func=cmd_eval)

    from kubeinfer.bench.command import add_bench_parser
    add_bench_parser(sub)
    from kubeinfer.serve.command import add_serve_parser
    add_serve_parser(sub)
    from kubeinfer.operator.render_command import add_render_parser
    add_render_parser(sub)
    from kubeinfer.operator.operator_command import add_operator_parser
    add_operator_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # CheckpointError too: bad input gets one line, not a traceback
        print(f"kubeinfer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
