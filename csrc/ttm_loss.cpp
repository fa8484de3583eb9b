// Fused TTM / WTTM / KD loss on the CPU: the ops ttm_kernels_C::forward and ttm_kernels_C::backward.
//
// The same math as ttm_kernels/triton_kernels.py, one row per task, rows in parallel. Per row, with
// s = student_scale and g = teacher_scale:
//   statistics: one streaming pass over z and v with online (max, sum) accumulation of lse(s*z), lse(g*v),
//             lse(v) (WTTM only) and lse(z) (cross-entropy under a student temperature only).
//   KL / gradient: a second pass that recomputes the probabilities from the statistics and sums the KL in a
//             form that never cancels (see GradientOptions); given `grad`, it also computes the row's gradient
//             in fp32 and rounds it once at the store.
// Statistics, (12, N) fp32, rows as named in ttm_kernels/_stats.py: loss, kl (the divergence), ce, weight (U, or
// 1), then (max, log of the rescaled sum) of s*z, g*v and z, kept apart, then the row sum the gradient of the
// reverse KL and the JSD needs (a third pass: statistics, sums, gradient) and the student's entropy. Rows whose target is ignore_index get zero
// statistics and a zero gradient; a target outside [0, V) gives the row a NaN loss and a NaN gradient.
//
// The Python launcher (ttm_kernels/_ops.py) normalises every argument; these ops check that it did. Logits
// are (B, T, V) views with a contiguous last dimension and free leading strides; row r lives at
// (r / T) * stride(0) + (r % T) * stride(1), with each tensor's own T. The target is a contiguous int64 (N,)
// and the upstream gradient a contiguous fp32 (N,) or a 0-dim scalar. The gradient may be the student tensor
// itself (in-place backward): each block of a row is read in full before it is written.
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ttm_loss.h"

namespace ttm_cpu {
namespace {

// The statistics rows, in the order of ttm_kernels/_stats.py's Stat (RowStats below lists them in the same
// order), and the rows of a piece's online sums, in the order of its Partial.
enum Stat : int64_t {
  kLoss, kKl, kCe, kWeight, kMaxS, kLogSumS, kMaxT, kLogSumT, kMaxZ, kLogSumZ, kDivGrad, kEntropy, kNumStats
};
// The rows of a second pass's sums over a piece, in the order of _stats.py's PieceSum.
enum PieceSum : int64_t { kPieceKl, kPieceDivGrad, kPieceEntropy, kNumPieceSums };
enum Partial : int64_t {
  kPartMaxS, kPartSumS, kPartMaxT, kPartSumT, kPartMaxV, kPartSumV, kPartMaxZ, kPartSumZ, kPartTargetLogit,
  kNumPartial
};
// The rows of a top-k piece's online sums over its columns outside S, in the order of _stats.py's TopkPartial.
enum TopkPartial : int64_t { kTopkMaxS, kTopkSumS, kTopkMaxZ, kTopkSumZ, kTopkTailEntropy, kNumTopkPartial };

// The widest block kernels this CPU runs; TTM_KERNELS_CPU_ISA=baseline|avx2 narrows the choice (to test the
// other builds on a wide machine).
BlockKernels select_block_kernels() {
  const char* requested = std::getenv("TTM_KERNELS_CPU_ISA");
  const std::string limit = requested ? requested : "";
  TORCH_CHECK(limit.empty() || limit == "baseline" || limit == "avx2" || limit == "avx512",
              "TTM_KERNELS_CPU_ISA must be baseline, avx2 or avx512, got '", limit, "'");
#if defined(TTM_X86_DISPATCH)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (has_avx512 && (limit.empty() || limit == "avx512")) return avx512_block_kernels();
  if (has_avx2 && limit != "baseline") return avx2_block_kernels();
#endif
  return baseline_block_kernels();
}

const BlockKernels& block_kernels() {
  static const BlockKernels kernels = select_block_kernels();
  return kernels;
}

Dtype dtype_of(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return Dtype::Float32;
    case at::kBFloat16: return Dtype::BFloat16;
    case at::kHalf: return Dtype::Float16;
    case at::kDouble: return Dtype::Float64;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
  }
}

// Rows of a (B, T, V) view, addressed in bytes with int64 offsets.
struct Rows {
  char* base;
  int64_t stride_b, stride_t;  // bytes
  int64_t inner;               // T
  int64_t element_size;
  Dtype dtype;

  Rows(const at::Tensor& x, const char* name)
      : base(static_cast<char*>(x.data_ptr())),
        stride_b(x.stride(0) * static_cast<int64_t>(x.element_size())),
        stride_t(x.stride(1) * static_cast<int64_t>(x.element_size())),
        inner(x.size(1)),
        element_size(x.element_size()),
        dtype(dtype_of(x, name)) {}

  char* row(int64_t r) const { return base + (r / inner) * stride_b + (r % inner) * stride_t; }

  // Columns [start, start + n) of row `row_ptr` as fp32: in place when the row is fp32, else converted into
  // `buffer`.
  const float* block(const char* row_ptr, int64_t start, int64_t n, float* buffer) const {
    const char* first = row_ptr + start * element_size;
    if (dtype == Dtype::Float32) return reinterpret_cast<const float*>(first);
    block_kernels().load(first, dtype, n, buffer);
    return buffer;
  }

  float column(const char* row_ptr, int64_t col) const {
    float value;
    block_kernels().load(row_ptr + col * element_size, dtype, 1, &value);
    return value;
  }
};

struct LossSetup {
  float student_scale, teacher_scale, kl_coef, ce_weight;
  Divergence divergence;
  float jsd_beta;
  bool weighted, separate_ce;
  int64_t ignore_index;
  const int64_t* target;  // nullptr without a target
  const float* row_grad;  // upstream gradient of each row's loss
  int64_t row_grad_stride;
  int64_t vocab;         // columns of the tensors here: the whole row, or a piece of it
  int64_t col_offset;    // the row column of their first column (a piece's place in the row)
  int64_t row_vocab;     // columns of the whole row: targets must lie in [0, row_vocab)
};

// The rows of a gradient that a kernel writes. A fresh (N, V) gradient lies on new pages, which its first write
// faults in one 4 KiB page at a time: 60 of the 205 ms of a forward + backward at N = 2048, V = 32000, fp32, one
// core (benchmarks/RESULTS.md). Asking for transparent huge pages before that write (Linux, THP "madvise" or
// "always") lets the kernel fault 2 MiB at a time: 90 -> 41 ms to allocate and fill that tensor. Pages already
// touched keep theirs; it is advice, so a refusal changes nothing.
Rows gradient_rows(const at::Tensor& grad) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(grad.storage().data());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + grad.storage().nbytes()) & ~(kHugePage - 1);
  if (last >= first + 2 * kHugePage) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return Rows(grad, "grad");
}

bool overlaps(const void* a, const void* b, int64_t bytes) {
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return x < y + bytes && y < x + bytes;
}

struct RowBuffers {
  alignas(64) float z[kBlockSize];
  alignas(64) float v[kBlockSize];
  alignas(64) float grad[kBlockSize];
};

