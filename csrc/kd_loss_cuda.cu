// CUDA backend of ued_fast::kd_loss_fwd (arguments and semantics: docs/DESIGN.md 2 (the kernel contract); schema: csrc/kd_loss.cpp).
//
// Per row i, with u the teacher in "log units" (logits and log_probs: u = t; probs: u = log2 t, so
// that a zero probability is u = -inf), p = softmax of the tempered teacher,
// q = softmax(s * inv_student_temp), r = softmax(s):
//   row_loss = kd_coef * D(p, q) + ce_coef * CE(s, y)
//   grad     = kd_coef * inv_student_temp * dD/dz + ce_coef * (r - onehot(y))
// (the coefficients arrive computed on the host; ce_coef is 0 without a target).
//
// Everything is kept relative to the row maxima m_u (teacher) and m_s (student), in base 2:
//   z_a = sum 2^{(u-m_u)kA},  z_b = sum 2^{(s-m_s)kB},  z_s = sum 2^{(s-m_s)log2e},
//   w   = sum 2^{(u-m_u)kA} * ((u-m_u)kA - (s-m_s)kB)        (terms with p = 0 skipped: 0 log 0 = 0)
//   forward_kl = ln2 * (w/z_a - log2 z_a + log2 z_b),   CE = (m_s - s_y) + ln2 * log2 z_s
// kA = log2e*inv_teacher_temp for logits/log_probs and inv_teacher_temp for probs (u already in log2),
// kB = log2e*inv_student_temp. Differences to the maxima are taken before scaling, so 1e4-sized logits
// lose no precision. reverse_kl and jsd: once the row's normalizers are known, one more pass forms
// log p, log q per element (cuda::log_ratio_terms) and reduces D and S = sum q h; the gradient pass
// writes kd_coef * inv_student_temp * q (h - S) (forward_kl: (q - p)).
//
// Two kernels:
//  * warp per row (C <= kWarpMaxClasses): the row lives in registers; exact maxima first, then the
//    exponentials once (kept in registers for the gradient): 3 exp2 per element.
//  * block per row (larger C): one pass with an online (running-max) softmax, 16-byte loads when
//    every row is aligned, block reduction, then a second pass that re-reads the row (expected to
//    hit L2, see bench/NOTES.md) and writes the gradient: 6 exp2 per element. reverse_kl and jsd
//    read the row once more (and never split it over a cluster).
// No host synchronization, no allocation besides the outputs: safe inside CUDA graphs.
// UED_FAST_KD_MATH_ONLY: keep only the row math (host+device), for a host-side check of the formulas.
#ifndef UED_FAST_KD_MATH_ONLY
#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#ifndef UED_FAST_KD_MATH_ONLY
#include <cooperative_groups.h>

#include "cuda_reduce.cuh"
#include "utils.h"
#endif
#include "codes.h"
#include "cuda_utils.cuh"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <mutex>
#include <tuple>

