// CPU kernels for the decode hot path: one call where the torch path needs a dozen small ops.
//
// At batch 1 a decode step's tensors are a few KB, so a torch op costs its dispatch (5-30 us on a
// 2-core VM), not its arithmetic. These kernels fold the paged-attention decode (gather through the
// block table, softmax, weighted sum), the K/V cache write and RMSNorm into one call each, and
// run the int8 weight-only matmul for decode-sized batches at close to memory bandwidth (with
// AVX512-VNNI on int8-rounded activations).
// The norm, rotary, SwiGLU and attention kernels take fp32 or bf16 tensors and compute in fp32 (bf16
// is read by widening to fp32 and written rounded to nearest even); the matmul kernels take fp32
// activations. The int8 KV cache and fp16 stay on the torch path (kernels/attention.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

#if defined(__AVX512F__)
using kubeinfer::exp512;
using kubeinfer::silu512;
#endif

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

using bf16 = c10::BFloat16;

// Scalar type dispatch for the kernels that take fp32 or bf16: f is called with a value of the type.
template <typename F>
auto dispatch_float_bf16(const torch::Tensor& t, const char* what, F&& f) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16),
              what, " must be a float32 or bfloat16 CPU tensor");
  return t.scalar_type() == torch::kFloat32 ? f(float{}) : f(bf16{});
}

void check_same_dtype(const torch::Tensor& a, const torch::Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, " must have the dtype of the activations");
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
#endif
  for (; i < n; ++i) acc += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  return acc;
}

// o[i] += p * v[i] for an fp32 accumulator o.
template <typename T>
inline void axpy(float* o, float p, const T* v, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vp = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(o + i, _mm512_fmadd_ps(vp, load16(v + i), _mm512_loadu_ps(o + i)));
#endif
  for (; i < n; ++i) o[i] += p * static_cast<float>(v[i]);
}

// exp(x - max) in place over each of `rows` rows of L scores; inv[r] = 1 / the row's sum.
void softmax_rows(float* scores, int64_t rows, int64_t L, float* inv) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sc = scores + r * L;
    float mx = -INFINITY;
    for (int64_t t = 0; t < L; ++t) mx = std::max(mx, sc[t]);
    float sum = 0.f;
    int64_t t0 = 0;
#if defined(__AVX512F__)
    const __m512 vmx = _mm512_set1_ps(mx);
    __m512 vsum = _mm512_setzero_ps();
    for (; t0 + 16 <= L; t0 += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + t0), vmx));
      _mm512_storeu_ps(sc + t0, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    sum = _mm512_reduce_add_ps(vsum);
#endif
    for (int64_t t = t0; t < L; ++t) {
      sc[t] = std::exp(sc[t] - mx);
      sum += sc[t];
    }
    inv[r] = 1.f / sum;
  }
}

// Attention of `rows` query heads (fp32, [rows, D], scores scaled by `scale`) that share one kv
// head, over the first L tokens reached through `table`; writes [rows, D] fp32 to out. Any D, any rows.
template <typename T>
void attend_generic(const float* q, float scale, int64_t rows, int64_t D, const T* kh, const T* vh,
                    const int64_t* table, int64_t L, int64_t BS, float* scores, float* inv, float* out) {
  // A block of the table at a time: a division per token (t / BS) costs more than its dot product.
  for (int64_t blk = 0, t = 0; t < L; ++blk) {
    const T* kb = kh + table[blk] * BS * D;
    for (int64_t j = 0, n = std::min(BS, L - t); j < n; ++j, ++t)
      for (int64_t g = 0; g < rows; ++g) scores[g * L + t] = dot_any(q + g * D, kb + j * D, D) * scale;
  }
  softmax_rows(scores, rows, L, inv);
  std::fill_n(out, rows * D, 0.f);
  for (int64_t blk = 0, t = 0; t < L; ++blk) {
    const T* vb = vh + table[blk] * BS * D;
    for (int64_t j = 0, n = std::min(BS, L - t); j < n; ++j, ++t)
      for (int64_t g = 0; g < rows; ++g) axpy(out + g * D, scores[g * L + t], vb + j * D, D);
  }
  for (int64_t g = 0; g < rows; ++g)
    for (int64_t i = 0; i < D; ++i) out[g * D + i] *= inv[g];
}

