// int8 weight-only matmul on Q8 activations (quant_dot.h), on the kernels' interleaved int8 layout,
// packed once at load (kernel_layouts.pack_int8); the same scheme as q4_gemm.cpp's int4 one:
//
//   qs      [N16, KB * 512] int8: output rows in groups of 16 (the last padded with zero rows), K
//           padded with zeros to KB whole blocks of 32; a group's block b is [8][16][4] (j, r, t):
//           byte (j, r, t) is row r's weight of input k = 32 b + 4 j + t.
//   scales  [N16, 16] fp32: row r's scale (quant.Int8WeightOnly's per-output-row scale).
//
// vpdpbusd multiplies unsigned by signed bytes, so on the avx512 tier the activations enter as
// x + 128 (unsigned) and the block's 128 * sum(w) is taken back off in int32: exactly the signed
// dot product. The avx2 tier has no unsigned-times-signed multiply wide enough for x + 128, and
// moves w's sign onto x instead: |w| * sign(x, w).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "quant_dot.h"

using namespace kubeinfer;

namespace {

constexpr int64_t kBlockBytes = kGroupRows * kQ8Block;  // one group's block of 32 inputs

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// xu: the Q8 rows with 128 added (x ^ 0x80 as unsigned bytes).
template <int MB>
void group_rows(const Q8Rows& xq, const uint8_t* xu, int64_t m0, bool first, const int8_t* qg, const float* sg,
                float* y, int64_t N, int64_t n0) {
  const int64_t KB = xq.KB;
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    const int8_t* qb = qg + b * kBlockBytes;
    if (first) prefetch_ahead(qb, kBlockBytes);  // this tile reads the weights from memory
    __m512i w[8];
    __m512i bias = _mm512_setzero_si512();  // 128 * sum(w) per row
    for (int j = 0; j < 8; ++j) {
      w[j] = _mm512_loadu_si512(qb + 64 * j);
      bias = _mm512_dpbusd_epi32(bias, offset, w[j]);
    }
    for (int m = 0; m < MB; ++m) {
      const uint8_t* xb = xu + (m0 + m) * KB * kQ8Block + b * kQ8Block;
      __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
      for (int j = 0; j < 8; j += 2) {
        even = _mm512_dpbusd_epi32(even, _mm512_set1_epi32(load_i32(xb + 4 * j)), w[j]);
        odd = _mm512_dpbusd_epi32(odd, _mm512_set1_epi32(load_i32(xb + 4 * j + 4)),
                                  w[j + 1]);
      }
      const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(even, odd), bias);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xq.d[(m0 + m) * KB + b]), acc[m]);
    }
  }
  const __m512 s = _mm512_loadu_ps(sg);
  const __mmask16 valid = group_lanes(N, n0);
  for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(y + (m0 + m) * N + n0, valid, _mm512_mul_ps(acc[m], s));
}
#else
// Both halves of the group (rows 0-7 and 8-15, each 32 bytes of every 64-byte line) in one pass, so
// each line of weights is read once.
template <int MB>
void group_rows(const Q8Rows& xq, const uint8_t*, int64_t m0, bool first, const int8_t* qg, const float* sg, float* y,
                int64_t N, int64_t n0) {
  const int64_t KB = xq.KB;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    const int8_t* qb = qg + b * kBlockBytes;
    if (first) prefetch_ahead(qb, kBlockBytes);
    for (int m = 0; m < MB; ++m) {
      const int8_t* xb = xq.row(m0 + m) + b * kQ8Block;
      __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        const __m256i xv = _mm256_set1_epi32(load_i32(xb + 4 * j));
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 64 * j));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 64 * j + 32));
        // |w| * |x| <= 127 * 127: a pair's sum fits vpmaddubsw's int16, not two pairs'.
        sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(xv, w0)), ones));
        sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(xv, w1)), ones));
      }
      const __m256 d = _mm256_set1_ps(xq.d[(m0 + m) * KB + b]);
      acc[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum0), d, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum1), d, acc[m][1]);
    }
  }
  for (int h = 0; h < 2 && n0 + 8 * h < N; ++h) {
    const __m256 s = _mm256_loadu_ps(sg + 8 * h);
    const int64_t lanes = std::min<int64_t>(8, N - n0 - 8 * h);
    for (int m = 0; m < MB; ++m) {
      float* out = y + (m0 + m) * N + n0 + 8 * h;
      const __m256 v = _mm256_mul_ps(acc[m][h], s);
      if (lanes == 8) {
        _mm256_storeu_ps(out, v);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, v);
        std::copy(tmp, tmp + lanes, out);
      }
    }
  }
}
#endif

