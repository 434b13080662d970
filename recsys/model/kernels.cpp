// Fused CPU kernels for GRU4Rec training (built once by recsys/model/kernels.py).
//
// - Adagrad with momentum. With torch ops the ~2,200 item rows of a step have their accumulator
//   and velocity gathered, five element-wise passes and a scatter back: ~6 passes over ~13 MB of
//   random rows. Here each touched value is read once and written once. The arithmetic is
//   recsys/model/optimizer.py's: acc += g²; v = m·v − lr·g/√(acc + eps); p += v (without
//   momentum: p −= lr·g/√(acc + eps)).
// - BPR-max with its gradient, a few passes per row of the score matrix (recsys/model/losses.py).
// - Inverted-dropout masks from a counter-based hash, and the GRU cell's element-wise work with
//   its backward (recsys/model/gru4rec.py).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

// The element-wise loops are compiled for AVX-512, AVX2 and baseline x86-64, and the loader picks
// one for the CPU at run time; elsewhere for the compiler's default target.
#if defined(__x86_64__) && defined(__GNUC__)
#define RECSYS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RECSYS_CLONES
#endif

namespace {

void update(float* p, float* acc, float* vel, const float* g, int64_t n, float lr, float m,
            float eps) {
  if (vel != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float a = acc[j] + g[j] * g[j];
      acc[j] = a;
      const float v = m * vel[j] - lr * g[j] / std::sqrt(a + eps);
      vel[j] = v;
      p[j] += v;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float a = acc[j] + g[j] * g[j];
      acc[j] = a;
      p[j] -= lr * g[j] / std::sqrt(a + eps);
    }
  }
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}

}  // namespace

// param (N, H); state (N, S, H) with S = 2 (accumulator, velocity) or 1 (accumulator);
// rows (U,) distinct int64 row indices; grad (U, H), one row per index.
void adagrad_rows_(torch::Tensor param, torch::Tensor state, torch::Tensor rows,
                   torch::Tensor grad, double lr, double momentum, double eps) {
  check_f32(param, "param");
  check_f32(state, "state");
  check_f32(grad, "grad");
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == torch::kInt64 &&
                  rows.is_contiguous() && rows.dim() == 1,
              "rows must be a contiguous int64 CPU vector");
  TORCH_CHECK(param.dim() == 2 && state.dim() == 3 && grad.dim() == 2, "expected param (N, H), "
              "state (N, S, H), grad (U, H)");
  const int64_t n = param.size(0), h = param.size(1), s = state.size(1), u = rows.size(0);
  TORCH_CHECK(state.size(0) == n && state.size(2) == h && (s == 1 || s == 2),
              "state must be (N, 1 or 2, H) for param (N, H)");
  TORCH_CHECK(grad.size(0) == u && grad.size(1) == h, "grad must be (len(rows), H)");
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < u; ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < n, "row index ", r[i], " out of range [0, ", n, ")");
  }
  float* p = param.data_ptr<float>();
  float* st = state.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const float flr = lr, fm = momentum, feps = eps;
  at::parallel_for(0, u, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* acc = st + r[i] * s * h;
      update(p + r[i] * h, acc, s == 2 ? acc + h : nullptr, g + i * h, h, flr, fm, feps);
    }
  });
}

// param, acc, grad (and vel, unless it is empty: no momentum): contiguous, the same size.
void adagrad_dense_(torch::Tensor param, torch::Tensor acc, torch::Tensor vel,
                    torch::Tensor grad, double lr, double momentum, double eps) {
  check_f32(param, "param");
  check_f32(acc, "acc");
  check_f32(grad, "grad");
  const int64_t n = param.numel();
  TORCH_CHECK(acc.numel() == n && grad.numel() == n, "param, acc and grad differ in size");
  const bool has_vel = vel.numel() > 0;
  if (has_vel) {
    check_f32(vel, "vel");
    TORCH_CHECK(vel.numel() == n, "param and vel differ in size");
  }
  float* p = param.data_ptr<float>();
  float* a = acc.data_ptr<float>();
  float* v = has_vel ? vel.data_ptr<float>() : nullptr;
  const float* g = grad.data_ptr<float>();
  const float flr = lr, fm = momentum, feps = eps;
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    update(p + begin, a + begin, v ? v + begin : nullptr, g + begin, end - begin, flr, fm, feps);
  });
}

// ---- BPR-max -------------------------------------------------------------------------------

namespace {

// e^x to ~2 ulp with operations a compiler vectorises (std::exp in a loop stays scalar): the
// Cephes range reduction and polynomial. Inputs are clamped to [-87.3, 88.3] (normal results).
inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float k = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const int32_t n = static_cast<int32_t>(k);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return (p * r * r + r + 1.0f) * __builtin_bit_cast(float, (n + 127) << 23);
}

}  // namespace

