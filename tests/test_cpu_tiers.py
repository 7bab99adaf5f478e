"""ISA tiers of the C++ CPU kernels (kernels/cpu.py) and the quantized kernels at every tier this
machine can run (lower tiers forced), against torch references."""

from __future__ import annotations

import logging
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from kubeinfer.worker.kernels import cpu
from kubeinfer.worker.kernels.kernel_layouts import pack_int8, pack_q4, unpack_int8, unpack_q4
from kubeinfer.worker.kernels.quant_linear import AMX_QUANT_KERNEL_MAX_ROWS, CppInt4Linear, CppInt8Linear
from kubeinfer.worker.quant import Int4WeightOnly, Int8WeightOnly

AVX2 = {"avx2", "fma", "f16c"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"}
AMX = AVX512 | {"amx_tile", "amx_bf16", "amx_int8"}


# ---- tier selection (pure logic: no build) ----

@pytest.mark.parametrize("flags,want", [
    (set(), []), ({"avx2", "fma"}, []), (AVX2, ["avx2"]), (AVX2 | {"avx512f", "avx512bw"}, ["avx2"]),
    (AVX512 - {"avx512_bf16"}, ["avx2"]),  # Ice Lake: AVX-512 and VNNI without BF16
    (AVX512, ["avx2", "avx512"]), (AMX, ["avx2", "avx512", "amx"]),
    (AMX - {"avx512_vnni"}, ["avx2"]),       # a tier needs every lower one
])
def test_supported_tiers_from_cpu_flags(flags, want):
    assert cpu.supported_tiers(frozenset(flags)) == want


def test_choose_tier_takes_the_best_or_a_forced_lower_one(caplog):
    assert cpu.choose_tier(None, ["avx2", "avx512"]) == "avx512"
    assert cpu.choose_tier("", ["avx2", "avx512"]) == "avx512"
    assert cpu.choose_tier("avx2", ["avx2", "avx512"]) == "avx2"
    assert cpu.choose_tier(" AVX512 ", ["avx2", "avx512", "amx"]) == "avx512"
    assert cpu.choose_tier(None, []) is None
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        assert cpu.choose_tier("amx", ["avx2", "avx512"]) == "avx512"  # the CPU lacks it: clamped, said why
    assert "KUBEINFER_CPU_ISA=amx" in caplog.text and "amx_tile" in caplog.text and "avx512" in caplog.text
    with pytest.raises(ValueError, match="not an ISA tier.*avx2, avx512, amx"):
        cpu.choose_tier("sse4", ["avx2"])


def test_tier_flags_are_fixed_never_the_build_machines():
    assert cpu.tier_cflags("avx2") == ["-mavx2", "-mfma", "-mf16c"]
    assert not any(f.startswith("-mavx512") or f.startswith("-mamx") for f in cpu.tier_cflags("avx2"))
    assert "-mavx512vnni" in cpu.tier_cflags("avx512") and not any("amx" in f for f in cpu.tier_cflags("avx512"))
    assert {"-mavx2", "-mavx512bf16", "-mamx-tile"} <= set(cpu.tier_cflags("amx"))
    assert not any("native" in f for t in cpu.TIERS for f in cpu.tier_cflags(t))


def test_env_var_forces_a_lower_tier(monkeypatch):
    here = cpu.cpu_tiers()
    if not here:
        pytest.skip("this CPU has no ISA tier")
    monkeypatch.setenv(cpu.ENV_VAR, "avx2")
    assert cpu.selected_tier() == "avx2"
    monkeypatch.delenv(cpu.ENV_VAR)
    assert cpu.selected_tier() == here[-1]
    monkeypatch.setenv(cpu.ENV_VAR, "amx")
    assert cpu.selected_tier() == ("amx" if "amx" in here else here[-1])


def test_loading_a_tier_this_cpu_lacks_is_refused():
    missing = [t for t in cpu.TIERS if t not in cpu.cpu_tiers()]
    if not missing:
        pytest.skip("this CPU runs every tier")
    with pytest.raises(ValueError, match=f"cannot run the {missing[0]} tier"):
        cpu.load_cpu_kernels(missing[0])
    with pytest.raises(ValueError, match="unknown ISA tier"):
        cpu.load_cpu_kernels("avx1024")


# ---- the kernels, at every tier this CPU runs (the conftest fixture `kernels`) ----

def test_avx2_build_holds_no_avx512_instructions():
    if "avx2" not in cpu.cpu_tiers() or shutil.which("objdump") is None:
        pytest.skip("needs a CPU with AVX2 and objdump")
    avx2 = cpu.load_cpu_kernels("avx2")
    if avx2 is None:
        pytest.skip("the C++ CPU kernels could not be built (no compiler?)")
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", avx2.__file__], capture_output=True,
                         text=True, check=True).stdout
    assert "%ymm" in asm                                 # it is vectorized
    assert "%zmm" not in asm and "{%k" not in asm        # but never with AVX-512 registers or masks
    assert "vpdpbusd" not in asm and "tdpb" not in asm   # nor VNNI or AMX


