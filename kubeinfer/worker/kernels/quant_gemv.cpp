// fp32, and weight-only int8 and int4 matmuls for decode-sized batches (a few activation rows): every weight
// is read once per call and dotted with all rows while it sits in L1, on Q8 activations
// (quant_dot.h). Threads split the output rows (parallel.h's pool, torch's thread count).
//
// int8: qweight [N, K] int8 with one fp32 scale per output row (quant.Int8WeightOnly), as stored.
// int4: the kernel's own Q4 layout, packed once at load (quant_linear.CppInt4Linear): qs [N, K / 2]
// uint8, each block of 32 inputs as 16 bytes in quant_dot.h's order, with the scheme's scales and
// mins [N, K / G] (fp16 or fp32) as they are: W = q * scale + min per group of G (a multiple of 32).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "quant_dot.h"

using namespace kubeinfer;

namespace {

// Threads claim runs of whole rows: two runs per thread (at least 16 KB of weights each), so each
// thread reads long sequential streams the hardware prefetcher follows, with a spare run per thread
// for balance (parallel.h: a thread that is not running takes none, so an oversubscribed machine
// never makes the caller wait for it). Measured on the 2-core Zen 4 VM, int4 gate|up of SmolLM2
// (884 KB) streamed from DRAM with two threads: runs of 16 KB 15.5 GB/s, a run per thread 22, two
// per thread 21-26, 4 KB runs 8. Within a run each row is read start to end (four interleaved rows
// had read the LM head at a quarter of the speed).
template <typename F>
void for_rows(int64_t N, int64_t row_bytes, F&& f) {
  const int64_t runs = 2 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>({4, 16384 / std::max<int64_t>(1, row_bytes), (N + runs - 1) / runs});
  parallel_chunks(N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) f(n);
  });
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Two blocks per 512-bit step: each x block's scale spread over its 8 lanes of the dot product,
// [M, KB / 2][16], made once per call.
std::vector<float> spread_scales(const Q8Rows& xq, int64_t M) {
  const int64_t pairs = xq.KB / 2;
  std::vector<float> out(M * pairs * 16);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t p = 0; p < pairs; ++p)
      for (int i = 0; i < 16; ++i) out[(m * pairs + p) * 16 + i] = xq.d[m * xq.KB + 2 * p + i / 8];
  return out;
}
#endif

void int8_row(const Q8Rows& xq, const float* spread, const int8_t* w, float scale, float* y, int64_t M, int64_t K,
              int64_t N, int64_t n) {
  const int64_t full = K / kQ8Block, tail = K % kQ8Block;
  const int8_t* wn = w + n * K;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xm = xq.row(m);
    const float* dm = xq.d.data() + m * xq.KB;
    int64_t b = 0;
    float sum = 0.f;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    // vpdpbusd multiplies unsigned by signed bytes: |w| by x with w's sign moved onto it.
    const float* sp = spread + m * (xq.KB / 2) * 16;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; b + 2 <= full; b += 2) {
      const __m512i wv = _mm512_loadu_si512(wn + b * kQ8Block);
      const __m512i xv = _mm512_loadu_si512(xm + b * kQ8Block);
      const __m512i xs = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), _mm512_setzero_si512(), xv);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(wv), xs);
      const __m512 f = _mm512_cvtepi32_ps(dot), d = _mm512_loadu_ps(sp + b * 8);
      if (b & 2) acc1 = _mm512_fmadd_ps(f, d, acc1);  // two chains: the FMA latency is not the limit
      else acc0 = _mm512_fmadd_ps(f, d, acc0);
    }
    sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
    if (b < full) {  // every block on the avx2 tier, an odd last one on avx512
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (; b < full; ++b) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + b * kQ8Block));
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wn + b * kQ8Block));
        const __m256 f = _mm256_cvtepi32_ps(dot32_i8(wv, xv)), d = _mm256_set1_ps(dm[b]);
        if (b & 1) acc1 = _mm256_fmadd_ps(f, d, acc1);
        else acc0 = _mm256_fmadd_ps(f, d, acc0);
      }
      sum += hsum(_mm256_add_ps(acc0, acc1));
    }
    if (tail) {  // the last K % 32 weights: a full 32-byte load would run past the matrix
      const int8_t* wt = wn + full * kQ8Block;
      int32_t isum = 0;
      for (int64_t i = 0; i < tail; ++i) isum += int32_t{wt[i]} * int32_t{xm[full * kQ8Block + i]};
      sum += static_cast<float>(isum) * dm[full];
    }
    y[m * N + n] = sum * scale;
  }
}

