// The repeat readout's likelihood and its gradient in one pass per row (recsys/training/
// readout_loss.py, _ReadoutLikelihood, which holds the same arithmetic in torch ops).
//
// The head reads a few (R, L) tensors and has four small parameters, so in torch ops its cost is
// per-op overhead: ~60 calls a step, which on a small network (100 units, batch 32) cost about
// as much as the network's own step. Per row r, with a = 1/tau, g = softplus(u.h + c),
// lambda = sigmoid(theta), f = log(1 + sum_l lambda^l [history_l = item]) and x_l = g f_l:
//   loss_r = D - a s_t - g f_t,  D = log(Z_a + sum_{distinct l} e^{a s_l} (e^{x_l} - 1)),
//   Z_a = e^offset sum_k e^{a s_k - shift_k}  (the step's importance-weighted samples),
// and the gradient of sum_r loss_r in u, c, theta and log tau.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

void check_readout(const torch::Tensor& t, const char* name, torch::ScalarType type) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous(), name,
              " must be a contiguous ", c10::toString(type), " CPU tensor");
}

// log(e^x - 1) for x > 0, as the torch version computes it
inline double log_expm1(double x) {
  return x > 20.0 ? x + std::log1p(-std::exp(-x)) : std::log(std::expm1(x));
}

}  // namespace

