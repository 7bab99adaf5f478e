// Sampling a token per row from logits on the CPU: temperature, top-k, top-p and min-p, then one
// inverse-CDF draw, in a few passes over the row. It computes what sampling.py's torch path does
// (the same filters, ties kept, the same draw from the same uniform) without its dozen full-vocabulary
// ops, each of which also opened an OpenMP region whose spinning threads then slowed the next decode
// step's kernels.
//
// Per row: x = logit / T and its max (pass 1); e = exp(x - max) and its sum (pass 2); the top-k
// threshold (the k-th largest x, ties kept) from a candidate buffer that only values above the
// running threshold enter; the top-p threshold by a mass-weighted quickselect over the tokens that can
// be in the nucleus; the min-p threshold max + log(min_p). The draw walks the kept tokens in index
// order until their mass passes u times the kept total: P(token) = its probability, exactly the law
// of the torch path, from one uniform per row.
#include "common.h"
#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace kubeinfer {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Token {
  float x;    // the scaled logit
  float e;    // exp(x - max)
  int64_t i;  // its column
};

// x[i] = row[i] / t; returns the max, or NaN (with *nan_at, the first) when the row holds a NaN.
template <typename T>
float scale(const T* row, int64_t V, float t, float* x, int64_t* nan_at) {
  float mx = kNegInf;
  bool nan = false;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vt = _mm512_set1_ps(t);
  __m512 vmx = _mm512_set1_ps(kNegInf);
  __mmask16 unordered = 0;
  for (; i + 16 <= V; i += 16) {
    const __m512 v = _mm512_div_ps(load16(row + i), vt);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmx = _mm512_max_ps(vmx, v);
    _mm512_storeu_ps(x + i, v);
  }
  mx = _mm512_reduce_max_ps(vmx);
  nan = unordered != 0;
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 vt = _mm256_set1_ps(t);
  __m256 vmx = _mm256_set1_ps(kNegInf), unordered = _mm256_setzero_ps();
  for (; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_div_ps(load8(row + i), vt);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmx = _mm256_max_ps(vmx, v);
    _mm256_storeu_ps(x + i, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmx);
  for (float lane : lanes) mx = std::max(mx, lane);
  nan = _mm256_movemask_ps(unordered) != 0;
#endif
  for (; i < V; ++i) {
    x[i] = static_cast<float>(row[i]) / t;
    nan |= std::isnan(x[i]);
    mx = std::max(mx, x[i]);
  }
  if (nan) {
    *nan_at = std::find_if(x, x + V, [](float v) { return std::isnan(v); }) - x;
    return std::numeric_limits<float>::quiet_NaN();
  }
  return mx;
}

// Bit j: x[i + j] >= fx and e[i + j] >= fe and e[i + j] > 0, for the 16 columns from i (i + 16 <= V).
inline uint32_t kept16(const float* x, const float* e, int64_t i, float fx, float fe) {
#if defined(__AVX512F__)
  const __m512 ev = _mm512_loadu_ps(e + i);
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), _mm512_set1_ps(fx), _CMP_GE_OQ) &
         _mm512_cmp_ps_mask(ev, _mm512_set1_ps(fe), _CMP_GE_OQ) &
         _mm512_cmp_ps_mask(ev, _mm512_setzero_ps(), _CMP_GT_OQ);
#elif defined(__AVX2__) && defined(__FMA__)
  uint32_t bits = 0;
  for (int half = 0; half < 2; ++half) {
    const __m256 ev = _mm256_loadu_ps(e + i + 8 * half);
    const __m256 ok = _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i + 8 * half),
                                                                _mm256_set1_ps(fx), _CMP_GE_OQ),
                                                  _mm256_cmp_ps(ev, _mm256_set1_ps(fe), _CMP_GE_OQ)),
                                    _mm256_cmp_ps(ev, _mm256_setzero_ps(), _CMP_GT_OQ));
    bits |= static_cast<uint32_t>(_mm256_movemask_ps(ok)) << (8 * half);
  }
  return bits;