void zero_row(const Rows& grad, int64_t r, int64_t vocab) {
  std::memset(grad.row(r), 0, vocab * grad.element_size);
}

// The statistics of a row, as stored (see Stat).
struct RowStats {
  float loss, kl, ce, weight, m_s, log_d_s, m_t, log_d_t, m_z, log_d_z, div_grad, entropy;
};

RowStats load_stats(const float* stats, int64_t n_rows, int64_t r) {
  RowStats row;
  float* fields[kNumStats] = {&row.loss,    &row.kl,  &row.ce,      &row.weight, &row.m_s,      &row.log_d_s,
                              &row.m_t,     &row.log_d_t, &row.m_z, &row.log_d_z, &row.div_grad, &row.entropy};
  for (int64_t k = 0; k < kNumStats; ++k) *fields[k] = stats[k * n_rows + r];
  return row;
}

void store_stats(const RowStats& row, float* stats, int64_t n_rows, int64_t r) {
  const float values[kNumStats] = {row.loss,    row.kl,      row.ce,  row.weight,  row.m_s,      row.log_d_s,
                                   row.m_t,     row.log_d_t, row.m_z, row.log_d_z, row.div_grad, row.entropy};
  for (int64_t k = 0; k < kNumStats; ++k) stats[k * n_rows + r] = values[k];
}

// A second pass over row r: returns its sums and, unless `grad` is null, writes its gradient (which reads
// stats.div_grad for the reverse KL and the JSD).
SecondPassSums kl_gradient_row(const Rows& student, const Rows& teacher, const Rows* grad, const LossSetup& setup,
                      int64_t r, const RowStats& stats, RowBuffers& buffers) {
  const float row_grad = grad ? setup.row_grad[r * setup.row_grad_stride] : 0.0f;
  const int64_t target = setup.target ? setup.target[r] : -1;
  const bool target_in_range = target >= 0 && target < setup.row_vocab;
  GradientOptions options;
  options.student_scale = setup.student_scale;
  options.teacher_scale = setup.teacher_scale;
  options.m_s = stats.m_s;
  options.log_d_s = stats.log_d_s;
  options.m_t = stats.m_t;
  options.log_d_t = stats.log_d_t;
  options.m_z = stats.m_z;
  options.log_d_z = stats.log_d_z;
  options.kl_coef = row_grad * setup.kl_coef * stats.weight * setup.student_scale;
  // A class index outside [0, V) poisons the row's gradient, never a silent answer.
  options.ce_coef = !setup.target || target_in_range ? row_grad * setup.ce_weight
                                                     : std::numeric_limits<float>::quiet_NaN();
  options.has_target = setup.target != nullptr;
  options.separate_ce = setup.separate_ce;
  options.divergence = setup.divergence;
  options.jsd_beta = setup.jsd_beta;
  options.div_grad = stats.div_grad;

  const BlockKernels& kernels = block_kernels();
  const char* z_row = student.row(r);
  const char* v_row = teacher.row(r);
  char* g_row = grad ? grad->row(r) : nullptr;
  SecondPassSums sums;
  for (int64_t start = 0; start < setup.vocab; start += kBlockSize) {
    const int64_t n = std::min(kBlockSize, setup.vocab - start);
    const float* z = student.block(z_row, start, n, buffers.z);
    const float* v = teacher.block(v_row, start, n, buffers.v);
    float* out = nullptr;
    if (grad) {
      out = grad->dtype == Dtype::Float32 ? reinterpret_cast<float*>(g_row) + start : buffers.grad;
      // An fp32 gradient written over its own (fp32) input: read the block aside first.
      if (overlaps(out, z, n * sizeof(float))) {
        std::memcpy(buffers.z, z, n * sizeof(float));
        z = buffers.z;
      }
      if (overlaps(out, v, n * sizeof(float))) {
        std::memcpy(buffers.v, v, n * sizeof(float));
        v = buffers.v;
      }
    }
    options.target_column = target - setup.col_offset - start;
    const SecondPassSums block = kernels.kl_gradient(z, v, n, options, out);
    sums.kl += block.kl;
    sums.div_grad += block.div_grad;
    sums.entropy += block.entropy;
    if (grad && grad->dtype != Dtype::Float32) kernels.store(out, n, g_row + start * grad->element_size, grad->dtype);
  }
  return sums;
}

// The online sums of row r's columns here, and its target logit if one of them holds it (else -inf).
RowAccumulators scan_row(const Rows& student, const Rows& teacher, const LossSetup& setup, int64_t r,
                         RowBuffers& buffers, float* target_logit) {
  const BlockKernels& kernels = block_kernels();
  const ScanOptions options{setup.student_scale, setup.teacher_scale, setup.weighted, setup.separate_ce};
  const char* z_row = student.row(r);
  const char* v_row = teacher.row(r);
  RowAccumulators sums;
  for (int64_t start = 0; start < setup.vocab; start += kBlockSize) {
    const int64_t n = std::min(kBlockSize, setup.vocab - start);
    kernels.scan(student.block(z_row, start, n, buffers.z), teacher.block(v_row, start, n, buffers.v), n,
                 options, sums);
  }
  *target_logit = -std::numeric_limits<float>::infinity();
  if (setup.target) {
    const int64_t column = setup.target[r] - setup.col_offset;
    if (column >= 0 && column < setup.vocab) *target_logit = student.column(z_row, column);
  }
  return sums;
}

// A row's statistics from its (whole or merged) online sums; the KL and the loss come from the second pass.
RowStats finalize(const RowAccumulators& sums, float target_logit, const LossSetup& setup, int64_t r) {
  RowStats row;
  row.m_s = sums.m_s;
  row.log_d_s = std::log(sums.d_s);
  row.m_t = sums.m_t;
  row.log_d_t = std::log(sums.d_t);
  const float g = setup.teacher_scale;
  // U = sum softmax(v)^g = exp(lse(g*v) - g * lse(v)); the maxima are subtracted first.
  row.weight = setup.weighted ? std::exp((sums.m_t - g * sums.m_v) + row.log_d_t - g * std::log(sums.d_v)) : 1.0f;
  row.m_z = setup.separate_ce ? sums.m_z : row.m_s;
  row.log_d_z = setup.separate_ce ? std::log(sums.d_z) : row.log_d_s;
  row.ce = 0.0f;
  if (setup.target) {
    const int64_t y = setup.target[r];
    const float z_y = y >= 0 && y < setup.row_vocab ? target_logit : std::numeric_limits<float>::quiet_NaN();
    row.ce = (row.m_z - z_y) + row.log_d_z;
  }
  row.kl = 0.0f;
  row.loss = 0.0f;
  row.div_grad = 0.0f;
  row.entropy = 0.0f;
  return row;
}

