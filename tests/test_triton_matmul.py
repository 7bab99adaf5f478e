"""W8A16 / W4A16 Triton matmuls on quant.py's weight states (the one quantizer and reference), run on
the CPU through the Triton interpreter (see tests/triton_interp.py)."""

from __future__ import annotations

import pytest

from tests.triton_interp import assert_close, tm, triton_interpreter  # noqa: F401 (autouse fixture)

import torch  # noqa: E402  (after triton_interp: TRITON_INTERPRET must be set before triton is imported)

from kubeinfer.worker.quant import get_scheme, pack_int4  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("m", [1, 37])  # decode-sized (split-K) and prefill-sized
def test_w8a16_matmul(dtype, m):
    torch.manual_seed(0)
    n, k = 80, 200  # neither a multiple of the tiles
    scheme = get_scheme("int8")
    state = scheme.quantize(torch.randn(n, k) * 0.05)
    x = torch.randn(m, k).to(dtype)
    assert (tm.split_k(m, n, k, x.device) > 1) == (m == 1)
    ref = x.float() @ scheme.dequantize(state).T
    assert_close(tm.w8a16_matmul(x, state["qweight"], state["scales"]), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("m,group_size", [(1, 32), (5, 64), (37, 32)])
def test_w4a16_matmul(dtype, m, group_size):
    torch.manual_seed(1)
    n, k = 80, 320  # N not a multiple of the tile; K = 2.5 K tiles
    scheme = get_scheme("int4", group_size)
    state = scheme.quantize(torch.randn(n, k) * 0.05)
    assert state["scales"].dtype == state["mins"].dtype == torch.float16
    x = torch.randn(2, m, k).to(dtype)  # leading dims are flattened
    assert (tm.split_k(2 * m, n, k, x.device) > 1) == (2 * m <= 16)
    ref = x.float() @ scheme.dequantize(state).T
    out = tm.w4a16_matmul(x, state["qweight"], state["scales"], state["mins"], group_size)
    assert out.shape == (2, m, n)
    assert_close(out, ref, dtype)


def test_w4a16_matmul_layout_and_checks():
    """The layout spelled out: low nibble = even k, ``W = q * scales[n, g] + mins[n, g]`` (fp32 scales
    and mins work too); a group size that does not match the scales is rejected."""
    torch.manual_seed(2)
    n, k, g = 48, 96, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales, mins = torch.rand(n, k // g) * 0.01, torch.randn(n, k // g) * 0.05
    w = q.float() * scales.repeat_interleave(g, 1) + mins.repeat_interleave(g, 1)
    x = torch.randn(3, k)
    assert_close(tm.w4a16_matmul(x, pack_int4(q), scales, mins, g), x @ w.T, torch.float32)
    with pytest.raises(AssertionError):
        tm.w4a16_matmul(x, pack_int4(q), scales, mins, 16)


def test_split_k_host_rule():
    """Split K only for decode-sized inputs whose N tiles leave SMs idle (132 SMs off CUDA); every
    slice is a whole number of K tiles and none is empty."""
    assert tm.split_k(1, 576, 1536, "cpu") == 12     # 9 N tiles: one slice per K tile
    assert tm.split_k(1, 576, 576, "cpu") == 5       # K tail: 5 tiles, the last partial
    assert tm.split_k(16, 11008, 4096, "cpu") == 1   # 172 N tiles already fill the SMs
    assert tm.split_k(1, 4096, 11008, "cpu") == 4    # 64 N tiles
    assert tm.split_k(17, 576, 1536, "cpu") == 1     # prefill-sized
    assert tm.split_k(1, 64, 1 << 16, "cpu") == 16   # capped
