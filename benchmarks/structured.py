"""Structured-output overhead on the default model (int4): decode throughput with a JSON schema
against the same requests unconstrained, at batch 1 and batch 32 (issue #16: target >= 0.9x).

    python benchmarks/structured.py           # `make bench`
    python benchmarks/structured.py --quick   # fewer tokens, for a smoke check

Two engines of the same configuration hold the two batches, one unconstrained and one with the
schema, and their decode steps alternate: each step of one is timed right beside a step of the
other, so a busy machine slows both alike (on this shared VM, best-of-rounds ratios of separate runs
swung from 0.6x to 1.2x). The schema asks for an array of at least 64 objects, so no constrained
request can finish before ``--decode-tokens`` and both decode full batches; the unconstrained ones
ignore EOS for the same reason. Only decode steps are timed (after every request has its first
token). The grammar's compile is warmed up first and reported on its own line (it runs once per
distinct schema), and the time the grammar work itself takes (bitmask fill, mask, matcher advance)
is reported as a share of the constrained decode time.
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


def start(engine: Engine, params: list[SamplingParams]) -> None:
    """Add the batch and step until every request has its first token (prefill is not measured)."""
    for p in params:
        engine.add_request(prompt=PROMPT, params=p)
    started: set[str] = set()
    while len(started) < len(params):
        started.update(o.request_id for o in engine.step())


def alternating_decode(plain: Engine, constrained: Engine, clock: GrammarClock) -> tuple[int, float, int, float]:
    """Decode tokens and seconds of each engine's batch (plain, then constrained), their steps
    alternating; the grammar work is timed by ``clock`` on the constrained steps only."""
    time_p = time_c = 0.0
    tokens_p = tokens_c = 0
    with clock.watching(constrained):
        while plain.has_unfinished_requests() and constrained.has_unfinished_requests():
            t0 = time.perf_counter()
            tokens_p += sum(len(o.new_token_ids) for o in plain.step())
            t1 = time.perf_counter()
            tokens_c += sum(len(o.new_token_ids) for o in constrained.step())
            t2 = time.perf_counter()
            time_p, time_c = time_p + t1 - t0, time_c + t2 - t1
    for engine in (plain, constrained):  # whatever is left (the same step count for both, normally)
        while engine.has_unfinished_requests():
            engine.step()
    return tokens_p, time_p, tokens_c, time_c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,32")
    args = ap.parse_args()
    tokens, rounds = (16, 1) if args.quick else (args.decode_tokens, args.rounds)
    print(f"machine: {platform.machine()} {cpu_model()} cpus={os.cpu_count()} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} load={os.getloadavg()[0]:.1f}")
    print(f"model: {os.path.basename(default_model_path())} int4; {tokens} decode tokens per request, "
          f"{rounds} rounds of alternating decode steps (all rounds' steps summed)")
    plain = Engine(quantization="int4", max_model_len=1024, max_num_seqs=64)
    constrained = Engine(quantization="int4", max_model_len=1024, max_num_seqs=64)
    t0 = time.perf_counter()
    constrained.generate([PROMPT], SamplingParams(max_tokens=2, structured_output={"json": SCHEMA}))
    print(f"first request with the schema (xgrammar vocabulary tables + compile, once): "
          f"{(time.perf_counter() - t0) * 1e3:.0f} ms")
    for batch in (int(b) for b in args.batches.split(",")):
        clock = GrammarClock()
        tokens_s = {"plain": [0, 0.0], "json_schema": [0, 0.0]}
        for r in range(rounds):
            start(plain, [SamplingParams(max_tokens=tokens, temperature=1.0, seed=r * 1000 + i, ignore_eos=True)
                          for i in range(batch)])
            start(constrained, [SamplingParams(max_tokens=tokens, temperature=1.0, seed=r * 1000 + i,
                                               structured_output={"json": SCHEMA}) for i in range(batch)])
            n_p, s_p, n_c, s_c = alternating_decode(plain, constrained, clock)
            for key, n, sec in (("plain", n_p, s_p), ("json_schema", n_c, s_c)):
                tokens_s[key][0] += n
                tokens_s[key][1] += sec
        tps = {k: n / sec for k, (n, sec) in tokens_s.items()}
        ratio = tps["json_schema"] / tps["plain"]
        print(f"batch {batch:>2}: decode {tps['plain']:7.1f} tok/s unconstrained, {tps['json_schema']:7.1f} tok/s "
              f"with the JSON schema: {ratio:.2f}x {'(>= 0.9x: ok)' if ratio >= 0.9 else '(below the 0.9x target)'}; "
              f"grammar work {clock.seconds / tokens_s['json_schema'][1]:.1%} of the constrained decode time")


if __name__ == "__main__":
    main()
