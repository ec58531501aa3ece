// CUDA kernel of ued_fast::sparse_kd_loss_fwd: KD from a sparse (top-k) teacher (arguments and semantics:
// the kernel contract, docs/DESIGN.md 2.5; schema and CPU kernel: csrc/sparse_kd_loss.cpp). Not yet run on a GPU;
// compile check without one: .ci/check_cuda.sh csrc/sparse_kd_loss_cuda.cu
//
// One CTA per row (NT threads, chosen from C). The teacher is k (index, log p) entries plus 'rest'; the
// student's row is streamed:
//  * pass 1: each thread sweeps its VEC-wide vectors (16-byte loads when aligned), keeping online maxima
//    and sums, relative to them, in base 2: z_b = sum 2^{(s - m_s) kB} over all columns (kB = log2e *
//    inv_student_temp), z_off the same over the columns off the support S relative to their own maximum
//    m_off (accumulated directly, so a tiny off-S mass keeps its precision), z_s = sum 2^{(s - m_s) log2e}
//    for the CE when inv_student_temp != 1 (otherwise z_b is that sum). Off-S membership: the row's indices
//    are sorted, so the entries falling in a warp's window of 32 * VEC columns are a contiguous run of the
//    list; every lane of the warp keeps the same cursor into it (warp-uniform branches; a window without
//    entries costs no reads).
//  * block merge of the statistics, then the (k+1)-category math: the k entries spread over the threads
//    (D and H = sum h summed by the block), 'rest' from lse_off - lse.
//  * pass 2 (compute_grad): the row read again, grad_j = kd_coef * inv_student_temp * G_j + CE terms with
//    G_j = h_a - q_j H at support columns (h_a recomputed from the entry) and h_rest exp(z_j - lse_off) -
//    q_j H off it (q_j = exp(z_j - lse_off) q_rest: one exp per column).
// A bad target or index gives a NaN row (no out-of-bounds access). No host synchronization, no allocation
// besides the outputs: safe inside CUDA graphs.
// UED_FAST_SPARSE_MATH_ONLY: keep only the per-thread and row math (host+device), for a host-side check
// of the kernel's algorithm against float64 (.ci/sparse_math_check.cu).
#ifndef UED_FAST_SPARSE_MATH_ONLY
#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_reduce.cuh"
#include "utils.h"
#endif
#include "codes.h"
#include "cuda_utils.cuh"