// Row i of BPR-max: writes dLoss/dscores into g (C,) and returns the loss; e and sg are scratch.
RECSYS_CLONES float bpr_max_row(
    const float* __restrict s, float* __restrict g, float* __restrict e, float* __restrict sg,
    int64_t c, int64_t i, float lam, float alpha) {
  if (alpha > 0) {
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const float x = s[j];
      const float neg = alpha * (fast_exp(x < 0.0f ? x : 0.0f) - 1.0f);
      g[j] = x > 0 ? x : neg;  // ELU
    }
  } else {
    std::memcpy(g, s, c * sizeof(float));
  }
  const float pos = g[i];
  g[i] = -3.0e38f;  // out of the maximum over the negatives
  float m = -3.0e38f;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < c; ++j) m = g[j] > m ? g[j] : m;
  g[i] = pos;
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) {
    e[j] = fast_exp(g[j] - m);                        // softmax over the negatives, unnormalised
    sg[j] = 1.0f / (1.0f + fast_exp(g[j] - pos));     // sigmoid(r_i - r_j)
  }
  e[i] = 0.0f;  // the positive is not its own negative
  float z = 0, ranking = 0, reg = 0, sig2 = 0;
#pragma omp simd reduction(+ : z, ranking, reg, sig2)
  for (int64_t j = 0; j < c; ++j) {
    z += e[j];
    ranking += e[j] * sg[j];
    reg += e[j] * g[j] * g[j];
    sig2 += e[j] * sg[j] * sg[j];
  }
  ranking /= z;
  reg /= z;
  sig2 /= z;
  const float inv = 1.0f / (ranking + 1e-24f);
  const float base = ranking * inv - lam * reg, wz = 1.0f / z;
  const float slope_shift = alpha > 0 ? alpha : 0.0f;
  const bool elu = alpha > 0;
#pragma omp simd
  for (int64_t j = 0; j < c; ++j) {
    const float x = g[j];
    const float d = e[j] * wz * (base - sg[j] * sg[j] * inv + lam * (x * x + 2.0f * x));
    g[j] = (elu && x <= 0) ? d * (x + slope_shift) : d;  // ELU's derivative from its result
  }
  const float dpos = (sig2 - ranking) * inv;
  g[i] = (elu && pos <= 0) ? dpos * (pos + alpha) : dpos;
  return lam * reg - std::log(ranking + 1e-24f);
}

// The BPR-max loss of each row of scores (B, C), C >= B, the positive of row i in column i, and
// its gradient with respect to the scores (ELU included): the arithmetic of _BprMax in
// recsys/model/losses.py, in four passes over a row instead of ~20 over the matrix.
std::vector<torch::Tensor> bpr_max(torch::Tensor scores, double bpreg, double elu_alpha) {
  check_f32(scores, "scores");
  TORCH_CHECK(scores.dim() == 2 && scores.size(1) >= scores.size(0),
              "scores must be (B, C) with C >= B");
  const int64_t b = scores.size(0), c = scores.size(1);
  auto loss = torch::empty({b}, scores.options());
  auto grad = torch::empty({b, c}, scores.options());
  const float* s = scores.data_ptr<float>();
  float* lo = loss.data_ptr<float>();
  float* gr = grad.data_ptr<float>();
  const float lam = bpreg, alpha = elu_alpha;
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> e(c), sg(c);
    for (int64_t i = begin; i < end; ++i) {
      lo[i] = bpr_max_row(s + i * c, gr + i * c, e.data(), sg.data(), c, i, lam, alpha);
    }
  });
  return {loss, grad};
}

// ---- dropout masks ---------------------------------------------------------------------------

namespace {

// Murmur3's 32-bit finaliser: a bijection that mixes every input bit into every output bit.
inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

RECSYS_CLONES void dropout_block(
    float* __restrict out, int64_t begin, int64_t end, uint32_t k1, uint32_t k2,
    uint32_t threshold, float scale) {
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) {
    const uint32_t u = mix32(mix32(static_cast<uint32_t>(j) ^ k1) + k2) >> 8;  // 24 bits
    out[j] = u >= threshold ? scale : 0.0f;
  }
}

}  // namespace

// An inverted-dropout mask of `n` values: 0 with probability p, else 1 / (1 - p). Element j is a
// hash of (j, seed), a counter-based stream: the mask depends only on the seed (drawn from
// torch's generator by the caller, so checkpoints resume it), not on the thread count. The
// uniform draw has 24 bits, as torch.rand's float does. Replaces rand + compare + cast + scale:
// 0.05 against 0.3 ms for 128 x 512.
torch::Tensor dropout_mask(int64_t n, double p, int64_t seed) {
  TORCH_CHECK(n >= 0 && p >= 0 && p < 1, "dropout_mask needs n >= 0 and 0 <= p < 1");
  TORCH_CHECK(n <= (int64_t{1} << 32), "dropout_mask: at most 2^32 values per call");
  auto mask = torch::empty({n}, torch::kFloat32);
  float* out = mask.data_ptr<float>();
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t k1 = static_cast<uint32_t>(s), k2 = static_cast<uint32_t>(s >> 32);
  const uint32_t threshold = static_cast<uint32_t>(std::llround(p * 16777216.0));  // p * 2^24
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    dropout_block(out, begin, end, k1, k2, threshold, scale);
  });
  return mask;
}