// Statistics of row r (the online sums, then the divergence), writing its gradient too given `grad`: in the
// divergence's pass for the forward KL, in a third pass for the reverse KL and the JSD, whose gradient needs
// the row's sum.
void forward_row(const Rows& student, const Rows& teacher, const Rows* grad, const LossSetup& setup, int64_t r,
                 float* stats, int64_t n_rows, RowBuffers& buffers) {
  float target_logit;
  const RowAccumulators online = scan_row(student, teacher, setup, r, buffers, &target_logit);
  RowStats row = finalize(online, target_logit, setup, r);
  const bool fused_grad = setup.divergence == Divergence::kForwardKl;
  const SecondPassSums sums = kl_gradient_row(student, teacher, fused_grad ? grad : nullptr, setup, r, row, buffers);
  row.kl = sums.kl;
  row.div_grad = sums.div_grad;
  row.entropy = sums.entropy;
  if (grad && !fused_grad) kl_gradient_row(student, teacher, grad, setup, r, row, buffers);
  row.loss = setup.kl_coef * row.weight * row.kl + setup.ce_weight * row.ce;
  store_stats(row, stats, n_rows, r);
}

bool is_ignored(const LossSetup& setup, int64_t r) {
  return setup.target && setup.target[r] == setup.ignore_index;
}

// Enough rows per task to amortise the task (at least ~32K columns), at most one row when rows are long.
int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

void check_rows(const at::Tensor& x, const at::Tensor& like, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, name, " must be a (B, T, V) view, got shape ", x.sizes());
  // Each view has its own (B, T) split of the N rows: row_view may merge the two leading dimensions of one
  // tensor but not another's (a contiguous gradient of a sliced student).
  TORCH_CHECK(x.size(0) * x.size(1) == like.size(0) * like.size(1) && x.size(2) == like.size(2), name,
              " must have the student's ", like.size(0) * like.size(1), " rows of ", like.size(2),
              " columns, got shape ", x.sizes());
  TORCH_CHECK(x.stride(2) == 1 || x.size(2) == 1, name, " must have a contiguous last dimension, got strides ",
              x.strides());
  dtype_of(x, name);
}

// The target: a contiguous int64 (N,), or none.
const int64_t* target_rows(const std::optional<at::Tensor>& target, int64_t n_rows) {
  if (!target.has_value() || !target->defined()) return nullptr;
  TORCH_CHECK(target->device().is_cpu() && target->scalar_type() == at::kLong && target->dim() == 1 &&
                  target->size(0) == n_rows && target->is_contiguous(),
              "target must be a contiguous int64 CPU tensor of shape (", n_rows, ",), got ",
              target->scalar_type(), " ", target->sizes(), " with strides ", target->strides());
  return target->data_ptr<int64_t>();
}

// The upstream gradient: a contiguous fp32 (N,), or a 0-dim scalar shared by every row (stride 0).
void set_row_grad(LossSetup& setup, const at::Tensor& row_grad, int64_t n_rows) {
  TORCH_CHECK(row_grad.device().is_cpu() && row_grad.scalar_type() == at::kFloat &&
                  (row_grad.dim() == 0 || (row_grad.dim() == 1 && row_grad.size(0) == n_rows &&
                                           row_grad.is_contiguous())),
              "row_grad must be a contiguous float32 CPU tensor of shape (", n_rows, ",) or a scalar, got ",
              row_grad.scalar_type(), " ", row_grad.sizes());
  setup.row_grad = row_grad.data_ptr<float>();
  setup.row_grad_stride = row_grad.dim() == 0 ? 0 : 1;
}

// The setup of rows of `vocab` columns (a whole row until set_piece says otherwise).
Divergence divergence_of(double jsd_beta) {
  TORCH_CHECK(jsd_beta >= 0.0 && jsd_beta <= 1.0, "jsd_beta must lie in [0, 1], got ", jsd_beta);
  return jsd_beta == 0.0 ? Divergence::kForwardKl : jsd_beta == 1.0 ? Divergence::kReverseKl : Divergence::kJsd;
}

LossSetup make_setup(int64_t vocab, const int64_t* target, double student_scale, double teacher_scale,
                     double kl_coef, double ce_weight, bool weighted, int64_t ignore_index, double jsd_beta = 0.0) {
  LossSetup setup;
  setup.divergence = divergence_of(jsd_beta);
  setup.jsd_beta = static_cast<float>(jsd_beta);
  setup.student_scale = static_cast<float>(student_scale);
  setup.teacher_scale = static_cast<float>(teacher_scale);
  setup.kl_coef = static_cast<float>(kl_coef);
  setup.ce_weight = static_cast<float>(ce_weight);
  setup.weighted = weighted;
  setup.separate_ce = target != nullptr && student_scale != 1.0;
  setup.ignore_index = ignore_index;
  setup.target = target;
  setup.row_grad = nullptr;
  setup.row_grad_stride = 0;
  setup.vocab = vocab;
  setup.col_offset = 0;
  setup.row_vocab = setup.vocab;
  return setup;
}

// A piece of the row: columns [col_offset, col_offset + V) of rows of row_vocab columns.
void set_piece(LossSetup& setup, int64_t col_offset, int64_t row_vocab) {
  TORCH_CHECK(col_offset >= 0 && col_offset + setup.vocab <= row_vocab, "a piece of columns [", col_offset, ", ",
              col_offset + setup.vocab, ") does not fit rows of ", row_vocab, " columns");
  setup.col_offset = col_offset;
  setup.row_vocab = row_vocab;
}

at::Tensor forward(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                   double student_scale, double teacher_scale, double kl_coef, double ce_weight, bool weighted,
                   int64_t ignore_index, double jsd_beta, const std::optional<at::Tensor>& grad,
                   const std::optional<at::Tensor>& row_grad) {
  check_rows(student, student, "student");
  check_rows(teacher, student, "teacher");
  const int64_t n_rows = student.size(0) * student.size(1);
  LossSetup setup = make_setup(student.size(2), target_rows(target, n_rows), student_scale, teacher_scale, kl_coef,
                               ce_weight, weighted, ignore_index, jsd_beta);
  const bool has_grad = grad.has_value() && grad->defined();
  if (has_grad) {
    check_rows(*grad, student, "grad");
    TORCH_CHECK(row_grad.has_value() && row_grad->defined(), "forward with grad needs row_grad");
    set_row_grad(setup, *row_grad, n_rows);
  }
  at::Tensor stats = at::empty({kNumStats, n_rows}, student.options().dtype(at::kFloat));
  if (n_rows == 0) return stats;

  const Rows student_rows(student, "student"), teacher_rows(teacher, "teacher");
  const std::optional<Rows> grad_rows = has_grad ? std::optional<Rows>(gradient_rows(*grad)) : std::nullopt;
  float* stats_ptr = stats.data_ptr<float>();
  at::parallel_for(0, n_rows, grain_rows(setup.vocab), [&](int64_t begin, int64_t end) {
    RowBuffers buffers;
    for (int64_t r = begin; r < end; ++r) {
      if (is_ignored(setup, r)) {
        for (int64_t k = 0; k < kNumStats; ++k) stats_ptr[k * n_rows + r] = 0.0f;
        if (grad_rows) zero_row(*grad_rows, r, setup.vocab);
        continue;
      }
      forward_row(student_rows, teacher_rows, grad_rows ? &*grad_rows : nullptr, setup, r, stats_ptr, n_rows,
                  buffers);
    }
  });
  return stats;
}

