// Host-side check of csrc/sparse_kd_loss_cuda.cu's algorithm against a dense float64 reference written
// from docs/DESIGN.md 2.5 (the kernel contract): the kernel's own per-thread functions run for NT simulated threads
// (strided VEC-wide vectors, the warps' running pointers into the sorted support, the reductions'
// merge trees), then the (k+1)-category row math and the gradient writer. Random rows over: the three
// divergences (jsd with beta 0, 0.3, 1), 'rest' -inf or finite, no target / target / ignored, inv_t 1
// and != 1, padding entries, k = 1 and k = C, C not a multiple of NT or VEC, clustered and spread supports,
// 1e4 logits, a student mass off the support of ~1e-30, zero-probability live entries, bad indices and
// targets (NaN rows). Run by .ci/check_host_math.sh.
#include "sparse_kd_loss_cuda.cu"  // compiled with -DUED_FAST_SPARSE_MATH_ONLY -Icsrc: the row math only

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>
using namespace ued_fast;

constexpr int64_t kIgnore = -100;

struct Case {
  int C, k, npad;
  bool clustered;  // live indices contiguous, else spread at random
  int div;
  float beta, inv_t;
  int tgt;         // 0 none, 1 target, 2 ignored, 3 out of range
  float scale;     // student logit scale
  bool rest_inf;   // teacher 'rest' -inf (convention 'zero')
  int tiny_off;    // student mass off the support: 0 O(1), 1 ~1e-30, 2 below float32's range (q_rest = 0)
  bool zero_p;     // one live entry with p = 0
  int bad_idx;     // 0 none, 1 an index >= C, 2 an index < -1
};

struct Row {
  std::vector<float> s, lp;   // student [C], teacher log p [k + 1]
  std::vector<int64_t> idx;   // [k]
  int64_t y;
};

static SparseParams params(const Case& c) {
  SparseParams p{};
  p.n_cols = c.C;
  p.k = c.k;
  p.ignore_index = kIgnore;
  p.divergence = c.div;
  p.with_ce = c.tgt != 0;
  p.separate_ce = p.with_ce && c.inv_t != 1.f;
  p.k_student = static_cast<float>(kLog2e * double(c.inv_t));
  p.kd_coef = 1.3f;
  p.ce_coef = p.with_ce ? 0.4f : 0.f;
  p.g_kd = static_cast<float>(double(p.kd_coef) * c.inv_t);
  p.beta = c.beta;
  return p;
}

// ---- float64 reference, dense, from the contract's formulas ----
struct Ref {
  double loss, D, lq_scale;  // lq_scale: the largest |log q| or |log p| of a category with mass
  std::vector<double> g;
};

