// Causal attention for prefill chunks over the paged KV cache, on the CPU (fp32 or bf16).
//
// A chunk's queries are the last n positions of its context; each attends to the cached tokens up to
// its own position, read in place through the chunk's block table (the step's own K/V are already
// written there). This replaces one SDPA call per chunk (and, for a chunk after a cached prefix, a
// gather of the whole context into a workspace): SDPA's CPU kernel ran prompt-sized chunks at 64-78
// GFLOPS on the Zen 4 dev VM, and it wants the K/V contiguous.
//
// Flash-attention order: a unit of work is one (chunk, kv head, tile of positions), its rows every
// query head of that kv head at every position of the tile. It walks the keys a vector's width at
// a time (N = 16 on AVX-512, 8 on AVX2): the keys transposed once into [D][N] for all the tile's
// rows, scores for four rows at a time, an online softmax per row, then the same keys' values
// weighted into fp32 accumulators that stay in L1. Everything is fp32 (bf16 K/V widened, exact).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common.h"

using namespace kubeinfer;

namespace {

#if defined(__AVX512F__)
struct Vec {
  using V = __m512;
  static constexpr int N = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const bf16* p) { return load16(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V exp(V x) { return exp512(x); }
  // r[i][j] <- r[j][i] for a 16 x 16 block: pairs of rows interleaved, then pairs of pairs, then the
  // 128-bit lanes gathered (48 shuffles, where element-wise stores take 256 loads and stores).
  static void transpose(V (&r)[N]) {
    V t[N];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // r[4i + e], lane L: element 4L + e of rows 4i..4i+3
      const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
      const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
      r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
      r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
      r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int e = 0; e < 4; ++e) {  // column 4L + e: lane L of r[e], r[4 + e], r[8 + e], r[12 + e]
      const V lo01 = _mm512_shuffle_f32x4(r[e], r[4 + e], _MM_SHUFFLE(1, 0, 1, 0));
      const V hi01 = _mm512_shuffle_f32x4(r[e], r[4 + e], _MM_SHUFFLE(3, 2, 3, 2));
      const V lo23 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], _MM_SHUFFLE(1, 0, 1, 0));
      const V hi23 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], _MM_SHUFFLE(3, 2, 3, 2));
      t[e] = _mm512_shuffle_f32x4(lo01, lo23, _MM_SHUFFLE(2, 0, 2, 0));
      t[4 + e] = _mm512_shuffle_f32x4(lo01, lo23, _MM_SHUFFLE(3, 1, 3, 1));
      t[8 + e] = _mm512_shuffle_f32x4(hi01, hi23, _MM_SHUFFLE(2, 0, 2, 0));
      t[12 + e] = _mm512_shuffle_f32x4(hi01, hi23, _MM_SHUFFLE(3, 1, 3, 1));
    }
    for (int i = 0; i < N; ++i) r[i] = t[i];
  }
  static float max(V v) { return _mm512_reduce_max_ps(v); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
  // v where lane < count, else fill.
  static V keep_first(V v, int count, float fill) {
    return _mm512_mask_mov_ps(_mm512_set1_ps(fill), static_cast<__mmask16>((1u << count) - 1), v);
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  using V = __m256;
  static constexpr int N = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const bf16* p) { return load8(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V exp(V x) { return exp256(x); }
  static void transpose(V (&r)[N]) {  // 8 x 8: interleave pairs, then pairs of pairs, then the 128-bit halves
    V t[N], u[N];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
      r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
    }
  }
  static float max(V v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static V keep_first(V v, int count, float fill) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(count), lane));
    return _mm256_blendv_ps(_mm256_set1_ps(fill), v, keep);
  }
};
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
constexpr int N = Vec::N;
// Rows scored and weighted together: RG accumulators and the key or value vector they share. A tile's
// last group is filled up with spare rows (computed, never stored), so every loop over the group has
// a fixed trip count and its accumulators stay in registers.
constexpr int RG = 4;

// One unit's geometry: rows [0, rows) are (position i, head g) as row = i * G + g.
struct Unit {
  int64_t chunk, head, pos0, npos;  // positions [pos0, pos0 + npos) of the chunk's context
  int64_t cost;                     // rows x keys, to hand out the longest first
};

// The scratch of one thread: every buffer a unit needs, grown as needed.
struct Scratch {
  std::vector<float> q, acc, p, kt, v, mx, den;
};