namespace ued_fast {
namespace {

// ---- launch-configuration knobs (tune on the H100, record outcomes in bench/NOTES.md) ----
constexpr int kWarpRowsPerBlock = 4;      // warp kernel: rows (warps) per block
constexpr int kWarpMaxClasses = 1024;     // C up to this uses the warp kernel (32 classes per lane max)
constexpr int kBlockThreads = 512;        // block kernel: threads per row
constexpr int kBlockMinBlocksPerSm = 2;   // __launch_bounds__ hint: 2 rows resident per SM (L2 re-read set)
constexpr int kBlockUnroll = 2;           // block kernel: vectors loaded per thread before use
// Long rows (sm_90+): split a row over a cluster of up to kMaxRowSplit CTAs (stats merged through
// distributed shared memory) until the rows resident at once take at most kL2ResidentFraction of
// L2, so that pass 2's re-read hits L2 instead of DRAM.
constexpr int kMaxRowSplit = 8;
constexpr double kL2ResidentFraction = 0.5;

using cuda::from_float;
using cuda::kLn2;
using cuda::kLog2e;
using cuda::load_vec;
using cuda::store_vec;
using cuda::to_float;

// Teacher value in log units: logits/log_probs as they are, probs as log2 (0 -> -inf).
__host__ __device__ __forceinline__ float teacher_log_units(float t, int kind) {
  return kind == kTeacherProbs ? log2f(t) : t;
}

// ---- kernel parameters ----
struct KdParams {
  const void* student;
  const void* teacher;
  const int64_t* target;  // nullptr: no target
  float* row_loss;        // [N]
  void* grad;             // [N, C] contiguous, nullptr when not computed
  int64_t n_rows, n_cols, student_stride, teacher_stride, target_stride, ignore_index;
  int teacher_kind;
  int divergence;  // kForwardKl, kReverseKl, kJsd
  int row_split;   // block kernel: CTAs per row (a thread-block cluster when > 1)
  float k_teacher;  // kA
  float k_student;  // kB = log2e * inv_student_temp
  float kd_coef, ce_coef;  // loss weights of D and CE
  float g_kd;              // gradient weight of dD/dz: kd_coef * inv_student_temp
  float beta;              // jsd
};

// Row status from its target: 0 normal, 1 ignored (loss 0, grad 0), 2 out of range (NaN).
struct RowTarget {
  int64_t y;
  int status;
};

__device__ __forceinline__ RowTarget row_target(const KdParams& p, int64_t row) {
  if (p.target == nullptr) return {-1, 0};
  const int64_t y = p.target[row * p.target_stride];
  if (y == p.ignore_index) return {y, 1};
  if (y < 0 || y >= p.n_cols) return {y, 2};
  return {y, 0};
}

// ---- running statistics of one row (or part of it) ----
struct RowStats {
  float m_u, z_a, w, m_s, z_b, z_s;
};

__host__ __device__ __forceinline__ RowStats empty_stats() { return {-INFINITY, 0.f, 0.f, -INFINITY, 0.f, 0.f}; }

// Re-express x's sums relative to the maxima (m_u, m_s) >= x's own.
__host__ __device__ __forceinline__ void rebase(RowStats& x, float m_u, float m_s, float k_a, float k_b, bool with_ce) {
  if (x.m_u == -INFINITY) {
    x.z_a = 0.f;
    x.w = 0.f;
  } else if (m_u != x.m_u || m_s != x.m_s) {
    const float shift = (m_u - x.m_u) * k_a - (m_s - x.m_s) * k_b;  // each term's log-ratio drops by this
    const float f = exp2f((x.m_u - m_u) * k_a);
    x.w = f * (x.w - x.z_a * shift);
    x.z_a *= f;
  }
  if (x.m_s == -INFINITY) {
    x.z_b = 0.f;
    x.z_s = 0.f;
  } else if (m_s != x.m_s) {
    x.z_b *= exp2f((x.m_s - m_s) * k_b);
    if (with_ce) x.z_s *= exp2f((x.m_s - m_s) * kLog2e);
  }
  x.m_u = m_u;
  x.m_s = m_s;
}

__host__ __device__ __forceinline__ RowStats merge(RowStats a, RowStats b, float k_a, float k_b, bool with_ce) {
  const float m_u = fmaxf(a.m_u, b.m_u), m_s = fmaxf(a.m_s, b.m_s);
  rebase(a, m_u, m_s, k_a, k_b, with_ce);
  rebase(b, m_u, m_s, k_a, k_b, with_ce);
  return {m_u, a.z_a + b.z_a, a.w + b.w, m_s, a.z_b + b.z_b, a.z_s + b.z_s};
}

// Accumulate elements (u, s) whose maxima are <= the stats' maxima.
__host__ __device__ __forceinline__ void accumulate(RowStats& st, float u, float s, float k_a, float k_b, bool with_ce) {
  const float du = (u - st.m_u) * k_a;
  const float ds = s - st.m_s;
  const float ea = u == -INFINITY ? 0.f : exp2f(du);
  st.z_a += ea;
  st.w += u == -INFINITY ? 0.f : ea * (du - ds * k_b);
  st.z_b += s == -INFINITY ? 0.f : exp2f(ds * k_b);
  if (with_ce) st.z_s += s == -INFINITY ? 0.f : exp2f(ds * kLog2e);
}

// What pass 2 needs: log2 of the normalizers, and the row maxima.
struct RowNorm {
  float m_u, m_s, lz_a, lz_b, lz_s;
};

// Row loss from the full-row statistics: CE, and forward_kl's divergence (the others add kd_coef * D
// from their own pass).
__host__ __device__ __forceinline__ float finish_row(const KdParams& p, const RowStats& st, float s_y, RowNorm& nrm) {
  nrm = {st.m_u, st.m_s, log2f(st.z_a), log2f(st.z_b), p.target ? log2f(st.z_s) : 0.f};
  float loss = 0.f;
  if (p.divergence == kForwardKl) loss = p.kd_coef * kLn2 * (st.w / st.z_a - nrm.lz_a + nrm.lz_b);
  if (p.target) loss += p.ce_coef * ((st.m_s - s_y) + kLn2 * nrm.lz_s);
  return loss;
}

// reverse_kl, jsd: the element's share of D; q and h (cuda::log_ratio_terms) for the gradient.
__host__ __device__ __forceinline__ float log_ratio_element(const KdParams& p, const RowNorm& n, float u, float s,
                                                           float& q, float& h) {
  const float l2p = u == -INFINITY ? -INFINITY : (u - n.m_u) * p.k_teacher - n.lz_a;
  const float l2q = (s - n.m_s) * p.k_student - n.lz_b;
  q = exp2f(l2q);
  return cuda::log_ratio_terms(p.divergence == kJsd, p.beta, exp2f(l2p), kLn2 * l2p, q, kLn2 * l2q, h);
}

using cuda::DivSums;

__host__ __device__ __forceinline__ void accumulate_div(const KdParams& p, const RowNorm& n, float u, float s,
                                                        DivSums& acc) {
  float q, h;
  acc.d += log_ratio_element(p, n, u, s, q, h);
  acc.s += q * h;  // h = 0 where q = 0
}

// Gradient of one element; S: the row's sum q h (reverse_kl, jsd; unused for forward_kl).
__host__ __device__ __forceinline__ float grad_element(const KdParams& p, const RowNorm& n, float u, float s,
                                                       bool is_target, float S) {
  const float ds = s - n.m_s;
  float g;
  if (p.divergence == kForwardKl) {
    const float pt = u == -INFINITY ? 0.f : exp2f((u - n.m_u) * p.k_teacher - n.lz_a);
    g = p.g_kd * (exp2f(ds * p.k_student - n.lz_b) - pt);
  } else {
    float q, h;
    log_ratio_element(p, n, u, s, q, h);
    g = q == 0.f ? 0.f : p.g_kd * q * (h - S);
  }
  if (p.target) g += p.ce_coef * (exp2f(ds * kLog2e - n.lz_s) - (is_target ? 1.f : 0.f));
  return g;
}

// Merge of running statistics, for the reductions of cuda_reduce.cuh.
struct MergeStats {
  float k_a, k_b;
  bool with_ce;
  __host__ __device__ __forceinline__ RowStats operator()(const RowStats& a, const RowStats& b) const {
    return merge(a, b, k_a, k_b, with_ce);
  }
};

#ifndef UED_FAST_KD_MATH_ONLY
// Maxima of a thread's teacher and student values (register arrays).
template <int N>
__device__ __forceinline__ void array_max(const float (&u)[N], const float (&s)[N], float& m_u, float& m_s) {
  m_u = -INFINITY;
  m_s = -INFINITY;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    m_u = fmaxf(m_u, u[k]);
    m_s = fmaxf(m_s, s[k]);
  }
}

template <typename T>
__device__ __forceinline__ float load_one(const void* base, int64_t offset) {
  return to_float(__ldg(reinterpret_cast<const T*>(base) + offset));
}

// ---- warp per row: the whole row in registers, ELEMS classes per lane ----
template <typename S, typename Tt, int ELEMS>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32)
kd_loss_warp_kernel(const KdParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarpRowsPerBlock + (threadIdx.x >> 5);
  if (row >= p.n_rows) return;  // whole warp leaves together; no block-level barrier below
  const int64_t C = p.n_cols;
  S* grad_row = p.grad ? reinterpret_cast<S*>(p.grad) + row * C : nullptr;

  const RowTarget tg = row_target(p, row);
  if (tg.status != 0) {
    const float fill = tg.status == 1 ? 0.f : NAN;
    if (lane == 0) p.row_loss[row] = fill;
    if (grad_row)
      for (int64_t j = lane; j < C; j += 32) grad_row[j] = from_float<S>(fill);
    return;
  }
  const bool with_ce = p.target != nullptr;
  const int64_t s_off = row * p.student_stride, t_off = row * p.teacher_stride;

  // Load everything first (all loads in flight), then the exact maxima.
  float s[ELEMS], u[ELEMS];
#pragma unroll
  for (int k = 0; k < ELEMS; ++k) {
    const int64_t j = int64_t(k) * 32 + lane;
    if (j < C) {
      s[k] = load_one<S>(p.student, s_off + j);
      u[k] = teacher_log_units(load_one<Tt>(p.teacher, t_off + j), p.teacher_kind);
    } else {  // padding, after the teacher transform (log2(-inf) would be NaN)
      s[k] = -INFINITY;
      u[k] = -INFINITY;
    }
  }
  float m_u, m_s;
  array_max(u, s, m_u, m_s);
  m_u = cuda::warp_allreduce(m_u, cuda::MaxOp{});
  m_s = cuda::warp_allreduce(m_s, cuda::MaxOp{});

  // Exponentials once; keep them (p, q, r numerators) for the gradient.
  float ea[ELEMS];  // 2^{(u-m_u)kA}: p numerators
  float es[ELEMS];  // 2^{(s-m_s)log2e}: softmax(s) numerators; s[] is overwritten by the q numerators
  RowStats st{m_u, 0.f, 0.f, m_s, 0.f, 0.f};
#pragma unroll
  for (int k = 0; k < ELEMS; ++k) {
    const float du = (u[k] - m_u) * p.k_teacher;
    const float ds = s[k] - m_s;
    const bool zero_p = u[k] == -INFINITY, pad = s[k] == -INFINITY;
    ea[k] = zero_p ? 0.f : exp2f(du);
    const float eb = pad ? 0.f : exp2f(ds * p.k_student);
    es[k] = (with_ce && !pad) ? exp2f(ds * kLog2e) : 0.f;
    st.z_a += ea[k];
    st.w += zero_p ? 0.f : ea[k] * (du - ds * p.k_student);
    st.z_b += eb;
    st.z_s += es[k];
    s[k] = eb;
  }
  st.z_a = cuda::warp_allreduce(st.z_a, cuda::SumOp{});
  st.w = cuda::warp_allreduce(st.w, cuda::SumOp{});
  st.z_b = cuda::warp_allreduce(st.z_b, cuda::SumOp{});
  st.z_s = cuda::warp_allreduce(st.z_s, cuda::SumOp{});
  const float s_y = with_ce ? load_one<S>(p.student, s_off + tg.y) : 0.f;
  RowNorm nrm;
  float loss = finish_row(p, st, s_y, nrm);
  const bool forward_kl = p.divergence == kForwardKl;
  DivSums div{0.f, 0.f};
  // f(k, j) for this lane's classes j (k: the register slot).
  auto for_each_class = [&](auto&& f) {
#pragma unroll
    for (int k = 0; k < ELEMS; ++k)
      if (int64_t(k) * 32 + lane < C) f(k, int64_t(k) * 32 + lane);
  };
  if (!forward_kl) {  // s[] now holds q's numerators: the student row is read again (L1/L2)
    for_each_class([&](int k, int64_t j) { accumulate_div(p, nrm, u[k], load_one<S>(p.student, s_off + j), div); });
    div = cuda::warp_allreduce(div, cuda::SumOp{});
    loss += p.kd_coef * div.d;
  }
  if (lane == 0) p.row_loss[row] = loss;
  if (grad_row == nullptr) return;

  const float inv_za = 1.f / st.z_a, inv_zb = 1.f / st.z_b, inv_zs = with_ce ? 1.f / st.z_s : 0.f;
  for_each_class([&](int k, int64_t j) {
    float g;
    if (forward_kl) {
      g = p.g_kd * (s[k] * inv_zb - ea[k] * inv_za);
      if (with_ce) g += p.ce_coef * (es[k] * inv_zs - (j == tg.y ? 1.f : 0.f));
    } else {
      g = grad_element(p, nrm, u[k], load_one<S>(p.student, s_off + j), j == tg.y, div.s);
    }
    grad_row[j] = from_float<S>(g);
  });
}

