// Integer dot products for the weight-only quantized linears, in the manner of llama.cpp's ggml-cpu
// (Q8 activations times Q8 / Q4 weights), for every ISA tier the kernels are built for.
//
// Activations are rounded to int8 per block of 32 inputs (scale max|x| / 127, "Q8"), so a block of
// weights costs integer dot products and one fp32 multiply-add by its scale, instead of 32 widenings
// and FMAs (the kernels: int8_gemm.cpp, q4_gemm.cpp).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "quant_dot.h needs the avx2 tier's instructions (AVX2, FMA, F16C) at least"
#endif

namespace kubeinfer {

constexpr int64_t kQ8Block = 32;

// Rows of activations rounded to int8 per block of 32. K is padded with zeros to a whole block, so
// a tail block's dot product may read a full 32 bytes of x (never of the weights).
struct Q8Rows {
  int64_t KB = 0;           // blocks per row, the partial tail block included
  std::vector<int8_t> q;    // [M, KB * 32]
  std::vector<float> d;     // [M, KB]: the block's scale, max|x| / 127
  // [M, KB]: d * sum(q) over the block, the rounded x's sum (the int4 weights' min term). Not x's
  // exact sum: with it the min term would not cancel the rounding error of the q * scale term, and
  // the int4 error would be that of all-positive weights 0..15, ~2x the int8 one on real models.
  std::vector<float> xsum;

  const int8_t* row(int64_t m) const { return q.data() + m * KB * kQ8Block; }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One full block: rounds to nearest even (as torch.round does), so a test can replay it exactly.
inline void quantize_block32(const float* x, int8_t* q, float* d, float* xsum) {
  const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16),
               v3 = _mm256_loadu_ps(x + 24);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                    _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
  const float mx = hmax(amax);
  *d = mx / 127.f;
  const __m256 inv = _mm256_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, inv), kRound));
  const __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, inv), kRound));
  const __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, inv), kRound));
  const __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, inv), kRound));
  const __m256i isum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
  *xsum = *d * hsum(_mm256_cvtepi32_ps(isum));  // exact: |sum| <= 32 * 127
  // The packs work per 128-bit lane: the permute puts the eight 4-byte groups back in order.
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

// x [M, K] fp32 (row stride K) -> Q8 rows.
inline void quantize_q8(const float* x, int64_t M, int64_t K, Q8Rows& out) {
  const int64_t full = K / kQ8Block, tail = K % kQ8Block;
  out.KB = full + (tail ? 1 : 0);
  out.q.assign(M * out.KB * kQ8Block, 0);
  out.d.assign(M * out.KB, 0.f);
  out.xsum.assign(M * out.KB, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    int8_t* qm = out.q.data() + m * out.KB * kQ8Block;
    float* dm = out.d.data() + m * out.KB;
    float* sm = out.xsum.data() + m * out.KB;
    for (int64_t b = 0; b < full; ++b) quantize_block32(xm + b * kQ8Block, qm + b * kQ8Block, dm + b, sm + b);
    if (tail) {
      const float* xb = xm + full * kQ8Block;
      float mx = 0.f;
      for (int64_t i = 0; i < tail; ++i) mx = std::max(mx, std::fabs(xb[i]));
      const float inv = mx > 0.f ? 127.f / mx : 0.f;
      int32_t isum = 0;
      for (int64_t i = 0; i < tail; ++i) {
        qm[full * kQ8Block + i] = static_cast<int8_t>(std::nearbyintf(xb[i] * inv));
        isum += qm[full * kQ8Block + i];
      }
      dm[full] = mx / 127.f;
      sm[full] = dm[full] * static_cast<float>(isum);
    }
  }
}

// The interleaved weight layouts (int8_gemm.cpp, q4_gemm.cpp) hold output rows in groups of this many:
// one 32-bit lane per row of a 512-bit vector.
constexpr int kGroupRows = 16;

// How far ahead in a run of groups a kernel asks for the weights: the hardware prefetcher alone keeps
// too few lines in flight for one thread's stream (measured on the Q4 GEMV before the interleaved
// layouts: 72-77 us against 86-95 for int4 gate|up on one thread of the Zen 4 VM).
constexpr int64_t kPrefetchBytes = 2048;

// Asks for the `bytes` of a weight stream that lie kPrefetchBytes past p.
inline void prefetch_ahead(const void* p, int64_t bytes) {
  for (int64_t l = 0; l < bytes; l += 64)
    _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes + l, _MM_HINT_T0);
}

// Four activation bytes as one 32-bit value, to broadcast to every lane.
inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if defined(__AVX512F__)
// The lanes of a group whose rows exist: all 16, or those below N in the last group.
inline __mmask16 group_lanes(int64_t N, int64_t n0) {
  return N - n0 >= kGroupRows ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (N - n0)) - 1);
}
#endif

// Activation rows a kernel keeps in registers at once, sharing each unpacked block of weights: the
// avx512 tier has 32 vector registers, avx2 16.
#if defined(__AVX512F__)
constexpr int kTileRows = 8;
#else
constexpr int kTileRows = 4;
#endif

// f(m0, std::integral_constant<int, rows>) over [0, M) in as few tiles of at most kTileRows as
// possible, of sizes that differ by one at most: a 5-row verification step is 3 + 2 rows, not 4 + 1
// (a tile of one shares nothing).
template <typename F>
void for_row_tiles(int64_t M, F&& f) {
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  int64_t m0 = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t rows = M / tiles + (t < M % tiles ? 1 : 0);
    switch (rows) {
#define KUBEINFER_TILE(R) \
  case R: f(m0, std::integral_constant<int, R>{}); break;
      KUBEINFER_TILE(1) KUBEINFER_TILE(2) KUBEINFER_TILE(3) KUBEINFER_TILE(4)
#if defined(__AVX512F__)
      KUBEINFER_TILE(5) KUBEINFER_TILE(6) KUBEINFER_TILE(7) KUBEINFER_TILE(8)
#endif
#undef KUBEINFER_TILE
      default: break;
    }
    m0 += rows;
  }
}

// f(m0, rows) over [0, M) in blocks of kRowBlock rows: a kernel passes every weight once per block,
// so a long prefill's Q8 rows (K bytes each) are re-read from L2 for each group of weights, not from
// memory.
constexpr int64_t kRowBlock = 128;

template <typename F>
void for_row_blocks(int64_t M, F&& f) {
  for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) f(m0, std::min(kRowBlock, M - m0));
}

}  // namespace kubeinfer
