"""torch.compile'd decode steps give the same tokens as eager ones."""

from __future__ import annotations

from kubeinfer.worker import Engine, SamplingParams

PROMPTS = [[5 + i, 17, 99, 3, 250 - i] * (i + 1) for i in range(6)]


def test_compiled_decode_matches_eager(tiny_llama_dir):
    # Different lengths finish at different steps, so decode batches shrink from 6 to 1: the one
    # dynamic-shape graph must serve every batch size and context length.
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    kwargs = dict(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=64)
    eager = [o.output_token_ids for o in Engine(**kwargs).generate(PROMPTS, params)]
    compiled_engine = Engine(**kwargs, compile=True)
    compiled = [o.output_token_ids for o in compiled_engine.generate(PROMPTS, params)]
    assert compiled == eager
    assert compiled_engine.runner._decode_forward is not compiled_engine.runner.model.forward
