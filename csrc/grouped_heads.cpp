// grouped_heads: K linear specialist heads over grouped features, assembled into C classes
// (DESIGN 2.3; spec: ued_fast/reference.py grouped_heads_reference). CPU kernels + op schemas.
//
// The cover reaches the kernels as tensors built once per cover (ued_fast/ops/grouped_heads.py):
//   cover_index  [K, W] int64: class of head k's output j, -1 for padding (and for 'other').
//   class_ptr    [C+1] int64, class_entries [nnz] int64: CSR table class c -> flat k*W + j of the
//                head outputs that hold it; count(c) = class_ptr[c+1] - class_ptr[c].
// mode 0 = logit_mean, 1 = prob_mean. Math in float32 (float64 for float64 inputs).
//
// grouped_heads_fwd -> (out [N, C] in the features' dtype, saved): saved is the head outputs
//   u [K, N, W] in the compute dtype for prob_mean (the backward reuses them), empty for logit_mean.
// grouped_heads_bwd -> (grad_features, grad_weight, grad_bias); an unrequested one is empty.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace ued_fast {
namespace {

constexpr int64_t kLogitMean = 0;
constexpr int64_t kProbMean = 1;

struct CoverTables {
  int64_t K, W, C;
  const int64_t* cover_index;
  const int64_t* class_ptr;
  const int64_t* class_entries;
  std::vector<int64_t> sizes;  // |S_k|: outputs j < sizes[k] are real classes
};

CoverTables read_tables(const at::Tensor& cover_index, const at::Tensor& class_ptr,
                        const at::Tensor& class_entries) {
  for (const auto* t : {&cover_index, &class_ptr, &class_entries}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->device().is_cpu(),
                "grouped_heads: cover tables must be contiguous int64 CPU tensors");
  }
  TORCH_CHECK(cover_index.dim() == 2 && class_ptr.dim() == 1 && class_ptr.size(0) >= 2,
              "grouped_heads: malformed cover tables");
  CoverTables tab{cover_index.size(0), cover_index.size(1), class_ptr.size(0) - 1,
                  cover_index.data_ptr<int64_t>(), class_ptr.data_ptr<int64_t>(),
                  class_entries.data_ptr<int64_t>(), {}};
  tab.sizes.resize(tab.K);
  for (int64_t k = 0; k < tab.K; ++k) {
    int64_t s = 0;
    while (s < tab.W && tab.cover_index[k * tab.W + s] >= 0) ++s;
    tab.sizes[k] = s;
  }
  return tab;
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// features [N, K*D] or [K, N, D] -> a [K, N, D] view (no copy).
at::Tensor heads_view(const at::Tensor& features, int64_t K, int64_t D) {
  return features.dim() == 3 ? features : features.unflatten(1, {K, D}).transpose(0, 1);
}

void check_inputs(const at::Tensor& features, const at::Tensor& weight, const CoverTables& tab) {
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == tab.K && weight.size(2) == tab.W,
              "grouped_heads: weight must be [K, D, W] matching cover_index [K, W]");
  const int64_t D = weight.size(1);
  TORCH_CHECK((features.dim() == 2 && features.size(1) == tab.K * D) ||
                  (features.dim() == 3 && features.size(0) == tab.K && features.size(2) == D),
              "grouped_heads: features must be [N, K*D] or [K, N, D]");
}

// The logit_mean map as one block-structured matrix: M[k, d, c] = W[k, d, j] / count(c) where head
// k's output j is class c, and b_eff[c] = mean of the covering heads' biases. Cheap: [K*D, C].
template <typename scalar_t>
void build_block_matrix(const CoverTables& tab, const scalar_t* w, const scalar_t* b, int64_t D,
                        scalar_t* m, scalar_t* b_eff) {
  const int64_t K = tab.K, W = tab.W, C = tab.C;
  std::fill(b_eff, b_eff + C, scalar_t(0));
  at::parallel_for(0, K * D, 64, [&](int64_t begin, int64_t end) {
    for (int64_t kd = begin; kd < end; ++kd) {
      const int64_t k = kd / D;
      scalar_t* row = m + kd * C;
      std::fill(row, row + C, scalar_t(0));
      for (int64_t j = 0; j < tab.sizes[k]; ++j) {
        const int64_t c = tab.cover_index[k * W + j];
        row[c] = w[kd * W + j] / scalar_t(tab.class_ptr[c + 1] - tab.class_ptr[c]);
      }
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < tab.sizes[k]; ++j) {
      const int64_t c = tab.cover_index[k * W + j];
      b_eff[c] += b[k * W + j] / scalar_t(tab.class_ptr[c + 1] - tab.class_ptr[c]);
    }
  }
}

// Per row n of u [K, N, W]: log q of every head's real outputs (j <= |S_k|) into lq [K*W], and
// log r_c (before the final renormalization) into lr [C]. Everything in log space.
template <typename scalar_t>
void row_log_probs(const CoverTables& tab, const scalar_t* u, int64_t N, int64_t n, scalar_t* lq,
                   scalar_t* lr) {
  const int64_t W = tab.W;
  for (int64_t k = 0; k < tab.K; ++k) {
    const scalar_t* uk = u + (k * N + n) * W;
    const int64_t real = tab.sizes[k] + 1;  // its classes and 'other'
    scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t j = 0; j < real; ++j) mx = std::max(mx, uk[j]);
    scalar_t s = 0;
    for (int64_t j = 0; j < real; ++j) s += std::exp(uk[j] - mx);
    const scalar_t lse = mx + std::log(s);
    for (int64_t j = 0; j < real; ++j) lq[k * W + j] = uk[j] - lse;
  }
  for (int64_t c = 0; c < tab.C; ++c) {
    const int64_t e0 = tab.class_ptr[c], e1 = tab.class_ptr[c + 1];
    scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t e = e0; e < e1; ++e) mx = std::max(mx, lq[tab.class_entries[e]]);
    scalar_t s = 0;
    for (int64_t e = e0; e < e1; ++e) s += std::exp(lq[tab.class_entries[e]] - mx);
    lr[c] = mx + std::log(s / scalar_t(e1 - e0));
  }
}