// The online sums of each row's columns here, a piece [col_offset, col_offset + V) of the row:
// (NUM_PARTIAL, N) fp32, rows as named in ttm_kernels/_stats.py's Partial.
at::Tensor partial(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                   double student_scale, double teacher_scale, bool weighted, int64_t ignore_index,
                   int64_t col_offset) {
  check_rows(student, student, "student");
  check_rows(teacher, student, "teacher");
  const int64_t n_rows = student.size(0) * student.size(1);
  LossSetup setup = make_setup(student.size(2), target_rows(target, n_rows), student_scale, teacher_scale, 0.0, 0.0,
                               weighted, ignore_index);
  setup.col_offset = col_offset;
  at::Tensor partials = at::empty({kNumPartial, n_rows}, student.options().dtype(at::kFloat));
  if (n_rows == 0) return partials;
  const Rows student_rows(student, "student"), teacher_rows(teacher, "teacher");
  float* out = partials.data_ptr<float>();
  at::parallel_for(0, n_rows, grain_rows(setup.vocab), [&](int64_t begin, int64_t end) {
    RowBuffers buffers;
    for (int64_t r = begin; r < end; ++r) {
      float target_logit = -std::numeric_limits<float>::infinity();
      const RowAccumulators sums = is_ignored(setup, r)
                                       ? RowAccumulators()
                                       : scan_row(student_rows, teacher_rows, setup, r, buffers, &target_logit);
      const float values[kNumPartial] = {sums.m_s, sums.d_s, sums.m_t, sums.d_t, sums.m_v,
                                         sums.d_v, sums.m_z, sums.d_z, target_logit};
      for (int64_t k = 0; k < kNumPartial; ++k) out[k * n_rows + r] = values[k];
    }
  });
  return partials;
}

// One online (max, sum) pair merged over a row's pieces: M = max m_c, D = sum d_c exp(m_c - M).
void merge_pair(const float* m, const float* d, int64_t n_pieces, float& m_out, float& d_out) {
  float m_all = kInitialMax;
  for (int64_t c = 0; c < n_pieces; ++c) m_all = std::max(m_all, m[c]);
  float d_all = 0.0f;
  for (int64_t c = 0; c < n_pieces; ++c) d_all += d[c] * std::exp(m[c] - m_all);
  m_out = m_all;
  d_out = d_all;
}

// The rows' statistics from the partials of their pieces, (NUM_PARTIAL, N, C): all but the KL and the loss,
// which the pieces' second pass gives (see pieces).
at::Tensor merge(const at::Tensor& partials, const std::optional<at::Tensor>& target, double student_scale,
                 double teacher_scale, bool weighted, int64_t ignore_index, int64_t row_vocab) {
  TORCH_CHECK(partials.device().is_cpu() && partials.scalar_type() == at::kFloat && partials.dim() == 3 &&
                  partials.size(0) == kNumPartial && partials.is_contiguous(),
              "partials must be a contiguous (", kNumPartial, ", N, pieces) float32 CPU tensor, got ",
              partials.scalar_type(), " ", partials.sizes());
  const int64_t n_rows = partials.size(1), n_pieces = partials.size(2);
  const LossSetup setup = make_setup(row_vocab, target_rows(target, n_rows), student_scale, teacher_scale, 0.0, 0.0,
                                     weighted, ignore_index);
  at::Tensor stats = at::empty({kNumStats, n_rows}, partials.options());
  const float* in = partials.data_ptr<float>();
  float* out = stats.data_ptr<float>();
  at::parallel_for(0, n_rows, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (is_ignored(setup, r)) {
        for (int64_t k = 0; k < kNumStats; ++k) out[k * n_rows + r] = 0.0f;
        continue;
      }
      auto field = [&](Partial k) { return in + (k * n_rows + r) * n_pieces; };
      RowAccumulators sums;
      merge_pair(field(kPartMaxS), field(kPartSumS), n_pieces, sums.m_s, sums.d_s);
      merge_pair(field(kPartMaxT), field(kPartSumT), n_pieces, sums.m_t, sums.d_t);
      merge_pair(field(kPartMaxV), field(kPartSumV), n_pieces, sums.m_v, sums.d_v);
      merge_pair(field(kPartMaxZ), field(kPartSumZ), n_pieces, sums.m_z, sums.d_z);
      const float* logits = field(kPartTargetLogit);
      const float target_logit = *std::max_element(logits, logits + n_pieces);
      store_stats(finalize(sums, target_logit, setup, r), out, n_rows, r);
    }
  });
  return stats;
}

// The second pass over each row's columns here, a piece [col_offset, col_offset + V) of rows of row_vocab
// columns, from the rows' statistics: returns the piece's sums (NUM_PIECE_SUMS, N) (rows as _stats.py's
// PieceSum) and, given `grad`, writes its gradient of sum_i row_grad_i * loss_i, which for the reverse KL and
// the JSD reads the row's merged DIV_GRAD from `stats`. With the whole row (col_offset 0, row_vocab V) this is
// the backward.
at::Tensor pieces(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                  const at::Tensor& stats, double student_scale, double teacher_scale, double kl_coef,
                  double ce_weight, int64_t ignore_index, double jsd_beta, int64_t col_offset, int64_t row_vocab,
                  const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& row_grad) {
  check_rows(student, student, "student");
  check_rows(teacher, student, "teacher");
  const int64_t n_rows = student.size(0) * student.size(1);
  TORCH_CHECK(stats.device().is_cpu() && stats.scalar_type() == at::kFloat && stats.dim() == 2 &&
                  stats.size(0) == kNumStats && stats.size(1) == n_rows && stats.is_contiguous(),
              "stats must be the contiguous (", kNumStats, ", ", n_rows, ") float32 CPU tensor of forward, got ",
              stats.scalar_type(), " ", stats.sizes());
  LossSetup setup = make_setup(student.size(2), target_rows(target, n_rows), student_scale, teacher_scale, kl_coef,
                               ce_weight, /*weighted=*/false, ignore_index, jsd_beta);
  set_piece(setup, col_offset, row_vocab);
  const bool has_grad = grad.has_value() && grad->defined();
  if (has_grad) {
    check_rows(*grad, student, "grad");
    TORCH_CHECK(row_grad.has_value() && row_grad->defined(), "pieces with grad needs row_grad");
    set_row_grad(setup, *row_grad, n_rows);
  }
  at::Tensor sums = at::empty({kNumPieceSums, n_rows}, stats.options());
  if (n_rows == 0) return sums;
  const float* stats_ptr = stats.data_ptr<float>();
  float* sums_ptr = sums.data_ptr<float>();
  const Rows student_rows(student, "student"), teacher_rows(teacher, "teacher");
  const std::optional<Rows> grad_rows = has_grad ? std::optional<Rows>(gradient_rows(*grad)) : std::nullopt;
  at::parallel_for(0, n_rows, grain_rows(setup.vocab), [&](int64_t begin, int64_t end) {
    RowBuffers buffers;
    for (int64_t r = begin; r < end; ++r) {
      SecondPassSums row;
      if (is_ignored(setup, r)) {
        if (grad_rows) zero_row(*grad_rows, r, setup.vocab);
      } else {
        row = kl_gradient_row(student_rows, teacher_rows, grad_rows ? &*grad_rows : nullptr, setup, r,
                              load_stats(stats_ptr, n_rows, r), buffers);
      }
      sums_ptr[kPieceKl * n_rows + r] = row.kl;
      sums_ptr[kPieceDivGrad * n_rows + r] = row.div_grad;
      sums_ptr[kPieceEntropy * n_rows + r] = row.entropy;
    }
  });
  return sums;
}