#else
  uint32_t bits = 0;
  for (int j = 0; j < 16; ++j) bits |= static_cast<uint32_t>(x[i + j] >= fx && e[i + j] >= fe && e[i + j] > 0.f) << j;
  return bits;
#endif
}

// Below it exp(x - max) is under 2^-125 of the top token's: taken as 0, so that a masked token (-inf)
// weighs exactly nothing (the vector exps clamp their input, and would give it 2^-126).
constexpr float kLowestExponent = -87.f;

// e[i] = exp(x[i] - mx) where x[i] >= keep_from (and the exponent is not below kLowestExponent), else 0;
// blocks[b] = the sum of e over [16b, 16b + 16); returns the sum of the block sums in double, in block
// order (the draw adds them in the same order).
double exponentiate(const float* x, int64_t V, float mx, float keep_from, float* e, float* blocks) {
  int64_t i = 0, b = 0;
  double total = 0;
  keep_from = std::max(keep_from, mx + kLowestExponent);
#if defined(__AVX512F__)
  const __m512 vmx = _mm512_set1_ps(mx), vkeep = _mm512_set1_ps(keep_from);
  for (; i + 16 <= V; i += 16, ++b) {
    const __m512 v = load16(x + i);
    const __m512 ev = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, vkeep, _CMP_GE_OQ), exp512(_mm512_sub_ps(v, vmx)));
    _mm512_storeu_ps(e + i, ev);
    blocks[b] = _mm512_reduce_add_ps(ev);
    total += blocks[b];
  }
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 vmx = _mm256_set1_ps(mx), vkeep = _mm256_set1_ps(keep_from);
  for (; i + 16 <= V; i += 16, ++b) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    const __m256 e0 = _mm256_and_ps(_mm256_cmp_ps(v0, vkeep, _CMP_GE_OQ), exp256(_mm256_sub_ps(v0, vmx)));
    const __m256 e1 = _mm256_and_ps(_mm256_cmp_ps(v1, vkeep, _CMP_GE_OQ), exp256(_mm256_sub_ps(v1, vmx)));
    _mm256_storeu_ps(e + i, e0);
    _mm256_storeu_ps(e + i + 8, e1);
    const __m256 s = _mm256_add_ps(e0, e1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    blocks[b] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    total += blocks[b];
  }
#endif
  for (; i < V; i += 16, ++b) {  // scalar blocks: the tail, or every block without AVX2
    float s = 0.f;
    for (int64_t j = i; j < std::min(V, i + 16); ++j) {
      e[j] = x[j] >= keep_from ? std::exp(x[j] - mx) : 0.f;
      s += e[j];
    }
    blocks[b] = s;
    total += s;
  }
  return total;
}

// The k-th largest of x (1 <= k < V): a buffer keeps the values above the k-th largest seen so far,
// cut back to k whenever it fills, so after the first few thousand columns nearly every block of 16 is
// refused by one vector comparison. -inf when fewer than k values are finite.
float kth_largest(const float* x, const float* e, int64_t V, int64_t k, std::vector<float>& buf) {
  const size_t cap = static_cast<size_t>(std::max<int64_t>(4 * k, 2048));
  float floor = kNegInf;  // values at or below it cannot change the answer once k are kept
  buf.clear();
  auto cut = [&] {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<float>());
    floor = buf[k - 1];
    buf.resize(k);
  };
  int64_t i = 0;
  for (; i + 16 <= V; i += 16) {
    // e > 0 stands for x > -inf here (masked and negligible tokens are never among the k kept).
    for (uint32_t bits = kept16(x, e, i, std::nextafter(floor, INFINITY), 0.f); bits; bits &= bits - 1) {
      buf.push_back(x[i + __builtin_ctz(bits)]);
      if (buf.size() >= cap) cut();
    }
  }
  for (; i < V; ++i) {
    if (x[i] > floor && e[i] > 0.f) {
      buf.push_back(x[i]);
      if (buf.size() >= cap) cut();
    }
  }
  if (static_cast<int64_t>(buf.size()) < k) return kNegInf;
  cut();
  return floor;
}

