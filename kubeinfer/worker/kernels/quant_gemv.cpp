// fp32 and weight-only int8 matmuls for decode-sized batches (a few activation rows): every weight is
// read once per call and dotted with all rows while it sits in L1, int8 on Q8 activations
// (quant_dot.h). Threads split the output rows (parallel.h's pool, torch's thread count). int4 has
// its own interleaved layout and kernel: q4_gemm.cpp.
//
// int8: qweight [N, K] int8 with one fp32 scale per output row (quant.Int8WeightOnly), as stored.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "quant_dot.h"

using namespace kubeinfer;

namespace {

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

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() &&
                  x.size(1) == K,
              "x must be a contiguous float32 CPU tensor [M, K] with K = ", K);
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