// ---- block per row: online softmax over VEC-wide chunks, then a gradient pass ----

// One step of a block-kernel sweep: f(r, i) for the thread's kBlockUnroll vectors
// i = base + r * kBlockThreads (i may pass the end), unrolled so that their loads issue together.
template <typename F>
__device__ __forceinline__ void for_each_unrolled(int64_t base, F&& f) {
#pragma unroll
  for (int r = 0; r < kBlockUnroll; ++r) f(r, base + int64_t(r) * kBlockThreads);
}

// VEC: classes per load (16 bytes of the wider input dtype), or 1 for the unaligned fallback.
template <typename S, typename Tt, int VEC>
__global__ void __launch_bounds__(kBlockThreads, kBlockMinBlocksPerSm)
kd_loss_block_kernel(const KdParams p) {
  constexpr int kChunk = kBlockUnroll * VEC;
  const int split = p.row_split;
  const int64_t row = blockIdx.x / split;
  const int part = blockIdx.x % split;  // = rank in the cluster: clusters are consecutive CTAs along x
  const int64_t C = p.n_cols;
  const int64_t n_vec = C / VEC;  // VEC divides C (checked on the host)
  const int64_t v_begin = n_vec * part / split, v_end = n_vec * (part + 1) / split;  // this CTA's vectors
  S* grad_row = p.grad ? reinterpret_cast<S*>(p.grad) + row * C : nullptr;
  const S* s_row = reinterpret_cast<const S*>(p.student) + row * p.student_stride;
  const Tt* t_row = reinterpret_cast<const Tt*>(p.teacher) + row * p.teacher_stride;

  const RowTarget tg = row_target(p, row);  // same for the whole block: uniform branch
  if (tg.status != 0) {
    const float fill = tg.status == 1 ? 0.f : NAN;
    if (threadIdx.x == 0 && part == 0) p.row_loss[row] = fill;
    if (grad_row) {
      float v[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = fill;
      for (int64_t i = v_begin + threadIdx.x; i < v_end; i += kBlockThreads) store_vec<S, VEC>(grad_row + i * VEC, v);
    }
    return;  // the whole cluster leaves here (same row), before any cluster barrier
  }
  const bool with_ce = p.target != nullptr;
  const float k_a = p.k_teacher, k_b = p.k_student;

  // Pass 1: each thread keeps running stats over its chunks (kBlockUnroll vectors, strided by the block).
  RowStats st = empty_stats();
  for (int64_t base = v_begin + threadIdx.x; base < v_end; base += int64_t(kBlockThreads) * kBlockUnroll) {
    float s[kChunk], u[kChunk];
    for_each_unrolled(base, [&](int r, int64_t i) {
      float sv[VEC], tv[VEC];
      if (i < v_end) {
        load_vec<S, VEC>(s_row + i * VEC, sv);
        load_vec<Tt, VEC>(t_row + i * VEC, tv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) tv[k] = teacher_log_units(tv[k], p.teacher_kind);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) sv[k] = tv[k] = -INFINITY;  // padding (after the transform): contributes nothing
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        s[r * VEC + k] = sv[k];
        u[r * VEC + k] = tv[k];
      }
    });
    float cm_u, cm_s;
    array_max(u, s, cm_u, cm_s);
    if (cm_u > st.m_u || cm_s > st.m_s)  // rare after the first chunks: rescale only then
      rebase(st, fmaxf(st.m_u, cm_u), fmaxf(st.m_s, cm_s), k_a, k_b, with_ce);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) accumulate(st, u[k], s[k], k_a, k_b, with_ce);
  }

  __shared__ RowStats partial[kBlockThreads / 32];
  __shared__ DivSums div_partial[kBlockThreads / 32];
  __shared__ RowStats cta_stats;
  const MergeStats merge_stats{k_a, k_b, with_ce};
  RowStats row_st = cuda::group_allreduce<kBlockThreads>(st, merge_stats, empty_stats(), partial);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (split > 1) {  // merge the cluster's CTAs, in rank order so that every CTA gets the same bits
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x == 0) cta_stats = row_st;
    cluster.sync();  // every CTA's cta_stats is written
    row_st = empty_stats();
    for (int r = 0; r < split; ++r) row_st = merge_stats(row_st, *cluster.map_shared_rank(&cta_stats, r));
    cluster.sync();  // no CTA leaves (releasing its shared memory) while another still reads it
  }
