// Host-side check of the row math of csrc/kd_loss_cuda.cu (the functions the kernels call) against a
// float64 reference: both kernels' algorithms (block: strided chunks + merge tree; warp: exact maxima),
// many C, temperatures, teacher kinds, 1e4 logits, -inf teacher entries, the three divergences
// (forward_kl, reverse_kl, jsd with several beta). Run by .ci/check_cuda.sh and .ci/check_host_math.sh.
#include "kd_loss_cuda.cu"  // compiled with -DUED_FAST_KD_MATH_ONLY -Icsrc: the row math only
#include <cstdio>
#include <random>
#include <vector>
#include <algorithm>
using namespace ued_fast;

struct Case { int C; float T; int kind; bool tgt; float scale; int neg_inf; float alpha; int div; float beta; };  // neg_inf: 0 none, 1 every 3rd, 2 first 60%

static double ref_divergence;  // D of the last reference() call

static void reference(const std::vector<float>& s, const std::vector<float>& t, int y, const Case& c,
                      double& loss, std::vector<double>& g) {
  int C = c.C; double T = c.T; std::vector<double> a(C), b(C);
  for (int j = 0; j < C; ++j) { a[j] = (c.kind == 2 ? std::log((double)t[j]) : (double)t[j]) / T; b[j] = s[j] / T; }
  auto lse = [](const std::vector<double>& v) { double m = -INFINITY; for (double x : v) m = std::max(m, x);
    double z = 0; for (double x : v) z += std::exp(x - m); return m + std::log(z); };
  double la = lse(a), lb = lse(b); std::vector<double> sd(s.begin(), s.end()); double ls = lse(sd);
  // D and dD/dz per the kernel contract (docs/DESIGN.md 2), with 0 log 0 = 0; h: reverse_kl / jsd gradient factors, S = sum q h.
  double kl = 0, S = 0, beta = c.beta; std::vector<double> h(C, 0);
  for (int j = 0; j < C; ++j) {
    double lp = a[j] - la, lq = b[j] - lb, p = std::exp(lp), q = std::exp(lq);
    if (float(q) == 0.f) q = 0;  // where float32's q underflows, it is 0 (reverse_kl: no +inf from there)
    if (c.div == 0) { if (p > 0) kl += p * (lp - lq); }
    else if (c.div == 1) { if (q > 0) { kl += q * (lq - lp); h[j] = lq - lp; } }
    else { double m = beta * p + (1 - beta) * q, lm = std::log(m);
      if (beta * p > 0) kl += beta * p * (lp - lm);
      if ((1 - beta) * q > 0) { kl += (1 - beta) * q * (lq - lm); h[j] = (1 - beta) * (lq - lm); } }
    S += q * h[j];
  }
  ref_divergence = kl;
  double s2 = T * T; double ckl = c.tgt ? c.alpha * s2 : s2, cce = c.tgt ? 1 - c.alpha : 0;
  loss = ckl * kl + (c.tgt ? cce * (ls - s[y]) : 0);
  g.assign(C, 0);
  for (int j = 0; j < C; ++j) { double p = std::exp(a[j] - la), q = std::exp(b[j] - lb), r = std::exp(sd[j] - ls);
    double dd = c.div == 0 ? q - p : (q > 0 ? q * (h[j] - S) : 0);
    g[j] = ckl / T * dd + cce * (r - (j == y)); }
}

static KdParams params(const Case& c) {
  // The host's coefficients (docs/DESIGN.md 2, the kernel contract) and their base-2 scales, as kd_loss_fwd_cuda sets them.
  KdParams p{}; float T = c.T, s2 = T * T;
  p.n_cols = c.C; p.teacher_kind = c.kind; p.k_student = kLog2e / T; p.k_teacher = c.kind == 2 ? 1.f / T : kLog2e / T;
  p.target = c.tgt ? reinterpret_cast<const int64_t*>(1) : nullptr;  // only tested for null-ness by the math
  p.kd_coef = c.tgt ? c.alpha * s2 : s2; p.ce_coef = c.tgt ? 1 - c.alpha : 0; p.g_kd = p.kd_coef / T;
  p.divergence = c.div; p.beta = c.beta;
  return p;
}

// reverse_kl / jsd pass of both kernels: NT threads' strided partial sums, then a tree (the order of
// cuda::group_allreduce is immaterial at this tolerance).
static DivSums div_pass(const KdParams& p, const RowNorm& n, const std::vector<float>& s, const std::vector<float>& t,
                        int NT) {
  std::vector<DivSums> th(NT, DivSums{0.f, 0.f});
  if (p.divergence == 0) return th[0];
  for (int tid = 0; tid < NT; ++tid)
    for (size_t j = tid; j < s.size(); j += NT) accumulate_div(p, n, teacher_log_units(t[j], p.teacher_kind), s[j], th[tid]);
  for (int off = 1; off < NT; off *= 2)
    for (int i = 0; i + off < NT; i += 2 * off) th[i] = th[i] + th[i + off];
  return th[0];
}

