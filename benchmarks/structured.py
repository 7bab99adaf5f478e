"""Structured-output overhead on the default model (int4): decode throughput with a JSON schema
against the same requests unconstrained, at batch 1 and batch 32 (issue #16: target >= 0.9x).

    python benchmarks/structured.py           # `make bench`
    python benchmarks/structured.py --quick   # fewer tokens and rounds, for a smoke check

The schema asks for an array of at least 64 objects, so no constrained request can finish before
``--decode-tokens`` and both runs decode full batches for the same number of steps; the
unconstrained run ignores EOS for the same reason. Only decode steps are timed (after every request
has its first token). Rounds interleave the two modes; the best round of each counts. The grammar's
compile is warmed up first and reported on its own line (it runs once per distinct schema). On a
shared, busy machine the throughput ratio is noisy, so the time the grammar work itself takes (bitmask
fill, mask, matcher advance) is also measured, as a share of the constrained decode time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import cpu_model  # noqa: E402  (the machine line every benchmark prints)

from kubeinfer.worker import Engine, SamplingParams  # noqa: E402
from kubeinfer.worker.models.gguf import default_model_path  # noqa: E402

PROMPT = "List the inventory of the warehouse as JSON:"
SCHEMA = {
    "type": "object",
    "properties": {
        "warehouse": {"type": "string"},
        "items": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                               "kind": {"enum": ["tool", "part", "food"]}, "in_stock": {"type": "boolean"}},
                "required": ["id", "name", "kind", "in_stock"],
            },
        },
    },
    "required": ["warehouse", "items"],
}


class GrammarClock:
    """Adds up the seconds spent in the engine's grammar work: bitmask fill, mask, matcher advance."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed

    @contextlib.contextmanager
    def watching(self, engine: Engine):
        import xgrammar

        from kubeinfer.worker import structured_output
        so = engine._structured
        saved = so.fill_bitmask, structured_output.apply_bitmask, xgrammar.GrammarMatcher.accept_token
        so.fill_bitmask = self.wrap(saved[0])
        structured_output.apply_bitmask = self.wrap(saved[1])
        xgrammar.GrammarMatcher.accept_token = self.wrap(saved[2])
        try:
            yield self
        finally:
            del so.fill_bitmask
            structured_output.apply_bitmask, xgrammar.GrammarMatcher.accept_token = saved[1], saved[2]


def decode_tps(engine: Engine, params: list[SamplingParams]) -> float:
    """Decode tokens per second of one batch: the time from every request's first token to the end."""
    for p in params:
        engine.add_request(prompt=PROMPT, params=p)
    started: set[str] = set()
    while len(started) < len(params):  # prefill (and the first token) is not what is measured
        started.update(o.request_id for o in engine.step())
    t0, tokens = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,32")
    args = ap.parse_args()
    tokens, rounds = (16, 1) if args.quick else (args.decode_tokens, args.rounds)
    print(f"machine: {platform.machine()} {cpu_model()} cpus={os.cpu_count()} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")
    print(f"model: {os.path.basename(default_model_path())} int4; {tokens} decode tokens per request, "
          f"best of {rounds} interleaved rounds")
    engine = Engine(quantization="int4", max_model_len=1024, max_num_seqs=64)
    t0 = time.perf_counter()
    engine.generate([PROMPT], SamplingParams(max_tokens=2, structured_output={"json": SCHEMA}))
    print(f"first request with the schema (xgrammar vocabulary tables + compile, once): "
          f"{(time.perf_counter() - t0) * 1e3:.0f} ms")
    for batch in (int(b) for b in args.batches.split(",")):
        best = {"plain": 0.0, "json_schema": 0.0}
        clock, decode_s = GrammarClock(), 0.0
        for r in range(rounds):
            plain = [SamplingParams(max_tokens=tokens, temperature=1.0, seed=r * 1000 + i, ignore_eos=True)
                     for i in range(batch)]
            constrained = [SamplingParams(max_tokens=tokens, temperature=1.0, seed=r * 1000 + i,
                                          structured_output={"json": SCHEMA}) for i in range(batch)]
            best["plain"] = max(best["plain"], decode_tps(engine, plain))
            with clock.watching(engine):
                tps = decode_tps(engine, constrained)
            decode_s += batch * (tokens - 1) / tps
            best["json_schema"] = max(best["json_schema"], tps)
        ratio = best["json_schema"] / best["plain"]
        print(f"batch {batch:>2}: decode {best['plain']:7.1f} tok/s unconstrained, {best['json_schema']:7.1f} tok/s "
              f"with the JSON schema: {ratio:.2f}x {'(>= 0.9x: ok)' if ratio >= 0.9 else '(below the 0.9x target)'}; "
              f"grammar work {clock.seconds / decode_s:.1%} of the constrained decode time")


if __name__ == "__main__":
    main()