#endif
  const bool writes_loss = threadIdx.x == 0 && part == 0;
  const float s_y = with_ce && writes_loss ? load_one<S>(s_row, tg.y) : 0.f;
  RowNorm nrm;
  float loss = finish_row(p, row_st, s_y, nrm);
  DivSums div{0.f, 0.f};
  if (p.divergence != kForwardKl) {  // one more read of the row: D and S (split is 1 here)
    for (int64_t i = v_begin + threadIdx.x; i < v_end; i += kBlockThreads) {
      float sv[VEC], tv[VEC];
      load_vec<S, VEC>(s_row + i * VEC, sv);
      load_vec<Tt, VEC>(t_row + i * VEC, tv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) accumulate_div(p, nrm, teacher_log_units(tv[k], p.teacher_kind), sv[k], div);
    }
    div = cuda::group_allreduce<kBlockThreads>(div, cuda::SumOp{}, DivSums{0.f, 0.f}, div_partial);
    loss += p.kd_coef * div.d;
  }
  if (writes_loss) p.row_loss[row] = loss;
  if (grad_row == nullptr) return;

  // Pass 2: re-read the row (L2-resident if the resident rows fit) and write the gradient.
  for (int64_t base = v_begin + threadIdx.x; base < v_end; base += int64_t(kBlockThreads) * kBlockUnroll) {
    float s[kBlockUnroll][VEC], t[kBlockUnroll][VEC];
    for_each_unrolled(base, [&](int r, int64_t i) {
      if (i < v_end) {
        load_vec<S, VEC, true>(s_row + i * VEC, s[r]);
        load_vec<Tt, VEC, true>(t_row + i * VEC, t[r]);
      }
    });
    for_each_unrolled(base, [&](int r, int64_t i) {
      if (i < v_end) {
        float g[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          g[k] = grad_element(p, nrm, teacher_log_units(t[r][k], p.teacher_kind), s[r][k], i * VEC + k == tg.y, div.s);
        store_vec<S, VEC>(grad_row + i * VEC, g);
      }
    });
  }
}