static Ref reference(const Case& c, const Row& r, const SparseParams& p) {
  const int C = c.C, k = c.k;
  Ref out{};
  const int status = target_status(p, r.y);
  bool bad = false;
  for (int64_t i : r.idx) bad |= i < -1 || i >= C;
  if (status == 1 || status == 2 || bad) {
    const double fill = status == 1 ? 0.0 : NAN;  // an ignored row reads nothing else, not even its indices
    out.loss = fill;
    out.g.assign(C, fill);
    return out;
  }
  std::vector<double> z(C), sd(C);
  std::vector<char> live(C, 0);
  for (int j = 0; j < C; ++j) { z[j] = double(r.s[j]) * double(c.inv_t); sd[j] = r.s[j]; }
  for (int64_t i : r.idx) if (i >= 0) live[i] = 1;
  auto lse = [&](const std::vector<double>& v, bool off_only) -> double {
    double m = -INFINITY;
    for (int j = 0; j < C; ++j) if (!off_only || !live[j]) m = std::max(m, v[j]);
    if (m == -INFINITY) return -INFINITY;
    double sum = 0;
    for (int j = 0; j < C; ++j) if (!off_only || !live[j]) sum += std::exp(v[j] - m);
    return m + std::log(sum);
  };
  const double lse_z = lse(z, false), lse_off = lse(z, true), lse_s = lse(sd, false);
  // categories a < k, then 'rest'
  std::vector<double> lq(k + 1), h(k + 1, 0.0);
  for (int a = 0; a < k; ++a) lq[a] = r.idx[a] < 0 ? -INFINITY : z[r.idx[a]] - lse_z;
  lq[k] = lse_off - lse_z;
  double D = 0, H = 0, beta = c.beta;
  out.lq_scale = 0;
  for (int a = 0; a <= k; ++a) {
    const double lp = r.lp[a], pp = std::exp(lp);
    double q = std::exp(lq[a]);
    if (float(q) == 0.f) q = 0;  // where float32's q underflows it is 0 (no +inf from there)
    if (pp > 0) out.lq_scale = std::max(out.lq_scale, std::abs(lp));
    if (q > 0) out.lq_scale = std::max(out.lq_scale, std::abs(lq[a]));
    double d = 0;
    if (c.div == 0) {
      d = pp > 0 ? pp * (lp - lq[a]) : 0;
      h[a] = -pp;
    } else if (c.div == 1) {
      d = q > 0 ? q * (lq[a] - lp) : 0;
      h[a] = q > 0 ? q * (lq[a] - lp + 1) : 0;
    } else {
      const double lm = std::log(beta * pp + (1 - beta) * q);
      d = (beta * pp > 0 ? beta * pp * (lp - lm) : 0) + ((1 - beta) * q > 0 ? (1 - beta) * q * (lq[a] - lm) : 0);
      h[a] = (1 - beta) * q > 0 ? (1 - beta) * q * (lq[a] - lm) : 0;
    }
    D += d;
    H += h[a];
  }
  out.D = D;
  out.loss = double(p.kd_coef) * D + (p.with_ce ? double(p.ce_coef) * (lse_s - sd[r.y]) : 0.0);
  std::vector<int> entry(C, -1);
  for (int a = 0; a < k; ++a) if (r.idx[a] >= 0) entry[r.idx[a]] = a;
  out.g.assign(C, 0);
  for (int j = 0; j < C; ++j) {
    const double q = std::exp(z[j] - lse_z);
    const double G = entry[j] >= 0 ? h[entry[j]] - q * H : h[k] * std::exp(z[j] - lse_off) - q * H;
    double g = double(p.kd_coef) * c.inv_t * G;
    if (p.with_ce) g += double(p.ce_coef) * (std::exp(sd[j] - lse_s) - (j == r.y ? 1.0 : 0.0));
    out.g[j] = g;
  }
  return out;
}

// ---- the kernel's algorithm, NT simulated threads ----
// cuda::group_allreduce: a butterfly within each warp (merge is commutative: every lane ends equal), the
// warps' results then combined by one more butterfly (identity past the last warp).
template <typename T, typename F>
static T block_allreduce(std::vector<T> v, F combine, T identity) {
  const int nt = int(v.size());
  auto butterfly = [&](std::vector<T>& w, int base) {
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      std::vector<T> next(w.begin() + base, w.begin() + base + kWarp);
      for (int l = 0; l < kWarp; ++l) next[l] = combine(w[base + l], w[base + (l ^ off)]);
      std::copy(next.begin(), next.end(), w.begin() + base);
    }
  };
  for (int w = 0; w < nt / kWarp; ++w) butterfly(v, w * kWarp);
  if (nt <= kWarp) return v[0];
  std::vector<T> warps(kWarp, identity);
  for (int w = 0; w < nt / kWarp; ++w) warps[w] = v[w * kWarp];
  butterfly(warps, 0);
  return warps[0];
}

// The simulated loads and stores, as __host__ __device__ functors over plain arrays: the kernel's
// host+device sweeps call them (nvcc flags host-only callables there). The loads count reads outside the
// row in *bad (and return NaN there).
template <int VEC>
struct HostLoad {
  const float* s;
  int64_t n;
  int* bad;
  __host__ __device__ void operator()(int64_t i, float (&out)[VEC]) const {
    for (int v = 0; v < VEC; ++v) {
      const int64_t j = i * VEC + v;
      const bool inside = j >= 0 && j < n;
      *bad += !inside;
      out[v] = inside ? s[j] : NAN;
    }
  }
};
struct HostValue {
  const float* s;
  int64_t n;
  int* bad;
  __host__ __device__ float operator()(int64_t col) const {
    const bool inside = col >= 0 && col < n;
    *bad += !inside;
    return inside ? s[col] : NAN;
  }
};
template <int VEC>
struct HostStore {  // counts the writes of each column
  float* g;
  char* written;
  __host__ __device__ void operator()(int64_t i, const float (&gv)[VEC]) const {
    for (int v = 0; v < VEC; ++v) { g[i * VEC + v] = gv[v]; ++written[i * VEC + v]; }
  }
};

