// Shared declarations of the fused TTM / WTTM / KD loss CPU kernel (see ttm_loss.cpp).
//
// The per-row driver (ttm_loss.cpp) walks each row in blocks of kBlockSize columns and hands every block,
// as fp32, to a table of block kernels. The block kernels are compiled once per instruction set
// (ttm_loss_blocks_*.cpp, all from ttm_loss_blocks.h) and the widest one the CPU supports is picked at
// load time, so the build needs no -march flag and runs on any x86-64 (or other) CPU.
#pragma once

#include <cstdint>

// x86-64 with GCC: the block kernels are also compiled for AVX2 and AVX-512 (with #pragma GCC target).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TTM_X86_DISPATCH 1
#endif

namespace ttm_cpu {

// Columns per block: the fp32 copies of one block of z, v and the gradient (24 KiB) stay in L1.
constexpr int64_t kBlockSize = 2048;

// Initial running maximum: finite, so that exp(-inf - m) = 0 and exp(m - m) = 1 and an all -inf prefix of a
// row never produces inf - inf.
constexpr float kInitialMax = -1.0e30f;

enum class Dtype : int { Float32, BFloat16, Float16, Float64 };

// Online (max, sum of exp) state of one row, kept relative to the running maxima:
//   d_s = sum exp(s*z - m_s), d_t = sum exp(g*v - m_t), d_v = sum exp(v - m_v), d_z = sum exp(z - m_z).
struct RowAccumulators {
  float m_s = kInitialMax, d_s = 0.0f;
  float t_s = 0.0f;  // sum exp(s*z - m_s) * (s*z - m_s): the student's entropy (ScanOptions::entropy only)
  float m_t = kInitialMax, d_t = 0.0f;
  float m_v = kInitialMax, d_v = 0.0f;  // lse(v): WTTM weight only
  float m_z = kInitialMax, d_z = 0.0f;  // lse(z): cross-entropy under a student temperature only
};

struct ScanOptions {
  float student_scale, teacher_scale;
  bool weighted;     // accumulate lse(v)
  bool separate_ce;  // accumulate lse(z)
  bool has_teacher = true;  // false: v is not read (a top-k teacher has no row), only the student's sums move
  bool entropy = false;     // accumulate t_s (with !has_teacher only: a top-k teacher's tail)
};

// The divergence of the second pass (LossSpec.jsd_beta): 0 the forward KL(p || q), 1 the reverse KL(q || p),
// in between the generalised JSD beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q.
enum class Divergence : int { kForwardKl, kReverseKl, kJsd };

// A second pass's sums over its columns: the divergence's terms, the row sum its gradient needs (the reverse
// KL's own terms, the JSD's KL(q || m); 0 for the forward KL) and the student's entropy terms -q log q.
struct SecondPassSums {
  float kl = 0.0f, div_grad = 0.0f, entropy = 0.0f;
};

// The second pass over a row, with the row's final statistics. It sums KL(p || q), p = softmax(g*v) and
// q = softmax(s*z), as sum_i q_i f(log(p_i / q_i)) with f(y) = y e^y - e^y + 1 >= 0: no term is negative, so
// the sum never cancels (the one-pass form E_p[g*v - s*z] - lse(g*v) + lse(s*z) loses all its digits when
// KL << log V, e.g. KD at a large temperature). Given an output it also writes the gradient
// d/dz = kl_coef * (q - p) + ce_coef * (softmax(z) - onehot(y)), where kl_coef already carries
// beta * kl_scale * weight * s and the row's upstream gradient.
// Probabilities are recomputed as exp((x - max) - log_sum), max and log-sum kept apart (as log_softmax does):
// their fp32 sum, the lse, would lose the log-sum's bits next to a logit of 1e4.
struct GradientOptions {
  float student_scale, teacher_scale;
  float m_s, log_d_s, m_t, log_d_t, m_z, log_d_z;
  float kl_coef, ce_coef;
  Divergence divergence = Divergence::kForwardKl;
  float jsd_beta = 0.0f;  // the JSD's mixture weight
  float div_grad = 0.0f;  // the row's (merged) DIV_GRAD sum: the reverse KL's and the JSD's gradient need it
  bool has_target;
  bool separate_ce;  // softmax(z) from lse_z rather than softmax(s*z)
  int64_t target_column;  // y relative to the block's first column (may lie outside the block)
};

struct BlockKernels {
  const char* isa;
  // Folds n columns of z and v into the row state (of z alone when !options.has_teacher; v may be null then).
  void (*scan)(const float* z, const float* v, int64_t n, const ScanOptions& options, RowAccumulators& row);
  // Returns the sums of n columns and, unless `grad` is null, writes their fp32 gradient; `grad` must not alias
  // z or v. The reverse KL's and the JSD's gradient reads options.div_grad, the row's sum, from an earlier pass.
  SecondPassSums (*kl_gradient)(const float* z, const float* v, int64_t n, const GradientOptions& options,
                                float* grad);
  void (*load)(const void* src, Dtype dtype, int64_t n, float* dst);
  // Rounds n fp32 values once (to nearest even) into dst's dtype.
  void (*store)(const float* src, int64_t n, void* dst, Dtype dtype);
};

BlockKernels baseline_block_kernels();
#if defined(TTM_X86_DISPATCH)
BlockKernels avx2_block_kernels();
BlockKernels avx512_block_kernels();
#endif

}  // namespace ttm_cpu
