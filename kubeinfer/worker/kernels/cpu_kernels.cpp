// CPU kernels for the decode hot path: one call where the torch path needs a dozen small ops.
//
// At batch 1 a decode step's tensors are a few KB, so a torch op costs its dispatch (5-30 us on a
// 2-core VM), not its arithmetic. These kernels fold the paged-attention decode (gather through the
// block table, softmax, weighted sum), the K/V cache write and RMSNorm into one call each, and
// run the int8 weight-only matmul for decode-sized batches at close to memory bandwidth.
// fp32 only; the int8 KV cache and other dtypes stay on the torch path (kernels/attention.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// sum_k x[k] * w[k] for int8 w. The AVX-512 path keeps four independent accumulators so the FMA
// latency chain does not cap throughput (one chain reaches ~5 GB/s of weights per core, four ~2x).
inline float dot_i8(const float* x, const int8_t* w, int64_t n) {
  int64_t k = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (; k + 64 <= n; k += 64) {
    __m512i b = _mm512_loadu_si512(w + k);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(b))), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16),
                         _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 1))), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32),
                         _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 2))), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48),
                         _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 3))), a3);
  }
  acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
  for (; k < n; ++k) acc += x[k] * static_cast<float>(w[k]);
  return acc;
}

#if defined(__AVX512F__)
// expf for 16 lanes: Cephes' degree-6 polynomial on x - n ln2, scaled by 2^n (~1 ulp; inputs
// clamped to +-88.38, where float exp saturates). glibc's vector expf needs -ffast-math.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}
#endif

void check_f32(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, what, " must be a float32 CPU tensor");
}

}  // namespace

// out[t] = x[t] / rms(x[t]) * weight; x [T, H] with unit stride in H.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_f32(x, "x");
  check_f32(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous() && weight.size(0) == x.size(1),
              "rms_norm expects x [T, H] (unit stride in H) and weight [H]");
  const int64_t T = x.size(0), H = x.size(1), xs = x.stride(0);
  auto out = torch::empty({T, H}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = xp + t * xs;
      const float inv = 1.f / std::sqrt(dot(row, row, H) / H + static_cast<float>(eps));
      float* o = op + t * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) o[i] = row[i] * inv * wp[i];
    }
  });
  return out;
}

// Rotates the first `heads` heads of x [T, >=heads, d] in place (HF's rotate-half layout):
// x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin over the two halves; cos/sin [T, d] contiguous.
void rotary_(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads) {
  check_f32(x, "x");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && heads <= x.size(1), "x must be [T, heads, d] with unit stride in d");
  const int64_t T = x.size(0), D = x.size(2), half = D / 2;
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * D && sin.numel() == T * D,
              "cos and sin must be contiguous [T, d]");
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* c = cp + t * D;
    const float* s = sp + t * D;
    for (int64_t h = 0; h < heads; ++h) {
      float* r = xp + t * x.stride(0) + h * x.stride(1);
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float a = r[i], b = r[i + half];
        r[i] = a * c[i] - b * s[i];
        r[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

// SwiGLU's gate: out [T, I] = silu(x[:, :I]) * x[:, I:] for x [T, 2I] (the fused gate|up output).
torch::Tensor silu_mul(const torch::Tensor& x) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, "x must be a contiguous [T, 2I] tensor");
  const int64_t T = x.size(0), I = x.size(1) / 2;
  auto out = torch::empty({T, I}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* g = xp + t * 2 * I;
      const float* u = g + I;
      float* o = op + t * I;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + 16 <= I; i += 16) {
        const __m512 gv = _mm512_loadu_ps(g + i);
        const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        _mm512_storeu_ps(o + i, _mm512_mul_ps(silu, _mm512_loadu_ps(u + i)));
      }
#endif
      for (; i < I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// Stores k, v [T, kv_heads, d] (unit stride in d) at their slots of caches [kv_heads, blocks, block_size, d].
void write_kv(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_cache, torch::Tensor& v_cache,
              const torch::Tensor& slot_mapping) {
  check_f32(k, "k");
  check_f32(v, "v");
  check_f32(k_cache, "k_cache");
  check_f32(v_cache, "v_cache");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "k and v need unit stride in head_dim");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_contiguous(), "slot_mapping must be int64");
  const int64_t T = k.size(0), KVH = k.size(1), D = k.size(2);
  const int64_t slots_per_head = k_cache.size(1) * k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == KVH && k_cache.size(3) == D && slot_mapping.size(0) == T, "shape mismatch");
  const int64_t* sp = slot_mapping.data_ptr<int64_t>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t slot = sp[t];
    TORCH_CHECK(slot >= 0 && slot < slots_per_head, "slot ", slot, " is outside the KV cache");
    for (int64_t h = 0; h < KVH; ++h) {
      std::copy_n(kp + t * k.stride(0) + h * k.stride(1), D, kc + (h * slots_per_head + slot) * D);
      std::copy_n(vp + t * v.stride(0) + h * v.stride(1), D, vc + (h * slots_per_head + slot) * D);
    }
  }
}