// Block kernel's algorithm: SPLIT CTAs per row (a cluster), each with NT threads over its slice of
// vectors, chunks of UNROLL*VEC strided by NT; a merge tree per CTA, then the CTAs merged in rank order.
static float block_algo(const std::vector<float>& s, const std::vector<float>& t, int y, const Case& c,
                        std::vector<float>& g, int NT, int VEC, int UNROLL, int SPLIT = 1) {
  KdParams p = params(c); bool ce = c.tgt; int C = c.C; int nvec = C / VEC; int chunk = VEC * UNROLL;
  RowStats row_st = empty_stats();
  for (int part = 0; part < SPLIT; ++part) {
  const int v_begin = int(int64_t(nvec) * part / SPLIT), v_end = int(int64_t(nvec) * (part + 1) / SPLIT);
  std::vector<RowStats> th(NT, empty_stats());
  for (int tid = 0; tid < NT; ++tid) {
    RowStats st = empty_stats();
    for (int base = v_begin + tid; base < v_end; base += NT * UNROLL) {
      std::vector<float> cs(chunk), cu(chunk);
      for (int r = 0; r < UNROLL; ++r) { int i = base + r * NT;
        for (int k = 0; k < VEC; ++k) { if (i < v_end) { cs[r*VEC+k] = s[i*VEC+k]; cu[r*VEC+k] = teacher_log_units(t[i*VEC+k], c.kind); }
          else { cs[r*VEC+k] = -INFINITY; cu[r*VEC+k] = -INFINITY; } } }
      float mu = -INFINITY, ms = -INFINITY;
      for (int k = 0; k < chunk; ++k) { mu = fmaxf(mu, cu[k]); ms = fmaxf(ms, cs[k]); }
      if (mu > st.m_u || ms > st.m_s) rebase(st, fmaxf(st.m_u, mu), fmaxf(st.m_s, ms), p.k_teacher, p.k_student, ce);
      for (int k = 0; k < chunk; ++k) accumulate(st, cu[k], cs[k], p.k_teacher, p.k_student, ce);
    }
    th[tid] = st;
  }
  for (int off = 1; off < NT; off *= 2)  // butterfly-like tree
    for (int i = 0; i + off < NT; i += 2 * off) th[i] = merge(th[i], th[i + off], p.k_teacher, p.k_student, ce);
  row_st = merge(row_st, th[0], p.k_teacher, p.k_student, ce);
  }
  RowNorm n; float loss = finish_row(p, row_st, ce ? s[y] : 0.f, n);
  const DivSums div = div_pass(p, n, s, t, NT);
  loss += p.divergence == 0 ? 0.f : p.kd_coef * div.d;
  g.resize(C);
  for (int j = 0; j < C; ++j) g[j] = grad_element(p, n, teacher_log_units(t[j], c.kind), s[j], j == y, div.s);
  return loss;
}

// Warp kernel's algorithm (exact maxima, exponentials kept).
static float warp_algo(const std::vector<float>& s, const std::vector<float>& t, int y, const Case& c, std::vector<float>& g) {
  KdParams p = params(c); bool ce = c.tgt; int C = c.C;
  std::vector<float> u(C), ea(C), eb(C), es(C);
  float mu = -INFINITY, ms = -INFINITY;
  for (int j = 0; j < C; ++j) { u[j] = teacher_log_units(t[j], c.kind); mu = fmaxf(mu, u[j]); ms = fmaxf(ms, s[j]); }
  RowStats st{mu, 0, 0, ms, 0, 0};
  for (int j = 0; j < C; ++j) { float du = (u[j] - mu) * p.k_teacher, ds = s[j] - ms; bool zp = u[j] == -INFINITY;
    ea[j] = zp ? 0.f : exp2f(du); eb[j] = exp2f(ds * p.k_student); es[j] = ce ? exp2f(ds * kLog2e) : 0.f;
    st.z_a += ea[j]; st.w += zp ? 0.f : ea[j] * (du - ds * p.k_student); st.z_b += eb[j]; st.z_s += es[j]; }
  RowNorm n; float loss = finish_row(p, st, ce ? s[y] : 0.f, n);
  const DivSums div = div_pass(p, n, s, t, 32);
  loss += p.divergence == 0 ? 0.f : p.kd_coef * div.d;
  float ia = 1 / st.z_a, ib = 1 / st.z_b, is = ce ? 1 / st.z_s : 0; g.resize(C);
  for (int j = 0; j < C; ++j) {
    float v;
    if (p.divergence == 0) { v = p.g_kd * (eb[j] * ib - ea[j] * ia); if (ce) v += p.ce_coef * (es[j] * is - (j == y)); }
    else v = grad_element(p, n, u[j], s[j], j == y, div.s);
    g[j] = v; }
  return loss;
}