#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace ued_fast {
namespace {

// ---- launch-configuration knobs (not yet tuned on a GPU) ----
constexpr int kSmallRowThreads = 128;      // threads per row for C <= kSmallRowMaxClasses
constexpr int kSmallRowMaxClasses = 4096;
constexpr int kLargeRowThreads = 512;      // threads per row above it
constexpr int kMinRowsPerSm = 2;           // __launch_bounds__ hint (<= 64 registers at 512 threads; no spills)
constexpr int kWarp = 32;

using cuda::DivSums;
using cuda::kLn2;
using cuda::kLog2e;

// ---- kernel parameters ----
struct SparseParams {
  const void* student;      // [N, C], unit stride along C
  const int64_t* indices;   // [N, k], rows sorted, padding -1 first
  const float* log_p;       // [N, k + 1], 'rest' last
  const int64_t* target;    // nullptr: no target
  float* row_loss;          // [N]
  void* grad;               // [N, C] contiguous, nullptr when not computed
  int64_t n_rows, n_cols, k, student_stride, target_stride, ignore_index;
  int divergence;           // kForwardKl, kReverseKl, kJsd
  bool with_ce;             // a target is given
  bool separate_ce;         // with_ce and inv_student_temp != 1: softmax(s) needs its own sum
  float k_student;          // kB = log2e * inv_student_temp
  float kd_coef, ce_coef;   // loss weights of D and CE
  float g_kd;               // gradient weight of G: kd_coef * inv_student_temp
  float beta;               // jsd
};

// Read-only loads of the row's indices and log p (cached: every lane of a warp often reads the same entry).
template <typename T>
__host__ __device__ __forceinline__ T load_readonly(const T* ptr) {
#ifdef __CUDA_ARCH__
  return __ldg(ptr);
#else
  return *ptr;
#endif
}

// ---- running statistics of a row (or a thread's part of it), base 2, relative to their maxima ----
struct SparseStats {
  float m_s;    // max s over the columns seen
  float z_b;    // sum 2^{(s - m_s) kB}
  float z_s;    // sum 2^{(s - m_s) log2e} (separate_ce only)
  float m_off;  // max s over the off-support columns seen
  float z_off;  // sum over them of 2^{(s - m_off) kB}
};

__host__ __device__ __forceinline__ SparseStats empty_sparse_stats() {
  return {-INFINITY, 0.f, 0.f, -INFINITY, 0.f};
}

// 2^{(from - to) scale}: re-expresses a sum relative to maximum `from` relative to `to` >= from (0 for an
// empty sum, from = -inf).
__host__ __device__ __forceinline__ float rebase_factor(float from, float to, float scale) {
  return from == -INFINITY ? 0.f : exp2f((from - to) * scale);
}

// Re-express x relative to the maxima (m_s, m_off) >= x's own.
__host__ __device__ __forceinline__ void rebase(SparseStats& x, float m_s, float m_off, float k_b, bool separate_ce) {
  if (m_s != x.m_s) {
    x.z_b *= rebase_factor(x.m_s, m_s, k_b);
    if (separate_ce) x.z_s *= rebase_factor(x.m_s, m_s, kLog2e);
  }
  if (m_off != x.m_off) x.z_off *= rebase_factor(x.m_off, m_off, k_b);
  x.m_s = m_s;
  x.m_off = m_off;
}

__host__ __device__ __forceinline__ SparseStats merge(SparseStats a, SparseStats b, float k_b, bool separate_ce) {
  const float m_s = fmaxf(a.m_s, b.m_s), m_off = fmaxf(a.m_off, b.m_off);
  rebase(a, m_s, m_off, k_b, separate_ce);
  rebase(b, m_s, m_off, k_b, separate_ce);
  return {m_s, a.z_b + b.z_b, a.z_s + b.z_s, m_off, a.z_off + b.z_off};
}

// Merge of running statistics, for the reductions of cuda_reduce.cuh.
struct MergeSparseStats {
  float k_b;
  bool separate_ce;
  __host__ __device__ __forceinline__ SparseStats operator()(const SparseStats& a, const SparseStats& b) const {
    return merge(a, b, k_b, separate_ce);
  }
};

// ---- the support among a thread's columns ----
// First position >= from in the row's sorted list idx[0, k) whose index is >= col (k if none): strides
// of 32, then 4, then 1, so that skipping the other warps' entries costs about k / 32 reads per thread.
// Unsorted lists end somewhere in [from, k]: no out-of-bounds read.
__host__ __device__ __forceinline__ int64_t skip_below(const int64_t* idx, int64_t from, int64_t k, int64_t col) {
  while (from + 32 <= k && load_readonly(idx + from + 31) < col) from += 32;
  while (from + 4 <= k && load_readonly(idx + from + 3) < col) from += 4;
  while (from < k && load_readonly(idx + from) < col) ++from;
  return from;
}

// A warp's running position in the row's sorted list: pos, and the index stored there (col; INT64_MAX past
// the end), so that a window without support entries costs no reads.
struct SupportCursor {
  int64_t pos, col;
};

__host__ __device__ __forceinline__ SupportCursor start_cursor() { return {0, INT64_MIN}; }

// entry[v] = the list position a with idx[a] = base + v, or -1 off the support, for the VEC columns at
// base of a thread whose warp covers the window [lo, lo + 32 * VEC) (lo increasing from call to call: the
// cursor only moves forward). The window's entries are a run from the cursor.
template <int VEC>
__host__ __device__ __forceinline__ void support_entries(const int64_t* idx, int64_t k, SupportCursor& cur, int64_t lo,
                                                         int64_t base, int (&entry)[VEC]) {
  if (cur.col < lo) {
    cur.pos = skip_below(idx, cur.pos, k, lo);
    cur.col = cur.pos < k ? load_readonly(idx + cur.pos) : INT64_MAX;
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) entry[v] = -1;
  const int64_t hi = lo + int64_t(kWarp) * VEC;
  int64_t col = cur.col;
  for (int64_t a = cur.pos; col < hi;) {
    const int64_t off = col - base;
#pragma unroll
    for (int v = 0; v < VEC; ++v)
      if (off == v) entry[v] = static_cast<int>(a);
    if (++a >= k) break;
    col = load_readonly(idx + a);
  }
}

// Window start of the warp of thread tid, for its vector i (the sweep visits vectors i = tid + r * nt).
__host__ __device__ __forceinline__ int64_t warp_window(int64_t i, int tid, int vec) {
  return (i - (tid & (kWarp - 1))) * vec;
}

// One thread's sweep: its vectors i = tid, tid + nt, ... < n_vec, each loaded (load(i, s): vector i as
// floats) with its support positions, handed to f(i, s, entry).
template <int VEC, typename Load, typename F>
__host__ __device__ __forceinline__ void sweep_thread(const int64_t* idx, int64_t k, int64_t n_vec, int tid, int nt,
                                                      Load&& load, F&& f) {
  SupportCursor cur = start_cursor();
  for (int64_t i = tid; i < n_vec; i += nt) {
    float s[VEC];
    load(i, s);
    int entry[VEC];
    support_entries<VEC>(idx, k, cur, warp_window(i, tid, VEC), i * VEC, entry);
    f(i, s, entry);
  }
}

// ---- pass 1 ----
// Accumulate one vector s[VEC] (entry: its support positions, -1 off S). off_scale = 2^{(m_off - m_s) kB}
// (kept with the statistics by the caller): an off-S exponential serves both sums.
template <int VEC>
__host__ __device__ __forceinline__ void accumulate_vector(SparseStats& st, float& off_scale, const float (&s)[VEC],
                                                           const int (&entry)[VEC], float k_b, bool separate_ce) {
  float m_s = st.m_s, m_off = st.m_off;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    m_s = fmaxf(m_s, s[v]);
    if (entry[v] < 0) m_off = fmaxf(m_off, s[v]);
  }
  if (m_s != st.m_s || m_off != st.m_off) {  // rare after the first vectors: rescale only then
    rebase(st, m_s, m_off, k_b, separate_ce);
    off_scale = rebase_factor(m_off, m_s, k_b);
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    if (entry[v] < 0) {
      const float e = exp2f((s[v] - m_off) * k_b);
      st.z_off += e;
      st.z_b += e * off_scale;
    } else {
      st.z_b += exp2f((s[v] - m_s) * k_b);
    }
    if (separate_ce) st.z_s += exp2f((s[v] - m_s) * kLog2e);
  }
}