// One query per sequence against its first context_lens[s] cached tokens, found through
// block_tables [S, max_blocks]. q [S, heads, d] (unit stride in d) -> out [S, heads, d].
// Grouped-query heads share a kv head, so each (sequence, kv head) pair is one unit of parallel work.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale) {
  check_f32(q, "q");
  check_f32(k_cache, "k_cache");
  check_f32(v_cache, "v_cache");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.is_contiguous() && v_cache.is_contiguous(), "layout mismatch");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous() &&
                  context_lens.scalar_type() == torch::kInt64 && context_lens.is_contiguous(),
              "block_tables and context_lens must be contiguous int64");
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(0), NB = k_cache.size(1), BS = k_cache.size(2);
  TORCH_CHECK(H % KVH == 0 && k_cache.size(3) == D && block_tables.size(0) == S && context_lens.size(0) == S,
              "shape mismatch");
  const int64_t G = H / KVH, W = block_tables.size(1), q_seq_stride = q.stride(0), q_head_stride = q.stride(1);
  auto out = torch::empty({S, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= W * BS, "context length ", lens[s], " does not fit the block table");
    for (int64_t i = 0; i < (lens[s] + BS - 1) / BS; ++i)
      TORCH_CHECK(bt[s * W + i] >= 0 && bt[s * W + i] < NB, "block id ", bt[s * W + i], " is outside the KV cache");
  }
  const float fscale = static_cast<float>(scale);
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, W * BS));
  at::parallel_for(0, S * KVH, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t s = unit / KVH, h = unit % KVH, L = lens[s];
      const float* kh = kc + h * NB * BS * D;
      const float* vh = vc + h * NB * BS * D;
      const int64_t* table = bt + s * W;
      scores.resize(L);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t head = h * G + g;
        const float* qv = qp + s * q_seq_stride + head * q_head_stride;
        float mx = -INFINITY;
        for (int64_t t = 0; t < L; ++t) {
          const float* key = kh + (table[t / BS] * BS + t % BS) * D;
          scores[t] = dot(qv, key, D) * fscale;
          mx = std::max(mx, scores[t]);
        }
        float sum = 0.f;
        int64_t t0 = 0;
#if defined(__AVX512F__)
        const __m512 vmx = _mm512_set1_ps(mx);
        __m512 vsum = _mm512_setzero_ps();
        for (; t0 + 16 <= L; t0 += 16) {
          const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(scores.data() + t0), vmx));
          _mm512_storeu_ps(scores.data() + t0, e);
          vsum = _mm512_add_ps(vsum, e);
        }
        sum = _mm512_reduce_add_ps(vsum);
#endif
        for (int64_t t = t0; t < L; ++t) {
          scores[t] = std::exp(scores[t] - mx);
          sum += scores[t];
        }
        float* o = op + (s * H + head) * D;
        std::fill_n(o, D, 0.f);
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < L; ++t) {
          const float p = scores[t] * inv;
          const float* val = vh + (table[t / BS] * BS + t % BS) * D;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) o[i] += p * val[i];
        }
      }
    }
  });
  return out;
}

// y [M, N] = x [M, K] @ (qweight [N, K] int8 * scales [N]).T for a few rows M (decode): each weight
// row is read once and dotted with every x row while it sits in L1; fp32 accumulation.
torch::Tensor int8_gemv(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales) {
  check_f32(x, "x");
  check_f32(scales, "scales");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  TORCH_CHECK(qweight.scalar_type() == torch::kInt8 && qweight.is_contiguous() && qweight.dim() == 2 &&
                  qweight.size(1) == x.size(1) && scales.is_contiguous() && scales.size(0) == qweight.size(0),
              "qweight must be int8 [N, K] with scales [N]");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // ~64 KB of weights per task: enough to amortize the thread hand-off, fine enough to balance.
  const int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(1, K));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* w = wp + n * K;
      for (int64_t m = 0; m < M; ++m) {
        yp[m * N + n] = dot_i8(xp + m * K, w, K) * sp[n];
      }
    }
  });
  return y;
}

// aten's int4 CPU matmul with its bf16 casts, in one call: from Python the two casts and the op
// cost 14-24 us more per linear at batch 1 than this call (measured on the 576x832 qkv of SmolLM2).
torch::Tensor int4pack_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t group_size,
                              const torch::Tensor& scales_and_zeros) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  auto xb = x.to(torch::kBFloat16).contiguous();
  return at::_weight_int4pack_mm_for_cpu(xb, packed, group_size, scales_and_zeros).to(torch::kFloat32);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The engine steps in a thread beside the server's event loop: let it run while a kernel does.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim (fp32)", nogil);
  m.def("rotary_", &rotary_, "rotary embedding in place on the first heads (fp32)", nogil);
  m.def("silu_mul", &silu_mul, "SwiGLU gate: silu(gate) * up over a fused [T, 2I] tensor (fp32)", nogil);
  m.def("write_kv", &write_kv, "store K/V at their paged-cache slots (fp32)", nogil);
  m.def("int8_gemv", &int8_gemv, "int8 weight-only matmul for a few rows (fp32 activations)", nogil);
  m.def("int4pack_linear", &int4pack_linear, "aten's int4 CPU matmul for fp32 activations", nogil);
  m.def("decode_attention", &decode_attention, "paged attention for one query per sequence (fp32)", nogil);
}