inline float to_f32(float v) { return v; }
inline float to_f32(at::Half v) { return _cvtsh_ss(v.x); }

// 8 fp16 or fp32 values from p as fp32, the j-th taken from p[j / per_group] (per_group 1, 2 or 4):
// a row's group scales spread over 8 blocks.
inline __m256 load8_spread(const float* p, int64_t per_group) {
  if (per_group == 1) return _mm256_loadu_ps(p);
  const __m256 v = _mm256_castps128_ps256(_mm_loadu_ps(p));  // reads at most 4, the groups of 8 blocks
  return _mm256_permutevar8x32_ps(v, per_group == 2 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)
                                                    : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}
inline __m256 load8_spread(const at::Half* p, int64_t per_group) {
  const auto* u = reinterpret_cast<const uint16_t*>(p);
  if (per_group == 1) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u)));
  const __m128i h = per_group == 2 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(u))
                                   : _mm_cvtsi32_si128(static_cast<int>(u[0] | (uint32_t{u[1]} << 16)));
  return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(h), per_group == 2 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)
                                                                      : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

// dot32_u4 without VNNI on every tier: measured on Zen 4, vpdpbusd from a zero accumulator (a fresh
// dependency per block) was slower here than vpmaddubsw + vpmaddwd.
inline __m256i dot32_u4_pairs(__m256i q, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
}

// The 8 lanes' sums of 8 vectors, as one vector [sum(v0), ..., sum(v7)].
inline __m256i hsum8_epi32(const __m256i* v) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// How far ahead in a run of rows q4_row asks for the weights. Measured on the 2-core Zen 4 VM (avx2
// tier, int4 gate|up, weights cycled through 30 or 120 copies): one thread 72-77 us with it, 86-95
// without; two threads 40-50 against 55-72. The hardware prefetcher alone keeps too few lines in flight.
constexpr int64_t kPrefetchBytes = 2048;

// Output n of rows [m0, m0 + MB) of x: each block of weights is unpacked once for all MB rows (a
// speculative verification step or a small decode batch), and each row's sums are formed exactly as
// for MB = 1, so a row's result does not depend on the rows beside it.
template <typename S, int MB>
void q4_rows(const Q8Rows& xq, int64_t m0, const uint8_t* qn, const S* sn, const S* mn, float* y, int64_t K,
             int64_t N, int64_t per_group, int64_t n) {
  const int64_t KB = K / kQ8Block;
  // sum_k (q s + min) xq d = s * d * sum(q xq) + min * d * sum(xq), per block. Eight blocks at a
  // time: their integer sums gathered into one vector, then scaled with vector ops only.
  __m256 acc[MB], min_acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = min_acc[m] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= KB; b += 8) {
    if (m0 == 0) {  // a few rows ahead in the chunk's one stream
      _mm_prefetch(reinterpret_cast<const char*>(qn + b * (kQ8Block / 2) + kPrefetchBytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(qn + b * (kQ8Block / 2) + kPrefetchBytes + 64), _MM_HINT_T0);
    }
    __m256i w[8];
    for (int j = 0; j < 8; ++j) w[j] = unpack_q4_block(qn + (b + j) * (kQ8Block / 2));
    const int64_t g = b / per_group;
    const __m256 s8 = load8_spread(sn + g, per_group), min8 = load8_spread(mn + g, per_group);
    for (int m = 0; m < MB; ++m) {
      const int8_t* xm = xq.row(m0 + m);
      __m256i dots[8];
      for (int j = 0; j < 8; ++j)
        dots[j] = dot32_u4_pairs(w[j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + (b + j) * kQ8Block)));
      const __m256 sd = _mm256_mul_ps(s8, _mm256_loadu_ps(xq.d.data() + (m0 + m) * xq.KB + b));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8_epi32(dots)), sd, acc[m]);
      min_acc[m] = _mm256_fmadd_ps(min8, _mm256_loadu_ps(xq.xsum.data() + (m0 + m) * xq.KB + b), min_acc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    const int8_t* xm = xq.row(m0 + m);
    const float* dm = xq.d.data() + (m0 + m) * xq.KB;
    const float* sm = xq.xsum.data() + (m0 + m) * xq.KB;
    float sum = hsum(_mm256_add_ps(acc[m], min_acc[m]));
    for (int64_t t = b; t < KB; ++t) {  // the last KB % 8 blocks
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + t * kQ8Block));
      const int64_t g = t / per_group;
      const float isum = hsum(_mm256_cvtepi32_ps(dot32_u4(unpack_q4_block(qn + t * (kQ8Block / 2)), xv)));
      sum += isum * to_f32(sn[g]) * dm[t] + to_f32(mn[g]) * sm[t];
    }
    y[(m0 + m) * N + n] = sum;
  }
}