// One thread's statistics over its vectors (sweep_thread).
template <int VEC, typename Load>
__host__ __device__ __forceinline__ SparseStats thread_stats(const SparseParams& p, const int64_t* idx, int64_t n_vec,
                                                             int tid, int nt, Load&& load) {
  SparseStats st = empty_sparse_stats();
  float off_scale = 0.f;
  sweep_thread<VEC>(idx, p.k, n_vec, tid, nt, load, [&](int64_t, const float(&s)[VEC], const int(&entry)[VEC]) {
    accumulate_vector<VEC>(st, off_scale, s, entry, p.k_student, p.separate_ce);
  });
  return st;
}

// ---- row math ----
// The row's normalizers in log2 units, and 'rest' of the student: log2 q_rest = log2 e * (lse_off - lse).
struct SparseNorm {
  float m_s, lz_b, lz_s, m_off, lz_off;
  float l2q_rest, q_rest;
};

__host__ __device__ __forceinline__ SparseNorm finish_stats(const SparseParams& p, const SparseStats& st) {
  SparseNorm n;
  n.m_s = st.m_s;
  n.lz_b = log2f(st.z_b);
  n.lz_s = p.separate_ce ? log2f(st.z_s) : n.lz_b;
  n.m_off = st.m_off;
  n.lz_off = log2f(st.z_off);
  n.l2q_rest = st.m_off == -INFINITY ? -INFINITY : (st.m_off - st.m_s) * p.k_student + n.lz_off - n.lz_b;
  n.q_rest = exp2f(n.l2q_rest);
  return n;
}

