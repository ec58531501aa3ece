// grouped_heads: K linear specialist heads over grouped features, assembled into C classes
// (DESIGN 2.3; spec: ued_fast/reference.py grouped_heads_reference). CPU kernels + op schemas.
//
// The cover reaches the kernels as tensors built once per cover (ued_fast/ops/grouped_heads.py):
//   cover_index  [K, W] int64: class of head k's output j, -1 for padding (and for 'other').
//   class_ptr    [C+1] int64, class_entries [nnz] int64: CSR table class c -> flat k*W + j of the
//                head outputs that hold it; count(c) = class_ptr[c+1] - class_ptr[c].
// mode 0 = logit_mean, 1 = prob_mean. Math in float32 (float64 for float64 inputs).
//
// grouped_heads_fwd -> (out [N, C] in the features' dtype, saved): for prob_mean, saved is every
//   head's log-softmax over its real outputs (the backward needs log q, so it never recomputes the
//   heads' logsumexps), empty for logit_mean. The CPU kernels keep it transposed, [K, W, N] in the
//   compute dtype (-inf on padding): with few outputs per head, MKL computes W^T h^T several times
//   faster than h W (measured), and the gradient GEMMs read the same layout.
// grouped_heads_bwd -> (grad_features, grad_weight, grad_bias); an unrequested one is empty.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_vec.h"
#include "utils.h"

#include <algorithm>
#include <bit>
#include <cstdint>
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



void check_inputs(const at::Tensor& features, const at::Tensor& weight, const CoverTables& tab) {
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == tab.K && weight.size(2) == tab.W,
              "grouped_heads: weight must be [K, D, W] matching cover_index [K, W]");
  const int64_t D = weight.size(1);
  TORCH_CHECK((features.dim() == 2 && features.size(1) == tab.K * D) ||
                  (features.dim() == 3 && features.size(0) == tab.K && features.size(2) == D),
              "grouped_heads: features must be [N, K*D] or [K, N, D]");
}

// prob_mean runs on blocks of kLanes rows: in the [K, W, N] layout a block's values of one head
// output are contiguous, so every inner loop below runs over contiguous lanes and vectorizes.
constexpr int64_t kLanes = 16;

using cpu::lane_exp;  // the lane loops below vectorize with it (see cpu_vec.h)

// Rows n0..n0+B of lq_t [K, W, N] (log q of every head output) -> lr [C][kLanes] = log r_c and
// z [kLanes] = logsumexp over c of lr (the output is lr - z). A class held by one head (most of them)
// costs no exp/log.
template <typename scalar_t>
void block_class_log_r(const CoverTables& tab, const scalar_t* lq_t, int64_t N, int64_t n0, int64_t B,
                       const scalar_t* log_count, scalar_t* lr, scalar_t* z) {
  scalar_t mx[kLanes], s[kLanes];
  for (int64_t c = 0; c < tab.C; ++c) {
    const int64_t e0 = tab.class_ptr[c], e1 = tab.class_ptr[c + 1];
    scalar_t* lrc = lr + c * kLanes;
    if (e1 - e0 == 1) {
      const scalar_t* q = lq_t + tab.class_entries[e0] * N + n0;
      for (int64_t i = 0; i < B; ++i) lrc[i] = q[i];
      continue;
    }
    for (int64_t i = 0; i < B; ++i) mx[i] = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t e = e0; e < e1; ++e) {
      const scalar_t* q = lq_t + tab.class_entries[e] * N + n0;
      for (int64_t i = 0; i < B; ++i) mx[i] = std::max(mx[i], q[i]);
    }
    for (int64_t i = 0; i < B; ++i) s[i] = 0;
    for (int64_t e = e0; e < e1; ++e) {
      const scalar_t* q = lq_t + tab.class_entries[e] * N + n0;
      for (int64_t i = 0; i < B; ++i) s[i] += lane_exp(q[i] - mx[i]);
    }
    for (int64_t i = 0; i < B; ++i) lrc[i] = mx[i] + std::log(s[i]) - log_count[c];
  }
  for (int64_t i = 0; i < B; ++i) mx[i] = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t c = 0; c < tab.C; ++c) {
    for (int64_t i = 0; i < B; ++i) mx[i] = std::max(mx[i], lr[c * kLanes + i]);
  }
  for (int64_t i = 0; i < B; ++i) s[i] = 0;
  for (int64_t c = 0; c < tab.C; ++c) {
    for (int64_t i = 0; i < B; ++i) s[i] += lane_exp(lr[c * kLanes + i] - mx[i]);
  }
  for (int64_t i = 0; i < B; ++i) z[i] = mx[i] + std::log(s[i]);
}