template <typename S>
void q4_row(const Q8Rows& xq, const uint8_t* qs, const S* scales, const S* mins, float* y, int64_t M, int64_t K,
            int64_t N, int64_t G, int64_t n) {
  const int64_t NG = K / G, per_group = G / kQ8Block;
  const uint8_t* qn = qs + n * (K / 2);
  const S* sn = scales + n * NG;
  const S* mn = mins + n * NG;
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) q4_rows<S, 4>(xq, m0, qn, sn, mn, y, K, N, per_group, n);
  switch (M - m0) {
    case 3: q4_rows<S, 3>(xq, m0, qn, sn, mn, y, K, N, per_group, n); break;
    case 2: q4_rows<S, 2>(xq, m0, qn, sn, mn, y, K, N, per_group, n); break;
    case 1: q4_rows<S, 1>(xq, m0, qn, sn, mn, y, K, N, per_group, n); break;
    default: break;
  }
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() &&
                  x.size(1) == K,
              "x must be a contiguous float32 CPU tensor [M, K] with K = ", K);
}

void check_q4(const torch::Tensor& qs, const torch::Tensor& scales, const torch::Tensor& mins, int64_t G) {
  TORCH_CHECK(qs.device().is_cpu() && qs.scalar_type() == torch::kUInt8 && qs.dim() == 2 && qs.is_contiguous(),
              "qs must be a contiguous uint8 CPU tensor [N, K / 2]");
  const int64_t N = qs.size(0), K = 2 * qs.size(1);
  TORCH_CHECK(G > 0 && G % kQ8Block == 0 && K % G == 0, "group_size must be a multiple of 32 dividing K = ", K);
  TORCH_CHECK(scales.scalar_type() == mins.scalar_type() &&
                  (scales.scalar_type() == torch::kFloat16 || scales.scalar_type() == torch::kFloat32),
              "scales and mins must both be float16 or both float32");
  TORCH_CHECK(scales.is_contiguous() && mins.is_contiguous() && scales.dim() == 2 && scales.size(0) == N &&
                  scales.size(1) == K / G && mins.sizes() == scales.sizes(),
              "scales and mins must be contiguous [N, K / group_size]");
}

}  // namespace

// y [M, N] = x [M, K] @ w [N, K].T in fp32, for a few rows: the weight streamed once, each of its
// rows dotted with all of x's while it sits in L1. fp32 F.linear reaches about a third of the read
// bandwidth at batch 1 (oneDNN / MKL GEMV, OpenMP regions); this one is bound by memory alone.
template <int MB>
inline void f32_rows(const float* x, int64_t K, const float* wn, float* y, int64_t N) {
  constexpr int U = MB == 1 ? 4 : 2;  // independent FMA chains per row of x: the FMA latency is no limit
  __m256 acc[MB][U];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    for (int u = 0; u < U; ++u) {
      const __m256 w = _mm256_loadu_ps(wn + k + 8 * u);
      for (int m = 0; m < MB; ++m) acc[m][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k + 8 * u), acc[m][u]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 w = _mm256_loadu_ps(wn + k);
    for (int m = 0; m < MB; ++m) acc[m][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
  }
  for (int m = 0; m < MB; ++m) {
    __m256 a = acc[m][0];
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[m][u]);
    float sum = hsum(a);
    for (int64_t i = k; i < K; ++i) sum += wn[i] * x[m * K + i];
    y[m * N] = sum;
  }
}

