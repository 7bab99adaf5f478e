// CPU kernels for the decode hot path, and the Python bindings of every C++ kernel source.
//
// At batch 1 a decode step's tensors are a few KB, so a torch op costs its dispatch (5-30 us on a
// 2-core VM), not its arithmetic. These kernels fold RMSNorm (with the residual add), rotary and
// the SwiGLU gate into one call each and take the greedy argmax of a step's logits.
// paged_attention.cpp holds the decode attention and K/V write, quant_gemv.cpp the int8 / int4
// weight-only matmuls for decode-sized batches, amx_linear.cpp the bf16 AMX matmul.
// Every source is built once per ISA tier (kernels/cpu.py); the AVX-512 paths below exist in the
// avx512 and amx tiers' builds, the avx2 tier's build takes the scalar loops (vectorized by gcc).
// The norm, rotary and SwiGLU kernels take fp32 or bf16 tensors and compute in fp32 (bf16 is read
// by widening to fp32 and written rounded to nearest even); the matmul kernels take fp32
// activations. The int8 KV cache and fp16 stay on the torch path (kernels/attention.py).
// Their loops run on parallel.h's pool, never in an OpenMP region: OpenMP's threads spin after a
// region ends and took the cores from the pool's next loops (the 5-row argmax of every n-gram
// verification step opened one: that step ran ~20% slower than with GOMP_SPINCOUNT=0).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"
#include "parallel.h"

using namespace kubeinfer;

namespace {

// o = row / rms(row) * w for one row of H values, in fp32, rounded once to T.
template <typename T>
inline void rms_norm_row(const T* row, const T* w, T* o, int64_t H, float eps) {
  const float inv = 1.f / std::sqrt(dot_any(row, row, H) / H + eps);
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; i + 16 <= H; i += 16) store16(o + i, _mm512_mul_ps(_mm512_mul_ps(load16(row + i), vinv), load16(w + i)));
#endif
  for (; i < H; ++i) o[i] = static_cast<T>(static_cast<float>(row[i]) * inv * static_cast<float>(w[i]));
}

}  // namespace

// out[t] = x[t] / rms(x[t]) * weight; x [T, H] with unit stride in H, weight [H] of x's dtype.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_same_dtype(x, weight, "weight");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous() && weight.size(0) == x.size(1),
              "rms_norm expects x [T, H] (unit stride in H) and weight [H]");
  const int64_t T = x.size(0), H = x.size(1), xs = x.stride(0);
  auto out = torch::empty({T, H}, x.options());
  dispatch_float_bf16(x, "x", [&](auto tag) {
    using T_ = decltype(tag);
    const T_* xp = x.data_ptr<T_>();
    const T_* wp = weight.data_ptr<T_>();
    T_* op = out.data_ptr<T_>();
    layer_chunks(T, 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) rms_norm_row(xp + t * xs, wp, op + t * H, H, static_cast<float>(eps));
    });
    return 0;
  });
  return out;
}

// The residual stream's add fused with the next RMSNorm: residual += x in place (rounded to its
// dtype, as `residual + x` would be), then returns rms_norm(residual). x, residual [T, H] contiguous.
torch::Tensor add_rms_norm_(const torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& weight, double eps) {
  check_same_dtype(x, residual, "residual");
  check_same_dtype(x, weight, "weight");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes() &&
                  weight.is_contiguous() && weight.size(0) == x.size(1),
              "add_rms_norm_ expects contiguous x and residual [T, H] and weight [H]");
  const int64_t T = x.size(0), H = x.size(1);
  auto out = torch::empty({T, H}, x.options());
  dispatch_float_bf16(x, "x", [&](auto tag) {
    using T_ = decltype(tag);
    const T_* xp = x.data_ptr<T_>();
    T_* rp = residual.data_ptr<T_>();
    const T_* wp = weight.data_ptr<T_>();
    T_* op = out.data_ptr<T_>();
    layer_chunks(T, 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        T_* r = rp + t * H;
        const T_* xr = xp + t * H;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= H; i += 16) store16(r + i, _mm512_add_ps(load16(r + i), load16(xr + i)));
#endif
        for (; i < H; ++i) r[i] = static_cast<T_>(static_cast<float>(r[i]) + static_cast<float>(xr[i]));
        rms_norm_row(r, wp, op + t * H, H, static_cast<float>(eps));
      }
    });
    return 0;
  });
  return out;
}