int main() {
  std::mt19937 rng(7); int fails = 0, n = 0;
  std::vector<Case> cases;
  for (int C : {1, 2, 7, 100, 1000, 4096, 32000})
    for (float T : {0.5f, 1.f, 4.f, 20.f})
      for (int kind : {0, 1, 2})
        for (bool tgt : {false, true})
          for (float scale : {3.f, 1e4f})
            for (int ninf : {0, 1, 2})
              for (int div : {0, 1, 2})
                for (float beta : {0.f, 0.3f, 1.f}) {
                  if (div != 2 && beta != 0.3f) continue;  // beta matters to jsd only
                  cases.push_back({C, T, kind, tgt, scale, ninf, tgt ? 0.5f : 0.9f, div, beta});
                }
  double worst_l = 0, worst_g = 0;
  for (auto& c : cases) {
    if (c.kind == 2 && c.scale > 10) continue;  // probs are in [0, 1]
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<float> s(c.C), t(c.C);
    for (int j = 0; j < c.C; ++j) { s[j] = nd(rng) * c.scale; t[j] = nd(rng) * c.scale; }
    if (c.kind == 1 || c.kind == 2) {  // make log-probs / probs
      double m = *std::max_element(t.begin(), t.end()), z = 0; for (float x : t) z += std::exp(x - m);
      for (auto& x : t) x = float(x - m - std::log(z)); if (c.kind == 2) for (auto& x : t) x = std::exp(x); }
    const float zero_p = c.kind == 2 ? 0.f : -INFINITY;  // probability 0: whole CTA slices of it when neg_inf == 2
    if (c.neg_inf == 1 && c.C > 1) for (int j = 0; j < c.C; j += 3) t[j] = zero_p;
    if (c.neg_inf == 2 && c.C > 1) for (int j = 0; j < c.C * 6 / 10; ++j) t[j] = zero_p;
    int y = c.tgt ? int(rng() % c.C) : -1;
    double rl; std::vector<double> rg; reference(s, t, y, c, rl, rg);
    // fp32 rounds q - p and r - 1 near 1 to an ulp of the gradient's natural scale: measure against that.
    double gmax = (c.tgt ? c.alpha * c.T : c.T) + (c.tgt ? 1 - c.alpha : 0); for (double v : rg) gmax = std::max(gmax, std::abs(v));
    std::vector<float> g;
    for (int algo = 0; algo < 4; ++algo) {
      if ((algo == 0 || algo == 3) && c.C % 4) continue;
      if (algo == 2 && c.C > 1024) continue;
      float l = algo == 0 ? block_algo(s, t, y, c, g, 64, 4, 2)
              : algo == 1 ? block_algo(s, t, y, c, g, 32, 1, 2)
              : algo == 2 ? warp_algo(s, t, y, c, g)
                          : block_algo(s, t, y, c, g, 16, 4, 2, 4);  // row split over 4 CTAs
      if (std::isinf(rl)) {  // reverse_kl where p = 0 < q: +inf, as the math says; the gradient is NaN
        if (!(l == rl)) { ++fails; printf("FAIL C=%d div=%d: loss %g, expected %g\n", c.C, c.div, l, rl); }
        ++n;
        continue;
      }
      double el = std::abs(l - rl) / std::max(1.0, std::abs(rl)), eg = 0;
      for (int j = 0; j < c.C; ++j) eg = std::max(eg, std::abs(g[j] - rg[j]) / gmax);
      // reverse_kl, jsd: q (h - S) cancels two terms of the size of D: one float32 ulp of D per unit of q.
      const double g_tol = 1e-4 + (c.div == 0 ? 0.0 : 1.2e-7 * std::abs(ref_divergence));
      if (!(el < 1e-4) || !(eg < g_tol)) { ++fails; if (fails < 15) printf("FAIL div=%d beta=%g C=%d T=%g kind=%d tgt=%d scale=%g ninf=%d algo=%d loss=%g ref=%g el=%g eg=%g\n", c.div, c.beta, c.C, c.T, c.kind, c.tgt, c.scale, c.neg_inf, algo, l, rl, el, eg); }
       if (el == el) worst_l = std::max(worst_l, el); if (eg == eg) worst_g = std::max(worst_g, eg); ++n;
    }
  }
  printf("%d checks, %d failures; worst loss rel err %.3g, worst grad err / max|grad| %.3g\n", n, fails, worst_l, worst_g);
  return fails != 0;
}
