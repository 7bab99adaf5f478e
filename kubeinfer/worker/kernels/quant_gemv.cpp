// The fp32 matmul for decode-sized batches (a few activation rows): every weight is read once per call
// and dotted with all rows while it sits in L1. Threads split the output rows (parallel.h's pool,
// torch's thread count). int8 and int4 weights have their own interleaved layouts and kernels:
// int8_gemm.cpp, q4_gemm.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "quant_dot.h"

using namespace kubeinfer;

namespace {

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
  for_rows(N, K * 4, M, [&](int64_t n) {
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
