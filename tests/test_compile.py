"""torch.compile'd decode steps give the same tokens as eager ones, and really are compiled."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from kubeinfer.worker import Engine, SamplingParams

PROMPTS = [[5 + i, 17, 99, 3, 250 - i] * (i + 1) for i in range(6)]


def _graphs_compiled() -> int:
    # Dynamo's own count of the FX graphs it captured (and handed to the backend) in this process.
    return counters["stats"]["unique_graphs"]


def test_compiled_decode_matches_eager(tiny_llama_dir):
    # Different lengths finish at different steps, so decode batches shrink from 6 to 1: the one
    # dynamic-shape graph must serve every batch size and context length.
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    kwargs = dict(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=64)
    torch._dynamo.reset()  # forget graphs other tests compiled, so the counts below are this test's
    counters.clear()
    eager = [o.output_token_ids for o in Engine(**kwargs).generate(PROMPTS, params)]
    # The eager engine compiles nothing: the check below can tell the two apart.
    assert _graphs_compiled() == 0
    compiled_engine = Engine(**kwargs, compile=True)
    compiled = [o.output_token_ids for o in compiled_engine.generate(PROMPTS, params)]
    assert compiled == eager
    # Decode steps went through torch.compile: Dynamo captured the model's forward. (Comparing the
    # runner's forward with ``model.forward`` cannot tell: each attribute access makes a new bound
    # method, so ``is not`` holds whether or not anything was compiled.)
    assert _graphs_compiled() >= 1