template <typename T>
void attend_tile(const T* q, int64_t q_row_stride, int64_t q_head_stride, const T* kc, const T* vc,
                 const int64_t* table, int64_t BS, int64_t D, int64_t G, int64_t pos0, int64_t npos, float scale,
                 Scratch& s, T* out, int64_t out_row_stride, int64_t out_head_stride) {
  const int64_t rows = npos * G, DV = D / N, padded = rows + RG;
  s.q.assign(padded * D, 0.f);
  s.acc.assign(padded * D, 0.f);
  s.p.resize(padded * N);
  s.kt.resize(D * N);
  s.v.resize(N * D);
  s.mx.assign(padded, -INFINITY);
  s.den.assign(padded, 0.f);
  for (int64_t i = 0; i < npos; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const T* src = q + i * q_row_stride + g * q_head_stride;
      float* dst = s.q.data() + (i * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]) * scale;
    }
  const int64_t keys = pos0 + npos;  // the tile's last position sees every key before it
  for (int64_t k0 = 0; k0 < keys; k0 += N) {
    const int nk = static_cast<int>(std::min<int64_t>(N, keys - k0));
    // The keys transposed (kt[d * N + j]) and the values in rows, widened; missing keys are zeros.
    const T* krow[N];
    const T* vrow[N];
    for (int j = 0; j < nk; ++j) {
      const int64_t t = k0 + j, off = (table[t / BS] * BS + t % BS) * D;
      krow[j] = kc + off;
      vrow[j] = vc + off;
    }
    for (int64_t d0 = 0; d0 < D; d0 += N) {
      typename Vec::V block[N];
      for (int j = 0; j < N; ++j) block[j] = j < nk ? Vec::load(krow[j] + d0) : Vec::zero();
      Vec::transpose(block);
      for (int i = 0; i < N; ++i) Vec::store(s.kt.data() + (d0 + i) * N, block[i]);
    }
    for (int j = 0; j < N; ++j)
      for (int64_t v = 0; v < DV; ++v)
        Vec::store(s.v.data() + j * D + v * N, j < nk ? Vec::load(vrow[j] + v * N) : Vec::zero());
    // Rows whose position is below k0 see none of these keys; rows are in position order.
    const int64_t first_row = std::max<int64_t>(0, k0 - pos0) * G;
    for (int64_t r0 = first_row; r0 < rows; r0 += RG) {
      typename Vec::V sc[RG];
      for (int r = 0; r < RG; ++r) sc[r] = Vec::zero();
      const float* qr = s.q.data() + r0 * D;
      for (int64_t d = 0; d < D; ++d) {
        const typename Vec::V kv = Vec::load(s.kt.data() + d * N);
        for (int r = 0; r < RG; ++r) sc[r] = Vec::fmadd(Vec::set1(qr[r * D + d]), kv, sc[r]);
      }
      for (int r = 0; r < RG; ++r) {
        const int64_t row = r0 + r, pos = pos0 + row / G;
        const int visible = static_cast<int>(std::min<int64_t>(nk, pos - k0 + 1));
        const typename Vec::V sv = visible < N ? Vec::keep_first(sc[r], visible, -INFINITY) : sc[r];
        const float chunk_max = Vec::max(sv);
        float* acc = s.acc.data() + row * D;
        if (chunk_max > s.mx[row]) {  // rescale what was summed against the old maximum (exp(-inf) = 0)
          const float f = std::exp(s.mx[row] - chunk_max);
          const typename Vec::V vf = Vec::set1(f);
          for (int64_t v = 0; v < DV; ++v) Vec::store(acc + v * N, Vec::mul(Vec::load(acc + v * N), vf));
          s.den[row] *= f;
          s.mx[row] = chunk_max;
        }
        typename Vec::V e = Vec::exp(Vec::sub(sv, Vec::set1(s.mx[row])));
        if (visible < N) e = Vec::keep_first(e, visible, 0.f);  // exp clamps: -inf would give ~1e-39
        s.den[row] += Vec::sum(e);
        Vec::store(s.p.data() + row * N, e);
      }
      // acc[r] += sum_j p[r][j] * v[j], one vector of D at a time for the group's rows.
      for (int64_t v = 0; v < DV; ++v) {
        typename Vec::V a[RG];
        for (int r = 0; r < RG; ++r) a[r] = Vec::load(s.acc.data() + (r0 + r) * D + v * N);
        for (int j = 0; j < nk; ++j) {
          const typename Vec::V vv = Vec::load(s.v.data() + j * D + v * N);
          for (int r = 0; r < RG; ++r) a[r] = Vec::fmadd(Vec::set1(s.p[(r0 + r) * N + j]), vv, a[r]);
        }
        for (int r = 0; r < RG; ++r) Vec::store(s.acc.data() + (r0 + r) * D + v * N, a[r]);
      }
    }
  }
  for (int64_t row = 0; row < rows; ++row) {
    const float inv = 1.f / s.den[row];
    const float* acc = s.acc.data() + row * D;
    T* o = out + (row / G) * out_row_stride + (row % G) * out_head_stride;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] * inv);
  }
}
#endif

}  // namespace