// Rows n0..n0+B of uT [K, W, N]: each head's log-softmax over its real outputs (j <= |S_k|), in
// place (uT becomes lq_t; padding becomes -inf).
template <typename scalar_t>
void block_head_log_softmax(const CoverTables& tab, scalar_t* u_t, int64_t N, int64_t n0, int64_t B) {
  const int64_t W = tab.W;
  scalar_t mx[kLanes], s[kLanes];
  for (int64_t k = 0; k < tab.K; ++k) {
    scalar_t* uk = u_t + k * W * N + n0;  // output j of the block at uk[j * N + i]
    const int64_t real = tab.sizes[k] + 1;  // its classes and 'other'
    for (int64_t i = 0; i < B; ++i) mx[i] = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t j = 0; j < real; ++j) {
      for (int64_t i = 0; i < B; ++i) mx[i] = std::max(mx[i], uk[j * N + i]);
    }
    for (int64_t i = 0; i < B; ++i) s[i] = 0;
    for (int64_t j = 0; j < real; ++j) {
      for (int64_t i = 0; i < B; ++i) s[i] += lane_exp(uk[j * N + i] - mx[i]);
    }
    for (int64_t i = 0; i < B; ++i) mx[i] += std::log(s[i]);
    for (int64_t j = 0; j < real; ++j) {
      for (int64_t i = 0; i < B; ++i) uk[j * N + i] -= mx[i];
    }
    for (int64_t j = real; j < W; ++j) {
      for (int64_t i = 0; i < B; ++i) uk[j * N + i] = -std::numeric_limits<scalar_t>::infinity();
    }
  }
}