#if defined(__AVX512F__)
// Blocks sit wherever the allocator put them, so the hardware prefetcher stops at each block's
// end; asking for the next block's row j while this block's row j is consumed hides the miss (and
// its page walk). Spread out, not all at once: a burst of a block's 32 prefetches fills the line
// fill buffers and stalls the core until memory answers (measured: 73% of the kernel's time).
template <int64_t D, typename T>
inline void prefetch_row(const T* p) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

// r[j] = the sum of a[j]'s 16 lanes, for 16 vectors at once: a transpose-and-add tree of 45
// shuffles and adds, where 16 separate horizontal reductions take ~130 and a store each.
inline __m512 reduce16(const __m512 (&a)[16]) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a2i 0+2, a2i+1 0+2, a2i 1+3, a2i+1 1+3]
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: that lane's sums of vectors 4i..4i+3
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// bf16 pairs widened without a cross-lane shuffle: 32 bf16 (16 lanes of two) give their even
// elements by a shift and their odd ones by a mask, one op per 16 where cvtepu16 + shift take two.
inline __m512 bf16_even(__m512i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)); }
inline __m512 bf16_odd(__m512i x) {
  return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// One query row of D = 16 * DV in registers, in the form its key dot products want; dot_lanes gives
// the 16 lanes of q . k (still to be summed) for one key row.
template <int DV, typename T>
struct QueryRegs;

template <int DV>
struct QueryRegs<DV, float> {
  __m512 q[DV];
  void load(const float* p) {
    for (int v = 0; v < DV; ++v) q[v] = _mm512_loadu_ps(p + 16 * v);
  }
  __m512 dot_lanes(const float* k) const {
    __m512 a = _mm512_mul_ps(q[0], _mm512_loadu_ps(k));
    for (int v = 1; v < DV; ++v) a = _mm512_fmadd_ps(q[v], _mm512_loadu_ps(k + 16 * v), a);
    return a;
  }
};

// bf16 keys: with AVX512-BF16 one vdpbf16ps per 32 elements of the raw key (the query is
// bf16-valued, and a product of two bf16 is exact in fp32); without it, keys widened as bf16_even /
// bf16_odd against a query split the same way.
template <int DV>
struct QueryRegs<DV, bf16> {
  static_assert(DV % 2 == 0, "bf16 rows are read 32 elements at a time");
#if defined(__AVX512BF16__)
  __m512bh q[DV / 2];
  void load(const float* p) {
    for (int v = 0; v < DV / 2; ++v)
      q[v] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 32 * v + 16), _mm512_loadu_ps(p + 32 * v));
  }
  __m512 dot_lanes(const bf16* k) const {
    __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), q[0], (__m512bh)_mm512_loadu_si512(k));
    for (int v = 1; v < DV / 2; ++v) a = _mm512_dpbf16_ps(a, q[v], (__m512bh)_mm512_loadu_si512(k + 32 * v));
    return a;
  }
#else
  __m512 even[DV / 2], odd[DV / 2];
  void load(const float* p) {
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    for (int v = 0; v < DV / 2; ++v) {
      const __m512 lo = _mm512_loadu_ps(p + 32 * v), hi = _mm512_loadu_ps(p + 32 * v + 16);
      even[v] = _mm512_permutex2var_ps(lo, ev, hi);
      odd[v] = _mm512_permutex2var_ps(lo, od, hi);
    }
  }
  __m512 dot_lanes(const bf16* k) const {
    __m512 a = _mm512_setzero_ps();
    for (int v = 0; v < DV / 2; ++v) {
      const __m512i x = _mm512_loadu_si512(k + 32 * v);
      a = _mm512_fmadd_ps(odd[v], bf16_odd(x), _mm512_fmadd_ps(even[v], bf16_even(x), a));
    }
    return a;
  }