// The top-p threshold: the smallest value v among `c` whose strictly better mass is below `target`
// (torch's rule: keep the tokens whose better-ranked mass is below p; ties with the last one kept
// are kept). `c` holds every token that can be in the nucleus. A quickselect on mass: each round
// splits the range at a pivot into better / equal / worse and keeps the side where v lies.
float nucleus_threshold(std::vector<Token>& c, double target) {
  double above = 0;  // mass of the tokens known to be better than the whole range
  float found = kNegInf;
  auto lo = c.begin(), hi = c.end();
  while (lo < hi) {
    const float pivot = (lo + (hi - lo) / 2)->x;
    const auto better_end = std::partition(lo, hi, [&](const Token& t) { return t.x > pivot; });
    const auto equal_end = std::partition(better_end, hi, [&](const Token& t) { return t.x == pivot; });
    double better = 0, equal = 0;
    for (auto it = lo; it < better_end; ++it) better += it->e;
    for (auto it = better_end; it < equal_end; ++it) equal += it->e;
    if (above + better < target) {  // the pivot is kept; a worse value may be too
      found = pivot;
      if (above + better + equal >= target) break;
      above += better + equal;
      lo = equal_end;
    } else {
      hi = better_end;
    }
  }
  return found;
}

// Columns whose x >= floor_x and e >= floor_e (and e > 0), in column order.
void collect(const float* x, const float* e, int64_t V, float floor_x, float floor_e, std::vector<Token>& out) {
  out.clear();
  int64_t i = 0;
  for (; i + 16 <= V; i += 16) {
    for (uint32_t bits = kept16(x, e, i, floor_x, floor_e); bits; bits &= bits - 1) {
      const int64_t j = i + __builtin_ctz(bits);
      out.push_back({x[j], e[j], j});
    }
  }
  for (; i < V; ++i) {
    if (x[i] >= floor_x && e[i] >= floor_e && e[i] > 0.f) out.push_back({x[i], e[i], i});
  }
}

struct Scratch {
  std::vector<float> x, e, blocks, values;
  std::vector<Token> tokens, order;
};

template <typename T>
int64_t sample_row(const T* row, int64_t V, float t, int64_t k, float p, float min_p, double u, Scratch& s) {
  s.x.resize(V);
  s.e.resize(V);
  s.blocks.resize((V + 15) / 16);
  int64_t nan_at = -1;
  const float mx = scale(row, V, t, s.x.data(), &nan_at);
  if (nan_at >= 0) return nan_at;  // as the greedy argmax: a NaN wins
  if (mx == kNegInf) return 0;     // nothing is allowed: the torch path's softmax gives NaN and token 0
  const float min_p_floor = min_p > 0.f ? mx + std::log(min_p) : kNegInf;
  const bool top_k = k > 0 && k < V, filtered = top_k || p < 1.f;
  // Unfiltered rows (temperature, maybe min-p) keep what min-p keeps; the draw runs over the whole row.
  const double total = exponentiate(s.x.data(), V, mx, filtered ? kNegInf : min_p_floor, s.e.data(), s.blocks.data());
  if (!filtered) {
    const double target = u * total;
    double acc = 0;
    int64_t b = 0;
    for (; acc + s.blocks[b] <= target && b + 1 < static_cast<int64_t>(s.blocks.size()); ++b) acc += s.blocks[b];
    int64_t last = -1;
    for (int64_t i = 16 * b; i < std::min(V, 16 * b + 16); ++i) {
      if (s.e[i] <= 0.f) continue;
      last = i;
      acc += s.e[i];
      if (acc > target) return i;
    }
    return last >= 0 ? last : static_cast<int64_t>(std::max_element(s.x.begin(), s.x.end()) - s.x.begin());
  }
  // Top-k first, then top-p over what it keeps (normalised by that mass), then min-p. A token of
  // e = 0 (masked, or negligible) is never kept: it could not be drawn anyway.
  const float k_floor = top_k ? kth_largest(s.x.data(), s.e.data(), V, k, s.values) : kNegInf;
  float floor_x = std::max(k_floor, min_p_floor);
  if (top_k) collect(s.x.data(), s.e.data(), V, k_floor, 0.f, s.tokens);  // about k tokens, from now on
  if (p < 1.f) {
    double mass = total;
    if (top_k) {
      mass = 0;
      for (const Token& tok : s.tokens) mass += tok.e;
      s.order = s.tokens;
    } else {
      // A token worse than the nucleus has all tokens no better than it below 1 - p of the mass, so
      // one whose probability is below (1 - p) / V is never in it: the candidates are the rest.
      collect(s.x.data(), s.e.data(), V, kNegInf, static_cast<float>((1.0 - p) * mass / V), s.order);
    }
    floor_x = std::max(floor_x, nucleus_threshold(s.order, p * mass));
  }
  if (top_k) {
    s.tokens.erase(std::remove_if(s.tokens.begin(), s.tokens.end(), [&](const Token& t) { return t.x < floor_x; }),
                   s.tokens.end());
  } else {
    collect(s.x.data(), s.e.data(), V, floor_x, 0.f, s.tokens);
  }
  double kept = 0;
  for (const Token& tok : s.tokens) kept += tok.e;
  const double target = u * kept;
  double acc = 0;
  for (const Token& tok : s.tokens) {
    acc += tok.e;
    if (acc > target) return tok.i;
  }
  return s.tokens.back().i;  // u * kept rounded up to kept: the last kept token
}

}  // namespace