template <typename scalar_t>
std::vector<scalar_t> log_counts(const CoverTables& tab) {
  std::vector<scalar_t> out(tab.C);
  for (int64_t c = 0; c < tab.C; ++c) out[c] = std::log(scalar_t(tab.class_ptr[c + 1] - tab.class_ptr[c]));
  return out;
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
  const auto cd = acc_dtype(features.scalar_type());
  const int64_t K = tab.K, D = weight.size(1), C = tab.C;
  const int64_t N = features.dim() == 2 ? features.size(0) : features.size(1);
  const at::Tensor h = features.to(cd);
  const at::Tensor w = weight.to(cd).contiguous();
  const at::Tensor b = bias.to(cd).contiguous();

  if (mode == kLogitMean) {
    // The K head GEMMs (uT = W^T h^T), then z[:, c] = mean of the covering rows of uT plus biases.
    // Measured faster at every USTE shape than one GEMM on the block-structured [K*D, C] matrix
    // (that matrix is mostly zeros: K times the FLOPs; see bench/results/cpu_grouped_heads.md).
    at::Tensor u = at::bmm(w.transpose(1, 2).contiguous(), heads_view(h, K, D).transpose(1, 2));  // [K, W, N]
    at::Tensor z_t = at::empty({C, N}, w.options());
    AT_DISPATCH_FLOATING_TYPES(cd, "grouped_heads_logit_mean_assembly", [&] {
      const scalar_t* u_ptr = u.data_ptr<scalar_t>();  // head output kj = k*W + j of row n at kj*N + n
      const scalar_t* b_ptr = b.data_ptr<scalar_t>();
      scalar_t* z_ptr = z_t.data_ptr<scalar_t>();
      at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const int64_t e0 = tab.class_ptr[c], e1 = tab.class_ptr[c + 1];
          scalar_t* zc = z_ptr + c * N;
          const int64_t first = tab.class_entries[e0];
          scalar_t bias_sum = b_ptr[first];
          std::copy(u_ptr + first * N, u_ptr + (first + 1) * N, zc);
          for (int64_t e = e0 + 1; e < e1; ++e) {
            const int64_t kj = tab.class_entries[e];
            const scalar_t* uk = u_ptr + kj * N;
            for (int64_t n = 0; n < N; ++n) zc[n] += uk[n];
            bias_sum += b_ptr[kj];
          }
          const scalar_t inv = scalar_t(1) / scalar_t(e1 - e0);
          for (int64_t n = 0; n < N; ++n) zc[n] = (zc[n] + bias_sum) * inv;
        }
      });
    });
    return {z_t.t().contiguous().to(features.scalar_type()), at::empty({0}, w.options())};
  }
  // prob_mean: the K head GEMMs as one batched GEMM (transposed: uT = W^T h^T + b), then the
  // log-space assembly per row.
  at::Tensor u = at::bmm(w.transpose(1, 2).contiguous(), heads_view(h, K, D).transpose(1, 2));
  u.add_(b.unsqueeze(2));  // [K, W, N]
  at::Tensor out = at::empty({N, C}, w.options());
  AT_DISPATCH_FLOATING_TYPES(cd, "grouped_heads_prob_mean_fwd", [&] {
    scalar_t* u_ptr = u.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const std::vector<scalar_t> log_count = log_counts<scalar_t>(tab);
    const int64_t blocks = (N + kLanes - 1) / kLanes;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> lr(C * kLanes);
      scalar_t z[kLanes];
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t n0 = blk * kLanes, B = std::min(kLanes, N - n0);
        block_head_log_softmax<scalar_t>(tab, u_ptr, N, n0, B);
        block_class_log_r<scalar_t>(tab, u_ptr, N, n0, B, log_count.data(), lr.data(), z);
        for (int64_t i = 0; i < B; ++i) {
          scalar_t* out_n = out_ptr + (n0 + i) * C;
          for (int64_t c = 0; c < C; ++c) out_n[c] = lr[c * kLanes + i] - z[i];
        }
      }
    });
  });
  return {out.to(features.scalar_type()), u};  // u now holds log q [K, W, N]
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_heads_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& saved, const at::Tensor& cover_index, const at::Tensor& class_ptr,
    const at::Tensor& class_entries, int64_t mode, bool need_features, bool need_params) {
  const CoverTables tab = read_tables(cover_index, class_ptr, class_entries);
  check_inputs(features, weight, tab);
  const auto cd = acc_dtype(features.scalar_type());
  const int64_t K = tab.K, D = weight.size(1), W = tab.W, C = tab.C;
  const int64_t N = features.dim() == 2 ? features.size(0) : features.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == C,
              "grouped_heads: grad_out must be [N, C]");
  const at::Tensor g = grad_out.to(cd).contiguous();
  const at::Tensor w = weight.to(cd);
  if (mode == kProbMean) {
    TORCH_CHECK(saved.dim() == 3 && saved.size(0) == K && saved.size(1) == W && saved.size(2) == N &&
                    saved.scalar_type() == cd && saved.is_contiguous(),
                "grouped_heads: prob_mean backward needs the forward's head log-probabilities [K, W, N]");
  }

  // guT [K, W, N]: the gradient with respect to every head output (0 on padding).
  at::Tensor gu = at::empty({K, W, N}, g.options());
  AT_DISPATCH_FLOATING_TYPES(cd, "grouped_heads_bwd_assembly", [&] {
    const scalar_t* g_ptr = g.data_ptr<scalar_t>();
    scalar_t* gu_ptr = gu.data_ptr<scalar_t>();
    if (mode == kLogitMean) {
      // guT[k, j, :] = g[:, c] / count(c): contiguous rows from g transposed once.
      const at::Tensor g_t = g.t().contiguous();
      const scalar_t* gt_ptr = g_t.data_ptr<scalar_t>();
      at::parallel_for(0, K * W, 1, [&](int64_t begin, int64_t end) {
        for (int64_t kj = begin; kj < end; ++kj) {
          const int64_t k = kj / W, j = kj % W;
          scalar_t* guk = gu_ptr + kj * N;
          const int64_t c = j < tab.sizes[k] ? tab.cover_index[kj] : -1;
          if (c < 0) {
            std::fill(guk, guk + N, scalar_t(0));
            continue;
          }
          const scalar_t inv = scalar_t(1) / scalar_t(tab.class_ptr[c + 1] - tab.class_ptr[c]);
          const scalar_t* gc = gt_ptr + c * N;
          for (int64_t n = 0; n < N; ++n) guk[n] = gc[n] * inv;
        }
      });
      return;
    }
    const scalar_t* lq_ptr = saved.data_ptr<scalar_t>();
    const std::vector<scalar_t> log_count = log_counts<scalar_t>(tab);
    const int64_t blocks = (N + kLanes - 1) / kLanes;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> lr(C * kLanes), glq(K * W * kLanes);
      scalar_t z[kLanes], g_sum[kLanes], g_lr[kLanes], s[kLanes];
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t n0 = blk * kLanes, B = std::min(kLanes, N - n0);
        block_class_log_r<scalar_t>(tab, lq_ptr, N, n0, B, log_count.data(), lr.data(), z);
        for (int64_t i = 0; i < B; ++i) {
          const scalar_t* gn = g_ptr + (n0 + i) * C;
          scalar_t acc = 0;
          for (int64_t c = 0; c < C; ++c) acc += gn[c];
          g_sum[i] = acc;
        }
        // out_c = lr_c - z: d/d lr_c = g_c - softmax(lr)_c * sum g. lr_c = log mean_k q_k[c]:
        // d lr_c / d lq_kj = q_kj / sum of the covering q's = exp(lq_kj - lr_c - log count(c)).
        std::fill(glq.begin(), glq.end(), scalar_t(0));
        for (int64_t c = 0; c < C; ++c) {
          const int64_t e0 = tab.class_ptr[c], e1 = tab.class_ptr[c + 1];
          const scalar_t* lrc = lr.data() + c * kLanes;
          for (int64_t i = 0; i < B; ++i) {
            g_lr[i] = g_ptr[(n0 + i) * C + c] - lane_exp(lrc[i] - z[i]) * g_sum[i];
          }
          if (e1 - e0 == 1) {
            scalar_t* out = glq.data() + tab.class_entries[e0] * kLanes;
            for (int64_t i = 0; i < B; ++i) out[i] = g_lr[i];
            continue;
          }
          for (int64_t e = e0; e < e1; ++e) {
            const int64_t kj = tab.class_entries[e];
            const scalar_t* q = lq_ptr + kj * N + n0;
            scalar_t* out = glq.data() + kj * kLanes;
            for (int64_t i = 0; i < B; ++i) out[i] = g_lr[i] * lane_exp(q[i] - lrc[i] - log_count[c]);
          }
        }
        // lq = u - logsumexp(u over the head's real outputs): gu = glq - q * sum(glq).
        for (int64_t k = 0; k < K; ++k) {
          const int64_t real = tab.sizes[k] + 1;
          for (int64_t i = 0; i < B; ++i) s[i] = 0;
          for (int64_t j = 0; j < real; ++j) {
            const scalar_t* gq = glq.data() + (k * W + j) * kLanes;
            for (int64_t i = 0; i < B; ++i) s[i] += gq[i];
          }
          for (int64_t j = 0; j < W; ++j) {
            const int64_t kj = k * W + j;
            scalar_t* guk = gu_ptr + kj * N + n0;
            if (j >= real) {
              for (int64_t i = 0; i < B; ++i) guk[i] = 0;
              continue;
            }
            const scalar_t* q = lq_ptr + kj * N + n0;
            const scalar_t* gq = glq.data() + kj * kLanes;
            for (int64_t i = 0; i < B; ++i) guk[i] = gq[i] - lane_exp(q[i]) * s[i];
          }
        }
      }
    });
  });

  auto [grad_features, grad_weight, grad_bias] = empty_head_grads(features, weight);
  if (need_features) {
    // Padding columns may hold anything (even NaN): zero them so 0 * garbage cannot leak.
    std::vector<int64_t> real(tab.sizes);
    for (auto& r : real) r += mode == kProbMean ? 1 : 0;
    const at::Tensor pad = at::arange(W, cover_index.options()).view({1, W, 1}) >=
                           at::tensor(real, cover_index.options()).view({K, 1, 1});
    const at::Tensor w_t = w.transpose(1, 2).masked_fill(pad, 0);  // [K, W, D]
    if (features.dim() == 3) {
      grad_features = at::bmm(gu.transpose(1, 2), w_t).to(features.scalar_type());  // [K, N, D]
    } else {
      // Each head's GEMM writes its column block of [N, K*D] in place (no transpose copy).
      at::Tensor gf = at::empty({N, K * D}, g.options());
      for (int64_t k = 0; k < K; ++k) {
        at::Tensor block = gf.narrow(1, k * D, D);
        at::mm_out(block, gu[k].t(), w_t[k]);
      }
      grad_features = gf.to(features.scalar_type());
    }
  }
  if (need_params) {
    const at::Tensor h = heads_view(features.to(cd), K, D);
    grad_weight = at::bmm(gu, h).transpose(1, 2).contiguous().to(weight.scalar_type());  // [K, D, W]
    grad_bias = gu.sum(2).to(weight.scalar_type());                                       // [K, W]
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
