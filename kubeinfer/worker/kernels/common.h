// Helpers shared by the C++ CPU kernel sources: dtype dispatch and checks, and fp32/bf16 vector
// loads, stores and dot products (bf16 is widened to fp32 and rounded to nearest even on store).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "simd.h"

namespace kubeinfer {

using bf16 = c10::BFloat16;

// Scalar type dispatch for the kernels that take fp32 or bf16: f is called with a value of the type.
template <typename F>
auto dispatch_float_bf16(const torch::Tensor& t, const char* what, F&& f) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16),
              what, " must be a float32 or bfloat16 CPU tensor");
  return t.scalar_type() == torch::kFloat32 ? f(float{}) : f(bf16{});
}

inline void check_same_dtype(const torch::Tensor& a, const torch::Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, " must have the dtype of the activations");
}

// The blocks of a table row that hold `tokens` tokens (block_size each) must be blocks of a cache of
// num_blocks: a kernel that reads through the table never leaves the cache.
inline void check_block_ids(const int64_t* table_row, int64_t tokens, int64_t block_size, int64_t num_blocks) {
  for (int64_t i = 0; i < (tokens + block_size - 1) / block_size; ++i)
    TORCH_CHECK(table_row[i] >= 0 && table_row[i] < num_blocks, "block id ", table_row[i], " is outside the KV cache");
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
// bf16 is the top half of an fp32: widening is a shift.
inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(bf16* p, __m512 v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else
  // Round to nearest even, as c10::BFloat16 does (NaN payloads aside).
  const __m512i i = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(i, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
#endif
}

// bf16 pairs widened without a cross-lane shuffle: 32 bf16 (16 lanes of two) give their even
// elements by a shift and their odd ones by a mask, one op per 16 where cvtepu16 + shift take two.
inline __m512 bf16_even(__m512i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)); }
inline __m512 bf16_odd(__m512i x) {
  return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {  // bf16 is the top half of an fp32: widening is a shift
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
#endif

// sum_i a[i] * b[i] in fp32 for fp32 or bf16 operands.
template <typename A, typename B>
inline float dot_any(const A* a, const B* b, int64_t n) {
  int64_t i = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    v0 = _mm512_fmadd_ps(load16(a + i), load16(b + i), v0);
    v1 = _mm512_fmadd_ps(load16(a + i + 16), load16(b + i + 16), v1);
  }
  for (; i + 16 <= n; i += 16) v0 = _mm512_fmadd_ps(load16(a + i), load16(b + i), v0);
  acc = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
#elif defined(__AVX2__) && defined(__FMA__)
  // The avx2 tier (decode attention's scores, RMSNorm): 8 lanes, two chains.
  __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    v0 = _mm256_fmadd_ps(load8(a + i), load8(b + i), v0);
    v1 = _mm256_fmadd_ps(load8(a + i + 8), load8(b + i + 8), v1);
  }
  for (; i + 8 <= n; i += 8) v0 = _mm256_fmadd_ps(load8(a + i), load8(b + i), v0);
  const __m256 v = _mm256_add_ps(v0, v1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  acc = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
  for (; i < n; ++i) acc += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  return acc;
}

inline void check_f32(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, what, " must be a float32 CPU tensor");
}

}  // namespace kubeinfer