// Rotates the first `heads` heads of x [T, >=heads, d] in place (HF's rotate-half layout):
// x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin over the two halves; cos/sin [T, d] contiguous, x's dtype.
void rotary_(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads) {
  check_same_dtype(x, cos, "cos");
  check_same_dtype(x, sin, "sin");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && heads <= x.size(1), "x must be [T, heads, d] with unit stride in d");
  const int64_t T = x.size(0), D = x.size(2), half = D / 2;
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * D && sin.numel() == T * D,
              "cos and sin must be contiguous [T, d]");
  dispatch_float_bf16(x, "x", [&](auto tag) {
    using T_ = decltype(tag);
    T_* xp = x.data_ptr<T_>();
    const T_* cp = cos.data_ptr<T_>();
    const T_* sp = sin.data_ptr<T_>();
    layer_chunks(T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const T_* c = cp + t * D;
        const T_* s = sp + t * D;
        for (int64_t h = 0; h < heads; ++h) {
          T_* r = xp + t * x.stride(0) + h * x.stride(1);
          int64_t i = 0;
#if defined(__AVX512F__)
          for (; i + 16 <= half; i += 16) {
            const __m512 a = load16(r + i), b = load16(r + i + half);
            store16(r + i, _mm512_fmsub_ps(a, load16(c + i), _mm512_mul_ps(b, load16(s + i))));
            store16(r + i + half, _mm512_fmadd_ps(b, load16(c + i + half), _mm512_mul_ps(a, load16(s + i + half))));
          }
#endif
          for (; i < half; ++i) {
            const float a = r[i], b = r[i + half];
            r[i] = static_cast<T_>(a * static_cast<float>(c[i]) - b * static_cast<float>(s[i]));
            r[i + half] = static_cast<T_>(b * static_cast<float>(c[i + half]) + a * static_cast<float>(s[i + half]));
          }
        }
      }
    });
    return 0;
  });
}

// SwiGLU's gate: out [T, I] = silu(x[:, :I]) * x[:, I:] for x [T, 2I] (the fused gate|up output).
torch::Tensor silu_mul(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, "x must be a contiguous [T, 2I] tensor");
  const int64_t T = x.size(0), I = x.size(1) / 2;
  auto out = torch::empty({T, I}, x.options());
  dispatch_float_bf16(x, "x", [&](auto tag) {
    using T_ = decltype(tag);
    const T_* xp = x.data_ptr<T_>();
    T_* op = out.data_ptr<T_>();
    layer_chunks(T, 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const T_* g = xp + t * 2 * I;
        const T_* u = g + I;
        T_* o = op + t * I;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= I; i += 16) {
          store16(o + i, _mm512_mul_ps(silu512(load16(g + i)), load16(u + i)));
        }
#elif defined(__AVX2__) && defined(__FMA__)
        if constexpr (std::is_same_v<T_, float>) {  // bf16 models do not run at this tier (no bf16 dots)
          for (; i + 8 <= I; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(silu256(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < I; ++i) {
          const float gf = g[i];
          o[i] = static_cast<T_>(gf / (1.f + std::exp(-gf)) * static_cast<float>(u[i]));
        }
      }
    });
    return 0;
  });
  return out;
}