std::string cpu_isa() { return block_kernels().isa; }

}  // namespace
}  // namespace ttm_cpu

// --- Sparse teachers: each row's k most likely ids and their log-probabilities (ops topk_forward, topk_backward,
// topk_partial).
//
// Per row, S is the row's ids other than the padding id -1, sorted ascending (the Python launcher sorts them
// once, the padding first), l_i their log-probabilities over the full vocabulary, R every other column; the
// definition is ttm_kernels/reference.py's topk_loss_rows. With s = student_scale and g = teacher_scale:
//   statistics: one streaming pass over z with the columns of S set to -inf (a two-pointer walk of the sorted
//             ids along the blocks) gives lse(s*z) over R, and lse(z) over R for the CE under a temperature,
//             exactly (no 1 - q_S cancellation); the k gathered logits add S to give the whole row's.
//   O(k) per row, in double: the teacher on S + {R} (its tail mass 1 - sum_S p summed in double), the student
//             on S + {R}, and their KL in the form that never cancels (see GradientOptions).
//   gradient: for j in R, kl_coef * (q_j - pt_R q_j / q_R) plus the CE's: the dense block kernel with the
//             student's own logits as the teacher, p_j = exp(s*z_j - (lse_R - log pt_R)); the k entries of S
//             are then overwritten with kl_coef * (q_i - pt_i) plus the CE's, before the block is stored.
// Statistics: (12, N) fp32, rows as ttm_kernels/_stats.py's TopkStat: Stat's, with the (max, log-sum) of s*z
// over R in the rows that hold the teacher's for a dense teacher.
// Rows in pieces (vocabulary shards): topk_partial gives a piece's sums over its columns of R, which merge (with
// the k logits of S, each from the piece that holds it) into these statistics; topk_backward then writes each
// piece's gradient.
namespace ttm_cpu {
namespace {

struct TopkSetup {
  LossSetup loss;
  const int32_t* ids;      // (N, k), each row sorted ascending
  const float* logprobs;   // (N, k), in the ids' order
  int64_t k;
  bool bucket;             // tail "bucket" (else "renormalize")
};

// A row's student statistics, as stored: (max, log-sum) pairs of s*z over the row and over R, and of z.
struct TopkStudent {
  float m_all, log_d_all, m_tail, log_d_tail, m_z, log_d_z;
};

// The row's transformed teacher on S + {R}: log of its normaliser sum_b p_b**g, the WTTM weight, log pt_R.
struct TopkTeacher {
  double log_norm, weight, log_pt_tail;
};

// Per-thread scratch of k entries.
struct TopkScratch {
  std::vector<float> z;    // the logits of S
  std::vector<float> fix;  // the gradient entries of S
  explicit TopkScratch(int64_t k) : z(k), fix(k) {}
};

double kl_term(double q, double p, double y) {
  // q * f(y) as in the block kernels' kl_term (see there), in double.
  if (std::fabs(y) < 0.5) return q * (y * std::exp(y) - std::expm1(y));
  return (p > 0.0 ? p * y : 0.0) + (q - p);
}

// The first of row r's sorted ids at or past `column` (the padding -1 sorts first).
int64_t first_id(const TopkSetup& setup, int64_t r, int64_t column) {
  const int32_t* ids = setup.ids + r * setup.k;
  return std::lower_bound(ids, ids + setup.k, column) - ids;
}

// The online sums of s*z (and z; with `entropy` the sums t_s) over the columns here outside S: the ids of S are
// row columns, the tensors' columns start at the row's column col_offset (a vocabulary shard's first).
RowAccumulators scan_tail(const Rows& student, const TopkSetup& setup, int64_t r, bool entropy, RowBuffers& buffers) {
  const BlockKernels& kernels = block_kernels();
  const LossSetup& loss = setup.loss;
  ScanOptions options{loss.student_scale, loss.student_scale, false, loss.separate_ce};
  options.has_teacher = false;
  options.entropy = entropy;
  const int32_t* ids = setup.ids + r * setup.k;
  const char* z_row = student.row(r);
  RowAccumulators sums;
  int64_t next = first_id(setup, r, loss.col_offset);
  for (int64_t start = 0; start < loss.vocab; start += kBlockSize) {
    const int64_t n = std::min(kBlockSize, loss.vocab - start), end = loss.col_offset + start + n;
    const float* z = student.block(z_row, start, n, buffers.z);
    if (next < setup.k && ids[next] < end) {
      if (z != buffers.z) {
        std::memcpy(buffers.z, z, n * sizeof(float));
        z = buffers.z;
      }
      for (; next < setup.k && ids[next] < end; ++next) buffers.z[ids[next] - (end - n)] = -INFINITY;
    }
    kernels.scan(z, nullptr, n, options, sums);
  }
  return sums;
}

// The logits of row r's ids from `first` on into z_s: those of the columns here, -inf for the others (another
// shard's: their gradient entries are written there).
void gather_s(const Rows& student, const TopkSetup& setup, int64_t r, int64_t first, float* z_s) {
  const LossSetup& loss = setup.loss;
  const int32_t* ids = setup.ids + r * setup.k;
  const char* z_row = student.row(r);
  for (int64_t i = first; i < setup.k; ++i) {
    const int64_t column = ids[i] - loss.col_offset;
    z_s[i - first] = column >= 0 && column < loss.vocab ? student.column(z_row, column) : -INFINITY;
  }
}

// One (max, sum) pair of the row's tail merged with the values x_i of S: the whole row's (max, log-sum).
void merge_with(float m_tail, float d_tail, const float* z_s, int64_t n, float scale, float& m_out,
                float& log_d_out) {
  float m = m_tail;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, scale * z_s[i]);
  double d = double(d_tail) * std::exp(double(m_tail) - m);
  for (int64_t i = 0; i < n; ++i) d += std::exp(double(scale * z_s[i]) - m);
  m_out = m;
  log_d_out = static_cast<float>(std::log(d));
}

TopkTeacher topk_teacher(const TopkSetup& setup, int64_t r, int64_t first) {
  const LossSetup& loss = setup.loss;
  const double g = loss.teacher_scale;
  const float* l = setup.logprobs + r * setup.k;
  double m_l = -INFINITY, m_w = -INFINITY;
  for (int64_t i = first; i < setup.k; ++i) {
    m_l = std::max(m_l, double(l[i]));
    m_w = std::max(m_w, g * l[i]);
  }
  // sum p shifted by the row's largest log-probability: a row whose log-probabilities all lie below about -745
  // underflows in double, and its renormalised weight needs log sum p, which is finite.
  const double shift = m_l > -INFINITY ? m_l : 0.0;
  double p_shifted = 0.0;
  for (int64_t i = first; i < setup.k; ++i) p_shifted += std::exp(double(l[i]) - shift);
  const double log_p_sum = shift + std::log(p_shifted);
  const double p_sum = std::exp(log_p_sum);
  // Under the power transform a residue counts: 1 - sum p in double, from the stored values.
  const double p_tail = setup.bucket && setup.k - first < loss.row_vocab ? std::max(0.0, 1.0 - p_sum) : 0.0;
  const double w_tail = g * std::log(p_tail);
  m_w = std::max(m_w, w_tail);
  double sum_w = std::exp(w_tail - m_w);
  for (int64_t i = first; i < setup.k; ++i) sum_w += std::exp(g * l[i] - m_w);
  TopkTeacher teacher;
  teacher.log_norm = m_w + std::log(sum_w);
  teacher.weight = !loss.weighted ? 1.0 : std::exp(teacher.log_norm - (setup.bucket ? 0.0 : g * log_p_sum));
  teacher.log_pt_tail = w_tail - teacher.log_norm;
  return teacher;
}

// The KL over S + {R} from the student's statistics and the logits of S; with `fix`, also writes the gradient
// entries of S (kl_coef, ce_coef as in GradientOptions).
double topk_kl(const TopkSetup& setup, int64_t r, int64_t first, const float* z_s, const TopkStudent& st,
               const TopkTeacher& teacher, float* fix, float kl_coef, float ce_coef) {
  const LossSetup& loss = setup.loss;
  const double g = loss.teacher_scale;
  const float s = loss.student_scale;
  const int32_t* ids = setup.ids + r * setup.k;
  const float* l = setup.logprobs + r * setup.k;
  const double log_q_tail = (double(st.m_tail) - st.m_all) + double(st.log_d_tail) - st.log_d_all;
  double kl = kl_term(std::exp(log_q_tail), std::exp(teacher.log_pt_tail), teacher.log_pt_tail - log_q_tail);
  const int64_t target = loss.target ? loss.target[r] : -1;
  for (int64_t i = 0; i < setup.k - first; ++i) {
    const double log_q = (double(s * z_s[i]) - st.m_all) - st.log_d_all;
    const double log_pt = g * l[first + i] - teacher.log_norm;
    const double q = std::exp(log_q), pt = std::exp(log_pt);
    kl += kl_term(q, pt, log_pt - log_q);
    if (fix) {
      double value = kl_coef * (q - pt);
      if (loss.target) {
        const double q_ce = loss.separate_ce ? std::exp((double(z_s[i]) - st.m_z) - st.log_d_z) : q;
        value += ce_coef * (q_ce - (ids[first + i] == target ? 1.0 : 0.0));
      }
      fix[i] = static_cast<float>(value);
    }
  }
  return kl;
}

// The student's entropy as reference.topk_loss_rows defines it, in double: over S + {R} with the bucket, over the
// vocabulary otherwise, where R's share sum_R q log q = e^c (T + c D) comes from the tail's online sums
// (D = sum e^(x - m_R), T = sum e^(x - m_R) (x - m_R), x = s*z) with c = log q_j - (x_j - m_R).
double topk_entropy(const TopkSetup& setup, int64_t first, const float* z_s, const TopkStudent& st, float tail_t,
                    float tail_d) {
  const float s = setup.loss.student_scale;
  double q_log_q = 0.0;
  for (int64_t i = 0; i < setup.k - first; ++i) {
    const double log_q = (double(s * z_s[i]) - st.m_all) - st.log_d_all;
    const double q = std::exp(log_q);
    if (q > 0.0) q_log_q += q * log_q;
  }
  const double c = (double(st.m_tail) - st.m_all) - st.log_d_all;
  if (setup.bucket) {
    const double log_q_tail = c + double(st.log_d_tail);
    const double q_tail = std::exp(log_q_tail);
    if (q_tail > 0.0) q_log_q += q_tail * log_q_tail;
  } else if (tail_d > 0.0f) {
    q_log_q += std::exp(c) * (double(tail_t) + c * tail_d);
  }
  return -q_log_q;
}

// Writes row r's gradient over the columns here: the dense block kernel over every column (R's entries), the
// entries of S here overwritten from `fix` (indexed from the row's first id) before each block is stored.
void topk_gradient_row(const Rows& student, const Rows& grad, const TopkSetup& setup, int64_t r, int64_t first,
                       const TopkStudent& st, const TopkTeacher& teacher, const float* fix, float kl_coef,
                       float ce_coef, RowBuffers& buffers) {
  const LossSetup& loss = setup.loss;
  const int32_t* ids = setup.ids + r * setup.k;
  GradientOptions options;
  options.student_scale = loss.student_scale;
  options.teacher_scale = loss.student_scale;
  options.m_s = st.m_all;
  options.log_d_s = st.log_d_all;
  // p_j = pt_R q_j / q_R = exp(s*z_j - (lse_R - log pt_R)); none where R is empty or all -inf.
  options.m_t = st.m_tail;
  options.log_d_t = std::isfinite(st.log_d_tail) ? static_cast<float>(st.log_d_tail - teacher.log_pt_tail) : INFINITY;
  options.m_z = st.m_z;
  options.log_d_z = st.log_d_z;
  options.kl_coef = kl_coef;
  options.ce_coef = ce_coef;
  options.has_target = loss.target != nullptr;
  options.separate_ce = loss.separate_ce;
  const int64_t target = loss.target ? loss.target[r] : -1;
  const BlockKernels& kernels = block_kernels();
  const char* z_row = student.row(r);
  char* g_row = grad.row(r);
  int64_t next = first_id(setup, r, loss.col_offset);
  for (int64_t start = 0; start < loss.vocab; start += kBlockSize) {
    const int64_t n = std::min(kBlockSize, loss.vocab - start);
    const float* z = student.block(z_row, start, n, buffers.z);
    float* out = grad.dtype == Dtype::Float32 ? reinterpret_cast<float*>(g_row) + start : buffers.grad;
    if (overlaps(out, z, n * sizeof(float))) {  // an fp32 gradient written over its own input
      std::memcpy(buffers.z, z, n * sizeof(float));
      z = buffers.z;
    }
    const int64_t column = loss.col_offset + start;  // the row column of the block's first
    options.target_column = target - column;
    // The entries of S are garbage here (z_i may exceed R's maximum) and are overwritten next.
    kernels.kl_gradient(z, z, n, options, out);
    for (; next < setup.k && ids[next] < column + n; ++next) out[ids[next] - column] = fix[next - first];
    if (grad.dtype != Dtype::Float32) kernels.store(out, n, g_row + start * grad.element_size, grad.dtype);
  }
}

float row_grad_of(const LossSetup& setup, int64_t r) { return setup.row_grad[r * setup.row_grad_stride]; }

float checked_ce_coef(const LossSetup& setup, int64_t r, float row_grad) {
  const int64_t target = setup.target ? setup.target[r] : -1;
  // A class index outside [0, V) poisons the row's gradient, never a silent answer.
  return !setup.target || (target >= 0 && target < setup.row_vocab) ? row_grad * setup.ce_weight
                                                                      : std::numeric_limits<float>::quiet_NaN();
}

// `logprobs` may be absent (topk_partial reads no teacher); the student may be a piece of the rows, columns
// [col_offset, col_offset + V) of row_vocab (default: the whole rows).
TopkSetup make_topk_setup(const at::Tensor& student, const at::Tensor& ids, const at::Tensor* logprobs,
                          const std::optional<at::Tensor>& target, double student_scale, double teacher_scale,
                          double kl_coef, double ce_weight, bool weighted, bool bucket, int64_t ignore_index,
                          int64_t col_offset = 0, int64_t row_vocab = -1) {
  check_rows(student, student, "student");
  const int64_t n_rows = student.size(0) * student.size(1);
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kInt && ids.dim() == 2 && ids.size(0) == n_rows &&
                  ids.size(1) >= 1 && ids.is_contiguous(),
              "ids must be a contiguous int32 CPU tensor of shape (", n_rows, ", k >= 1), got ", ids.scalar_type(),
              " ", ids.sizes());
  TORCH_CHECK(!logprobs || (logprobs->device().is_cpu() && logprobs->scalar_type() == at::kFloat &&
                            logprobs->sizes() == ids.sizes() && logprobs->is_contiguous()),
              "logprobs must be a contiguous float32 CPU tensor of the ids' shape ", ids.sizes());
  TopkSetup setup;
  setup.loss = make_setup(student.size(2), target_rows(target, n_rows), student_scale, teacher_scale, kl_coef, ce_weight,
                          weighted, ignore_index);
  set_piece(setup.loss, col_offset, row_vocab < 0 ? student.size(2) : row_vocab);
  setup.ids = ids.data_ptr<int32_t>();
  setup.logprobs = logprobs ? logprobs->data_ptr<float>() : nullptr;
  setup.k = ids.size(1);
  setup.bucket = bucket;
  return setup;
}

