// The int4 catalogue pass of the live ranker (recsys/quantized.py, Int4Pass): upper bounds on
// every item's fp32 score x . w_j + b_j for one or two session outputs x, from 4-bit weights.
//
// torch's weight-only int4 kernel reads the weights at ~9 GB/s and rounds x and its output to
// bf16, which the bounds must then cover. Here x is quantised to int8 per row (x ~ s_x x_q) and
// the products are exact integer sums (AVX-512 VNNI: 64 multiply-adds an instruction), so the
// only rounding left is a few fp32 operations per group, and the bound's bf16 terms give way to
// ||x - s_x x_q|| ||D_j||. Layout: tiles of 16 items, one 32-bit lane each; per tile and group of
// 64 weights, 8 blocks of 64 bytes whose lane i holds item i's weights d..d+3 in its low nibbles
// and d+4..d+7 in its high ones. Bound terms (recsys/quantized.py derives them), item j, row x:
//   s_x sum_g [s_jg (sum_k q_jk x_qk - 8 X_g) + z_jg X_g]     (X_g: the group's sum of x_q)
//   + b_j + sum_g l1_g slack_jg + ||x - s_x x_q|| ||D_j|| + ref ||x|| ||w_j||
//   + per_norm ||x|| + constant   (the reference's item-independent rounding, fp32_absolute).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RECSYS_VNNI 1
#endif

namespace {

constexpr int kTile = 16;   // items per tile
constexpr int kGroup = 64;  // weights per scale and zero
constexpr int kBlock = 64;  // bytes per block: 16 items x 8 weights

struct Rows {  // the int8 copies of the rows and their per-row and per-group terms
  int64_t hp = 0, groups = 0;
  std::vector<int8_t> xq;    // (M, hp)
  std::vector<int32_t> sum;  // (M, G): sum of x_q over the group
  std::vector<float> l1;     // (M, G): max(||x_g||_1, s_x ||x_q,g||_1), rounded up
  std::vector<float> sx, resid, fixed;  // (M,): scale; ||x - s_x x_q||; the absolute terms
  std::vector<float> ref;                // (M,): ref_unit ||x||
};

Rows quantise_rows(const float* x, int64_t m, int64_t h, int64_t hp, double ref_unit,
                   double per_norm, double constant) {
  Rows r;
  r.hp = hp;
  r.groups = hp / kGroup;
  r.xq.assign(m * hp, 0);
  r.sum.assign(m * r.groups, 0);
  r.l1.assign(m * r.groups, 0.f);
  r.sx.assign(m, 1.f);
  r.resid.assign(m, 0.f);
  r.fixed.assign(m, 0.f);
  r.ref.assign(m, 0.f);
  const double up = 1.0 + std::ldexp(1.0, -20);  // past the rounding of these double sums
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * h;
    float amax = 0.f;
    for (int64_t k = 0; k < h; ++k) amax = std::max(amax, std::fabs(xi[k]));
    const float sx = amax > 0.f ? amax / 127.f : 1.f;
    r.sx[i] = sx;
    double resid2 = 0.0, norm2 = 0.0;
    for (int64_t g = 0; g < r.groups; ++g) {
      double l1x = 0.0, l1q = 0.0;
      int32_t total = 0;
      for (int64_t k = g * kGroup; k < std::min<int64_t>((g + 1) * kGroup, h); ++k) {
        // clamped as a float: a NaN (whose row's bounds come out NaN: never certified) has no
        // integer value to cast to
        const float level = std::fmin(std::fmax(std::nearbyint(xi[k] / sx), -127.f), 127.f);
        const int32_t q = static_cast<int32_t>(level);
        r.xq[i * hp + k] = static_cast<int8_t>(q);
        total += q;
        const double d = static_cast<double>(xi[k]) - static_cast<double>(sx) * q;  // exact
        resid2 += d * d;
        norm2 += static_cast<double>(xi[k]) * xi[k];
        l1x += std::fabs(static_cast<double>(xi[k]));
        l1q += std::abs(q);
      }
      r.sum[i * r.groups + g] = total;
      r.l1[i * r.groups + g] = static_cast<float>(std::max(l1x, l1q * sx) * up);
    }
    const double norm = std::sqrt(norm2) * up;
    r.resid[i] = static_cast<float>(std::sqrt(resid2) * up);
    r.ref[i] = static_cast<float>(ref_unit * norm * up);
    r.fixed[i] = static_cast<float>((per_norm * norm + constant) * up);
  }
  return r;
}