// ---- host side ----
bool aligned(const void* ptr, int64_t row_stride_elems, int64_t elem_bytes, int64_t vec_bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % vec_bytes == 0 && (row_stride_elems * elem_bytes) % vec_bytes == 0;
}

struct DeviceInfo {
  int major = 0, sm_count = 0, l2_bytes = 0;
};

// Read once per device (cudaDeviceGetAttribute costs microseconds; launches should not).
const DeviceInfo& device_info(int device) {
  constexpr int kMaxDevices = 64;
  static DeviceInfo infos[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "kd_loss_fwd (cuda): device index ", device, " out of range");
  std::call_once(once[device], [device] {
    DeviceInfo& d = infos[device];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.l2_bytes, cudaDevAttrL2CacheSize, device));
  });
  return infos[device];
}

// kMaxRowSplit, or UED_FAST_KD_MAX_ROW_SPLIT (1, 2, 4 or 8) to compare splits without a rebuild.
int max_row_split() {
  static const int value = [] {
    const char* env = std::getenv("UED_FAST_KD_MAX_ROW_SPLIT");
    const int v = env ? std::atoi(env) : kMaxRowSplit;
    return (v == 1 || v == 2 || v == 4 || v == 8) ? v : kMaxRowSplit;
  }();
  return value;
}