#endif
};

// One value row in fp32 registers: in order for fp32; for bf16 as (even, odd) pairs of 16, the
// order store_rows undoes.
template <int DV>
inline void load_value_row(const float* v, __m512 (&vv)[DV]) {
  for (int i = 0; i < DV; ++i) vv[i] = _mm512_loadu_ps(v + 16 * i);
}
template <int DV>
inline void load_value_row(const bf16* v, __m512 (&vv)[DV]) {
  for (int i = 0; i < DV / 2; ++i) {
    const __m512i x = _mm512_loadu_si512(v + 32 * i);
    vv[2 * i] = bf16_even(x);
    vv[2 * i + 1] = bf16_odd(x);
  }
}

// out[g] = acc[g] * inv[g] for GC rows of D = 16 * DV, putting load_value_row's order back.
template <int DV, int GC, typename T>
inline void store_rows(const __m512 (&acc)[GC][DV], const float* inv, float* out) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  for (int g = 0; g < GC; ++g) {
    const __m512 s = _mm512_set1_ps(inv[g]);
    float* o = out + g * DV * 16;
    if constexpr (std::is_same_v<T, float>) {
      for (int i = 0; i < DV; ++i) _mm512_storeu_ps(o + 16 * i, _mm512_mul_ps(acc[g][i], s));
    } else {
      for (int i = 0; i < DV / 2; ++i) {
        const __m512 e = _mm512_mul_ps(acc[g][2 * i], s), od = _mm512_mul_ps(acc[g][2 * i + 1], s);
        _mm512_storeu_ps(o + 32 * i, _mm512_permutex2var_ps(e, lo, od));
        _mm512_storeu_ps(o + 32 * i + 16, _mm512_permutex2var_ps(e, hi, od));
      }
    }
  }
}

// attend_generic for D = 16 * DV and GC rows in one pass over keys and values (online softmax, as
// in flash-decoding): 16 keys at a time, their GC x 16 scores summed together by reduce16, then
// the same 16 value rows weighted into GC x D fp32 accumulators. Each key and value row is loaded
// (and widened from bf16) once for all GC heads, K and V stream side by side (more misses in
// flight than a K pass then a V pass), and no per-token score buffer exists. GC * DV <= 16.
template <int DV, int GC, typename T>
void attend_regs(const float* q, float scale, const T* kh, const T* vh, const int64_t* table, int64_t L, int64_t BS,
                 float* out) {
  constexpr int64_t D = DV * 16;
  QueryRegs<DV, T> qr[GC];
  __m512 acc[GC][DV], sum[GC];
  float mx[GC];
  for (int g = 0; g < GC; ++g) {
    qr[g].load(q + g * D);
    mx[g] = -INFINITY;
    sum[g] = _mm512_setzero_ps();
    for (int v = 0; v < DV; ++v) acc[g][v] = _mm512_setzero_ps();
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  alignas(64) float p[GC][16];
  for (int64_t blk = 0, t = 0; t < L; ++blk) {
    const int64_t n = std::min(BS, L - t);
    const T* kb = kh + table[blk] * BS * D;
    const T* vb = vh + table[blk] * BS * D;
    const bool more = t + BS < L;
    const T* kn = more ? kh + table[blk + 1] * BS * D : kb;
    const T* vn = more ? vh + table[blk + 1] * BS * D : vb;
    for (int64_t j = 0; j < n; j += 16) {
      const int c = static_cast<int>(std::min<int64_t>(16, n - j));
      const __mmask16 valid = static_cast<__mmask16>((1u << c) - 1);
      for (int g = 0; g < GC; ++g) {
        __m512 lanes[16];
        if (c == 16) {
          for (int r = 0; r < 16; ++r) {
            if (g == 0) prefetch_row<D>(kn + (j + r) * D);
            lanes[r] = qr[g].dot_lanes(kb + (j + r) * D);
          }
        } else {  // a block's last BS % 16 keys, or the sequence's last few
          for (int r = 0; r < 16; ++r) lanes[r] = r < c ? qr[g].dot_lanes(kb + (j + r) * D) : _mm512_setzero_ps();
        }
        const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, _mm512_mul_ps(reduce16(lanes), vscale));
        const float chunk_max = _mm512_reduce_max_ps(s);
        if (chunk_max > mx[g]) {  // rescale what was summed against the old maximum (exp(-inf) = 0)
          const __m512 f = _mm512_set1_ps(std::exp(mx[g] - chunk_max));
          for (int v = 0; v < DV; ++v) acc[g][v] = _mm512_mul_ps(acc[g][v], f);
          sum[g] = _mm512_mul_ps(sum[g], f);
          mx[g] = chunk_max;
        }
        const __m512 e = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(s, _mm512_set1_ps(mx[g]))));
        sum[g] = _mm512_add_ps(sum[g], e);
        _mm512_store_ps(p[g], e);
      }
      for (int r = 0; r < c; ++r) {
        prefetch_row<D>(vn + (j + r) * D);
        __m512 vv[DV];
        load_value_row(vb + (j + r) * D, vv);
        for (int g = 0; g < GC; ++g) {
          const __m512 pg = _mm512_set1_ps(p[g][r]);
          for (int v = 0; v < DV; ++v) acc[g][v] = _mm512_fmadd_ps(pg, vv[v], acc[g][v]);
        }
      }
    }
    t += n;
  }
  float inv[GC];
  for (int g = 0; g < GC; ++g) inv[g] = 1.f / _mm512_reduce_add_ps(sum[g]);
  store_rows<DV, GC, T>(acc, inv, out);
}
#endif