struct Tile {  // one tile's arrays, and the catalogue-wide per-item ones from its first item
  const uint8_t* packed;
  const float *scale, *zero, *slack;  // (G, 16)
  const float *bias, *dnorm, *norms;  // (16,)
};

// The portable path (and the reference the SIMD path is tested against): the same integer
// sums and fp32 operations in the same order (the compiler may fuse a multiply-add on one path
// and not the other, which only removes a rounding).
void tile_scalar(const Tile& t, const Rows& r, int64_t row, int count, float* out) {
  for (int i = 0; i < count; ++i) {
    float acc = 0.f, bound = 0.f;
    for (int64_t g = 0; g < r.groups; ++g) {
      int32_t dot = 0;
      const int8_t* xq = r.xq.data() + row * r.hp + g * kGroup;
      for (int b = 0; b < 8; ++b) {
        const uint8_t* lane = t.packed + (g * 8 + b) * kBlock + i * 4;
        for (int c = 0; c < 4; ++c) {
          dot += (lane[c] & 0x0F) * xq[b * 8 + c] + (lane[c] >> 4) * xq[b * 8 + 4 + c];
        }
      }
      const int32_t xs = r.sum[row * r.groups + g];
      const float s = t.scale[g * kTile + i], z = t.zero[g * kTile + i];
      acc = std::fma(s, static_cast<float>(dot - 8 * xs), acc);
      acc = std::fma(z, static_cast<float>(xs), acc);
      bound = std::fma(t.slack[g * kTile + i], r.l1[row * r.groups + g], bound);
    }
    float v = acc * r.sx[row] + t.bias[i];
    v += bound;
    v = std::fma(r.resid[row], t.dnorm[i], v);
    v = std::fma(r.ref[row], t.norms[i], v);
    out[i] = v + r.fixed[row];
  }
}

#ifdef RECSYS_VNNI
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_vnni(const Tile& t,
                                                                        const Rows& r,
                                                                        int64_t row0, int rows,
                                                                        int count,
                                                                        float* const* out) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  __m512 bound[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t g = 0; g < r.groups; ++g) {
    __m512i dot[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int b = 0; b < 8; ++b) {
      const __m512i v = _mm512_loadu_si512(t.packed + (g * 8 + b) * kBlock);
      const __m512i lo = _mm512_and_si512(v, nibble);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      for (int k = 0; k < rows; ++k) {
        const int8_t* xq = r.xq.data() + (row0 + k) * r.hp + g * kGroup + b * 8;
        int32_t first, second;
        std::memcpy(&first, xq, 4);
        std::memcpy(&second, xq + 4, 4);
        dot[k] = _mm512_dpbusd_epi32(dot[k], lo, _mm512_set1_epi32(first));
        dot[k] = _mm512_dpbusd_epi32(dot[k], hi, _mm512_set1_epi32(second));
      }
    }
    const __m512 s = _mm512_loadu_ps(t.scale + g * kTile);
    const __m512 z = _mm512_loadu_ps(t.zero + g * kTile);
    const __m512 e = _mm512_loadu_ps(t.slack + g * kTile);
    for (int k = 0; k < rows; ++k) {
      const int64_t row = row0 + k;
      const int32_t xs = r.sum[row * r.groups + g];
      const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[k], _mm512_set1_epi32(8 * xs)));
      acc[k] = _mm512_fmadd_ps(s, d, acc[k]);
      acc[k] = _mm512_fmadd_ps(z, _mm512_set1_ps(static_cast<float>(xs)), acc[k]);
      bound[k] = _mm512_fmadd_ps(e, _mm512_set1_ps(r.l1[row * r.groups + g]), bound[k]);
    }
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1u);
  const __m512 bias = _mm512_maskz_loadu_ps(mask, t.bias);
  const __m512 dnorm = _mm512_maskz_loadu_ps(mask, t.dnorm);
  const __m512 norms = _mm512_maskz_loadu_ps(mask, t.norms);
  for (int k = 0; k < rows; ++k) {
    const int64_t row = row0 + k;
    __m512 v = _mm512_add_ps(_mm512_mul_ps(acc[k], _mm512_set1_ps(r.sx[row])), bias);
    v = _mm512_add_ps(v, bound[k]);
    v = _mm512_fmadd_ps(_mm512_set1_ps(r.resid[row]), dnorm, v);
    v = _mm512_fmadd_ps(_mm512_set1_ps(r.ref[row]), norms, v);
    v = _mm512_add_ps(v, _mm512_set1_ps(r.fixed[row]));
    _mm512_mask_storeu_ps(out[k], mask, v);
  }
}
#endif

