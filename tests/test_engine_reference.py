"""The engine computes what Hugging Face transformers computes (fp32), token for token."""

from __future__ import annotations

import pytest
import torch

from kubeinfer.worker import Engine, SamplingParams
from kubeinfer.worker.evaluation import prompt_logits as prefill_logits
from tests.conftest import TINY_VOCAB, build_tiny_model

PROMPTS = [[5, 17, 99, 3, 250, 7],
           list(range(10, 50)),
           [(i * 37 + 11) % TINY_VOCAB for i in range(97)]]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "llama3-rope"])
def test_matches_transformers(tmp_path, family):
    hf = build_tiny_model(str(tmp_path), family)
    engine = Engine(model=str(tmp_path), max_model_len=512, num_kv_blocks=64, max_num_batched_tokens=64)
    for ids in PROMPTS:
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        ours = prefill_logits(engine, ids)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = engine.generate(PROMPTS, params)
    for ids, out in zip(PROMPTS, outs):
        assert out.output_token_ids == hf_greedy(hf, ids, 32)
        assert out.finish_reason == "length"