def _q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation rounding, replayed: per block of 32 (zero-padded), scale max|x| / 127,
    round half to even."""
    m, k = x.shape
    kb = (k + 31) // 32
    padded = torch.zeros(m, kb * 32)
    padded[:, :k] = x
    blocks = padded.view(m, kb, 32)
    amax = blocks.abs().amax(-1)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return torch.round(blocks * inv[..., None]), amax / 127


SHAPES = [(1, 576, 200), (2, 100, 7), (3, 33, 9), (4, 31, 5), (5, 1536, 577), (1, 64, 1)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_gemv_is_q8_activations_times_int8_weights(kernels, m, k, n):
    torch.manual_seed(m * k + n)
    scheme = Int8WeightOnly()
    state = scheme.quantize(torch.randn(n, k))
    x = torch.randn(m, k)
    x[0, :16] *= 50  # one loud block: its coarse step must not leak into the other blocks
    packed = pack_int8(state["qweight"], state["scales"])
    assert all(torch.equal(a, b) for a, b in zip(unpack_int8(*packed, n, k), (state["qweight"], state["scales"])))
    got = kernels.int8_gemv(x, *packed, n)
    q, d = _q8(x)
    w = torch.zeros(n, q.shape[1] * 32)
    w[:, :k] = state["qweight"].float()
    # Integer dot products per block are exact; only the fp32 scale multiply-adds round.
    emulated = (torch.einsum("mbk,nbk->mnb", q.double(), w.view(n, -1, 32).double()) * d.double()[:, None]).sum(-1)
    emulated = emulated * state["scales"].double()
    torch.testing.assert_close(got.double(), emulated, rtol=1e-5, atol=1e-5 * float(emulated.abs().max()))
    # And within the activation rounding of the fp32 reference: |err| <= sum_k |w| * step / 2.
    deq = scheme.dequantize(state)
    step = (d / 2).repeat_interleave(32, dim=1)[:, :k]
    bound = step @ deq.abs().T + 1e-4 * (x.abs() @ deq.abs().T)
    assert bool(((got - x @ deq.T).abs() <= bound).all())


@pytest.mark.parametrize("n,k", [(9, 33), (40, 71), (17, 64)])
def test_int8_rows_are_the_weight_rows(kernels, n, k):
    """The GEMM path's operand: rows of the interleaved int8 weight back in row order, any K."""
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    packed = pack_int8(q, torch.rand(n))
    assert torch.equal(kernels.int8_rows(*packed, n, k, 0, n), q)
    assert torch.equal(kernels.int8_rows(*packed, n, k, 2, n - 3), q[2:n - 1])


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,n", [(1, 200), (3, 9), (5, 7), (8, 5), (6, 33)])
def test_q4_gemv_is_q8_activations_times_q4_weights(kernels, group_size, scale_dtype, m, n):
    torch.manual_seed(group_size + m + n)
    k = 384
    scheme = Int4WeightOnly(group_size)
    state = scheme.quantize(torch.randn(n, k))
    scales, mins = state["scales"].to(scale_dtype), state["mins"].to(scale_dtype)
    x = torch.randn(m, k)
    got = kernels.q4_gemv(x, *pack_q4(state["qweight"], scales, mins), group_size, n)
    # sum_k (q s + min) xq d per block = s * d * sum(q xq) + min * d * sum(xq).
    q, d = _q8(x)
    nib = scheme.dequantize({"qweight": state["qweight"], "scales": torch.ones_like(scales),
                             "mins": torch.zeros_like(mins)}).double()  # the integers q
    s = scales.double().repeat_interleave(group_size // 32, dim=1)   # [n, kb]
    mn = mins.double().repeat_interleave(group_size // 32, dim=1)
    isum = torch.einsum("mbk,nbk->mnb", q.double(), nib.view(n, -1, 32))
    xsum = q.double().sum(-1) * d.double()
    emulated = (isum * s[None] * d.double()[:, None]).sum(-1) + (mn[None] * xsum[:, None]).sum(-1)
    torch.testing.assert_close(got.double(), emulated, rtol=1e-5, atol=1e-5 * float(emulated.abs().max()))
    ref = x @ scheme.dequantize(state).T
    assert float((got - ref).abs().max()) < 0.03 * float(ref.abs().max())


@pytest.mark.parametrize("m", [5, 7, 13, 300])  # uneven tiles of rows; past one block of 128 rows
def test_quantized_gemv_rows_do_not_depend_on_the_rows_beside_them(kernels, m):
    """Rows share each unpacked weight block (a tile of up to 8 at a time), never their sums: a row's
    result is the same bit for bit alone or in any batch, as a speculative verification step needs."""
    torch.manual_seed(m)
    x = torch.randn(m, 576)
    state = Int4WeightOnly(32).quantize(torch.randn(70, 576))
    packed = pack_q4(state["qweight"], state["scales"], state["mins"])
    together = kernels.q4_gemv(x, *packed, 32, 70)
    state8 = Int8WeightOnly().quantize(torch.randn(70, 576))
    packed8 = pack_int8(state8["qweight"], state8["scales"])
    together8 = kernels.int8_gemv(x, *packed8, 70)
    for i in sorted({0, 1, m // 2, m - 2, m - 1}):
        assert torch.equal(together[i], kernels.q4_gemv(x[i:i + 1], *packed, 32, 70)[0])
        assert torch.equal(together8[i], kernels.int8_gemv(x[i:i + 1], *packed8, 70)[0])


@pytest.mark.parametrize("group_size", [32, 128])
def test_q4_layout_round_trips_and_dequantizes_exactly(kernels, group_size):
    scheme = Int4WeightOnly(group_size)
    state = scheme.quantize(torch.randn(37, 256))
    packed = pack_q4(state["qweight"], state["scales"], state["mins"])
    assert packed[0].shape == (3, 256 // 32 * 256)  # 37 rows in 3 groups of 16, the last padded
    unpacked = unpack_q4(*packed, 37, state["scales"].dtype)
    assert all(torch.equal(a, state[key]) for a, key in zip(unpacked, ("qweight", "scales", "mins")))
    want = scheme.dequantize(state)
    got = kernels.q4_dequant(*packed, group_size, 37, 3, 30)
    torch.testing.assert_close(got, want[3:33], rtol=1e-6, atol=1e-6)  # one FMA against mul + add


def test_quant_kernels_reject_bad_inputs(kernels):
    state = Int4WeightOnly(32).quantize(torch.randn(8, 64))
    qs, scales, mins = pack_q4(state["qweight"], state["scales"], state["mins"])
    with pytest.raises(RuntimeError, match="group_size"):
        kernels.q4_gemv(torch.randn(1, 64), qs, scales, mins, 48, 8)
    with pytest.raises(RuntimeError, match="float16 or both float32"):
        kernels.q4_gemv(torch.randn(1, 64), qs, scales.bfloat16(), mins.bfloat16(), 32, 8)
    with pytest.raises(RuntimeError, match="K = 64"):
        kernels.q4_gemv(torch.randn(1, 32), qs, scales, mins, 32, 8)
    with pytest.raises(RuntimeError, match="groups of 16 rows"):
        kernels.q4_gemv(torch.randn(1, 64), qs, scales, mins, 32, 17)
    with pytest.raises(RuntimeError, match=r"\[N / 16, K / group_size, 16\]"):
        kernels.q4_gemv(torch.randn(1, 64), qs, state["scales"], state["mins"], 32, 8)
    with pytest.raises(RuntimeError, match="rows out of range"):
        kernels.q4_dequant(qs, scales, mins, 32, 8, 4, 5)
    qs8, scales8 = pack_int8(torch.zeros(8, 64, dtype=torch.int8), torch.ones(8))
    with pytest.raises(RuntimeError, match="int8"):
        kernels.int8_gemv(torch.randn(1, 64), qs8.view(torch.uint8), scales8, 8)
    with pytest.raises(RuntimeError, match="blocks of 32"):
        kernels.int8_gemv(torch.randn(1, 65), qs8, scales8, 8)
    with pytest.raises(RuntimeError, match=r"float32 \[N / 16, 16\]"):
        kernels.int8_gemv(torch.randn(1, 64), qs8, torch.ones(8), 8)
    with pytest.raises(RuntimeError, match="rows out of range"):
        kernels.int8_rows(qs8, scales8, 8, 64, 4, 5)


@pytest.mark.parametrize("rows", [1, 5, 40, AMX_QUANT_KERNEL_MAX_ROWS + 3])
@pytest.mark.parametrize("gemm", [False, True])  # the kernels, or the amx tier's blocked GEMM (forced)
def test_cpp_quantized_modules_match_their_reference(kernels, rows, gemm):
    torch.manual_seed(rows)
    x = torch.randn(rows, 96)
    for scheme, cls in ((Int8WeightOnly(), CppInt8Linear), (Int4WeightOnly(32), CppInt4Linear)):
        state, bias = scheme.quantize(torch.randn(67, 96)), torch.randn(67)
        args = [state[key] for key in scheme.state_keys]
        args += [scheme.group_size] if scheme.name == "int4" else []
        mod = cls(*args, bias, kernels=kernels)
        if gemm:
            mod.decode_max_rows = 1
        want = x @ scheme.dequantize(state).T + bias
        err = float((mod(x) - want).abs().max() / want.abs().max())
        assert err < 0.02, (scheme.name, err)  # Q8 activations, or bf16 operands in the GEMM
        assert all(torch.equal(mod.quant_state()[key], state[key]) for key in scheme.state_keys)
        # One copy of the weight and its scales: the kernel layout's (67 rows padded to 80).
        assert mod.qweight is None and mod.scales is None and mod.qs.numel() == 80 * (96 if scheme.name == "int8" else 48)


@pytest.mark.parametrize("m,k,n", SHAPES + [(7, 40, 13), (8, 64, 3), (4, 576, 64)])
def test_f32_gemv_matches_torch(kernels, m, k, n):
    torch.manual_seed(m + k + n)
    w, x = torch.randn(n, k), torch.randn(m, k)
    torch.testing.assert_close(kernels.f32_gemv(x, w), x @ w.T, rtol=1e-5, atol=1e-5 * k ** 0.5)
    with pytest.raises(RuntimeError, match="K = "):
        kernels.f32_gemv(torch.randn(m, k + 1), w)


@pytest.mark.parametrize("rows", [1, 5, 40])  # the GEMV below F32_GEMV_MAX_ROWS, F.linear above
def test_cpp_f32_linear_and_the_tied_head_share_the_weights(kernels, rows):
    from torch import nn

    from kubeinfer.worker.kernels.cpp_backend import CppF32Linear, use_f32_gemv
    torch.manual_seed(rows)
    model = nn.Module()
    model.proj = nn.Linear(96, 67)
    model.embed_tokens = nn.Embedding(50, 96)
    model.lm_head, model.quantized_head = None, None
    plain = model.proj
    assert use_f32_gemv(model, kernels) == 2
    assert isinstance(model.proj, CppF32Linear) and model.proj.weight is plain.weight and model.proj.bias is plain.bias
    assert model.lm_head.weight is model.embed_tokens.weight  # no copy of the embedding
    x = torch.randn(rows, 96)
    torch.testing.assert_close(model.proj(x), F.linear(x, plain.weight, plain.bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model.lm_head(x), x @ model.embed_tokens.weight.T, rtol=1e-5, atol=1e-4)


def test_kernels_run_in_a_child_forked_after_the_pool_started(kernels):
    """A process forked after the kernels' thread pool started runs the kernels on its own thread
    (no wait for helpers the fork did not copy) and exits (no static destructor waits for them).
    In a fresh interpreter: a child forked from this test process, which holds Ray's, gRPC's and
    torch's threads, can hang on their locks instead of ours (it did in a full CI run)."""
    import subprocess
    import sys
    code = f"""
import ctypes, os, sys, time
import torch
torch.set_num_threads(1)  # torch's own OpenMP pool is not what is tested, and does not survive a fork
from kubeinfer.worker.kernels import cpu
k = cpu.load_cpu_kernels({kernels.tier!r})
torch.manual_seed(0)
w, x = torch.randn(3000, 64), torch.randn(1, 64)
want = k.f32_gemv(x, w)  # the pool's helper threads exist from here on; a fork copies none of them
pid = os.fork()
if pid == 0:
    code = 0 if torch.equal(k.f32_gemv(x, w), want) else 1
    ctypes.CDLL(None).exit(code)
    os._exit(code)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the forked child hung in the kernel")
    assert result.returncode == 0, result.stderr[-2000:]


def test_cpp_linears_copies_run_their_own_weights(kernels):
    # The decode call binds the module's tensors once; a copy (benchmarks/quant.py's cold copies,
    # pickle) must bind its own, and so must a module whose buffers _apply replaced.
    import copy
    from torch import nn

    from kubeinfer.worker.kernels.cpp_backend import CppF32Linear
    torch.manual_seed(0)
    x = torch.randn(1, 64)
    s4, s8 = Int4WeightOnly(32).quantize(torch.randn(16, 64)), Int8WeightOnly().quantize(torch.randn(16, 64))
    lin = nn.Linear(64, 16)
    for mod, weight in ((CppInt4Linear(s4["qweight"], s4["scales"], s4["mins"], 32, None, kernels=kernels), "qs"),
                        (CppInt8Linear(s8["qweight"], s8["scales"], torch.randn(16), kernels=kernels), "qs"),
                        (CppF32Linear(lin.weight, lin.bias, kernels=kernels), "weight")):
        want = mod(x)
        twin = copy.deepcopy(mod)
        with torch.no_grad():
            getattr(twin, weight).zero_()
        assert torch.equal(mod(x), want) and not torch.equal(twin(x), want), type(mod).__name__
        assert torch.equal(mod.float()(x), want)  # _apply (a no-op conversion here) rebinds the same values
