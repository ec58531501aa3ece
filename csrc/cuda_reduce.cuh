// Warp and thread-group reductions shared by the CUDA kernels. Any trivially copyable T made of 4-byte
// words (float, double, structs of floats) is shuffled word by word; `combine` is any associative
// __device__ callable (SumOp, MaxOp, or a kernel's merge of running statistics).
#pragma once

#include <cstdint>
#include <cstring>

namespace ued_fast {
namespace cuda {

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const { return a + b; }
};

struct MaxOp {  // fmaxf / fmax for float / double: a NaN operand yields the other one
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const { return max(a, b); }
};

template <typename T>
__device__ __forceinline__ T shfl_xor(const T& v, int offset) {
  static_assert(sizeof(T) % 4 == 0, "shfl_xor: T must be made of 4-byte words");
  constexpr int kWords = sizeof(T) / 4;
  uint32_t w[kWords];
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], offset);
  T out;
  memcpy(&out, w, sizeof(T));
  return out;
}

// Butterfly all-reduce over groups of WIDTH (a power of two <= 32) consecutive lanes: every lane of
// a group ends with the group's result.
template <int WIDTH = 32, typename T, typename F>
__device__ __forceinline__ T warp_allreduce(T v, F combine) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off >>= 1) v = combine(v, shfl_xor(v, off));
  return v;
}

// All-reduce over a group of TPR threads: a warp or part of one (TPR <= 32), or the whole block
// (TPR = blockDim.x, a multiple of 32, at most 1024; every thread of the block must call it). scratch:
// shared memory for TPR/32 values of T, reused by consecutive calls.
template <int TPR, typename T, typename F>
__device__ __forceinline__ T group_allreduce(T v, F combine, T identity, T* scratch) {
  v = warp_allreduce<(TPR < 32 ? TPR : 32)>(v, combine);
  if constexpr (TPR > 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // scratch may still be read by the previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = warp_allreduce<32>(lane < TPR / 32 ? scratch[lane] : identity, combine);
  }
  return v;
}

}  // namespace cuda
}  // namespace ued_fast
