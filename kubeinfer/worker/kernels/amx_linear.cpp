// bf16 linear layers on Intel AMX tiles: decode steps' small batches and prefill chunks alike.
//
// A decode step multiplies a few dozen rows by every weight of the model once, so its linears are
// bound by streaming weights from memory. oneDNN's AMX matmul (kernels/packed_linear.py's fallback)
// reached 13-16 GB/s on 32-64 rows here, plus ~20 us of fixed cost per call, 121 calls a step;
// this kernel streams each thread's weights as one sequential run of 1 KB tiles (~3 us a call).
// At 2048 rows (prefill) it is on par with oneDNN, and the gate|up form fuses the SwiGLU.
//
// Weight layout (amx_pack_weight): N padded to a multiple of 32, then
// [N/32][K/32][2][16 k-pairs][16 n][2 k], so one 32-column panel over all of K is one contiguous
// stream and each [16][16][2] slab is the VNNI "B" tile tdpbf16ps wants.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"
#define KUBEINFER_AMX 1
#endif

namespace kubeinfer {

#if defined(KUBEINFER_AMX)
namespace {

constexpr int64_t kGroupBytes = 1 << 20;  // weights kept in L2 across row blocks (2 MB L2 per core here)
constexpr int64_t kPrefetchSlabs = 4;     // 2 KB slabs (two weight tiles) ahead

// Linux gives a process AMX tile state only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM).
bool request_amx() {
  static const bool granted = [] {
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: fp32 accumulators (rows 0-15 / 16-31 x columns 0-15 / 16-31); 4-5: activation rows
// 0-15 / 16-31 (32 bf16 of K each); 6-7: the two weight tiles of a 32-column panel. All 16 x 64 B.
void configure_tiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
}

// c[4][16 x 16] fp32 = rows [a, a + 16 * (1 + TWO_M)) of x times one 32-column weight panel.
template <bool TWO_M>
inline void panel_product(const c10::BFloat16* a, int64_t lda_bytes, const c10::BFloat16* panel, int64_t KB,
                          bool prefetch, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (TWO_M) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const char* a_row16 = reinterpret_cast<const char*>(a) + 16 * lda_bytes;
  for (int64_t kb = 0; kb < KB; ++kb) {
    const c10::BFloat16* w = panel + kb * 1024;
    // Tile registers are not renamed: a tile load waits for the products still reading that tile,
    // so a miss in it stalls the whole chain. Ask for the weights kPrefetchSlabs slabs ahead (the
    // thread's panels are one contiguous run, so this runs on into the next panel).
    if (prefetch) {
      const char* ahead = reinterpret_cast<const char*>(w + kPrefetchSlabs * 1024);
      for (int line = 0; line < 32; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    }
    // Each tile is loaded just before its first product and last read as early as possible, so
    // the next step's load into it can start while the other products run.
    _tile_loadd(6, w, 64);
    _tile_loadd(4, a + kb * 32, lda_bytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (TWO_M) {
      _tile_loadd(5, a_row16 + kb * 64, lda_bytes);
      _tile_dpbf16ps(2, 5, 6);
    }
    _tile_loadd(7, w + 512, 64);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (TWO_M) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  if constexpr (TWO_M) {
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
  }
}

// out[row, n0 + j] = bf16(c[j] + bias[n0 + j]) for one row of a panel's 32 columns (c holds them as
// two 16-column tiles, 256 floats apart), as far as N reaches. One 64-byte store: a panel row is a
// whole cache line, and writing it in two halves made every line of a large output a read-for-
// ownership miss (gate_up at 2048 rows: 5.0 ms, of which 2.5 ms were its stores).
inline void store_panel_row(const float* c, const float* bias, c10::BFloat16* out, int64_t cols) {
  const __mmask16 lo_mask = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 hi_mask = cols >= 32 ? 0xffff : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  __m512 lo = _mm512_loadu_ps(c), hi = _mm512_loadu_ps(c + 256);
  if (bias != nullptr) {
    lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(lo_mask, bias));
    hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(hi_mask, bias + 16));
  }
  const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  if (cols >= 32)
    _mm512_storeu_si512(out, v);
  else
    _mm512_mask_storeu_epi16(out, (static_cast<__mmask32>(hi_mask) << 16) | lo_mask, v);
}

// The SwiGLU form of store_panel_row (amx_pack_weight with swiglu): the panel's first 16 columns
// are gate columns and its last 16 the matching up columns, so the panel yields 16 outputs
// silu(gate) * up, and the [M, 2I] gate|up product never reaches memory.
inline void store_panel_row_swiglu(const float* c, const float* gate_bias, const float* up_bias,
                                   c10::BFloat16* out) {
  __m512 gate = _mm512_loadu_ps(c), up = _mm512_loadu_ps(c + 256);
  if (gate_bias != nullptr) {
    gate = _mm512_add_ps(gate, _mm512_loadu_ps(gate_bias));
    up = _mm512_add_ps(up, _mm512_loadu_ps(up_bias));
  }
  const __m512 v = _mm512_mul_ps(silu512(gate), up);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

}  // namespace
#endif

bool amx_available() {
#if defined(KUBEINFER_AMX)
  return request_amx();
#else
  return false;
#endif
}

torch::Tensor amx_pack_weight(const torch::Tensor& weight, bool swiglu) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16 && weight.device().is_cpu(),
              "weight must be a 2-D bf16 CPU tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(K % 32 == 0, "in_features must be a multiple of 32 for the AMX layout, got ", K);
  const int64_t Np = (N + 31) / 32 * 32;
  auto w = torch::zeros({Np, K}, weight.options());
  if (swiglu) {
    // gate|up rows [2I, K] -> panels of 16 gate rows and the 16 matching up rows.
    TORCH_CHECK(N % 32 == 0, "a gate|up weight needs out_features (2 x intermediate) % 32 == 0, got ", N);
    w.view({N / 32, 2, 16, K}).copy_(weight.view({2, N / 32, 16, K}).transpose(0, 1));
  } else {
    w.narrow(0, 0, N).copy_(weight);
  }
  // (panel, half, n, kb, kpair, k) -> (panel, kb, half, kpair, n, k)
  return w.view({Np / 32, 2, 16, K / 32, 16, 2}).permute({0, 3, 1, 4, 2, 5}).contiguous();
}

// y [M, N] bf16 = x [M, K] bf16 @ W.T (+ bias), W [N, K] packed by amx_pack_weight; fp32
// accumulation, one rounding to bf16 after the bias (as oneDNN). With swiglu (a gate|up weight
// packed with swiglu), y [M, N / 2] = silu(gate) * up instead, also rounded once.
torch::Tensor amx_linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                         int64_t N, bool swiglu) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.stride(1) == 1,
              "x must be a bf16 [M, K] tensor with unit stride in K");
  TORCH_CHECK(packed.dim() == 6 && packed.scalar_type() == torch::kBFloat16 && packed.is_contiguous() &&
                  packed.size(2) == 2 && packed.size(3) == 16 && packed.size(4) == 16 && packed.size(5) == 2,
              "packed must come from amx_pack_weight");
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0), KB = packed.size(1);
  TORCH_CHECK(KB * 32 == K && N > panels * 32 - 32 && N <= panels * 32 && (!swiglu || N == panels * 32),
              "x and the packed weight disagree in shape");
  torch::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be [N]");
    bias_f = bias->to(torch::kFloat32).contiguous();
  }
  const int64_t out_cols = swiglu ? N / 2 : N;
  auto out = torch::empty({M, out_cols}, x.options());
  if (M == 0) return out;
