// Host-side check of the reduction of csrc/ensemble_kd_loss_cuda.cu (push / combine, the functions
// the kernel calls) against float64: each thread pushes its strided columns, then the group's
// xor-shuffle tree and, past one warp, the cross-warp tree run exactly as group_maxsum does, for
// the three group sizes the launcher uses (32, 256, 1024 threads per row). Rows hold -inf entries
// (masked-out classes, zero-probability teachers) in several patterns. Run by .ci/check_host_math.sh.
#include "ensemble_kd_loss_cuda.cu"  // compiled with -DUED_FAST_ENS_MATH_ONLY -Icsrc: the math only
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>
using namespace ued_fast::ens_kd_cuda;

// group_maxsum's algorithm over TPR per-thread partials.
static MaxSum group_reduce(std::vector<MaxSum> v) {
  const int tpr = int(v.size());
  const int warp_width = std::min(tpr, 32);
  for (int off = warp_width / 2; off > 0; off >>= 1) {
    std::vector<MaxSum> next(v);
    for (int i = 0; i < tpr; ++i) next[i] = combine(v[i], v[i ^ off]);
    v = next;
  }
  if (tpr <= 32) return v[0];
  std::vector<MaxSum> lanes(32, MaxSum{-INFINITY, 0.f});
  for (int w = 0; w < tpr / 32; ++w) lanes[w] = v[w * 32];
  for (int off = 16; off > 0; off >>= 1) {
    std::vector<MaxSum> next(lanes);
    for (int i = 0; i < 32; ++i) next[i] = combine(lanes[i], lanes[i ^ off]);
    lanes = next;
  }
  return lanes[0];
}

// The kernel's sweep 1 over one row of x * scale: strided pushes, then the group reduction.
static MaxSum kernel_maxsum(const std::vector<float>& x, float scale, int tpr) {
  std::vector<MaxSum> partial(tpr, MaxSum{-INFINITY, 0.f});
  for (int tid = 0; tid < tpr; ++tid)
    for (size_t c = tid; c < x.size(); c += tpr) partial[tid] = push(partial[tid], x[c] * scale);
  return group_reduce(partial);
}

static double reference_lse(const std::vector<float>& x, double scale) {
  double m = -INFINITY;
  for (float v : x) m = std::max(m, v * scale);
  if (m == -INFINITY) return -INFINITY;
  double z = 0;
  for (float v : x) z += std::exp(v * scale - m);
  return m + std::log(z);
}

int main() {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.f, 1.f);
  int checks = 0, fails = 0;
  double worst = 0;
  // -inf patterns: 0 none, 1 every 3rd, 2 the first 60%, 3 all but the last, 4 the first only,
  // 5 all of them.
  for (int C : {1, 2, 7, 40, 300, 1024, 5000, 20000, 32000})
    for (float scale : {3.f, 1e4f})
      for (float inv_t : {1.f, 0.25f, 2.f})
        for (int pattern = 0; pattern < 6; ++pattern)
          for (int tpr : {32, 256, 1024}) {
            std::vector<float> x(C);
            for (auto& v : x) v = normal(rng) * scale;
            for (int j = 0; j < C; ++j) {
              const bool drop = (pattern == 1 && j % 3 == 0) || (pattern == 2 && j < C * 6 / 10) ||
                                (pattern == 3 && j < C - 1) || (pattern == 4 && j == 0 && C > 1) || pattern == 5;
              if (drop) x[j] = -INFINITY;
            }
            const MaxSum got = kernel_maxsum(x, inv_t, tpr);
            const double lse = double(got.m) + std::log(double(got.z));
            const double ref = reference_lse(x, inv_t);
            // A row of -inf only must give (-inf, 0): its log-sum is -inf, as in float64.
            const bool ok_empty = ref == -INFINITY && got.m == -INFINITY && got.z == 0.f;
            const double err = ref == -INFINITY ? 0.0 : std::abs(lse - ref) / std::max(1.0, std::abs(ref));
            ++checks;
            if (ref == -INFINITY ? !ok_empty : (!(err < 1e-5) || got.m != got.m || got.z != got.z)) {
              ++fails;
              if (fails <= 15)
                printf("FAIL C=%d scale=%g inv_t=%g pattern=%d tpr=%d: max %g sum %g lse %g, fp64 %g\n", C,
                       scale, inv_t, pattern, tpr, got.m, got.z, lse, ref);
            } else {
              worst = std::max(worst, err);
            }
          }
  printf("ensemble reduction: %d checks, %d failures; worst log-sum-exp rel err %.3g\n", checks, fails, worst);
  return fails != 0;
}