// Whether this build has the kernel (AVX2 and up), and the head sizes it takes (multiples of its
// vector width); the backend asks once, when the model is built, and keeps SDPA otherwise.
bool prefill_attention_supports(int64_t head_dim) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  return head_dim > 0 && head_dim % N == 0 && head_dim <= 512;
#else
  (void)head_dim;
  return false;
#endif
}

// Chunks [first_chunk, S) of a step described as the Triton path has it: chunk c is rows
// [cu_seqlens_q[c], cu_seqlens_q[c+1]) of q [T, heads, d] and out, the last positions of a context of
// context_lens[c] tokens reached through block_tables[c]. Writes those rows of out (q's dtype, the
// caches' too); other rows are left as they are.
void prefill_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                       const torch::Tensor& cu_seqlens_q, const torch::Tensor& context_lens,
                       const torch::Tensor& block_tables, int64_t first_chunk, double scale, torch::Tensor& out) {
  check_same_dtype(q, k_cache, "k_cache");
  check_same_dtype(q, v_cache, "v_cache");
  check_same_dtype(q, out, "out");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes() && q.stride(2) == 1 && out.stride(2) == 1 &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(), "layout mismatch");
  for (const auto* t : {&cu_seqlens_q, &context_lens, &block_tables})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous(),
                "cu_seqlens_q, context_lens and block_tables must be contiguous int64");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(0), NB = k_cache.size(1), BS = k_cache.size(2);
  const int64_t S = context_lens.size(0), W = block_tables.size(1);
  TORCH_CHECK(H % KVH == 0 && k_cache.size(3) == D && v_cache.sizes() == k_cache.sizes() &&
                  cu_seqlens_q.size(0) == S + 1 && block_tables.size(0) == S && 0 <= first_chunk && first_chunk <= S,
              "shape mismatch");
  TORCH_CHECK(prefill_attention_supports(D), "head_dim ", D, " is not supported by this build's prefill kernel");
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  const int64_t G = H / KVH;
  const int64_t* cu = cu_seqlens_q.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  // About 48 rows of D = 64 (24 of 128) a tile: their fp32 accumulators and queries stay in L1.
  const int64_t tile = std::max<int64_t>(1, std::max<int64_t>(G, 3072 / D) / G);
  std::vector<Unit> units;
  for (int64_t c = first_chunk; c < S; ++c) {
    const int64_t n = cu[c + 1] - cu[c], ctx = lens[c];
    TORCH_CHECK(0 <= cu[c] && cu[c] <= cu[c + 1] && cu[c + 1] <= T, "cu_seqlens_q must rise within the batch");
    TORCH_CHECK(n <= ctx && ctx <= W * BS, "chunk ", c, ": ", n, " queries and context ", ctx,
                " do not fit its block table");
    check_block_ids(bt + c * W, ctx, BS, NB);
    for (int64_t p = ctx - n; p < ctx; p += tile)
      for (int64_t h = 0; h < KVH; ++h) {
        const int64_t np = std::min(tile, ctx - p);
        units.push_back({c, h, p, np, np * (p + np)});
      }
  }
  // Longest first, claimed one at a time by the threads: the causal tiles differ in cost by
  // their position, and the last unit handed out should be a short one.
  std::stable_sort(units.begin(), units.end(), [](const Unit& a, const Unit& b) { return a.cost > b.cost; });
  const float fscale = static_cast<float>(scale);
  dispatch_float_bf16(q, "q", [&](auto tag) {
    using T_ = decltype(tag);
    const T_* qp = q.data_ptr<T_>();
    const T_* kc = k_cache.data_ptr<T_>();
    const T_* vc = v_cache.data_ptr<T_>();
    T_* op = out.data_ptr<T_>();
    // On torch's OpenMP threads, as the prefill GEMMs around it: on the decode kernels' pool, its
    // helper fought the OpenMP threads still spinning after the last GEMM for the cores, and the
    // kernel ran at half speed inside a step (measured: 11 ms a layer against 5.8 alone). Units
    // are claimed one at a time from a shared counter.
    std::atomic<int64_t> next{0};
    const int64_t count = static_cast<int64_t>(units.size());
    at::parallel_for(0, std::min<int64_t>(count, at::get_num_threads()), 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t t = begin; t < end; ++t)
        for (int64_t i = next++; i < count; i = next++) {
          const Unit& u = units[i];
          const int64_t row0 = cu[u.chunk + 1] - (lens[u.chunk] - u.pos0);  // the batch row of position pos0
          attend_tile(qp + row0 * q.stride(0) + u.head * G * q.stride(1), q.stride(0), q.stride(1),
                      kc + u.head * NB * BS * D, vc + u.head * NB * BS * D, bt + u.chunk * W, BS, D, G, u.pos0,
                      u.npos, fscale, scratch, op + row0 * out.stride(0) + u.head * G * out.stride(1),
                      out.stride(0), out.stride(1));
        }
    });
    return 0;
  });
#endif
}