// log2 q of a column with student value s.
__host__ __device__ __forceinline__ float log2_q(const SparseParams& p, const SparseNorm& n, float s) {
  return (s - n.m_s) * p.k_student - n.lz_b;
}

// One category's share d of D and h = dD/d(log q) (contract), from log p (natural) and log2 q.
__host__ __device__ __forceinline__ float category_terms(const SparseParams& p, float lp, float l2q, float& h) {
  const float pt = cuda::fast_exp(lp), q = exp2f(l2q), lq = kLn2 * l2q;
  if (p.divergence == kForwardKl) {
    h = -pt;
    return pt == 0.f ? 0.f : pt * (lp - lq);
  }
  float r;  // reverse_kl: lq - lp; jsd: (1 - beta)(lq - lm); 0 where q = 0
  const float d = cuda::log_ratio_terms(p.divergence == kJsd, p.beta, pt, lp, q, lq, r);
  h = q == 0.f ? 0.f : q * (p.divergence == kReverseKl ? r + 1.f : r);
  return d;
}

// One thread's share of (D, H) over the k entries a = tid, tid + nt, ...; s_at(col): the student's value.
template <typename LoadS>
__host__ __device__ __forceinline__ DivSums thread_categories(const SparseParams& p, const SparseNorm& n,
                                                             const int64_t* idx, const float* log_p, int tid, int nt,
                                                             LoadS&& s_at) {
  DivSums acc{0.f, 0.f};
  for (int64_t a = tid; a < p.k; a += nt) {
    const int64_t col = load_readonly(idx + a);
    const float l2q = col < 0 ? -INFINITY : log2_q(p, n, s_at(col));  // padding: q = 0
    float h;
    acc.d += category_terms(p, load_readonly(log_p + a), l2q, h);
    acc.s += h;
  }
  return acc;
}

// The row's D and H: the entries' block sum plus 'rest' (every thread computes h_rest for pass 2).
struct RowTerms {
  float D, H, h_rest;
};

__host__ __device__ __forceinline__ RowTerms row_terms(const SparseParams& p, const SparseNorm& n, DivSums entries,
                                                       float lp_rest) {
  float h_rest;
  const float d_rest = category_terms(p, lp_rest, n.l2q_rest, h_rest);
  return {entries.d + d_rest, entries.s + h_rest, h_rest};
}

__host__ __device__ __forceinline__ float row_loss_value(const SparseParams& p, const SparseNorm& n, const RowTerms& t,
                                                         float s_y) {
  float loss = p.kd_coef * t.D;
  if (p.with_ce) loss += p.ce_coef * ((n.m_s - s_y) + kLn2 * n.lz_s);
  return loss;
}

// ---- pass 2 ----
// Gradient of one column with student value s; lp: its entry's log p at a support column.
__host__ __device__ __forceinline__ float grad_element(const SparseParams& p, const SparseNorm& n, const RowTerms& t,
                                                       float s, bool support, float lp, bool is_target) {
  float q, G;
  if (support) {
    const float l2q = log2_q(p, n, s);
    q = exp2f(l2q);
    float h;
    category_terms(p, lp, l2q, h);
    G = h - q * t.H;
  } else {  // exp(z - lse_off), and q from it: exact even where q_rest underflows
    const float r = exp2f((s - n.m_off) * p.k_student - n.lz_off);
    q = r * n.q_rest;
    G = t.h_rest * r - q * t.H;
  }
  float g = p.g_kd * G;
  if (p.with_ce) {
    const float softmax_s = p.separate_ce ? exp2f((s - n.m_s) * kLog2e - n.lz_s) : q;
    g += p.ce_coef * (softmax_s - (is_target ? 1.f : 0.f));
  }
  return g;
}