#if defined(KUBEINFER_AMX)
  TORCH_CHECK(request_amx(), "this kernel needs AMX, which the OS did not grant");
  // Tiles read 16 rows at a time: a partial last group of rows reads from a zero-padded copy.
  const int64_t Mp = (M + 15) / 16 * 16;
  torch::Tensor xs = x;
  if (Mp != M) {
    xs = torch::zeros({Mp, K}, x.options());
    xs.narrow(0, 0, M).copy_(x);
  }
  const auto* xp = xs.data_ptr<c10::BFloat16>();
  const int64_t lda = xs.stride(0), lda_bytes = lda * 2;
  const auto* wp = packed.data_ptr<c10::BFloat16>();
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto* op = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, panels, 1, [&](int64_t p_begin, int64_t p_end) {
    configure_tiles();
    alignas(64) float c[4 * 256];
    // A group of weight panels (~1 MB) stays in L2 while 32-row blocks of x (in L1) go past it:
    // each weight comes from memory once, however many rows, and the output is written row-wise.
    const int64_t group = std::max<int64_t>(1, kGroupBytes / (KB * 2048));
    for (int64_t g0 = p_begin; g0 < p_end; g0 += group) {
      const int64_t g_end = std::min(p_end, g0 + group);
      for (int64_t m = 0; m < Mp; m += 32) {
        const bool two = m + 16 < Mp;
        for (int64_t p = g0; p < g_end; ++p) {
          const auto* panel = wp + p * KB * 1024;
          if (two)
            panel_product<true>(xp + m * lda, lda_bytes, panel, KB, m == 0, c);
          else
            panel_product<false>(xp + m * lda, lda_bytes, panel, KB, m == 0, c);
          for (int64_t r = 0; r < (two ? 32 : 16) && m + r < M; ++r) {
            const float* cr = c + (r / 16) * 512 + (r % 16) * 16;
            if (swiglu)
              store_panel_row_swiglu(cr, bp == nullptr ? nullptr : bp + p * 16,
                                     bp == nullptr ? nullptr : bp + out_cols + p * 16, op + (m + r) * out_cols + p * 16);
            else
              store_panel_row(cr, bp == nullptr ? nullptr : bp + p * 32, op + (m + r) * N + p * 32, N - p * 32);
          }
        }
      }
    }
    _tile_release();
  });
  return out;
#else
  TORCH_CHECK(false, "this build has no AMX kernels (compiled without AMX support)");
  return out;
#endif
}

}  // namespace kubeinfer
