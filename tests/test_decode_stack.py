"""The one-call decode stack (kernels/decode_stack.py): chosen once at bind, only where every layer runs
the C++ kernels on fp32 activations, and bit for bit the per-module path it replaces."""

from __future__ import annotations

import pytest
import torch

from kubeinfer.worker import Engine, SamplingParams
from kubeinfer.worker.kernels.cpu import load_cpu_kernels
from kubeinfer.worker.kernels.quant_linear import quant_kernel_max_rows

pytestmark = pytest.mark.skipif(load_cpu_kernels() is None, reason="the C++ CPU kernels do not build here")

PROMPTS = [[5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 65, 69, 73], [7, 3, 99], [12] * 40]


def _engine(model_dir: str, **kw) -> Engine:
    return Engine(model=model_dir, kernel_backend="cpp", max_model_len=256, num_kv_blocks=64,
                  max_num_batched_tokens=32, enable_prefix_caching=False, **kw)


def _run(engine: Engine, prompts=PROMPTS, max_tokens: int = 24):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    return [(o.output_token_ids, o.logprobs) for o in engine.generate(prompts, params)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_stack_is_bit_for_bit_the_per_module_path(family, quantization, tiny_llama_dir, tiny_qwen_dir):
    model_dir = tiny_llama_dir if family == "llama" else tiny_qwen_dir  # qwen2: q/k/v biases, tied head
    fused = _engine(model_dir, quantization=quantization)
    stack = fused.runner.model.decode_stack
    assert stack is not None
    # every linear on its GEMV below the bound
    assert stack.max_rows == (8 if quantization is None else quant_kernel_max_rows(fused.backend.kernels))
    calls = []
    stack._impl = _Spy(stack._impl, calls)
    per_module = _engine(model_dir, quantization=quantization)
    per_module.runner.model.decode_stack = None
    got, want = _run(fused), _run(per_module)
    assert got == want  # tokens and logprobs, exactly
    assert len(calls) >= 23  # every decode step of the run went through the stack


class _Spy:
    """Counts the stack's forward calls and passes everything through."""

    def __init__(self, impl, calls: list) -> None:
        self._impl, self._calls = impl, calls

    def forward(self, *args):
        self._calls.append(args[0].shape[0])
        return self._impl.forward(*args)

    def set_caches(self, k, v):
        return self._impl.set_caches(k, v)


def test_batches_past_the_row_bound_take_the_per_module_path(tiny_llama_dir):
    fused = _engine(tiny_llama_dir)  # fp32: the f32 GEMV bound, 8 rows
    calls = []
    stack = fused.runner.model.decode_stack
    stack._impl = _Spy(stack._impl, calls)
    per_module = _engine(tiny_llama_dir)
    per_module.runner.model.decode_stack = None
    prompts = [[3 + i, 8, 13 + i] for i in range(10)]
    assert _run(fused, prompts, 6) == _run(per_module, prompts, 6)
    assert calls == [] or max(calls) < 8


def test_speculative_verification_rows_run_in_the_stack(tiny_llama_dir):
    """A speculating sequence's drafts are decode rows: the stack verifies them, and greedy output is
    the plain one."""
    plain = _engine(tiny_llama_dir)
    plain.runner.model.decode_stack = None
    spec = _engine(tiny_llama_dir, speculative_method="ngram", num_speculative_tokens=3)
    calls = []
    stack = spec.runner.model.decode_stack
    stack._impl = _Spy(stack._impl, calls)
    prompt = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    assert [o.output_token_ids for o in spec.generate(prompt, params)] == \
        [o.output_token_ids for o in plain.generate(prompt, params)]
    assert calls


def test_no_stack_where_a_layer_leaves_the_cpp_fp32_kernels(tiny_llama_dir):
    assert _engine(tiny_llama_dir, dtype="bfloat16").runner.model.decode_stack is None  # packed bf16 linears
    torch_engine = Engine(model=tiny_llama_dir, kernel_backend="torch", max_model_len=256, num_kv_blocks=64)
    assert torch_engine.runner.model.decode_stack is None


def test_the_stack_refuses_caches_that_do_not_match_its_layers(tiny_llama_dir):
    impl = _engine(tiny_llama_dir).runner.model.decode_stack._impl
    k = torch.zeros(2, 4, 16, 16)
    with pytest.raises(RuntimeError, match="one K and one V cache per layer"):
        impl.set_caches([k], [k])
    fresh = load_cpu_kernels().DecodeStack(heads=4, kv_heads=2, head_dim=16, eps=1e-5, scale=0.25,
                                           final_norm=torch.ones(64))
    with pytest.raises(RuntimeError, match="set_caches first"):
        fresh.forward(torch.zeros(1, 64), torch.zeros(1, 16), torch.zeros(1, 16), torch.zeros(1, dtype=torch.long),
                      torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="bad head configuration"):
        load_cpu_kernels().DecodeStack(heads=3, kv_heads=2, head_dim=16, eps=1e-5, scale=0.25,
                                       final_norm=torch.ones(64))