// ---- GRU cell --------------------------------------------------------------------------------

namespace {

inline float fast_sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

inline float fast_tanh(float x) { return 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f); }

// One row: gi, gh (3H) as [r | z | n] pre-activations, h (H) -> out (H), act (3H) = [r | z | n].
RECSYS_CLONES void gru_forward_row(const float* __restrict gi, const float* __restrict gh,
                                   const float* __restrict h, float* __restrict out,
                                   float* __restrict act, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float r = fast_sigmoid(gi[j] + gh[j]);
    const float z = fast_sigmoid(gi[n + j] + gh[n + j]);
    const float c = fast_tanh(gi[2 * n + j] + r * gh[2 * n + j]);
    out[j] = c + z * (h[j] - c);
    act[j] = r;
    act[n + j] = z;
    act[2 * n + j] = c;
  }
}

RECSYS_CLONES void gru_backward_row(const float* __restrict dout, const float* __restrict act,
                                    const float* __restrict gh, const float* __restrict h,
                                    float* __restrict dgi, float* __restrict dgh,
                                    float* __restrict dh, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float r = act[j], z = act[n + j], c = act[2 * n + j], d = dout[j];
    const float dc = d * (1.0f - z) * (1.0f - c * c);  // through tanh
    const float dr = dc * gh[2 * n + j] * r * (1.0f - r);  // through the reset gate's sigmoid
    const float dz = d * (h[j] - c) * z * (1.0f - z);
    dgi[j] = dr;
    dgi[n + j] = dz;
    dgi[2 * n + j] = dc;
    dgh[j] = dr;
    dgh[n + j] = dz;
    dgh[2 * n + j] = dc * r;
    dh[j] = d * z;
  }
}

void check_cell(const torch::Tensor& g, const torch::Tensor& h) {
  TORCH_CHECK(g.dim() == 2 && h.dim() == 2 && g.size(0) == h.size(0) &&
                  g.size(1) == 3 * h.size(1),
              "expected gates (B, 3H) and hidden (B, H)");
}

}  // namespace

// torch.gru_cell's arithmetic from precomputed gates (bias included): r = σ(gi_r + gh_r),
// z = σ(gi_z + gh_z), c = tanh(gi_n + r·gh_n), h' = c + z·(h − c). Returns h' and the
// activations [r | z | c] that gru_cell_backward needs, in one pass instead of ~10 ops whose
// slices autograd would spread back into zeroed (B, 3H) buffers.
std::vector<torch::Tensor> gru_cell_forward(torch::Tensor gi, torch::Tensor gh, torch::Tensor h) {
  check_f32(gi, "gi");
  check_f32(gh, "gh");
  check_f32(h, "h");
  check_cell(gi, h);
  check_cell(gh, h);
  const int64_t b = h.size(0), n = h.size(1);
  auto out = torch::empty({b, n}, h.options());
  auto act = torch::empty({b, 3 * n}, h.options());
  const float *pi = gi.data_ptr<float>(), *ph = gh.data_ptr<float>(), *hp = h.data_ptr<float>();
  float *po = out.data_ptr<float>(), *pa = act.data_ptr<float>();
  at::parallel_for(0, b, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      gru_forward_row(pi + i * 3 * n, ph + i * 3 * n, hp + i * n, po + i * n, pa + i * 3 * n, n);
    }
  });
  return {out, act};
}

// Gradients of gru_cell_forward's h' with respect to gi, gh and h, given dL/dh'.
std::vector<torch::Tensor> gru_cell_backward(torch::Tensor dout, torch::Tensor act,
                                             torch::Tensor gh, torch::Tensor h) {
  check_f32(dout, "dout");
  check_f32(act, "act");
  check_f32(gh, "gh");
  check_f32(h, "h");
  check_cell(act, h);
  check_cell(gh, h);
  TORCH_CHECK(dout.sizes() == h.sizes(), "dout must be shaped like h");
  const int64_t b = h.size(0), n = h.size(1);
  auto dgi = torch::empty({b, 3 * n}, h.options());
  auto dgh = torch::empty({b, 3 * n}, h.options());
  auto dh = torch::empty({b, n}, h.options());
  const float *pd = dout.data_ptr<float>(), *pa = act.data_ptr<float>();
  const float *ph = gh.data_ptr<float>(), *hp = h.data_ptr<float>();
  float *pgi = dgi.data_ptr<float>(), *pgh = dgh.data_ptr<float>(), *pdh = dh.data_ptr<float>();
  at::parallel_for(0, b, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      gru_backward_row(pd + i * n, pa + i * 3 * n, ph + i * 3 * n, hp + i * n, pgi + i * 3 * n,
                       pgh + i * 3 * n, pdh + i * n, n);
    }
  });
  return {dgi, dgh, dh};
}
