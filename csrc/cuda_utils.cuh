// Device helpers shared by the CUDA kernels: element conversion to and from float, the fast exp/log
// of the kernels (libm on the host, so that the row math can be checked there against float64:
// .ci/*_math_check.cu), the per-element terms of the reverse_kl and jsd divergences, and 16-byte vector
// loads and stores. No torch headers (the host checks include it without them).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace c10 {
struct BFloat16;
struct Half;
}  // namespace c10

namespace ued_fast {
namespace cuda {

// The CUDA storage type of a c10 dtype (what dispatch_float in utils.h hands over).
template <typename T> struct device_type { using type = T; };
template <> struct device_type<c10::BFloat16> { using type = __nv_bfloat16; };
template <> struct device_type<c10::Half> { using type = __half; };

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- element conversion ----
__host__ __device__ __forceinline__ float to_float(float x) { return x; }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__host__ __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __host__ __device__ __forceinline__ T from_float(float x);
template <> __host__ __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __host__ __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// exp and log of the kernels: the fast intrinsics on the device, libm on the host.
#ifdef __CUDA_ARCH__
#define UED_FAST_DEVICE_OR_HOST(device_fn, host_fn) device_fn
#else
#define UED_FAST_DEVICE_OR_HOST(device_fn, host_fn) host_fn
#endif
__host__ __device__ __forceinline__ float fast_exp(float x) { return UED_FAST_DEVICE_OR_HOST(__expf, std::exp)(x); }
__host__ __device__ __forceinline__ float fast_log(float x) { return UED_FAST_DEVICE_OR_HOST(__logf, std::log)(x); }

// Element terms of the divergences that need log p and log q per element (reverse_kl, jsd), given
// p, q and their logs (0 * log 0 = 0 on every side; the float twin of cpu::divergence_terms).
// Returns the element's share of D; h is its factor of the gradient, dD/dz_j = q_j (h_j - sum_c q_c h_c):
//   reverse_kl: d = q (log q - log p), h = log q - log p
//   jsd:        d = beta p (log p - log m) + (1-beta) q (log q - log m), h = (1-beta)(log q - log m)
// h is 0 where q = 0 (that element has no gradient).
__host__ __device__ __forceinline__ float log_ratio_terms(bool jsd, float beta, float p, float log_p, float q,
                                                         float log_q, float& h) {
  if (!jsd) {
    const float r = log_q - log_p;
    h = q == 0.f ? 0.f : r;
    return q == 0.f ? 0.f : q * r;
  }
  // A side of weight 0 (beta or 1-beta, or a zero probability) counts nowhere, even where m = 0.
  const float bp = beta * p, oq = (1.f - beta) * q;
  const float log_m = fast_log(bp + oq);
  h = oq == 0.f ? 0.f : (1.f - beta) * (log_q - log_m);
  return (bp == 0.f ? 0.f : bp * (log_p - log_m)) + (oq == 0.f ? 0.f : oq * (log_q - log_m));
}

// (D, S = sum_j q_j h_j) of a row or part of one, summed by the reductions (reverse_kl, jsd).
struct DivSums {
  float d, s;
  __host__ __device__ __forceinline__ DivSums operator+(const DivSums& o) const { return {d + o.d, s + o.s}; }
};

// ---- vector loads and stores (device only) ----
// Raw storage of N elements of T moved in one instruction (N * sizeof(T) in {2, 4, 8, 16} bytes).
template <int BYTES> struct RawVec;
template <> struct RawVec<2> { using type = unsigned short; };
template <> struct RawVec<4> { using type = unsigned int; };
template <> struct RawVec<8> { using type = uint2; };
template <> struct RawVec<16> { using type = uint4; };

template <typename T, int N>
union Pack {
  using Raw = typename RawVec<N * sizeof(T)>::type;
  Raw raw;
  T v[N];
};

// Load N consecutive elements (ptr aligned to N * sizeof(T)) as floats. STREAM: last use of the data (evict-first).
template <typename T, int N, bool STREAM = false>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[N]) {
  Pack<T, N> pk;
  using Raw = typename Pack<T, N>::Raw;
  if constexpr (STREAM) {
    pk.raw = __ldcs(reinterpret_cast<const Raw*>(ptr));
  } else {
    pk.raw = __ldg(reinterpret_cast<const Raw*>(ptr));
  }
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_float(pk.v[k]);
}

// Store N floats as consecutive elements of T, streaming (written once, not re-read by the kernel).
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* ptr, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int k = 0; k < N; ++k) pk.v[k] = from_float<T>(in[k]);
  __stcs(reinterpret_cast<typename Pack<T, N>::Raw*>(ptr), pk.raw);
}

}  // namespace cuda
}  // namespace ued_fast