void check_int8(const torch::Tensor& qs, const torch::Tensor& scales, int64_t N) {
  TORCH_CHECK(qs.device().is_cpu() && qs.scalar_type() == torch::kInt8 && qs.dim() == 2 && qs.is_contiguous() &&
                  qs.size(1) % kBlockBytes == 0,
              "qs must be a contiguous int8 CPU tensor [N / 16, KB * 512] (the interleaved int8 layout)");
  const int64_t groups = qs.size(0);
  TORCH_CHECK(N > (groups - 1) * kGroupRows && N <= groups * kGroupRows, "n = ", N, " does not fit ", groups,
              " groups of 16 rows");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == groups && scales.size(1) == kGroupRows,
              "scales must be contiguous float32 [N / 16, 16]");
}

}  // namespace

// y [M, n] = x [M, K] @ (W * scales).T, W in the interleaved int8 layout, on Q8 activations.
torch::Tensor int8_gemv(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& scales, int64_t n) {
  check_int8(qs, scales, n);
  const int64_t KB = qs.size(1) / kBlockBytes, M = x.size(0);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() &&
                  x.size(1) > (KB - 1) * kQ8Block && x.size(1) <= KB * kQ8Block,
              "x must be a contiguous float32 CPU tensor [M, K] with K in the weight's ", KB, " blocks of 32");
  const int64_t K = x.size(1);
  auto y = torch::empty({M, n}, x.options());
  Q8Rows xq;
  quantize_q8(x.data_ptr<float>(), M, K, xq);
  std::vector<uint8_t> xu;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  xu.resize(xq.q.size());
  for (size_t i = 0; i < xu.size(); ++i) xu[i] = static_cast<uint8_t>(xq.q[i]) ^ 0x80;
#endif
  const int8_t* q = qs.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_row_blocks(M, [&](int64_t mb, int64_t rows) {
    for_rows(qs.size(0), qs.size(1), M, [&](int64_t group) {
      const int8_t* qg = q + group * qs.size(1);
      const float* sg = sp + group * kGroupRows;
      for_row_tiles(rows, [&](int64_t m0, auto tile) {
        group_rows<decltype(tile)::value>(xq, xu.data(), mb + m0, m0 == 0, qg, sg, yp, n, group * kGroupRows);
      });
    });
  });
  return y;
}

// Rows [row0, row0 + rows) of the integer weights in row order, int8 [rows, k]: the GEMM operand of
// large batches, a block of rows at a time (the caller converts it and applies the scales).
torch::Tensor int8_rows(const torch::Tensor& qs, const torch::Tensor& scales, int64_t n, int64_t k, int64_t row0,
                        int64_t rows) {
  check_int8(qs, scales, n);
  const int64_t KB = qs.size(1) / kBlockBytes;
  TORCH_CHECK(k > (KB - 1) * kQ8Block && k <= KB * kQ8Block, "k = ", k, " does not fit ", KB, " blocks of 32");
  TORCH_CHECK(row0 >= 0 && rows >= 0 && row0 + rows <= n, "rows out of range");
  auto out = torch::empty({rows, k}, qs.options());
  const int8_t* q = qs.data_ptr<int8_t>();
  int8_t* op = out.data_ptr<int8_t>();
  layer_chunks(rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t row = row0 + r;
      const int8_t* qg = q + (row / kGroupRows) * qs.size(1) + 4 * (row % kGroupRows);
      for (int64_t kk = 0; kk < k; kk += 4)  // 4 inputs at a time: (block, j) = divmod(kk, 32) / 4
        std::memcpy(op + r * k + kk, qg + (kk / kQ8Block) * kBlockBytes + 64 * (kk % kQ8Block / 4),
                    std::min<int64_t>(4, k - kk));
    }
  });
  return out;
}