// One (sequence, kv head) unit: `rows` query heads at once, through the register kernels where
// D is 64 or 128, else the generic loops.
template <typename T>
void attend(const float* q, float scale, int64_t rows, int64_t D, const T* kh, const T* vh, const int64_t* table,
            int64_t L, int64_t BS, float* scores, float* inv, float* out) {
#if defined(__AVX512F__)
  if (D == 64 || D == 128) {
    const int64_t most = D == 64 ? 4 : 2;
    for (int64_t g0 = 0; g0 < rows;) {
      const int64_t gc = std::min(most, rows - g0);
      const float* qg = q + g0 * D;
      float* og = out + g0 * D;
      if (D == 64) {
        switch (gc) {
          case 1: attend_regs<4, 1>(qg, scale, kh, vh, table, L, BS, og); break;
          case 2: attend_regs<4, 2>(qg, scale, kh, vh, table, L, BS, og); break;
          case 3: attend_regs<4, 3>(qg, scale, kh, vh, table, L, BS, og); break;
          default: attend_regs<4, 4>(qg, scale, kh, vh, table, L, BS, og); break;
        }
      } else if (gc == 1) {
        attend_regs<8, 1>(qg, scale, kh, vh, table, L, BS, og);
      } else {
        attend_regs<8, 2>(qg, scale, kh, vh, table, L, BS, og);
      }
      g0 += gc;
    }
    return;
  }
#endif
  attend_generic(q, scale, rows, D, kh, vh, table, L, BS, scores, inv, out);
}

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

