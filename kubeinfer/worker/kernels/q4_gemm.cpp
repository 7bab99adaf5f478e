// int4 weight-only matmul on Q8 activations (quant_dot.h), on the kernels' interleaved Q4 layout,
// packed once at load (kernel_layouts.pack_q4):
//
//   qs      [N16, KB * 256] uint8: output rows in groups of 16 (the last padded with zero rows); a
//           group's block b of 32 inputs is 256 bytes [4][16][4] (j, r, t): byte (j, r, t) holds
//           row r's input k = 32 b + 4 j + t in its low nibble and k + 16 in its high one.
//   scales  [N16, K / G, 16] and mins alike, fp16 or fp32: W = q * scale + min per group of G inputs
//           (a multiple of 32), the group's 16 rows side by side.
//
// Four bytes of an activation row, broadcast to every lane, meet the same four inputs of 16 output
// rows: one vpdpbusd (avx512 tier) or two vpmaddubsw (avx2) leave each row's partial sum in its own
// lane, so a block costs 8 such steps for 16 rows and no horizontal sums; the block's unpacked
// weights stay in registers for a tile of activation rows (quant_dot.h's for_row_tiles; the
// technique of llama.cpp's repacked "q4_0_8x8" layouts). Each activation row is computed by the same
// instructions whatever the rows beside it, so a row's result does not depend on the batch
// (speculative verification relies on it).
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "quant_dot.h"

using namespace kubeinfer;

namespace {

constexpr int64_t kBlockBytes = kGroupRows * kQ8Block / 2;  // one group's block of 32 inputs

inline float to_f32(float v) { return v; }
inline float to_f32(at::Half v) { return _cvtsh_ss(v.x); }

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
inline __m512 load_lanes(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_lanes(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Activation rows [m0, m0 + MB) times one group of 16 output rows.
template <typename S, int MB>
void group_rows(const Q8Rows& xq, int64_t m0, bool first, const uint8_t* qg, const S* sg, const S* mg, float* y,
                int64_t N, int64_t n0, int64_t per_group) {
  const int64_t KB = xq.KB;
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    const uint8_t* qb = qg + b * kBlockBytes;
    if (first) prefetch_ahead(qb, kBlockBytes);  // this tile reads the weights from memory
    __m512i w[8];
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_loadu_si512(qb + 64 * j);
      w[j] = _mm512_and_si512(v, nibble);
      w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    }
    const int64_t g = b / per_group;
    const __m512 s = load_lanes(sg + g * kGroupRows), mn = load_lanes(mg + g * kGroupRows);
    for (int m = 0; m < MB; ++m) {
      const int8_t* xb = xq.row(m0 + m) + b * kQ8Block;
      __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();  // two dependency chains
      for (int j = 0; j < 8; j += 2) {
        even = _mm512_dpbusd_epi32(even, w[j], _mm512_set1_epi32(load_i32(xb + 4 * j)));
        odd = _mm512_dpbusd_epi32(odd, w[j + 1], _mm512_set1_epi32(load_i32(xb + 4 * j + 4)));
      }
      const int64_t i = (m0 + m) * KB + b;
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
      acc[m] = _mm512_fmadd_ps(sum, _mm512_mul_ps(s, _mm512_set1_ps(xq.d[i])), acc[m]);
      acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xq.xsum[i]), acc[m]);
    }
  }
  const __mmask16 valid = group_lanes(N, n0);
  for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(y + (m0 + m) * N + n0, valid, acc[m]);
}
#else
inline __m256 load_lanes8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_lanes8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The same on the avx2 tier, one half of the group (8 rows) at a time. The eight vpmaddubsw of a
// block add up in int16: each is at most 2 * 15 * 128, and 8 * 3840 < 32768.
template <typename S, int MB>
void group_rows(const Q8Rows& xq, int64_t m0, bool first, const uint8_t* qg, const S* sg, const S* mg, float* y,
                int64_t N, int64_t n0, int64_t per_group) {
  const int64_t KB = xq.KB;
  const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2 && n0 + 8 * h < N; ++h) {
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < KB; ++b) {
      const uint8_t* qb = qg + b * kBlockBytes + 32 * h;
      if (first && h == 0) prefetch_ahead(qb, kBlockBytes);
      __m256i w[8];
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 64 * j));
        w[j] = _mm256_and_si256(v, nibble);
        w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      }
      const int64_t g = b / per_group;
      const __m256 s = load_lanes8(sg + g * kGroupRows + 8 * h), mn = load_lanes8(mg + g * kGroupRows + 8 * h);
      for (int m = 0; m < MB; ++m) {
        const int8_t* xb = xq.row(m0 + m) + b * kQ8Block;
        __m256i s16 = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(load_i32(xb)));
        for (int j = 1; j < 8; ++j)
          s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[j], _mm256_set1_epi32(load_i32(xb + 4 * j))));
        const int64_t i = (m0 + m) * KB + b;
        const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
        acc[m] = _mm256_fmadd_ps(sum, _mm256_mul_ps(s, _mm256_set1_ps(xq.d[i])), acc[m]);
        acc[m] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xq.xsum[i]), acc[m]);
      }
    }
    const int64_t lanes = std::min<int64_t>(8, N - n0 - 8 * h);
    for (int m = 0; m < MB; ++m) {
      float* out = y + (m0 + m) * N + n0 + 8 * h;
      if (lanes == 8) {
        _mm256_storeu_ps(out, acc[m]);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, acc[m]);
        std::copy(tmp, tmp + lanes, out);
      }
    }
  }
}
#endif

