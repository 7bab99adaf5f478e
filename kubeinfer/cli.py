"""The `kubeinfer` command."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from dataclasses import Field, fields
from typing import Any, Mapping

_SCALARS = {"str": str, "int": int, "float": float, "bool": bool}


def engine_flag(f: Field) -> str:
    """The command-line flag of EngineConfig field ``f``: its ``flag`` metadata (names users already
    type, ``--no-...`` for a bool that defaults to True), else ``--`` + the name with dashes."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _flag_dest(f: Field) -> str:
    return engine_flag(f)[2:].replace("-", "_")


def _command_line_fields() -> list[Field]:
    from kubeinfer.worker.config import NOT_ON_COMMAND_LINE, EngineConfig
    return [f for f in fields(EngineConfig) if f.name not in NOT_ON_COMMAND_LINE]


def _choice(choices: tuple, flag: str):
    """argparse type of a field whose choices include "none": the word parses as None."""
    def parse(text: str):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(choices)})")
        return None if text == "none" else text
    parse.__name__ = flag
    return parse


def add_engine_args(p: argparse.ArgumentParser, help_overrides: Mapping[str, str] | None = None) -> None:
    """One flag per EngineConfig field (but NOT_ON_COMMAND_LINE), with the field's type, choices, help
    and default (COMMAND_LINE_DEFAULTS where the command line's differs): every command that builds an
    engine (generate, serve, bench, eval) gets the same flags, defaults and meanings from here.
    ``help_overrides`` (field -> help) words a flag for one command, e.g. serve's ``--device``."""
    from kubeinfer.worker.config import COMMAND_LINE_DEFAULTS
    group = p.add_argument_group("engine settings (kubeinfer.worker.EngineConfig)")
    for f in _command_line_fields():
        meta, flag = f.metadata, engine_flag(f)
        help_text = (help_overrides or {}).get(f.name) or meta["help"]
        default = COMMAND_LINE_DEFAULTS.get(f.name, f.default)
        kind = _SCALARS[f.type.replace(" | None", "")]
        if kind is bool:
            # A bool flag turns the field away from its default: --enforce-eager, --no-prefix-caching.
            if flag.startswith("--no-") != bool(default):
                raise TypeError(f"EngineConfig.{f.name}: flag {flag} does not turn its default {default} around")
            if default:
                help_text = f"turn off what is on by default: {help_text}"
            group.add_argument(flag, dest=_flag_dest(f), action="store_true", help=help_text)
            continue
        kwargs: dict[str, Any] = {"type": float if meta.get("gib") else kind, "default": default,
                                  "metavar": meta.get("metavar")}
        choices = meta.get("choices")
        if choices and "none" in choices:
            kwargs.update(type=_choice(choices, flag), metavar="{" + ",".join(choices) + "}")
            default = "none" if default is None else default
        elif choices:
            kwargs["choices"] = choices
        if default is not None:
            help_text += f" (default: {default})"
        group.add_argument(flag, dest=_flag_dest(f), help=help_text, **kwargs)


def _add_engine_args(p: argparse.ArgumentParser, model_help: str | None = None) -> None:
    """``add_engine_args`` with the --model help worded for one command (kubeinfer.bench uses it)."""
    add_engine_args(p, {"model": model_help} if model_help else None)


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
    """The EngineConfig keywords the engine flags set, one per flag (validated by EngineConfig)."""
    kwargs = {}
    for f in _command_line_fields():
        value = getattr(args, _flag_dest(f))
        if f.type == "bool" and engine_flag(f).startswith("--no-"):
            value = not value
        elif f.metadata.get("gib") and value is not None:
            if not value > 0:
                raise ValueError(f"{engine_flag(f)} must be > 0, got {value:g}")
            value = int(value * (1 << 30))
        kwargs[f.name] = value
    return kwargs


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
          f"dtype {engine.config.dtype}, quantization {args.quantization or 'none'}, kv cache {args.kv_cache_dtype})")
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
    add_engine_args(gen)
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
    add_engine_args(ppl)
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