torch::Tensor f32_gemv(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == torch::kFloat32 && weight.dim() == 2 &&
                  weight.is_contiguous(),
              "weight must be a contiguous float32 CPU tensor [N, K]");
  const int64_t N = weight.size(0), K = weight.size(1);
  check_x(x, K);
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_rows(N, K * 4, [&](int64_t n) {
    const float* wn = w + n * K;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) f32_rows<4>(xp + m * K, K, wn, yp + m * N + n, N);
    switch (M - m) {
      case 3: f32_rows<3>(xp + m * K, K, wn, yp + m * N + n, N); break;
      case 2: f32_rows<2>(xp + m * K, K, wn, yp + m * N + n, N); break;
      case 1: f32_rows<1>(xp + m * K, K, wn, yp + m * N + n, N); break;
      default: break;
    }
  });
  return y;
}

// y [M, N] = x [M, K] @ (qweight [N, K] int8 * scales [N]).T on Q8 activations (any K and N).
torch::Tensor int8_gemv(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales) {
  TORCH_CHECK(qweight.scalar_type() == torch::kInt8 && qweight.is_contiguous() && qweight.dim() == 2,
              "qweight must be a contiguous int8 [N, K] tensor");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  check_x(x, K);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() && scales.numel() == N,
              "scales must be float32 [N]");
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  Q8Rows xq;
  quantize_q8(x.data_ptr<float>(), M, K, xq);
  const int8_t* w = qweight.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const std::vector<float> spread = spread_scales(xq, M);
  const float* sp = spread.data();
#else
  const float* sp = nullptr;
#endif
  for_rows(N, K, [&](int64_t n) { int8_row(xq, sp, w, s[n], yp, M, K, N, n); });
  return y;
}

// y [M, N] = x [M, K] @ W.T for the Q4 layout (see the top of this file), on Q8 activations.
torch::Tensor q4_gemv(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& scales,
                      const torch::Tensor& mins, int64_t group_size) {
  check_q4(qs, scales, mins, group_size);
  const int64_t N = qs.size(0), K = 2 * qs.size(1), M = x.size(0);
  check_x(x, K);
  auto y = torch::empty({M, N}, x.options());
  Q8Rows xq;
  quantize_q8(x.data_ptr<float>(), M, K, xq);
  const uint8_t* q = qs.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  auto run = [&](auto tag) {
    using S = decltype(tag);
    const S* sp = scales.data_ptr<S>();
    const S* mp = mins.data_ptr<S>();
    for_rows(N, K / 2, [&](int64_t n) { q4_row(xq, q, sp, mp, yp, M, K, N, group_size, n); });
  };
  if (scales.scalar_type() == torch::kFloat16) run(at::Half{});
  else run(float{});
  return y;
}

// Rows [row0, row0 + rows) of the Q4 weight dequantized to fp32 [rows, K]: the prefill path's
// matmul operand, a block at a time, so no second copy of the whole weight is ever held.
torch::Tensor q4_dequant(const torch::Tensor& qs, const torch::Tensor& scales, const torch::Tensor& mins,
                         int64_t group_size, int64_t row0, int64_t rows) {
  check_q4(qs, scales, mins, group_size);
  const int64_t N = qs.size(0), K = 2 * qs.size(1), NG = K / group_size;
  TORCH_CHECK(row0 >= 0 && rows >= 0 && row0 + rows <= N, "rows out of range");
  auto out = torch::empty({rows, K}, qs.options().dtype(torch::kFloat32));
  const uint8_t* q = qs.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  auto run = [&](auto tag) {
    using S = decltype(tag);
    const S* sp = scales.data_ptr<S>();
    const S* mp = mins.data_ptr<S>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t row = row0 + r;
        for (int64_t b = 0; b < K / kQ8Block; ++b) {
          const int64_t g = b * kQ8Block / group_size;
          const __m256 s = _mm256_set1_ps(to_f32(sp[row * NG + g])), mn = _mm256_set1_ps(to_f32(mp[row * NG + g]));
          const __m256i qv = unpack_q4_block(q + row * (K / 2) + b * (kQ8Block / 2));
          float* o = op + r * K + b * kQ8Block;
          for (int i = 0; i < 4; ++i) {
            const __m256i part = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                reinterpret_cast<const __m128i*>(reinterpret_cast<const uint8_t*>(&qv) + 8 * i)));
            _mm256_storeu_ps(o + 8 * i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(part), s, mn));
          }
        }
      }
    });
  };
  if (scales.scalar_type() == torch::kFloat16) run(at::Half{});
  else run(float{});
  return out;
}