// Greedy token per row of logits [B, V] (fp32 or bf16): the index of the first maximum, or of the
// first NaN if the row has one (torch.max's and argmax's rule). On bf16 logits this reads half the
// bytes of widening them to fp32 first and skips the [B, V] fp32 copy, every decode step.
torch::Tensor greedy_argmax(const torch::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [B, V] with unit stride in V");
  const int64_t B = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  TORCH_CHECK(V >= 1, "logits must have at least one column");
  auto out = torch::empty({B}, logits.options().dtype(torch::kInt64));
  int64_t* op = out.data_ptr<int64_t>();
  dispatch_float_bf16(logits, "logits", [&](auto tag) {
    using T_ = decltype(tag);
    const T_* lp = logits.data_ptr<T_>();
    parallel_chunks(B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const T_* row = lp + b * row_stride;
        int64_t i = 0, best_i = 0, nan_at = -1;
        float best = static_cast<float>(row[0]);
        if (std::isnan(best)) nan_at = 0;
#if defined(__AVX512F__)
        // Per lane: its first maximum (strictly greater replaces); then the lowest index among the
        // lanes holding the overall maximum.
        __m512 vbest = _mm512_set1_ps(-INFINITY);
        __m512i vidx = _mm512_setzero_si512(), lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                         14, 15);
        const __m512i step = _mm512_set1_epi32(16);
        for (; nan_at < 0 && i + 16 <= V && V <= INT32_MAX; i += 16, lane = _mm512_add_epi32(lane, step)) {
          const __m512 v = load16(row + i);
          const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
          if (nan) {
            nan_at = i + __builtin_ctz(nan);
            break;
          }
          const __mmask16 gt = _mm512_cmp_ps_mask(v, vbest, _CMP_GT_OQ);
          vbest = _mm512_mask_mov_ps(vbest, gt, v);
          vidx = _mm512_mask_mov_epi32(vidx, gt, lane);
        }
        if (nan_at < 0 && i > 0) {
          const float mx = _mm512_reduce_max_ps(vbest);
          const __mmask16 at_max = _mm512_cmp_ps_mask(vbest, _mm512_set1_ps(mx), _CMP_EQ_OQ);
          best = mx;
          best_i = _mm512_mask_reduce_min_epi32(at_max, vidx);
        }
#endif
        for (; nan_at < 0 && i < V; ++i) {
          const float v = static_cast<float>(row[i]);
          if (std::isnan(v)) nan_at = i;
          else if (v > best) best = v, best_i = i;
        }
        op[b] = nan_at >= 0 ? nan_at : best_i;
      }
    });
    return 0;
  });
  return out;
}

// quant_gemv.cpp
torch::Tensor f32_gemv(const torch::Tensor& x, const torch::Tensor& weight);

// int8_gemm.cpp
torch::Tensor int8_gemv(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& scales, int64_t n);
torch::Tensor int8_rows(const torch::Tensor& qs, const torch::Tensor& scales, int64_t n, int64_t k, int64_t row0,
                        int64_t rows);

// q4_gemm.cpp
torch::Tensor q4_gemv(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& scales,
                      const torch::Tensor& mins, int64_t group_size, int64_t n);
torch::Tensor q4_dequant(const torch::Tensor& qs, const torch::Tensor& scales, const torch::Tensor& mins,
                         int64_t group_size, int64_t n, int64_t row0, int64_t rows);

namespace kubeinfer {  // amx_linear.cpp
bool amx_available();
torch::Tensor amx_pack_weight(const torch::Tensor& weight, bool swiglu);
torch::Tensor amx_linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                         int64_t N, bool swiglu);
}  // namespace kubeinfer

// paged_attention.cpp
void write_kv(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_cache, torch::Tensor& v_cache,
              const torch::Tensor& slot_mapping);
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale);

// prefill_attention.cpp
bool prefill_attention_supports(int64_t head_dim);
void prefill_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                       const torch::Tensor& cu_seqlens_q, const torch::Tensor& context_lens,
                       const torch::Tensor& block_tables, int64_t first_chunk, double scale, torch::Tensor& out);