void check_f32(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, what, " must be a float32 CPU tensor");
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
    at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
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
    at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
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
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
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
    at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const T_* g = xp + t * 2 * I;
        const T_* u = g + I;
        T_* o = op + t * I;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= I; i += 16) {
          store16(o + i, _mm512_mul_ps(silu512(load16(g + i)), load16(u + i)));
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

// Stores k, v [T, kv_heads, d] (unit stride in d) at their slots of caches [kv_heads, blocks, block_size, d]
// of the same dtype.
void write_kv(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_cache, torch::Tensor& v_cache,
              const torch::Tensor& slot_mapping) {
  check_same_dtype(k, v, "v");
  check_same_dtype(k, k_cache, "k_cache");
  check_same_dtype(k, v_cache, "v_cache");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "k and v need unit stride in head_dim");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_contiguous(), "slot_mapping must be int64");
  const int64_t T = k.size(0), KVH = k.size(1), D = k.size(2);
  const int64_t slots_per_head = k_cache.size(1) * k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == KVH && k_cache.size(3) == D && slot_mapping.size(0) == T, "shape mismatch");
  const int64_t* sp = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < slots_per_head, "slot ", sp[t], " is outside the KV cache");
  dispatch_float_bf16(k, "k", [&](auto tag) {
    using T_ = decltype(tag);
    T_* kc = k_cache.data_ptr<T_>();
    T_* vc = v_cache.data_ptr<T_>();
    const T_* kp = k.data_ptr<T_>();
    const T_* vp = v.data_ptr<T_>();
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < KVH; ++h) {
        std::copy_n(kp + t * k.stride(0) + h * k.stride(1), D, kc + (h * slots_per_head + sp[t]) * D);
        std::copy_n(vp + t * v.stride(0) + h * v.stride(1), D, vc + (h * slots_per_head + sp[t]) * D);
      }
    }
    return 0;
  });
}

// One query per sequence against its first context_lens[s] cached tokens, found through
// block_tables [S, max_blocks]. q [S, heads, d] (unit stride in d) -> out [S, heads, d], q's dtype
// (the caches' too); scores, softmax and the weighted sum are fp32.
// Grouped-query heads share a kv head, so each (sequence, kv head) pair is one unit of parallel work.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale) {
  check_same_dtype(q, k_cache, "k_cache");
  check_same_dtype(q, v_cache, "v_cache");
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
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= W * BS, "context length ", lens[s], " does not fit the block table");
    for (int64_t i = 0; i < (lens[s] + BS - 1) / BS; ++i)
      TORCH_CHECK(bt[s * W + i] >= 0 && bt[s * W + i] < NB, "block id ", bt[s * W + i], " is outside the KV cache");
  }
  const float fscale = static_cast<float>(scale);
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, W * BS));
  dispatch_float_bf16(q, "q", [&](auto tag) {
    using T_ = decltype(tag);
    const T_* qp = q.data_ptr<T_>();
    const T_* kc = k_cache.data_ptr<T_>();
    const T_* vc = v_cache.data_ptr<T_>();
    T_* op = out.data_ptr<T_>();
    // Each thread takes a contiguous run of units holding an equal share of the context tokens:
    // at::parallel_for's equal unit counts left one thread idle for a third of the call when long
    // and short sequences bunched (measured: sorted lengths 792 us, shuffled 556 us, bf16).
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), S * KVH / grain));
    std::vector<int64_t> bounds(parts + 1, S * KVH);
    bounds[0] = 0;
    {
      int64_t total = 0;
      for (int64_t s = 0; s < S; ++s) total += lens[s] * KVH;
      int64_t seen = 0, part = 1;
      for (int64_t unit = 0; unit < S * KVH && part < parts; ++unit) {
        seen += lens[unit / KVH];
        while (part < parts && seen * parts >= total * part) bounds[part++] = unit + 1;
      }
    }
    at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
      std::vector<float> qf(G * D), scores, inv(G), acc(G * D);
      for (int64_t unit = bounds[part_begin]; unit < bounds[part_end]; ++unit) {
        const int64_t s = unit / KVH, h = unit % KVH, L = lens[s];
        for (int64_t g = 0; g < G; ++g) {
          const T_* qv = qp + s * q_seq_stride + (h * G + g) * q_head_stride;
          for (int64_t i = 0; i < D; ++i) qf[g * D + i] = static_cast<float>(qv[i]);
        }
        scores.resize(G * L);
        attend(qf.data(), fscale, G, D, kc + h * NB * BS * D, vc + h * NB * BS * D, bt + s * W, L, BS, scores.data(),
               inv.data(), acc.data());
        T_* o = op + (s * H + h * G) * D;
        for (int64_t i = 0; i < G * D; ++i) o[i] = static_cast<T_>(acc[i]);
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
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
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

// y [M, N] = x [M, K] @ (qweight [N, K] int8 * scales [N]).T for a few rows M (decode): each weight
// row is read once and dotted with every x row while it sits in L1; fp32 accumulation.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// int8_gemv's VNNI path: x is quantized to int8 per 64 inputs (scale max|x| / 127, like llama.cpp's
// Q8 activations), so 64 weights cost one vpdpbusd instead of 16 widenings and FMAs. vpdpbusd
// multiplies unsigned by signed bytes: it takes |w| and x with w's sign moved onto it.
void int8_gemv_vnni(const float* xp, const int8_t* wp, const float* sp, float* yp, int64_t M, int64_t K, int64_t N) {
  const int64_t KB = K / 64;
  std::vector<int8_t> xq(M * K);
  std::vector<float> sx(M * KB);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < KB; ++b) {
      const float* xb = xp + m * K + b * 64;
      float amax = 0.f;
      for (int i = 0; i < 64; ++i) amax = std::max(amax, std::abs(xb[i]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      sx[m * KB + b] = amax / 127.f;
      for (int i = 0; i < 64; ++i) xq[m * K + b * 64 + i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
    }
  }
  const int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(1, K));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* w = wp + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xm = xq.data() + m * K;
        const float* sxm = sx.data() + m * KB;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t b = 0; b < KB; ++b) {
          const __m512i wv = _mm512_loadu_si512(w + b * 64);
          const __mmask64 neg = _mm512_movepi8_mask(wv);
          const __m512i xv = _mm512_loadu_si512(xm + b * 64);
          const __m512i xs = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(wv), xs);
          acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(sxm[b]), acc);
        }
        yp[m * N + n] = _mm512_reduce_add_ps(acc) * sp[n];
      }
    }
  });
}
#endif

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
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (K % 64 == 0) {
    int8_gemv_vnni(xp, wp, sp, yp, M, K, N);
    return y;
  }