// One token per row of logits [B, V] (fp32 or bf16): row b divided by temperature[b] (> 0), filtered
// by top_k[b] (0 = off), top_p[b] (1 = off) and min_p[b] (0 = off) when those are given, then drawn
// with uniforms[b] in [0, 1) (float64). Rows run in parallel on the kernels' pool.
torch::Tensor sample_rows(const torch::Tensor& logits, const torch::Tensor& temperature,
                          const c10::optional<torch::Tensor>& top_k, const c10::optional<torch::Tensor>& top_p,
                          const c10::optional<torch::Tensor>& min_p, const torch::Tensor& uniforms) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [B, V] with unit stride in V");
  const int64_t B = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  TORCH_CHECK(V >= 1, "logits must have at least one column");
  check_f32(temperature, "temperature");
  TORCH_CHECK(uniforms.scalar_type() == torch::kFloat64 && uniforms.numel() == B, "uniforms must be [B] float64");
  TORCH_CHECK(temperature.numel() == B && temperature.is_contiguous(), "temperature must be [B]");
  const float* tp = temperature.data_ptr<float>();
  const torch::Tensor u_t = uniforms.contiguous();
  const double* up = u_t.data_ptr<double>();
  const torch::Tensor k_t = top_k.has_value() ? top_k->to(torch::kInt64).contiguous() : torch::Tensor();
  const torch::Tensor p_t = top_p.has_value() ? top_p->contiguous() : torch::Tensor();
  const torch::Tensor m_t = min_p.has_value() ? min_p->contiguous() : torch::Tensor();
  for (const torch::Tensor* t : {&p_t, &m_t}) {
    if (t->defined()) check_f32(*t, "top_p and min_p");
  }
  for (const torch::Tensor* t : {&k_t, &p_t, &m_t}) {
    TORCH_CHECK(!t->defined() || t->numel() == B, "top_k, top_p and min_p must have one value per row");
  }
  auto out = torch::empty({B}, logits.options().dtype(torch::kInt64));
  int64_t* op = out.data_ptr<int64_t>();
  dispatch_float_bf16(logits, "logits", [&](auto tag) {
    using T_ = decltype(tag);
    const T_* lp = logits.data_ptr<T_>();
    parallel_chunks(B, 1, [&](int64_t begin, int64_t end) {
      thread_local Scratch scratch;
      for (int64_t b = begin; b < end; ++b) {
        op[b] = sample_row(lp + b * row_stride, V, tp[b], k_t.defined() ? k_t.data_ptr<int64_t>()[b] : 0,
                           p_t.defined() ? p_t.data_ptr<float>()[b] : 1.f,
                           m_t.defined() ? m_t.data_ptr<float>()[b] : 0.f, up[b], scratch);
      }
    });
  });
  return out;
}

}  // namespace kubeinfer
