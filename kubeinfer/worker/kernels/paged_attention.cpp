// Paged attention for decode steps, and the K/V cache write, on the CPU (fp32 or bf16).
//
// decode_attention reads each sequence's keys and values in place through its block table (the
// torch path gathers them into a workspace first: half of a bf16 offline run went to that copy).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"
#include "parallel.h"

using namespace kubeinfer;

namespace {

// o[i] += p * v[i] for an fp32 accumulator o.
template <typename T>
inline void axpy(float* o, float p, const T* v, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vp = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(o + i, _mm512_fmadd_ps(vp, load16(v + i), _mm512_loadu_ps(o + i)));
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 vp = _mm256_set1_ps(p);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(vp, load8(v + i), _mm256_loadu_ps(o + i)));
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
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    for (; t0 + 8 <= L; t0 += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + t0), vmx));
      _mm256_storeu_ps(sc + t0, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vsum);
    for (float l : lanes) sum += l;
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

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// r = the sums of a[0..3]'s 8 lanes each (a tree of horizontal adds).
inline __m128 reduce4(const __m256 (&a)[4]) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// attend_generic for GC (<= 3) query rows of D (a multiple of 8) on the avx2 tier, whose 16 vector
// registers hold no whole query, accumulator and key block at once (the avx512 tier's attend_regs).
// The same two passes, but each key or value vector loaded is used by all GC rows: scores 4 keys at
// a time into GC x 4 accumulators (one horizontal-add tree per row for 4 keys), and the weighted
// sums in GC x 4 registers, 32 elements of D at a time over all L values (not an accumulator in
// memory loaded and stored for every value row).
template <int GC, typename T>
void attend_avx2(const float* q, float scale, int64_t D, const T* kh, const T* vh, const int64_t* table, int64_t L,
                 int64_t BS, float* scores, float* inv, float* out) {
  const __m128 vscale = _mm_set1_ps(scale);
  for (int64_t blk = 0, t = 0; t < L; ++blk) {
    const T* kb = kh + table[blk] * BS * D;
    const int64_t n = std::min(BS, L - t);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      __m256 a[GC][4];
      for (int g = 0; g < GC; ++g)
        for (int r = 0; r < 4; ++r) a[g][r] = _mm256_setzero_ps();
      for (int64_t i = 0; i < D; i += 8) {
        __m256 k[4];
        for (int r = 0; r < 4; ++r) k[r] = load8(kb + (j + r) * D + i);
        for (int g = 0; g < GC; ++g) {
          const __m256 qv = _mm256_loadu_ps(q + g * D + i);
          for (int r = 0; r < 4; ++r) a[g][r] = _mm256_fmadd_ps(qv, k[r], a[g][r]);
        }
      }
      for (int g = 0; g < GC; ++g) _mm_storeu_ps(scores + g * L + t + j, _mm_mul_ps(reduce4(a[g]), vscale));
    }
    for (; j < n; ++j)
      for (int g = 0; g < GC; ++g) scores[g * L + t + j] = dot_any(q + g * D, kb + j * D, D) * scale;
    t += n;
  }
  softmax_rows(scores, GC, L, inv);
  for (int64_t i0 = 0; i0 < D; i0 += 32) {
    const int nv = static_cast<int>(std::min<int64_t>(32, D - i0) / 8);
    __m256 acc[GC][4];
    for (int g = 0; g < GC; ++g)
      for (int v = 0; v < 4; ++v) acc[g][v] = _mm256_setzero_ps();
    for (int64_t blk = 0, t = 0; t < L; ++blk) {
      const T* vb = vh + table[blk] * BS * D + i0;
      for (int64_t j = 0, n = std::min(BS, L - t); j < n; ++j, ++t) {
        const T* vr = vb + j * D;
        if (nv == 4) {
          __m256 v[4];
          for (int e = 0; e < 4; ++e) v[e] = load8(vr + 8 * e);
          for (int g = 0; g < GC; ++g) {
            const __m256 p = _mm256_broadcast_ss(scores + g * L + t);
            for (int e = 0; e < 4; ++e) acc[g][e] = _mm256_fmadd_ps(p, v[e], acc[g][e]);
          }
        } else {
          for (int g = 0; g < GC; ++g) {
            const __m256 p = _mm256_broadcast_ss(scores + g * L + t);
            for (int e = 0; e < nv; ++e) acc[g][e] = _mm256_fmadd_ps(p, load8(vr + 8 * e), acc[g][e]);
          }
        }
      }
    }
    for (int g = 0; g < GC; ++g) {
      const __m256 s = _mm256_set1_ps(inv[g]);
      for (int e = 0; e < nv; ++e) _mm256_storeu_ps(out + g * D + i0 + 8 * e, _mm256_mul_ps(acc[g][e], s));
    }
  }
}
#endif

// One (sequence, kv head) unit: `rows` query heads at once, through the register kernels where
// D is 64 or 128, else the generic loops.
template <typename T>
void attend(const float* q, float scale, int64_t rows, int64_t D, const T* kh, const T* vh, const int64_t* table,
            int64_t L, int64_t BS, std::vector<float>& scratch, float* out) {
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
  // The generic loops keep every score: rows x L of them, then rows softmax denominators.
  scratch.resize(rows * (L + 1));
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0) {  // rows in groups of at most 3 (3 x 4 accumulators), as evenly as possible
    const int64_t groups = (rows + 2) / 3;
    for (int64_t g0 = 0, i = 0; i < groups; ++i) {
      const int64_t gc = rows / groups + (i < rows % groups ? 1 : 0);
      float* sc = scratch.data();
      float* iv = sc + gc * L;
      if (gc == 1) attend_avx2<1>(q + g0 * D, scale, D, kh, vh, table, L, BS, sc, iv, out + g0 * D);
      else if (gc == 2) attend_avx2<2>(q + g0 * D, scale, D, kh, vh, table, L, BS, sc, iv, out + g0 * D);
      else attend_avx2<3>(q + g0 * D, scale, D, kh, vh, table, L, BS, sc, iv, out + g0 * D);
      g0 += gc;
    }
    return;
  }
#endif
  attend_generic(q, scale, rows, D, kh, vh, table, L, BS, scratch.data(), scratch.data() + rows * L, out);
}

}  // namespace

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
// On the threads of the ops around the call (parallel.h, layer_chunks): the decode kernels' pool
// inside a decode stack, torch's OpenMP threads elsewhere (measured: a bf16 offline run's decode
// attention took 4.0 s on the pool between oneDNN's GEMMs, 2.6 s with OpenMP's threads told not to spin).
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
    check_block_ids(bt + s * W, lens[s], BS, NB);
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
    auto body = [&](int64_t part) {
      std::vector<float> qf(G * D), scratch, acc(G * D);
      for (int64_t unit = bounds[part]; unit < bounds[part + 1]; ++unit) {
        const int64_t s = unit / KVH, h = unit % KVH, L = lens[s];
        for (int64_t g = 0; g < G; ++g) {
          const T_* qv = qp + s * q_seq_stride + (h * G + g) * q_head_stride;
          for (int64_t i = 0; i < D; ++i) qf[g * D + i] = static_cast<float>(qv[i]);
        }
        attend(qf.data(), fscale, G, D, kc + h * NB * BS * D, vc + h * NB * BS * D, bt + s * W, L, BS, scratch,
               acc.data());
        T_* o = op + (s * H + h * G) * D;
        for (int64_t i = 0; i < G * D; ++i) o[i] = static_cast<T_>(acc[i]);
      }
    };
    layer_chunks(parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t part = begin; part < end; ++part) body(part);
    });
    return 0;
  });
  return out;
}