// One thread's gradient vectors (sweep_thread); y: the target column (-1: none). store(i, g): vector i.
template <int VEC, typename Load, typename Store>
__host__ __device__ __forceinline__ void thread_grad(const SparseParams& p, const SparseNorm& n, const RowTerms& t,
                                                     const int64_t* idx, const float* log_p, int64_t n_vec, int tid,
                                                     int nt, int64_t y, Load&& load, Store&& store) {
  sweep_thread<VEC>(idx, p.k, n_vec, tid, nt, load, [&](int64_t i, const float(&s)[VEC], const int(&entry)[VEC]) {
    float g[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const bool support = entry[v] >= 0;
      const float lp = support ? load_readonly(log_p + entry[v]) : 0.f;
      g[v] = grad_element(p, n, t, s[v], support, lp, i * VEC + v == y);
    }
    store(i, g);
  });
}

// Row status from its target: 0 normal, 1 ignored (loss 0, grad 0), 2 bad (NaN).
__host__ __device__ __forceinline__ int target_status(const SparseParams& p, int64_t y) {
  if (!p.with_ce) return 0;
  if (y == p.ignore_index) return 1;
  return (y < 0 || y >= p.n_cols) ? 2 : 0;
}

__host__ __device__ __forceinline__ bool bad_index(const SparseParams& p, int64_t col) {
  return col < -1 || col >= p.n_cols;
}

#ifndef UED_FAST_SPARSE_MATH_ONLY
// ---- the kernel: one CTA of NT threads per row, VEC columns per load ----
template <typename S, int NT, int VEC>
__global__ void __launch_bounds__(NT, kMinRowsPerSm) sparse_kd_loss_kernel(const SparseParams p) {
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t C = p.n_cols, k = p.k, n_vec = C / VEC;  // VEC divides C (checked on the host)
  const S* s_row = reinterpret_cast<const S*>(p.student) + row * p.student_stride;
  S* grad_row = p.grad ? reinterpret_cast<S*>(p.grad) + row * C : nullptr;
  const int64_t* idx = p.indices + row * k;
  const float* log_p = p.log_p + row * (k + 1);

  const int64_t y = p.with_ce ? p.target[row * p.target_stride] : -1;
  int status = target_status(p, y);  // uniform over the block
  if (status == 0) {
    bool bad = false;
    for (int64_t a = tid; a < k; a += NT) bad |= bad_index(p, load_readonly(idx + a));
    if (__syncthreads_or(bad)) status = 2;
  }
  if (status != 0) {
    const float fill = status == 1 ? 0.f : NAN;
    if (tid == 0) p.row_loss[row] = fill;
    if (grad_row)
      for (int64_t j = tid; j < C; j += NT) grad_row[j] = cuda::from_float<S>(fill);
    return;
  }

  auto load_student = [&](int64_t i, float(&s)[VEC]) { cuda::load_vec<S, VEC>(s_row + i * VEC, s); };
  const SparseStats st = thread_stats<VEC>(p, idx, n_vec, tid, NT, load_student);
  __shared__ SparseStats stats_scratch[NT / kWarp];
  __shared__ DivSums sums_scratch[NT / kWarp];
  const SparseStats row_st = cuda::group_allreduce<NT>(st, MergeSparseStats{p.k_student, p.separate_ce},
                                                       empty_sparse_stats(), stats_scratch);
  const SparseNorm n = finish_stats(p, row_st);
  auto s_at = [&](int64_t col) { return cuda::to_float(s_row[col]); };
  DivSums entries = thread_categories(p, n, idx, log_p, tid, NT, s_at);
  entries = cuda::group_allreduce<NT>(entries, cuda::SumOp{}, DivSums{0.f, 0.f}, sums_scratch);
  const RowTerms t = row_terms(p, n, entries, load_readonly(log_p + k));
  if (tid == 0) p.row_loss[row] = row_loss_value(p, n, t, p.with_ce ? s_at(y) : 0.f);
  if (grad_row == nullptr) return;

  auto reload_row = [&](int64_t i, float(&s)[VEC]) { cuda::load_vec<S, VEC, true>(s_row + i * VEC, s); };
  auto store_grad = [&](int64_t i, const float(&g)[VEC]) { cuda::store_vec<S, VEC>(grad_row + i * VEC, g); };
  thread_grad<VEC>(p, n, t, idx, log_p, n_vec, tid, NT, y, reload_row, store_grad);
}