at::Tensor topk_forward(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
                        const std::optional<at::Tensor>& target, double student_scale, double teacher_scale,
                        double kl_coef, double ce_weight, bool weighted, bool bucket, int64_t ignore_index,
                        const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& row_grad) {
  TopkSetup setup = make_topk_setup(student, ids, &logprobs, target, student_scale, teacher_scale, kl_coef,
                                    ce_weight, weighted, bucket, ignore_index);
  const LossSetup& loss = setup.loss;
  const int64_t n_rows = student.size(0) * student.size(1);
  const bool has_grad = grad.has_value() && grad->defined();
  if (has_grad) {
    check_rows(*grad, student, "grad");
    TORCH_CHECK(row_grad.has_value() && row_grad->defined(), "topk_forward with grad needs row_grad");
    set_row_grad(setup.loss, *row_grad, n_rows);
  }
  at::Tensor stats = at::empty({kNumStats, n_rows}, student.options().dtype(at::kFloat));
  if (n_rows == 0) return stats;
  const Rows student_rows(student, "student");
  const std::optional<Rows> grad_rows = has_grad ? std::optional<Rows>(gradient_rows(*grad)) : std::nullopt;
  float* stats_ptr = stats.data_ptr<float>();
  at::parallel_for(0, n_rows, grain_rows(loss.vocab), [&](int64_t begin, int64_t end) {
    RowBuffers buffers;
    TopkScratch scratch(setup.k);
    for (int64_t r = begin; r < end; ++r) {
      if (is_ignored(loss, r)) {
        for (int64_t k = 0; k < kNumStats; ++k) stats_ptr[k * n_rows + r] = 0.0f;
        if (grad_rows) zero_row(*grad_rows, r, loss.vocab);
        continue;
      }
      const int64_t first = first_id(setup, r, 0), n = setup.k - first;
      // The renormalised teacher's entropy is the student's over the vocabulary: R's share needs t_s.
      const RowAccumulators sums = scan_tail(student_rows, setup, r, !setup.bucket, buffers);
      gather_s(student_rows, setup, r, first, scratch.z.data());
      TopkStudent st;
      st.m_tail = sums.m_s;
      st.log_d_tail = std::log(sums.d_s);
      merge_with(sums.m_s, sums.d_s, scratch.z.data(), n, loss.student_scale, st.m_all, st.log_d_all);
      if (loss.separate_ce) {
        merge_with(sums.m_z, sums.d_z, scratch.z.data(), n, 1.0f, st.m_z, st.log_d_z);
      } else {
        st.m_z = st.m_all;
        st.log_d_z = st.log_d_all;
      }
      RowStats row;
      row.ce = 0.0f;
      if (loss.target) {
        const int64_t y = loss.target[r];
        const float z_y = y >= 0 && y < loss.vocab ? student_rows.column(student_rows.row(r), y)
                                                   : std::numeric_limits<float>::quiet_NaN();
        row.ce = (st.m_z - z_y) + st.log_d_z;
      }
      const float row_grad = has_grad ? row_grad_of(loss, r) : 0.0f;
      const float ce_coef = checked_ce_coef(loss, r, row_grad);
      const TopkTeacher teacher = topk_teacher(setup, r, first);
      const float grad_kl_coef = static_cast<float>(row_grad * loss.kl_coef * teacher.weight * loss.student_scale);
      float* fix = grad_rows ? scratch.fix.data() : nullptr;
      row.kl = static_cast<float>(topk_kl(setup, r, first, scratch.z.data(), st, teacher, fix, grad_kl_coef, ce_coef));
      if (grad_rows) {
        topk_gradient_row(student_rows, *grad_rows, setup, r, first, st, teacher, fix, grad_kl_coef, ce_coef,
                          buffers);
      }
      row.weight = static_cast<float>(teacher.weight);
      row.loss = loss.kl_coef * row.weight * row.kl + loss.ce_weight * row.ce;
      row.div_grad = 0.0f;  // the forward KL's gradient needs no row sum
      row.entropy = static_cast<float>(topk_entropy(setup, first, scratch.z.data(), st, sums.t_s, sums.d_s));
      row.m_s = st.m_all;
      row.log_d_s = st.log_d_all;
      row.m_t = st.m_tail;
      row.log_d_t = st.log_d_tail;
      row.m_z = st.m_z;
      row.log_d_z = st.log_d_z;
      store_stats(row, stats_ptr, n_rows, r);
    }
  });
  return stats;
}