bool vnni_supported() {
#ifdef RECSYS_VNNI
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

void check_layout(const torch::Tensor& t, c10::ScalarType type, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous(), name,
              " must be a contiguous CPU tensor of ", c10::toString(type));
}

}  // namespace

// Whether this CPU runs the SIMD path (else int4_upper computes the same on the portable one).
bool int4_vnni() { return vnni_supported(); }

// x (M, dim) float32; packed (T, G, 8, 64) uint8; scale, zero, slack (T, G, 16) float32; bias,
// dnorm, norms (T * 16,) float32. Returns (M, n_items) upper bounds.
torch::Tensor int4_upper(torch::Tensor x, torch::Tensor packed, torch::Tensor scale,
                         torch::Tensor zero, torch::Tensor slack, torch::Tensor bias,
                         torch::Tensor dnorm, torch::Tensor norms, int64_t n_items, int64_t dim,
                         double ref_unit, double per_norm, double constant, bool simd) {
  check_layout(x, torch::kFloat32, "x");
  check_layout(packed, torch::kUInt8, "packed");
  for (const auto* t : {&scale, &zero, &slack, &bias, &dnorm, &norms}) {
    check_layout(*t, torch::kFloat32, "the scales, zeros, slacks and item terms");
  }
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && packed.size(2) == 8 && packed.size(3) == kBlock,
              "expected x (M, H) and packed (T, G, 8, 64)");
  const int64_t m = x.size(0), h = x.size(1), tiles = packed.size(0), groups = packed.size(1);
  TORCH_CHECK(h == dim && dim <= groups * kGroup && dim > (groups - 1) * kGroup &&
                  n_items <= tiles * kTile && n_items > (tiles - 1) * kTile,
              "x (", m, " x ", h, ") or n_items does not fit the packed weights (", dim,
              " units, ", n_items, " items)");
  TORCH_CHECK(scale.numel() == tiles * groups * kTile && zero.numel() == scale.numel() &&
                  slack.numel() == scale.numel(),
              "scale, zero and slack must be (T, G, 16)");
  TORCH_CHECK(bias.numel() == tiles * kTile && dnorm.numel() == bias.numel() &&
                  norms.numel() == bias.numel(),
              "bias, dnorm and norms must have T * 16 entries");
  auto result = torch::empty({m, n_items}, x.options());
  // The live service answers HTTP on another thread meanwhile (torch's own ops release it too).
  pybind11::gil_scoped_release no_gil;
  const Rows r = quantise_rows(x.data_ptr<float>(), m, h, groups * kGroup, ref_unit, per_norm,
                               constant);
  float* out = result.data_ptr<float>();
  const bool vnni = simd && vnni_supported();
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  const float *ps = scale.data_ptr<float>(), *pz = zero.data_ptr<float>();
  const float *pe = slack.data_ptr<float>(), *pb = bias.data_ptr<float>();
  const float *pd = dnorm.data_ptr<float>(), *pn = norms.data_ptr<float>();
  at::parallel_for(0, tiles, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t at = t * groups * kTile;
      const Tile tile{pk + t * groups * 8 * kBlock, ps + at, pz + at, pe + at,
                      pb + t * kTile, pd + t * kTile, pn + t * kTile};
      const int count = static_cast<int>(std::min<int64_t>(kTile, n_items - t * kTile));
      for (int64_t row = 0; row < m; row += 2) {
        const int rows = static_cast<int>(std::min<int64_t>(2, m - row));
        float* dest[2] = {out + row * n_items + t * kTile,
                          out + (row + rows - 1) * n_items + t * kTile};
#ifdef RECSYS_VNNI
        if (vnni) {
          tile_vnni(tile, r, row, rows, count, dest);
          continue;
        }
#endif
        (void)vnni;
        for (int k = 0; k < rows; ++k) tile_scalar(tile, r, row + k, count, dest[k]);
      }
    }
  });
  return result;
}