// bad_access: the student's reads outside the row, plus the gradient columns not written exactly once.
template <int VEC>
static float simulate(const Case& c, const Row& r, const SparseParams& p, int NT, std::vector<float>& g,
                      int& bad_access) {
  bad_access = 0;
  const int64_t C = c.C, n_vec = C / VEC;
  g.assign(C, 0.f);
  int status = target_status(p, r.y);
  if (status == 0) {
    for (int64_t a = 0; a < c.k; ++a)
      if (bad_index(p, r.idx[a])) status = 2;
  }
  if (status != 0) {
    const float fill = status == 1 ? 0.f : NAN;
    std::fill(g.begin(), g.end(), fill);
    return fill;
  }
  const int64_t* idx = r.idx.data();
  const float* log_p = r.lp.data();
  const HostLoad<VEC> load{r.s.data(), C, &bad_access};
  std::vector<SparseStats> stats(NT);
  for (int tid = 0; tid < NT; ++tid) stats[tid] = thread_stats<VEC>(p, idx, n_vec, tid, NT, load);
  const SparseStats row_st = block_allreduce(stats, MergeSparseStats{p.k_student, p.separate_ce}, empty_sparse_stats());
  const SparseNorm n = finish_stats(p, row_st);
  const HostValue s_at{r.s.data(), C, &bad_access};
  std::vector<DivSums> sums(NT);
  for (int tid = 0; tid < NT; ++tid) sums[tid] = thread_categories(p, n, idx, log_p, tid, NT, s_at);
  const DivSums entries = block_allreduce(sums, [](DivSums a, DivSums b) { return a + b; }, DivSums{0.f, 0.f});
  const RowTerms t = row_terms(p, n, entries, log_p[c.k]);
  const float loss = row_loss_value(p, n, t, p.with_ce ? s_at(r.y) : 0.f);
  std::vector<char> written(C, 0);
  const HostStore<VEC> store{g.data(), written.data()};
  for (int tid = 0; tid < NT; ++tid) thread_grad<VEC>(p, n, t, idx, log_p, n_vec, tid, NT, r.y, load, store);
  for (int64_t j = 0; j < C; ++j) bad_access += written[j] != 1;  // every column once (VEC divides C)
  return loss;
}

// ---- random rows ----
static Row make_row(const Case& c, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  Row r;
  const int live = c.k - c.npad;
  std::vector<int64_t> cols;
  if (c.clustered) {
    const int start = int(rng() % (c.C - live + 1));
    for (int i = 0; i < live; ++i) cols.push_back(start + i);
  } else {
    std::vector<int64_t> all(c.C);
    for (int j = 0; j < c.C; ++j) all[j] = j;
    for (int i = 0; i < live; ++i) std::swap(all[i], all[i + rng() % (c.C - i)]);
    cols.assign(all.begin(), all.begin() + live);
    std::sort(cols.begin(), cols.end());
  }
  r.idx.assign(c.npad, -1);
  r.idx.insert(r.idx.end(), cols.begin(), cols.end());
  // student: on the support O(scale); off it 70 or 120 nats lower in z when tiny_off
  r.s.resize(c.C);
  std::vector<char> on(c.C, 0);
  for (int64_t j : cols) on[j] = 1;
  for (int j = 0; j < c.C; ++j) {
    r.s[j] = nd(rng) * c.scale;
    if (c.tiny_off && !on[j]) r.s[j] = nd(rng) - (c.tiny_off == 1 ? 70.f : 120.f) / c.inv_t;
  }
  // teacher: random logits over the live entries and 'rest', normalized
  std::vector<double> u(c.k + 1, -INFINITY);
  for (int a = c.npad; a < c.k; ++a) u[a] = 2.0 * nd(rng);
  if (c.zero_p && live > 1) u[c.npad + int(rng() % live)] = -INFINITY;
  if (!c.rest_inf) u[c.k] = 2.0 * nd(rng);
  double m = -INFINITY, z = 0;
  for (double x : u) m = std::max(m, x);
  for (double x : u) z += x == -INFINITY ? 0 : std::exp(x - m);
  r.lp.resize(c.k + 1);
  for (int a = 0; a <= c.k; ++a) r.lp[a] = u[a] == -INFINITY ? -INFINITY : float(u[a] - m - std::log(z));
  if (c.bad_idx == 1) r.idx[rng() % c.k] = c.C + int(rng() % 3);
  if (c.bad_idx == 2) r.idx[rng() % c.k] = -2 - int(rng() % 3);
  r.y = c.tgt == 0 ? -1 : c.tgt == 1 ? int64_t(rng() % c.C) : c.tgt == 2 ? kIgnore : c.C + 1;
  return r;
}

