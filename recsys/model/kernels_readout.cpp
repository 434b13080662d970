// The repeat readout's likelihood and its gradient in one pass per row, straight from the
// training step's tensors (recsys/training/readout_loss.py: step_readout_loss, whose torch
// path holds the same arithmetic in torch ops).
//
// The head reads a few (R, L) tensors and has four small parameters, so in torch ops its cost is
// per-op overhead: ~60 calls a step, and a dozen more to gather its rows, history scores and
// importance weights, which on a small network (100 units, batch 32) cost about
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

// The step's tensors as the trainer has them, so the head's gathers happen here too: out (B, H)
// and scores (B, C) of the step, rows (R,) int64 (the readout's slots), the negatives' columns
// neg_begin .. neg_begin + n of scores and their items neg_items (n,) int64, shift_table (N,)
// (log pop^alpha per item) and offset (log P - log n), history (B, L) int64 (-1: empty),
// targets (B,) int64 (column j < B of scores is slot j's target), item_out (N, H) and
// item_bias (N,); gate_w (H,); gate_b, decay_logit, log_temperature (1,). Returns {loss (),
// d gate_w (H,), d gate_b, d decay_logit, d log_temperature (1,) each}.
std::vector<torch::Tensor> readout_step_nll(
    torch::Tensor out, torch::Tensor scores, torch::Tensor rows, int64_t neg_begin,
    torch::Tensor neg_items, torch::Tensor shift_table, double offset, torch::Tensor history,
    torch::Tensor targets, torch::Tensor item_out, torch::Tensor item_bias, torch::Tensor gate_w,
    torch::Tensor gate_b, torch::Tensor decay_logit, torch::Tensor log_temperature) {
  for (const auto& [t, name] :
       {std::pair{&out, "out"}, {&scores, "scores"}, {&shift_table, "shift_table"},
        {&item_out, "item_out"}, {&item_bias, "item_bias"}, {&gate_w, "gate_w"},
        {&gate_b, "gate_b"}, {&decay_logit, "decay_logit"},
        {&log_temperature, "log_temperature"}}) {
    check_readout(*t, name, torch::kFloat32);
  }
  for (const auto& [t, name] : {std::pair{&rows, "rows"}, {&neg_items, "neg_items"},
                                {&history, "history"}, {&targets, "targets"}}) {
    check_readout(*t, name, torch::kInt64);
  }
  const int64_t b = out.size(0), h = out.size(1), n = neg_items.numel(), cols = scores.size(1);
  const int64_t window = history.size(1), n_items = item_out.size(0), n_rows = rows.numel();
  TORCH_CHECK(out.dim() == 2 && gate_w.numel() == h && item_out.dim() == 2 &&
                  item_out.size(1) == h && item_bias.numel() == n_items &&
                  shift_table.numel() == n_items,
              "readout_step_nll: out (B, H), gate_w (H,), item_out (N, H), item_bias and "
              "shift_table (N,)");
  TORCH_CHECK(scores.size(0) == b && cols >= b && targets.numel() == b && history.size(0) == b &&
                  neg_begin >= 0 && neg_begin + n <= cols,
              "readout_step_nll: the step's tensors disagree in their slots or columns");
  TORCH_CHECK(gate_b.numel() == 1 && decay_logit.numel() == 1 && log_temperature.numel() == 1,
              "readout_step_nll: gate_b, decay_logit and log_temperature hold one value each");
  const int64_t* row_at = rows.data_ptr<int64_t>();
  const int64_t* negs = neg_items.data_ptr<int64_t>();
  const int64_t* hist = history.data_ptr<int64_t>();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  // the indices, checked once before the pass reads through them
  for (int64_t k = 0; k < n; ++k) {
    TORCH_CHECK(negs[k] >= 0 && negs[k] < n_items,
                "readout_step_nll: a sampled item outside the catalogue");
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    TORCH_CHECK(row_at[r] >= 0 && row_at[r] < b, "readout_step_nll: a row outside the batch");
    const int64_t* hr = hist + row_at[r] * window;
    TORCH_CHECK(tgt[row_at[r]] >= 0 && tgt[row_at[r]] < n_items,
                "readout_step_nll: a target outside the catalogue");
    for (int64_t l = 0; l < window; ++l) {
      TORCH_CHECK(hr[l] < n_items, "readout_step_nll: a history item outside the catalogue");
    }
  }

  const float* x_out = out.data_ptr<float>();
  const float* sc = scores.data_ptr<float>();
  const float* table = shift_table.data_ptr<float>();
  const float* emb = item_out.data_ptr<float>();
  const float* bias = item_bias.data_ptr<float>();
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
  std::vector<double> sh(n);  // the draw's log importance weights, shared by the rows
  for (int64_t k = 0; k < n; ++k) sh[k] = table[negs[k]];
  std::vector<double> d_w(h, 0.0), f(window), f_slope(window), x(window), term(window);
  std::vector<double> hs(window);  // the catalogue scores of the row's history items
  std::vector<char> keep(window);
  double loss = 0.0, d_c = 0.0, d_lam = 0.0, d_a = 0.0;
  const double minus_inf = -std::numeric_limits<double>::infinity();

  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t row = row_at[r], target = tgt[row];
    const float* xr = x_out + row * h;
    const int64_t* hr = hist + row * window;
    const double s_t = sc[row * cols + row];
    double pre = c;
    for (int64_t j = 0; j < h; ++j) pre += static_cast<double>(xr[j]) * w[j];
    const double g = pre > 20.0 ? pre : std::log1p(std::exp(pre));
    const double dg = 1.0 / (1.0 + std::exp(-pre));
    // the step's samples: log Z_a and E_q[s] (d log Z_a / d a)
    const float* sr = sc + row * cols + neg_begin;
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
      if (item == target) {
        count_t += power[l];
        slope_t += slope[l];
      }
      bool repeated = false;
      for (int64_t m = 0; m < l && !repeated; ++m) repeated = hr[m] == item;
      keep[l] = item >= 0 && !repeated;
      if (!keep[l]) continue;
      const float* e = emb + item * h;
      float dot = 0.0f;  // as the torch path's float32 product
      for (int64_t j = 0; j < h; ++j) dot += e[j] * xr[j];
      hs[l] = static_cast<double>(dot + bias[item]);
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
      term[l] = a * hs[l] + log_expm1(x[l]);
      const double hi = std::max(log_d, term[l]);
      log_d = hi + std::log(std::exp(log_d - hi) + std::exp(term[l] - hi));
    }
    const double f_t = std::log1p(count_t);
    loss += log_d - a * s_t - g * f_t;
    double da_r = std::exp(log_z - log_d) * mean_q - s_t;
    double dg_r = -f_t, dlam_r = -slope_t / (1.0 + count_t);
    for (int64_t l = 0; l < window; ++l) {
      if (!keep[l]) continue;
      const double pi = std::exp(a * hs[l] + x[l] - log_d);  // weight x d log(e^x - 1)/dx
      da_r += std::exp(term[l] - log_d) * hs[l];
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
