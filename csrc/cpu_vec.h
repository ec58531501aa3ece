// Vector helpers of the C++ CPU kernels, on ATen's Vectorized<T>. ONE vector-ISA strategy: the one
// setup.py selects with -march and CPU_CAPABILITY (AVX2+FMA by default on x86-64; see
// _cpu_arch_flags there), so Vectorized has that width in every kernel; check_cpu_supports_build()
// turns a CPU without that ISA into a clear error at the op's entry.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace ued_fast {
namespace cpu {

using at::vec::Vectorized;

// Accumulation type of a storage type: double for double, float otherwise.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline void check_cpu_supports_build() {
#if defined(__AVX2__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  TORCH_CHECK(ok, "ued_fast._C was built for AVX2+FMA (x86-64-v3) but this CPU lacks them; rebuild with "
                  "UED_FAST_CPU_ARCH=x86-64 (see setup.py)");
#endif
#if defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  TORCH_CHECK(ok512, "ued_fast._C was built for AVX-512 but this CPU lacks it; rebuild with "
                     "UED_FAST_CPU_ARCH=x86-64-v3 (see setup.py)");
#endif
}

// exp of a vector. float: exp_u20, an inline polynomial (~2e-6 relative error, far below the
// tolerance of float32 softmax sums, ~3x faster than exp), 0 for x < ln(FLT_MIN) and for -inf.
template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// Scalar exp for loops the compiler vectorizes itself (arguments <= 0, i.e. x - max). float: a
// Cephes-style polynomial (rel. error ~1e-7) with no float compare, which vectorizes (std::exp does
// not without -ffast-math, nor does a float clamp without -fno-trapping-math); arguments below -87
// give ~1e-38 rather than 0, which no sum can tell apart. Not for x > 88. double uses std::exp.
template <typename T>
inline T lane_exp(T x) {
  return std::exp(x);
}
template <>
inline float lane_exp<float>(float x) {
  // x = max(x, -87) as an integer compare on the bits (a float one would not vectorize): for x <= 0
  // a larger bit pattern is a more negative number (-inf and negative NaN clamp too).
  const uint32_t x_bits = std::bit_cast<uint32_t>(x);
  x = std::bit_cast<float>(x_bits > 0xC2AE0000u ? 0xC2AE0000u : x_bits);  // 0xC2AE0000 = -87.0f
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // in [-ln2/2, ln2/2]
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n as float bits; the integer clamp keeps the exponent field valid for very negative x.
  const int32_t bits = (std::clamp(static_cast<int32_t>(n), -126, 127) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

template <typename acc_t>
inline acc_t max_nan(acc_t x, acc_t y) {
  return (x != x || x > y) ? x : y;  // NaN wins, so a NaN input gives a NaN loss
}

// Reduction of a vector's lanes with f, in lane order.
template <typename acc_t, typename F>
inline acc_t hreduce(const Vectorized<acc_t>& v, F f) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  acc_t lanes[V];
  v.store(lanes);
  acc_t r = lanes[0];
  for (int64_t k = 1; k < V; ++k) r = f(r, lanes[k]);
  return r;
}

// Horizontal max (NaN wins) and sum of a vector's lanes.
template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  return hreduce(v, max_nan<acc_t>);
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  return hreduce(v, [](acc_t a, acc_t b) { return a + b; });
}

// Max of x[0, padded), padded a multiple of the vector width.
template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t padded) {
  using Vec = Vectorized<acc_t>;
  Vec m(-std::numeric_limits<acc_t>::infinity());
  for (int64_t j = 0; j < padded; j += Vec::size()) m = at::vec::maximum(m, Vec::loadu(x + j));
  return hmax(m);
}

// Columns rounded up to whole vectors.
template <typename acc_t>
inline int64_t padded_size(int64_t n) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  return (n + V - 1) / V * V;
}