namespace kubeinfer {  // sampling_kernel.cpp
torch::Tensor sample_rows(const torch::Tensor& logits, const torch::Tensor& temperature,
                          const c10::optional<torch::Tensor>& top_k, const c10::optional<torch::Tensor>& top_p,
                          const c10::optional<torch::Tensor>& min_p, const torch::Tensor& uniforms);
}  // namespace kubeinfer

void register_decode_stack(pybind11::module& m);  // decode_stack.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The engine steps in a thread beside the server's event loop: let it run while a kernel does.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  m.attr("int8_vnni") = true;   // the quantized dot products use vpdpbusd
#else
  m.attr("int8_vnni") = false;  // vpmaddubsw + vpmaddwd
#endif
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim (fp32 or bf16)", nogil);
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x, then RMSNorm of the residual (fp32 or bf16)", nogil);
  m.def("rotary_", &rotary_, "rotary embedding in place on the first heads (fp32 or bf16)", nogil);
  m.def("silu_mul", &silu_mul, "SwiGLU gate: silu(gate) * up over a fused [T, 2I] tensor (fp32 or bf16)", nogil);
  m.def("write_kv", &write_kv, "store K/V at their paged-cache slots (fp32 or bf16)", nogil);
  m.def("f32_gemv", &f32_gemv, "fp32 matmul for a few rows, the weight streamed once (fp32 in and out)",
        py::arg("x"), py::arg("weight"), nogil);
  m.def("int8_gemv", &int8_gemv, "int8 (interleaved layout) weight-only matmul on Q8 activations (fp32 in and out)",
        py::arg("x"), py::arg("qs"), py::arg("scales"), py::arg("n"), nogil);
  m.def("int8_rows", &int8_rows, "rows of an interleaved int8 weight, in row order (int8)", py::arg("qs"),
        py::arg("scales"), py::arg("n"), py::arg("k"), py::arg("row0"), py::arg("rows"), nogil);
  m.def("q4_gemv", &q4_gemv, "int4 (interleaved Q4 layout) weight-only matmul on Q8 activations",
        py::arg("x"), py::arg("qs"), py::arg("scales"), py::arg("mins"), py::arg("group_size"), py::arg("n"), nogil);
  m.def("q4_dequant", &q4_dequant, "rows of an interleaved-Q4 weight dequantized to fp32", py::arg("qs"),
        py::arg("scales"), py::arg("mins"), py::arg("group_size"), py::arg("n"), py::arg("row0"), py::arg("rows"),
        nogil);
  m.def("decode_attention", &decode_attention, "paged attention for one query per sequence (fp32 or bf16)", nogil);
  m.def("prefill_attention_supports", &prefill_attention_supports,
        "whether prefill_attention takes this head_dim in this build", py::arg("head_dim"));
  m.def("prefill_attention", &prefill_attention,
        "causal attention of prefill chunks over the paged cache, into their rows of out (fp32 or bf16)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cu_seqlens_q"), py::arg("context_lens"),
        py::arg("block_tables"), py::arg("first_chunk"), py::arg("scale"), py::arg("out"), nogil);
  m.def("greedy_argmax", &greedy_argmax, "first-maximum index per row of fp32 or bf16 logits (NaN wins)", nogil);
  m.def("sample_rows", &kubeinfer::sample_rows,
        "a token per row: temperature, top-k, top-p, min-p, then an inverse-CDF draw with the row's uniform",
        py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
        py::arg("uniforms"), nogil);
  m.def("amx_available", &kubeinfer::amx_available, "built with AMX, and the OS grants this process its tiles");
  m.def("amx_pack_weight", &kubeinfer::amx_pack_weight, "bf16 [N, K] weight -> amx_linear's tile layout",
        py::arg("weight"), py::arg("swiglu") = false, nogil);
  m.def("amx_linear", &kubeinfer::amx_linear, "bf16 linear on AMX tiles (weight from amx_pack_weight)",
        py::arg("x"), py::arg("packed"), py::arg("bias") = py::none(), py::arg("N"), py::arg("swiglu") = false, nogil);
  register_decode_stack(m);
}