#endif
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

namespace kubeinfer {  // amx_linear.cpp
bool amx_available();
torch::Tensor amx_pack_weight(const torch::Tensor& weight, bool swiglu);
torch::Tensor amx_linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                         int64_t N, bool swiglu);
}  // namespace kubeinfer

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The engine steps in a thread beside the server's event loop: let it run while a kernel does.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  m.attr("int8_vnni") = true;   // int8_gemv rounds activations to int8 (K % 64 == 0)
#else
  m.attr("int8_vnni") = false;  // int8_gemv computes in fp32
#endif
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim (fp32 or bf16)", nogil);
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x, then RMSNorm of the residual (fp32 or bf16)", nogil);
  m.def("rotary_", &rotary_, "rotary embedding in place on the first heads (fp32 or bf16)", nogil);
  m.def("silu_mul", &silu_mul, "SwiGLU gate: silu(gate) * up over a fused [T, 2I] tensor (fp32 or bf16)", nogil);
  m.def("write_kv", &write_kv, "store K/V at their paged-cache slots (fp32 or bf16)", nogil);
  m.def("int8_gemv", &int8_gemv, "int8 weight-only matmul for a few rows (fp32 activations)", nogil);
  m.def("int4pack_linear", &int4pack_linear, "aten's int4 CPU matmul for fp32 activations", nogil);
  m.def("decode_attention", &decode_attention, "paged attention for one query per sequence (fp32 or bf16)", nogil);
  m.def("greedy_argmax", &greedy_argmax, "first-maximum index per row of fp32 or bf16 logits (NaN wins)", nogil);
  m.def("amx_available", &kubeinfer::amx_available, "built with AMX, and the OS grants this process its tiles");
  m.def("amx_pack_weight", &kubeinfer::amx_pack_weight, "bf16 [N, K] weight -> amx_linear's tile layout",
        py::arg("weight"), py::arg("swiglu") = false, nogil);
  m.def("amx_linear", &kubeinfer::amx_linear, "bf16 linear on AMX tiles (weight from amx_pack_weight)",
        py::arg("x"), py::arg("packed"), py::arg("bias") = py::none(), py::arg("N"), py::arg("swiglu") = false, nogil);
}