template <typename S>
void group_all_rows(const Q8Rows& xq, int64_t mb, int64_t rows, const uint8_t* qg, const S* sg, const S* mg, float* y,
                    int64_t N, int64_t n0, int64_t per_group) {
  for_row_tiles(rows, [&](int64_t m0, auto tile) {
    group_rows<S, decltype(tile)::value>(xq, mb + m0, m0 == 0, qg, sg, mg, y, N, n0, per_group);
  });
}

void check_q4(const torch::Tensor& qs, const torch::Tensor& scales, const torch::Tensor& mins, int64_t G, int64_t N) {
  TORCH_CHECK(qs.device().is_cpu() && qs.scalar_type() == torch::kUInt8 && qs.dim() == 2 && qs.is_contiguous() &&
                  qs.size(1) % kBlockBytes == 0,
              "qs must be a contiguous uint8 CPU tensor [N / 16, K * 8] (the interleaved Q4 layout)");
  const int64_t groups = qs.size(0), K = qs.size(1) / kBlockBytes * kQ8Block;
  TORCH_CHECK(N > (groups - 1) * kGroupRows && N <= groups * kGroupRows, "n = ", N, " does not fit ", groups,
              " groups of 16 rows");
  TORCH_CHECK(G > 0 && G % kQ8Block == 0 && K % G == 0, "group_size must be a multiple of 32 dividing K = ", K);
  TORCH_CHECK(scales.scalar_type() == mins.scalar_type() &&
                  (scales.scalar_type() == torch::kFloat16 || scales.scalar_type() == torch::kFloat32),
              "scales and mins must both be float16 or both float32");
  TORCH_CHECK(scales.is_contiguous() && mins.is_contiguous() && scales.dim() == 3 && scales.size(0) == groups &&
                  scales.size(1) == K / G && scales.size(2) == kGroupRows && mins.sizes() == scales.sizes(),
              "scales and mins must be contiguous [N / 16, K / group_size, 16]");
}

template <typename F>
void with_scale_type(const torch::Tensor& scales, F&& f) {
  if (scales.scalar_type() == torch::kFloat16) f(at::Half{});
  else f(float{});
}

}  // namespace

// y [M, n] = x [M, K] @ W.T, W in the interleaved Q4 layout (top of this file), on Q8 activations.
torch::Tensor q4_gemv(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& scales,
                      const torch::Tensor& mins, int64_t group_size, int64_t n) {
  check_q4(qs, scales, mins, group_size, n);
  const int64_t K = qs.size(1) / kBlockBytes * kQ8Block, M = x.size(0), NG = K / group_size;
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() &&
                  x.size(1) == K,
              "x must be a contiguous float32 CPU tensor [M, K] with K = ", K);
  auto y = torch::empty({M, n}, x.options());
  Q8Rows xq;
  quantize_q8(x.data_ptr<float>(), M, K, xq);
  const uint8_t* q = qs.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  with_scale_type(scales, [&](auto tag) {
    using S = decltype(tag);
    const S* sp = scales.data_ptr<S>();
    const S* mp = mins.data_ptr<S>();
    for_row_blocks(M, [&](int64_t mb, int64_t rows) {
      for_rows(qs.size(0), qs.size(1), M, [&](int64_t group) {
        const int64_t scale0 = group * NG * kGroupRows;
        group_all_rows(xq, mb, rows, q + group * qs.size(1), sp + scale0, mp + scale0, yp, n, group * kGroupRows,
                       group_size / kQ8Block);
      });
    });
  });
  return y;
}

// Rows [row0, row0 + rows) of the weight dequantized to fp32 [rows, K]: the matmul operand of the
// prefill path, a block of rows at a time, so no second copy of the whole weight is ever held.
torch::Tensor q4_dequant(const torch::Tensor& qs, const torch::Tensor& scales, const torch::Tensor& mins,
                         int64_t group_size, int64_t n, int64_t row0, int64_t rows) {
  check_q4(qs, scales, mins, group_size, n);
  const int64_t K = qs.size(1) / kBlockBytes * kQ8Block, KB = K / kQ8Block, NG = K / group_size;
  TORCH_CHECK(row0 >= 0 && rows >= 0 && row0 + rows <= n, "rows out of range");
  auto out = torch::empty({rows, K}, qs.options().dtype(torch::kFloat32));
  const uint8_t* q = qs.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  with_scale_type(scales, [&](auto tag) {
    using S = decltype(tag);
    const S* sp = scales.data_ptr<S>();
    const S* mp = mins.data_ptr<S>();
    layer_chunks(rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t row = row0 + r, group = row / kGroupRows, lane = row % kGroupRows;
        const uint8_t* qg = q + group * qs.size(1) + 4 * lane;
        float* o = op + r * K;
        for (int64_t b = 0; b < KB; ++b) {
          const int64_t g = b * kQ8Block / group_size;
          const __m256 s = _mm256_set1_ps(to_f32(sp[(group * NG + g) * kGroupRows + lane]));
          const __m256 mn = _mm256_set1_ps(to_f32(mp[(group * NG + g) * kGroupRows + lane]));
          // The row's 4 bytes of each j: inputs 4 j .. 4 j + 3 (low nibbles) and 16 more (high).
          alignas(16) uint32_t bytes[4];
          for (int j = 0; j < 4; ++j) std::memcpy(&bytes[j], qg + b * kBlockBytes + 64 * j, 4);
          const __m128i packed = _mm_load_si128(reinterpret_cast<const __m128i*>(bytes));
          const __m128i lo = _mm_and_si128(packed, _mm_set1_epi8(0x0f));
          const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0f));
          float* ob = o + b * kQ8Block;
          const __m128i eights[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
          for (int e = 0; e < 4; ++e)
            _mm256_storeu_ps(ob + 8 * e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eights[e])), s, mn));
        }
      }
    });
  });
  return out;
}