template <typename scalar_t>
scalar_t log_sum_exp(const scalar_t* x, int64_t n) {
  scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i]);
  scalar_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - mx);
  return mx + std::log(s);
}

std::tuple<at::Tensor, at::Tensor> grouped_heads_fwd_cpu(
    const at::Tensor& features, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& cover_index, const at::Tensor& class_ptr, const at::Tensor& class_entries,
    int64_t mode) {
  const CoverTables tab = read_tables(cover_index, class_ptr, class_entries);
  check_inputs(features, weight, tab);
  TORCH_CHECK(mode == kLogitMean || mode == kProbMean, "grouped_heads: mode must be 0 or 1");
  const auto cd = compute_type(features.scalar_type());
  const int64_t K = tab.K, D = weight.size(1), W = tab.W, C = tab.C;
  const int64_t N = features.dim() == 2 ? features.size(0) : features.size(1);
  const at::Tensor h = features.to(cd);
  const at::Tensor w = weight.to(cd).contiguous();
  const at::Tensor b = bias.to(cd).contiguous();

  if (mode == kLogitMean) {
    // Linear: one GEMM against the block-structured matrix is the fastest CPU form (measured).
    at::Tensor m = at::empty({K, D, C}, w.options());
    at::Tensor b_eff = at::empty({C}, w.options());
    AT_DISPATCH_FLOATING_TYPES(cd, "grouped_heads_block_matrix", [&] {
      build_block_matrix<scalar_t>(tab, w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), D,
                                   m.data_ptr<scalar_t>(), b_eff.data_ptr<scalar_t>());
    });
    at::Tensor z;
    if (h.dim() == 2) {
      z = at::addmm(b_eff, h, m.view({K * D, C}));
    } else {
      z = at::addmm(b_eff, h[0], m[0]);
      for (int64_t k = 1; k < K; ++k) z.addmm_(h[k], m[k]);
    }
    return {z.to(features.scalar_type()), at::empty({0}, w.options())};
  }

  // prob_mean: the K head GEMMs as one batched GEMM, then the log-space assembly per row.
  const at::Tensor u = at::baddbmm(b.unsqueeze(1), heads_view(h, K, D), w);  // [K, N, W]
  at::Tensor out = at::empty({N, C}, w.options());
  AT_DISPATCH_FLOATING_TYPES(cd, "grouped_heads_prob_mean_fwd", [&] {
    const scalar_t* u_ptr = u.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> lq(K * W);
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* lr = out_ptr + n * C;
        row_log_probs<scalar_t>(tab, u_ptr, N, n, lq.data(), lr);
        const scalar_t z = log_sum_exp(lr, C);
        for (int64_t c = 0; c < C; ++c) lr[c] -= z;
      }
    });
  });
  return {out.to(features.scalar_type()), u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_heads_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& saved, const at::Tensor& cover_index, const at::Tensor& class_ptr,
    const at::Tensor& class_entries, int64_t mode, bool need_features, bool need_params) {
  const CoverTables tab = read_tables(cover_index, class_ptr, class_entries);
  check_inputs(features, weight, tab);
  const auto cd = compute_type(features.scalar_type());
  const int64_t K = tab.K, D = weight.size(1), W = tab.W, C = tab.C;
  const int64_t N = features.dim() == 2 ? features.size(0) : features.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == C,
              "grouped_heads: grad_out must be [N, C]");
  const at::Tensor g = grad_out.to(cd).contiguous();
  const at::Tensor w = weight.to(cd);
  if (mode == kProbMean) {
    TORCH_CHECK(saved.dim() == 3 && saved.size(0) == K && saved.size(1) == N && saved.size(2) == W &&
                    saved.scalar_type() == cd && saved.is_contiguous(),
                "grouped_heads: prob_mean backward needs the forward's head outputs [K, N, W]");
  }

  // gu [K, N, W]: the gradient with respect to every head output (0 on padding).
  at::Tensor gu = at::empty({K, N, W}, g.options());
  AT_DISPATCH_FLOATING_TYPES(cd, "grouped_heads_bwd_assembly", [&] {
    const scalar_t* g_ptr = g.data_ptr<scalar_t>();
    scalar_t* gu_ptr = gu.data_ptr<scalar_t>();
    if (mode == kLogitMean) {
      at::parallel_for(0, N, 32, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          for (int64_t k = 0; k < K; ++k) {
            scalar_t* guk = gu_ptr + (k * N + n) * W;
            for (int64_t j = 0; j < W; ++j) {
              const int64_t c = j < tab.sizes[k] ? tab.cover_index[k * W + j] : -1;
              guk[j] = c < 0 ? scalar_t(0)
                             : g_ptr[n * C + c] / scalar_t(tab.class_ptr[c + 1] - tab.class_ptr[c]);
            }
          }
        }
      });
      return;
    }
    const scalar_t* u_ptr = saved.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> lq(K * W), lr(C), glq(K * W);
      for (int64_t n = begin; n < end; ++n) {
        row_log_probs<scalar_t>(tab, u_ptr, N, n, lq.data(), lr.data());
        const scalar_t z = log_sum_exp(lr.data(), C);
        const scalar_t* gn = g_ptr + n * C;
        scalar_t g_sum = 0;
        for (int64_t c = 0; c < C; ++c) g_sum += gn[c];
        // out_c = lr_c - z: d/d lr_c = g_c - softmax(lr)_c * sum g. lr_c = log mean_k q_k[c]:
        // d lr_c / d lq_kj = q_kj / sum of the covering q's = exp(lq_kj - lr_c - log count(c)).
        std::fill(glq.begin(), glq.end(), scalar_t(0));
        for (int64_t c = 0; c < C; ++c) {
          const int64_t e0 = tab.class_ptr[c], e1 = tab.class_ptr[c + 1];
          const scalar_t g_lr = gn[c] - std::exp(lr[c] - z) * g_sum;
          const scalar_t log_total = lr[c] + std::log(scalar_t(e1 - e0));
          for (int64_t e = e0; e < e1; ++e) {
            const int64_t kj = tab.class_entries[e];
            glq[kj] = g_lr * std::exp(lq[kj] - log_total);
          }
        }
        // lq = u - logsumexp(u over the head's real outputs): gu = glq - q * sum(glq).
        for (int64_t k = 0; k < K; ++k) {
          const int64_t real = tab.sizes[k] + 1;
          scalar_t s = 0;
          for (int64_t j = 0; j < real; ++j) s += glq[k * W + j];
          scalar_t* guk = gu_ptr + (k * N + n) * W;
          for (int64_t j = 0; j < real; ++j) guk[j] = glq[k * W + j] - std::exp(lq[k * W + j]) * s;
          for (int64_t j = real; j < W; ++j) guk[j] = 0;
        }
      }
    });
  });

  at::Tensor grad_features = at::empty({0}, features.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  at::Tensor grad_bias = at::empty({0}, weight.options());
  if (need_features) {
    // Padding columns may hold anything (even NaN): zero them so 0 * garbage cannot leak.
    std::vector<int64_t> real(tab.sizes);
    for (auto& r : real) r += mode == kProbMean ? 1 : 0;
    const at::Tensor pad = at::arange(W, cover_index.options()).view({1, 1, W}) >=
                           at::tensor(real, cover_index.options()).view({K, 1, 1});
    at::Tensor gh = at::bmm(gu, w.masked_fill(pad, 0).transpose(1, 2));  // [K, N, D]
    grad_features = features.dim() == 3 ? gh.to(features.scalar_type())
                                        : gh.transpose(0, 1).reshape({N, K * D}).to(features.scalar_type());
  }
  if (need_params) {
    const at::Tensor h = heads_view(features.to(cd), K, D);
    grad_weight = at::bmm(h.transpose(1, 2), gu).to(weight.scalar_type());  // [K, D, W]
    grad_bias = gu.sum(1).to(weight.scalar_type());                          // [K, W]
  }
  return {grad_features, grad_weight, grad_bias};
}

}  // namespace
}  // namespace ued_fast

TORCH_LIBRARY_FRAGMENT(ued_fast, m) {
  m.def(
      "grouped_heads_fwd(Tensor features, Tensor weight, Tensor bias, Tensor cover_index, "
      "Tensor class_ptr, Tensor class_entries, int mode) -> (Tensor, Tensor)");
  m.def(
      "grouped_heads_bwd(Tensor grad_out, Tensor features, Tensor weight, Tensor saved, "
      "Tensor cover_index, Tensor class_ptr, Tensor class_entries, int mode, bool need_features, "
      "bool need_params) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ued_fast, CPU, m) {
  m.impl("grouped_heads_fwd", &ued_fast::grouped_heads_fwd_cpu);
  m.impl("grouped_heads_bwd", &ued_fast::grouped_heads_bwd_cpu);
}