// out (R, H); target_scores (R,); sample_scores (R, n); shift (n,); history_scores (R, L);
// history (R, L) int64 (-1: empty); targets (R,) int64; gate_w (H,); gate_b, decay_logit,
// log_temperature (1,). Returns {loss (), d gate_w (H,), d gate_b, d decay_logit,
// d log_temperature (1,) each}.
std::vector<torch::Tensor> readout_nll(torch::Tensor out, torch::Tensor target_scores,
                                       torch::Tensor sample_scores, torch::Tensor shift,
                                       double offset, torch::Tensor history_scores,
                                       torch::Tensor history, torch::Tensor targets,
                                       torch::Tensor gate_w, torch::Tensor gate_b,
                                       torch::Tensor decay_logit, torch::Tensor log_temperature) {
  for (const auto& [t, name] : {std::pair{&out, "out"}, {&target_scores, "target_scores"},
                                {&sample_scores, "sample_scores"}, {&shift, "shift"},
                                {&history_scores, "history_scores"}, {&gate_w, "gate_w"},
                                {&gate_b, "gate_b"}, {&decay_logit, "decay_logit"},
                                {&log_temperature, "log_temperature"}}) {
    check_readout(*t, name, torch::kFloat32);
  }
  check_readout(history, "history", torch::kInt64);
  check_readout(targets, "targets", torch::kInt64);
  const int64_t rows = out.size(0), h = out.size(1), n = sample_scores.size(1);
  const int64_t window = history.size(1);
  TORCH_CHECK(out.dim() == 2 && gate_w.numel() == h, "out must be (R, H) and gate_w (H,)");
  TORCH_CHECK(target_scores.numel() == rows && targets.numel() == rows &&
                  sample_scores.size(0) == rows && shift.numel() == n &&
                  history.size(0) == rows && history_scores.sizes() == history.sizes(),
              "readout_nll: the step's tensors disagree in their rows, samples or window");
  TORCH_CHECK(gate_b.numel() == 1 && decay_logit.numel() == 1 && log_temperature.numel() == 1,
              "readout_nll: gate_b, decay_logit and log_temperature hold one value each");

  const float* x_out = out.data_ptr<float>();
  const float* st = target_scores.data_ptr<float>();
  const float* ss = sample_scores.data_ptr<float>();
  const float* sh = shift.data_ptr<float>();
  const float* hs = history_scores.data_ptr<float>();
  const int64_t* hist = history.data_ptr<int64_t>();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const float* w = gate_w.data_ptr<float>();
  const double c = gate_b.data_ptr<float>()[0];
  const double a = std::exp(-static_cast<double>(log_temperature.data_ptr<float>()[0]));
  const double theta = decay_logit.data_ptr<float>()[0];
  const double lam = 1.0 / (1.0 + std::exp(-theta));

  std::vector<double> power(window), slope(window);  // lambda^l and its derivative in lambda
  for (int64_t l = 0; l < window; ++l) {
    power[l] = std::pow(lam, static_cast<double>(l));
    slope[l] = l == 0 ? 0.0 : l * std::pow(lam, static_cast<double>(l - 1));
  }
  std::vector<double> d_w(h, 0.0), f(window), f_slope(window), x(window), term(window);
  std::vector<char> keep(window);
  double loss = 0.0, d_c = 0.0, d_lam = 0.0, d_a = 0.0;
  const double minus_inf = -std::numeric_limits<double>::infinity();

  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x_out + r * h;
    const int64_t* hr = hist + r * window;
    const float* hsr = hs + r * window;
    double pre = c;
    for (int64_t j = 0; j < h; ++j) pre += static_cast<double>(xr[j]) * w[j];
    const double g = pre > 20.0 ? pre : std::log1p(std::exp(pre));
    const double dg = 1.0 / (1.0 + std::exp(-pre));
    // the step's samples: log Z_a and E_q[s] (d log Z_a / d a)
    const float* sr = ss + r * n;
    double top = minus_inf;
    for (int64_t k = 0; k < n; ++k) top = std::max(top, a * sr[k] - sh[k]);
    double total = 0.0, moment = 0.0;
    for (int64_t k = 0; k < n; ++k) {
      const double e = std::exp(a * sr[k] - sh[k] - top);
      total += e;
      moment += e * sr[k];
    }
    const double log_z = n > 0 ? top + std::log(total) + offset : minus_inf;
    const double mean_q = n > 0 ? moment / total : 0.0;
    // the history: distinct items (most recent position), their recency counts and terms
    double count_t = 0.0, slope_t = 0.0, log_d = log_z;
    for (int64_t l = 0; l < window; ++l) {
      const int64_t item = hr[l];
      if (item == tgt[r]) {
        count_t += power[l];
        slope_t += slope[l];
      }
      bool repeated = false;
      for (int64_t m = 0; m < l && !repeated; ++m) repeated = hr[m] == item;
      keep[l] = item >= 0 && !repeated;
      if (!keep[l]) continue;
      double count = 0.0, count_slope = 0.0;
      for (int64_t m = l; m < window; ++m) {
        if (hr[m] == item) {
          count += power[m];
          count_slope += slope[m];
        }
      }
      f[l] = std::log1p(count);
      f_slope[l] = count_slope / (1.0 + count);
      x[l] = std::max(g * f[l], 1e-30);
      term[l] = a * hsr[l] + log_expm1(x[l]);
      const double hi = std::max(log_d, term[l]);
      log_d = hi + std::log(std::exp(log_d - hi) + std::exp(term[l] - hi));
    }
    const double f_t = std::log1p(count_t);
    loss += log_d - a * st[r] - g * f_t;
    double da_r = std::exp(log_z - log_d) * mean_q - st[r];
    double dg_r = -f_t, dlam_r = -slope_t / (1.0 + count_t);
    for (int64_t l = 0; l < window; ++l) {
      if (!keep[l]) continue;
      const double pi = std::exp(a * hsr[l] + x[l] - log_d);  // weight x d log(e^x - 1)/dx
      da_r += std::exp(term[l] - log_d) * hsr[l];
      dg_r += pi * f[l];
      dlam_r += pi * f_slope[l];
    }
    const double d_pre = dg_r * dg;
    for (int64_t j = 0; j < h; ++j) d_w[j] += d_pre * xr[j];
    d_c += d_pre;
    d_lam += g * dlam_r;
    d_a += da_r;
  }
  auto grad_w = torch::empty({h}, out.options());
  float* gw = grad_w.data_ptr<float>();
  for (int64_t j = 0; j < h; ++j) gw[j] = static_cast<float>(d_w[j]);
  auto one = [&](double v) { return torch::full({1}, v, out.options()); };
  return {torch::full({}, loss, out.options()), grad_w, one(d_c), one(d_lam * lam * (1.0 - lam)),
          one(-d_a * a)};
}