// src[0, n) converted to the accumulation type into dst.
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else if constexpr (std::is_same_v<acc_t, float> && at::vec::is_reduced_floating_point_v<scalar_t>) {
    constexpr int64_t V = Vectorized<float>::size();
    int64_t j = 0;
    for (; j + V <= n; j += V) {
      Vectorized<float> v;
      at::vec::load_to_float(src + j, v);
      v.store(dst + j);
    }
    for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
  }
}

// n <= lanes values from p as one vector of the accumulation type, padded with -inf (probability 0).
template <typename acc_t, typename scalar_t>
inline Vectorized<acc_t> load_padded(const scalar_t* p, int64_t n) {
  using V = Vectorized<acc_t>;
  constexpr int L = V::size();
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (n == L) return V::loadu(p);
    return V::set(V(-std::numeric_limits<acc_t>::infinity()), V::loadu(p, n), n);
  }
  alignas(64) acc_t buf[L];
  for (int j = 0; j < L; ++j) buf[j] = j < n ? static_cast<acc_t>(p[j]) : -std::numeric_limits<acc_t>::infinity();
  return V::loadu(buf);
}

// The first n lanes of v, converted to scalar_t, to p.
template <typename acc_t, typename scalar_t>
inline void store_partial(const Vectorized<acc_t>& v, scalar_t* p, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    v.store(p, n);
  } else {
    alignas(64) acc_t buf[Vectorized<acc_t>::size()];
    v.store(buf);
    for (int64_t j = 0; j < n; ++j) p[j] = static_cast<scalar_t>(buf[j]);
  }
}

// In-place log of n values, a vector at a time.
template <typename acc_t>
inline void log_inplace(acc_t* x, int64_t n) {
  using V = Vectorized<acc_t>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    V::loadu(x + i, m).log().store(x + i, m);
  }
}

// The gradient G[0, C) (G = grad_row when the dtypes match, else scratch converted into grad_row).
template <typename student_t, typename acc_t>
inline acc_t* grad_target(student_t* grad_row, acc_t* scratch) {
  if constexpr (std::is_same_v<student_t, acc_t>) {
    return grad_row;
  } else {
    return scratch;
  }
}

template <typename student_t, typename acc_t>
inline void finish_grad(acc_t* G, student_t* grad_row, int64_t C) {
  if constexpr (!std::is_same_v<student_t, acc_t>) at::vec::convert(G, grad_row, C);
}

// Element terms of the divergences that need log p and log q per element (reverse_kl, jsd), given
// p, q and their logs (0 * log 0 = 0 on every side). Returns the element's share of D; h is the
// element's factor of the gradient, dD/dz_j = q_j (h_j - sum_c q_c h_c):
//   reverse_kl: d = q (log q - log p), h = log q - log p          (sum_c q_c h_c = D)
//   jsd:        d = beta p (log p - log m) + (1-beta) q (log q - log m), h = (1-beta)(log q - log m)
// h is 0 where q = 0 (that element has no gradient); then sum_c q_c h_c is D's q side.
template <typename acc_t>
inline Vectorized<acc_t> divergence_terms(bool jsd, const Vectorized<acc_t>& beta, const Vectorized<acc_t>& one_m_beta,
                                          const Vectorized<acc_t>& p, const Vectorized<acc_t>& log_p,
                                          const Vectorized<acc_t>& q, const Vectorized<acc_t>& log_q,
                                          Vectorized<acc_t>& h) {
  using V = Vectorized<acc_t>;
  const V zero(0);
  if (!jsd) {
    const V r = log_q - log_p;
    h = V::blendv(r, zero, q == zero);
    return V::blendv(q * r, zero, q == zero);
  }
  // A side of weight 0 (beta or 1-beta, or a zero probability) counts nowhere, even where m = 0.
  const V bp = beta * p, oq = one_m_beta * q;
  const V log_m = (bp + oq).log();
  h = V::blendv(one_m_beta * (log_q - log_m), zero, oq == zero);
  return V::blendv(bp * (log_p - log_m), zero, bp == zero) + V::blendv(oq * (log_q - log_m), zero, oq == zero);
}

}  // namespace cpu
}  // namespace ued_fast