// ---- host side ----
template <typename S, int NT>
void launch_rows(const SparseParams& p, bool vectorized, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(S);
  const dim3 grid(static_cast<unsigned>(p.n_rows)), block(NT);
  if (vectorized) sparse_kd_loss_kernel<S, NT, kVec><<<grid, block, 0, stream>>>(p);
  else sparse_kd_loss_kernel<S, NT, 1><<<grid, block, 0, stream>>>(p);
}

template <typename S>
void launch(const SparseParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(S);
  constexpr int64_t kVecBytes = 16;
  const bool vectorized = p.n_cols % kVec == 0 && reinterpret_cast<uintptr_t>(p.student) % kVecBytes == 0 &&
                          (p.student_stride * int64_t(sizeof(S))) % kVecBytes == 0 &&
                          (p.grad == nullptr || reinterpret_cast<uintptr_t>(p.grad) % kVecBytes == 0);
  if (p.n_cols <= kSmallRowMaxClasses) launch_rows<S, kSmallRowThreads>(p, vectorized, stream);
  else launch_rows<S, kLargeRowThreads>(p, vectorized, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_fwd_cuda(
    const at::Tensor& student, const at::Tensor& indices, const at::Tensor& log_p,
    const std::optional<at::Tensor>& target, double inv_student_temp, double kd_coef, double ce_coef,
    int64_t divergence, double beta, int64_t ignore_index, bool compute_grad) {
  constexpr const char* kOp = "sparse_kd_loss_fwd (cuda)";
  check_sparse_kd_loss_args(kOp, student, indices, log_p, target, inv_student_temp, kd_coef, ce_coef, divergence,
                            beta);
  TORCH_CHECK_VALUE(student.is_cuda(), kOp, ": student, indices and log_p must be CUDA tensors");
  const int64_t N = student.size(0), C = student.size(1), k = indices.size(1);
  TORCH_CHECK_VALUE(N <= INT32_MAX && C <= INT32_MAX && k <= INT32_MAX, kOp, ": shape too large: student ",
                    student.sizes(), ", indices ", indices.sizes());
  const bool has_target = target.has_value() && target->defined();

  const c10::cuda::CUDAGuard guard(student.device());
  auto [row_loss, grad] = kd_outputs(student, compute_grad, at::kFloat);
  if (N == 0) return {row_loss, grad};

  SparseParams p{};
  p.student = student.data_ptr();
  p.indices = indices.data_ptr<int64_t>();
  p.log_p = static_cast<const float*>(log_p.data_ptr());  // float32 for every student dtype on CUDA (checked)
  p.target = has_target ? target->data_ptr<int64_t>() : nullptr;
  p.row_loss = row_loss.data_ptr<float>();
  p.grad = compute_grad ? grad.data_ptr() : nullptr;
  p.n_rows = N;
  p.n_cols = C;
  p.k = k;
  p.student_stride = student.stride(0);
  p.target_stride = has_target ? target->stride(0) : 0;
  p.ignore_index = ignore_index;
  p.divergence = static_cast<int>(divergence);
  p.with_ce = has_target;
  p.separate_ce = has_target && inv_student_temp != 1.0;
  p.k_student = static_cast<float>(kLog2e * inv_student_temp);
  p.kd_coef = static_cast<float>(kd_coef);
  p.ce_coef = has_target ? static_cast<float>(ce_coef) : 0.f;
  p.g_kd = static_cast<float>(kd_coef * inv_student_temp);
  p.beta = static_cast<float>(beta);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.device().index()).stream();
  dispatch_float<false>(student.scalar_type(), kOp, "student", [&](auto s_tag) {
    launch<typename cuda::device_type<typename decltype(s_tag)::type>::type>(p, stream);
  });
  return {row_loss, grad};
}

#endif  // UED_FAST_SPARSE_MATH_ONLY
}  // namespace
}  // namespace ued_fast

#ifndef UED_FAST_SPARSE_MATH_ONLY
TORCH_LIBRARY_IMPL(ued_fast, CUDA, m) {
  m.impl("sparse_kd_loss_fwd", &ued_fast::sparse_kd_loss_fwd_cuda);
}
#endif