// Writes d(sum_i row_grad_i * loss_i)/dz into `grad` from the rows' statistics (topk_forward's, or those merged
// from topk_partial's): the logits of S and the teacher's O(k) terms are recomputed, the statistics pass is not.
// The student may be a piece of the rows, columns [col_offset, col_offset + V) of row_vocab (a vocabulary
// shard): the ids and the target are row columns, and the gradient is the piece's.
void topk_backward(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
                   const std::optional<at::Tensor>& target, const at::Tensor& stats, double student_scale,
                   double teacher_scale, double kl_coef, double ce_weight, bool bucket, int64_t ignore_index,
                   const at::Tensor& grad, const at::Tensor& row_grad, int64_t col_offset, int64_t row_vocab) {
  TopkSetup setup = make_topk_setup(student, ids, &logprobs, target, student_scale, teacher_scale, kl_coef,
                                    ce_weight, /*weighted=*/false, bucket, ignore_index, col_offset, row_vocab);
  const LossSetup& loss = setup.loss;
  const int64_t n_rows = student.size(0) * student.size(1);
  TORCH_CHECK(stats.device().is_cpu() && stats.scalar_type() == at::kFloat && stats.dim() == 2 &&
                  stats.size(0) == kNumStats && stats.size(1) == n_rows && stats.is_contiguous(),
              "stats must be the contiguous (", kNumStats, ", ", n_rows, ") float32 CPU tensor of topk_forward, got ",
              stats.scalar_type(), " ", stats.sizes());
  check_rows(grad, student, "grad");
  set_row_grad(setup.loss, row_grad, n_rows);
  if (n_rows == 0) return;
  const Rows student_rows(student, "student"), grad_rows = gradient_rows(grad);
  const float* stats_ptr = stats.data_ptr<float>();
  at::parallel_for(0, n_rows, grain_rows(loss.vocab), [&](int64_t begin, int64_t end) {
    RowBuffers buffers;
    TopkScratch scratch(setup.k);
    for (int64_t r = begin; r < end; ++r) {
      if (is_ignored(loss, r)) {
        zero_row(grad_rows, r, loss.vocab);
        continue;
      }
      const RowStats row = load_stats(stats_ptr, n_rows, r);
      const TopkStudent st{row.m_s, row.log_d_s, row.m_t, row.log_d_t, row.m_z, row.log_d_z};
      const int64_t first = first_id(setup, r, 0);
      gather_s(student_rows, setup, r, first, scratch.z.data());
      const float row_grad = row_grad_of(loss, r);
      const float ce_coef = checked_ce_coef(loss, r, row_grad);
      const float grad_kl_coef = row_grad * loss.kl_coef * row.weight * loss.student_scale;
      const TopkTeacher teacher = topk_teacher(setup, r, first);
      topk_kl(setup, r, first, scratch.z.data(), st, teacher, scratch.fix.data(), grad_kl_coef, ce_coef);
      topk_gradient_row(student_rows, grad_rows, setup, r, first, st, teacher, scratch.fix.data(), grad_kl_coef,
                        ce_coef, buffers);
    }
  });
}