// CTAs per row for the block kernel (see kMaxRowSplit).
int row_split(const DeviceInfo& dev, int64_t n_rows, int64_t n_vec, int64_t row_bytes) {
  if (dev.major < 9) return 1;  // clusters need sm_90
  const double resident_rows = double(dev.sm_count) * kBlockMinBlocksPerSm;
  int split = 1;
  while (split < max_row_split() && resident_rows / split * double(row_bytes) > kL2ResidentFraction * dev.l2_bytes &&
         n_vec / (2 * split) >= kBlockThreads && n_rows * 2 * split <= INT32_MAX)
    split *= 2;
  return split;
}

template <typename S, typename Tt, int VEC>
void launch_block_kernel(KdParams p, int split, cudaStream_t stream) {
  p.row_split = split;
  const dim3 grid(static_cast<unsigned>(p.n_rows * split)), block(kBlockThreads);
  if (split == 1) {
    kd_loss_block_kernel<S, Tt, VEC><<<grid, block, 0, stream>>>(p);
    return;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = split;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kd_loss_block_kernel<S, Tt, VEC>, p));
}

template <typename S, typename Tt>
void launch(KdParams p, int device, cudaStream_t stream) {
  const int64_t C = p.n_cols, N = p.n_rows;
  if (C <= kWarpMaxClasses) {
    const dim3 grid(static_cast<unsigned>((N + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock));
    const dim3 block(kWarpRowsPerBlock * 32);
    if (C <= 32) kd_loss_warp_kernel<S, Tt, 1><<<grid, block, 0, stream>>>(p);
    else if (C <= 128) kd_loss_warp_kernel<S, Tt, 4><<<grid, block, 0, stream>>>(p);
    else if (C <= 256) kd_loss_warp_kernel<S, Tt, 8><<<grid, block, 0, stream>>>(p);
    else if (C <= 512) kd_loss_warp_kernel<S, Tt, 16><<<grid, block, 0, stream>>>(p);
    else kd_loss_warp_kernel<S, Tt, 32><<<grid, block, 0, stream>>>(p);
  } else {
    constexpr int kVecBytes = 16;
    constexpr int kVec = kVecBytes / (sizeof(S) > sizeof(Tt) ? sizeof(S) : sizeof(Tt));
    const bool vectorized = C % kVec == 0 &&
        aligned(p.student, p.student_stride, sizeof(S), kVec * sizeof(S)) &&
        aligned(p.teacher, p.teacher_stride, sizeof(Tt), kVec * sizeof(Tt)) &&
        (p.grad == nullptr || aligned(p.grad, C, sizeof(S), kVec * sizeof(S)));
    const int vec = vectorized ? kVec : 1;
    // reverse_kl and jsd reduce D and S over the row once more: one CTA per row.
    const int split = p.divergence != kForwardKl
                          ? 1
                          : row_split(device_info(device), N, C / vec, C * int64_t(sizeof(S) + sizeof(Tt)));
    if (vectorized) launch_block_kernel<S, Tt, kVec>(p, split, stream);
    else launch_block_kernel<S, Tt, 1>(p, split, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
    double inv_student_temp, double inv_teacher_temp, double kd_coef, double ce_coef, int64_t divergence, double beta,
    int64_t ignore_index, int64_t teacher_kind, bool compute_grad) {
  constexpr const char* kOp = "kd_loss_fwd (cuda)";
  check_kd_loss_args(kOp, student, teacher, target, inv_student_temp, inv_teacher_temp, kd_coef, ce_coef, divergence,
                     beta, teacher_kind);
  TORCH_CHECK_VALUE(student.is_cuda(), kOp, ": student and teacher must be CUDA tensors");
  const int64_t N = student.size(0), C = student.size(1);
  TORCH_CHECK_VALUE(C <= INT32_MAX && N <= INT32_MAX, kOp, ": shape too large: ", student.sizes());
  TORCH_CHECK_VALUE(student.stride(1) == 1 || C == 1, kOp, ": student needs unit stride along classes");
  TORCH_CHECK_VALUE(teacher.stride(1) == 1 || C == 1, kOp, ": teacher needs unit stride along classes");
  const bool has_target = target.has_value() && target->defined();

  const c10::cuda::CUDAGuard guard(student.device());
  auto [row_loss, grad] = kd_outputs(student, compute_grad, at::kFloat);
  if (N == 0) return {row_loss, grad};

  KdParams p{};
  p.student = student.data_ptr();
  p.teacher = teacher.data_ptr();
  p.target = has_target ? target->data_ptr<int64_t>() : nullptr;
  p.row_loss = row_loss.data_ptr<float>();
  p.grad = compute_grad ? grad.data_ptr() : nullptr;
  p.n_rows = N;
  p.n_cols = C;
  p.student_stride = student.stride(0);
  p.teacher_stride = teacher.stride(0);
  p.target_stride = has_target ? target->stride(0) : 0;
  p.ignore_index = ignore_index;
  p.teacher_kind = static_cast<int>(teacher_kind);
  p.divergence = static_cast<int>(divergence);
  p.row_split = 1;
  // Base-2 scales of the host's coefficients (u is already in log2 units for probs).
  p.k_student = static_cast<float>(kLog2e * inv_student_temp);
  p.k_teacher = static_cast<float>(teacher_kind == kTeacherProbs ? inv_teacher_temp : kLog2e * inv_teacher_temp);
  p.kd_coef = static_cast<float>(kd_coef);
  p.ce_coef = has_target ? static_cast<float>(ce_coef) : 0.f;
  p.g_kd = static_cast<float>(kd_coef * inv_student_temp);
  p.beta = static_cast<float>(beta);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.device().index()).stream();
  dispatch_float<false>(student.scalar_type(), kOp, "student", [&](auto s_tag) {
    dispatch_float<false>(teacher.scalar_type(), kOp, "teacher", [&](auto t_tag) {
      launch<typename cuda::device_type<typename decltype(s_tag)::type>::type,
             typename cuda::device_type<typename decltype(t_tag)::type>::type>(p, student.device().index(), stream);
    });
  });
  return {row_loss, grad};
}

#endif  // UED_FAST_KD_MATH_ONLY
}  // namespace
}  // namespace ued_fast

#ifndef UED_FAST_KD_MATH_ONLY
TORCH_LIBRARY_IMPL(ued_fast, CUDA, m) {
  m.impl("kd_loss_fwd", &ued_fast::kd_loss_fwd_cuda);
}
#endif