static float run_kernel_algo(const Case& c, const Row& r, const SparseParams& p, int NT, int VEC, std::vector<float>& g,
                             int& bad_access) {
  return VEC == 1 ? simulate<1>(c, r, p, NT, g, bad_access)
       : VEC == 4 ? simulate<4>(c, r, p, NT, g, bad_access) : simulate<8>(c, r, p, NT, g, bad_access);
}

int main() {
  std::mt19937 rng(11);
  int n_checks = 0, n_fail = 0, n_rows = 0;
  double worst_l = 0, worst_g = 0, worst_g_small = 0, worst_g_ratio = 0;  // small: logits O(1); ratio: err / tolerance
  int n_inf = 0, n_nan = 0, n_tiny = 0, n_kc = 0;
  const struct { int div; float beta; } divs[] = {{0, 0.f}, {1, 0.f}, {2, 0.f}, {2, 0.3f}, {2, 1.f}};
  for (int C : {1, 2, 7, 64, 100, 1000, 4096, 4097, 20000}) {
    std::vector<int> ks = {1, std::min(5, C), std::min(64, C)};
    if (C <= 4097) ks.push_back(C);
    if (C == 20000) ks.push_back(2000);
    for (int k : ks)
      for (bool padded : {false, true})
        for (bool clustered : {false, true})
          for (auto dv : divs)
            for (int draw = 0; draw < 12; ++draw) {
              Case c{};
              c.C = C; c.k = k; c.npad = padded && k > 1 ? 1 + int(rng() % (k / 2 + 1)) : 0;
              c.npad = std::min(c.npad, k - 1);
              c.clustered = clustered; c.div = dv.div; c.beta = dv.beta;
              c.inv_t = draw % 2 ? 1.f : (draw % 4 == 0 ? 0.4f : 2.5f);
              c.tgt = int(rng() % 3);
              c.scale = rng() % 3 == 0 ? 1e4f : 3.f;
              c.rest_inf = rng() % 2;
              c.tiny_off = rng() % 4 == 0 ? 1 + int(rng() % 2) : 0;
              c.zero_p = rng() % 4 == 0;
              c.bad_idx = rng() % 25 == 0 ? 1 + int(rng() % 2) : 0;
              if (rng() % 40 == 0) c.tgt = 3;
              const SparseParams p = params(c);
              const Row r = make_row(c, rng);
              const Ref ref = reference(c, r, p);
              ++n_rows;
              n_inf += std::isinf(ref.loss);
              n_nan += std::isnan(ref.loss);
              n_tiny += c.tiny_off && c.k - c.npad < C;
              n_kc += c.k - c.npad == C;
              // the kernel's configurations: NT from C, VEC 16 bytes of float / 2-byte dtypes or 1; and NT = 64
              const int nt = C <= kSmallRowMaxClasses ? kSmallRowThreads : kLargeRowThreads;
              const int configs[][2] = {{nt, 1}, {nt, 4}, {nt, 8}, {64, 1}};
              for (const auto& cfg : configs) {
                const int NT = cfg[0], VEC = cfg[1];
                if (C % VEC) continue;
                std::vector<float> g;
                int bad_access;
                const float l = run_kernel_algo(c, r, p, NT, VEC, g, bad_access);
                ++n_checks;
                bool ok;
                double el = 0, eg = 0;
                if (!std::isfinite(ref.loss)) {  // NaN rows, or +inf (p > 0 = q, q > 0 = p): the same value
                  ok = std::isnan(ref.loss) ? std::isnan(l) : l == ref.loss;
                } else {
                  el = std::abs(l - ref.loss) / std::max(1.0, std::abs(ref.loss));
                  ok = el < 5e-6;
                  worst_l = std::max(worst_l, el);
                }
                if (std::isnan(ref.loss)) {
                  for (float v : g) ok = ok && std::isnan(v);
                } else if (std::all_of(ref.g.begin(), ref.g.end(), [](double v) { return std::isfinite(v); })) {
                  // the gradient's natural scale: its coefficients (|G| <= 1 for forward_kl), or its largest entry
                  double gmax = double(p.kd_coef) * c.inv_t + p.ce_coef;
                  for (double v : ref.g) gmax = std::max(gmax, std::abs(v));
                  for (int j = 0; j < C; ++j) {
                    const double e = std::abs(g[j] - ref.g[j]) / gmax;
                    eg = std::isnan(e) ? INFINITY : std::max(eg, e);  // a NaN gradient is the worst error
                  }
                  // h carries log q - log p (reverse_kl, jsd): float32 rounds it at eps * |log q|
                  const double g_tol = 2e-6 + 1e-7 * ref.lq_scale;
                  ok = ok && eg < g_tol;
                  worst_g = std::max(worst_g, eg);
                  worst_g_ratio = std::max(worst_g_ratio, eg / g_tol);
                  if (c.scale < 10) worst_g_small = std::max(worst_g_small, eg);
                }
                ok = ok && bad_access == 0;
                if (!ok) {
                  ++n_fail;
                  if (n_fail <= 20)
                    printf("FAIL C=%d k=%d npad=%d clustered=%d div=%d beta=%g inv_t=%g tgt=%d scale=%g rest_inf=%d "
                           "tiny_off=%d zero_p=%d bad_idx=%d NT=%d VEC=%d: loss %.9g ref %.9g (el %.3g) grad err %.3g\n",
                           c.C, c.k, c.npad, c.clustered, c.div, c.beta, c.inv_t, c.tgt, c.scale, c.rest_inf,
                           c.tiny_off, c.zero_p, c.bad_idx, NT, VEC, l, ref.loss, el, eg);
                  if (bad_access) printf("  %d out-of-row reads or columns not written once\n", bad_access);
                }
              }
            }
  }
  // Unsorted or duplicate indices: any result, but no read outside the row and every column written once.
  int n_unsorted = 0;
  for (int C : {7, 100, 1000, 4096, 20000})
    for (int draw = 0; draw < 40; ++draw) {
      Case c{};
      c.C = C; c.k = std::min(C, 1 + int(rng() % 300)); c.npad = c.k > 1 ? int(rng() % 3) % c.k : 0;
      c.clustered = draw % 2; c.div = draw % 3; c.beta = 0.3f; c.inv_t = draw % 4 ? 1.f : 0.4f;
      c.tgt = int(rng() % 2); c.scale = 3.f; c.rest_inf = false;
      const SparseParams p = params(c);
      Row r = make_row(c, rng);
      if (draw % 3 == 0) std::shuffle(r.idx.begin(), r.idx.end(), rng);             // unsorted, padding anywhere
      else r.idx[rng() % c.k] = r.idx[c.k - 1 - int(rng() % std::max(1, c.k / 2))];  // a duplicate (maybe padding)
      if (c.k > 1 && draw % 3 == 1) std::sort(r.idx.begin(), r.idx.end());          // sorted, with a duplicate
      const int nt = C <= kSmallRowMaxClasses ? kSmallRowThreads : kLargeRowThreads;
      for (int VEC : {1, 4, 8}) {
        if (C % VEC) continue;
        std::vector<float> g;
        int bad_access;
        run_kernel_algo(c, r, p, nt, VEC, g, bad_access);
        ++n_unsorted;
        ++n_checks;
        if (bad_access) {
          ++n_fail;
          printf("FAIL unsorted/duplicate indices C=%d k=%d VEC=%d: %d out-of-row reads or columns not written once\n",
                 C, c.k, VEC, bad_access);
        }
      }
    }
  printf("sparse_kd_loss: %d runs with unsorted or duplicate indices (checked: no read outside the row, every "
         "column written once)\n", n_unsorted);
  printf("sparse_kd_loss: %d rows (%d +inf, %d NaN, %d tiny off-support mass, %d k = C), %d checks, %d failures; "
         "worst loss rel err %.3g, worst grad err / max|grad| %.3g (logits O(1): %.3g; at most %.2f of the tolerance)\n",
         n_rows, n_inf, n_nan, n_tiny, n_kc, n_checks, n_fail, worst_l, worst_g, worst_g_small, worst_g_ratio);
  return n_fail != 0;
}