// A piece of the rows' student (columns [col_offset, col_offset + V) of row_vocab, a vocabulary shard): its
// online sums over its columns outside S, which merge across the pieces (ttm_kernels/_topk_ops.py's TopkPieces)
// into the statistics topk_backward takes. (TopkPartial, N) fp32, rows: the (max, sum) of s*z, those of z (the CE
// under a student temperature; else a copy of s*z's), and w = sum e_j (m - s*z_j) >= 0, e_j = exp(s*z_j - m), the
// tail's share of the renormalised teacher's entropy (0 with the bucket). Ignored rows hold empty sums.
at::Tensor topk_partial(const at::Tensor& student, const at::Tensor& ids, const std::optional<at::Tensor>& target,
                        double student_scale, bool bucket, int64_t ignore_index, int64_t col_offset,
                        int64_t row_vocab) {
  const TopkSetup setup = make_topk_setup(student, ids, nullptr, target, student_scale, 1.0, 0.0, 0.0,
                                          /*weighted=*/false, bucket, ignore_index, col_offset, row_vocab);
  const LossSetup& loss = setup.loss;
  const int64_t n_rows = student.size(0) * student.size(1);
  at::Tensor partial = at::empty({kNumTopkPartial, n_rows}, student.options().dtype(at::kFloat));
  if (n_rows == 0) return partial;
  const Rows student_rows(student, "student");
  float* out = partial.data_ptr<float>();
  at::parallel_for(0, n_rows, grain_rows(loss.vocab), [&](int64_t begin, int64_t end) {
    RowBuffers buffers;
    for (int64_t r = begin; r < end; ++r) {
      RowAccumulators sums;
      if (!is_ignored(loss, r)) sums = scan_tail(student_rows, setup, r, !setup.bucket, buffers);
      if (!loss.separate_ce) {
        sums.m_z = sums.m_s;
        sums.d_z = sums.d_s;
      }
      const float values[kNumTopkPartial] = {sums.m_s, sums.d_s, sums.m_z, sums.d_z, -sums.t_s};
      for (int64_t i = 0; i < kNumTopkPartial; ++i) out[i * n_rows + r] = values[i];
    }
  });
  return partial;
}

}  // namespace
}  // namespace ttm_cpu

TORCH_LIBRARY(ttm_kernels_C, m) {
  m.def(
      "forward(Tensor student, Tensor teacher, Tensor? target, float student_scale, float teacher_scale, "
      "float kl_coef, float ce_weight, bool weighted, int ignore_index, float jsd_beta, Tensor(a!)? grad, "
      "Tensor? row_grad) -> Tensor");
  m.def(
      "partial(Tensor student, Tensor teacher, Tensor? target, float student_scale, float teacher_scale, "
      "bool weighted, int ignore_index, int col_offset) -> Tensor");
  m.def(
      "merge(Tensor partials, Tensor? target, float student_scale, float teacher_scale, bool weighted, "
      "int ignore_index, int row_vocab) -> Tensor");
  m.def(
      "pieces(Tensor student, Tensor teacher, Tensor? target, Tensor stats, float student_scale, "
      "float teacher_scale, float kl_coef, float ce_weight, int ignore_index, float jsd_beta, int col_offset, "
      "int row_vocab, Tensor(a!)? grad, Tensor? row_grad) -> Tensor");
  m.def(
      "topk_forward(Tensor student, Tensor ids, Tensor logprobs, Tensor? target, float student_scale, "
      "float teacher_scale, float kl_coef, float ce_weight, bool weighted, bool bucket, int ignore_index, "
      "Tensor(a!)? grad, Tensor? row_grad) -> Tensor");
  m.def(
      "topk_backward(Tensor student, Tensor ids, Tensor logprobs, Tensor? target, Tensor stats, "
      "float student_scale, float teacher_scale, float kl_coef, float ce_weight, bool bucket, int ignore_index, "
      "Tensor(a!) grad, Tensor row_grad, int col_offset, int row_vocab) -> ()");
  m.def(
      "topk_partial(Tensor student, Tensor ids, Tensor? target, float student_scale, bool bucket, int ignore_index, "
      "int col_offset, int row_vocab) -> Tensor");
  // The instruction set the block kernels were picked for ("avx512", "avx2" or "baseline").
  m.def("cpu_isa() -> str", &ttm_cpu::cpu_isa);
}

TORCH_LIBRARY_IMPL(ttm_kernels_C, CPU, m) {
  m.impl("forward", &ttm_cpu::forward);
  m.impl("partial", &ttm_cpu::partial);
  m.impl("merge", &ttm_cpu::merge);
  m.impl("pieces", &ttm_cpu::pieces);
  m.impl("topk_forward", &ttm_cpu::topk_forward);
  m.impl("topk_backward", &ttm_cpu::topk_backward);
  m.impl("topk_partial", &ttm_cpu::topk_partial);
}

// `import ttm_kernels._C` loads this library, which registers the ops above; the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
