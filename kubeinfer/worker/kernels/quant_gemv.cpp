// Weight-only int8 and int4 matmuls for decode-sized batches (a few activation rows): every weight
// is read once per call and dotted with all rows while it sits in L1, on Q8 activations
// (quant_dot.h). Threads split the output rows (at::parallel_for, OpenMP with torch's thread count).
//
// int8: qweight [N, K] int8 with one fp32 scale per output row (quant.Int8WeightOnly), as stored.
// int4: the kernel's own Q4 layout, packed once at load (quant_linear.CppInt4Linear): qs [N, K / 2]
// uint8, each block of 32 inputs as 16 bytes in quant_dot.h's order, with the scheme's scales and
// mins [N, K / G] (fp16 or fp32) as they are: W = q * scale + min per group of G (a multiple of 32).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "quant_dot.h"

using namespace kubeinfer;

namespace {

constexpr int kRows = 4;  // weight rows per inner loop: four independent accumulator chains, one x load

// Threads take whole groups of kRows rows, ~16 KB of weights or more each (fewer hand-offs on small
// matrices, enough groups to balance on large ones).
template <typename F>
void for_row_groups(int64_t N, int64_t row_bytes, F&& f) {
  const int64_t groups = (N + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_bytes * kRows));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n = g * kRows;
      f(n, std::min<int64_t>(kRows, N - n));
    }
  });
}

template <int R>
void int8_rows(const Q8Rows& xq, const int8_t* w, const float* scales, float* y, int64_t M, int64_t K, int64_t N,
               int64_t n) {
  const int64_t full = K / kQ8Block, tail = K % kQ8Block;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xm = xq.row(m);
    const float* dm = xq.d.data() + m * xq.KB;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < full; ++b) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + b * kQ8Block));
      const __m256 dv = _mm256_set1_ps(dm[b]);
      for (int r = 0; r < R; ++r) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n + r) * K + b * kQ8Block));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32_i8(wv, xv)), dv, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float sum = hsum(acc[r]);
      if (tail) {  // the last K % 32 weights: a full 32-byte load would run past the matrix
        const int8_t* wt = w + (n + r) * K + full * kQ8Block;
        int32_t isum = 0;
        for (int64_t i = 0; i < tail; ++i) isum += int32_t{wt[i]} * int32_t{xm[full * kQ8Block + i]};
        sum += static_cast<float>(isum) * dm[full];
      }
      y[m * N + n + r] = sum * scales[n + r];
    }
  }
}

inline float to_f32(float v) { return v; }
inline float to_f32(at::Half v) { return _cvtsh_ss(v.x); }

template <int R, typename S>
void q4_rows(const Q8Rows& xq, const uint8_t* qs, const S* scales, const S* mins, float* y, int64_t M, int64_t K,
             int64_t N, int64_t G, int64_t n) {
  const int64_t KB = K / kQ8Block, NG = K / G, per_group = G / kQ8Block;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xm = xq.row(m);
    const float* dm = xq.d.data() + m * xq.KB;
    const float* sm = xq.xsum.data() + m * xq.KB;
    __m256 acc[R];
    float min_term[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), min_term[r] = 0.f;
    for (int64_t b = 0; b < KB; ++b) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + b * kQ8Block));
      const int64_t g = b / per_group;
      for (int r = 0; r < R; ++r) {
        const int64_t row = n + r;
        const __m256i qv = unpack_q4_block(qs + row * (K / 2) + b * (kQ8Block / 2));
        // sum_k (q s + min) xq d = s * d * sum(q xq) + min * d * sum(xq).
        const float s = to_f32(scales[row * NG + g]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32_u4(qv, xv)), _mm256_set1_ps(s * dm[b]), acc[r]);
        min_term[r] += to_f32(mins[row * NG + g]) * sm[b];
      }
    }
    for (int r = 0; r < R; ++r) y[m * N + n + r] = hsum(acc[r]) + min_term[r];
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
  for_row_groups(N, K, [&](int64_t n, int64_t rows) {
    if (rows == kRows) int8_rows<kRows>(xq, w, s, yp, M, K, N, n);
    else for (int64_t r = 0; r < rows; ++r) int8_rows<1>(xq, w, s, yp, M, K, N, n + r);
  });
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
    for_row_groups(N, K / 2, [&](int64_t n, int64_t rows) {
      if (rows == kRows) q4_rows<kRows>(xq, q, sp, mp, yp, M, K, N, group_size, n);
      else for (int64_t r = 0; r < rows; ++r) q4_rows<1>(xq, q, sp, mp, yp, M, K, N, group_size, n + r);
    });
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
