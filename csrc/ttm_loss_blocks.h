// Block kernels of the fused loss, written as plain loops that GCC vectorises (checked in the disassembly:
// no calls in the loops, zmm / ymm arithmetic in the AVX-512 / AVX2 builds).
//
// Included once per instruction set by ttm_loss_blocks_<isa>.cpp, after a `#pragma GCC target` and with
// TTM_ISA_NAMESPACE defined. Everything here has internal linkage, so that no function compiled for a wide
// instruction set can be merged by the linker with, and called in place of, its baseline twin. All the
// headers it needs must be included before the pragma, for the same reason.
//
// Expects: <algorithm>, <cmath>, <cstdint>, <cstring>, <c10/util/Half.h> and ttm_loss.h, and TTM_ISA_HAS_FMA.

namespace ttm_cpu {
namespace TTM_ISA_NAMESPACE {
namespace {

// Lets the reductions below be vectorised (each lane sums its own share) without -ffast-math.
#define TTM_SIMD_REDUCE(...) _Pragma(TTM_STRINGIFY(omp simd reduction(__VA_ARGS__)))
#define TTM_STRINGIFY(x) #x

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// a * b + c, fused where the instruction set has FMA. The build turns automatic contraction off
// (-ffp-contract=off) so that s * z - m rounds s * z first, exactly as the running maximum m did.
inline float mul_add(float a, float b, float c) {
#if TTM_ISA_HAS_FMA
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// exp(x) in fp32, branch-free so that it vectorises (Cephes expf: x = n ln2 + r with |r| <= ln2/2, a degree-6
// polynomial for exp(r), about 1 ulp). Returns 0 below -87.34 (no subnormals: such terms are below 1e-38 of
// the row maximum's), 0 for -inf, and NaN for NaN. Valid up to x = 88.3 only, unchecked: every caller passes
// a logit minus a maximum at least as large, minus a log-sum >= 0, so x <= 0.
inline float exp_fp32(float x) {
  constexpr float kMin = -87.33654f;          // exp(kMin) = 2^-126, the smallest normal
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float clamped = x < kMin ? kMin : x;  // keeps NaN
  const float shifted = mul_add(clamped, 1.44269504088896341f, kRoundMagic);
  const float n = shifted - kRoundMagic;
  float r = mul_add(n, -0.693359375f, clamped);  // ln2 split in two: n * ln2_hi is exact
  r = mul_add(n, 2.12194440e-4f, r);
  float poly = 1.9875691500e-4f;
  poly = mul_add(poly, r, 1.3981999507e-3f);
  poly = mul_add(poly, r, 8.3334519073e-3f);
  poly = mul_add(poly, r, 4.1665795894e-2f);
  poly = mul_add(poly, r, 1.6666665459e-1f);
  poly = mul_add(poly, r, 5.0000001201e-1f);
  poly = mul_add(poly, r * r, r) + 1.0f;
  // n sits in the low mantissa bits of `shifted`; 2^n is built from it with integer arithmetic only.
  const uint32_t two_to_n = (float_to_bits(shifted) - 0x4B400000u + 127u) << 23;
  const float result = poly * bits_to_float(two_to_n);
  return x < kMin ? 0.0f : result;
}

template <bool kWeighted, bool kSeparateCe, bool kTeacher = true, bool kEntropy = false>
inline void scan_block(const float* __restrict z, const float* __restrict v, int64_t n, const ScanOptions& options,
                       RowAccumulators& row) {
  const float s = options.student_scale, g = options.teacher_scale;
  float max_z = -INFINITY, max_v = -INFINITY;
  TTM_SIMD_REDUCE(max : max_z, max_v)
  for (int64_t i = 0; i < n; ++i) {
    max_z = z[i] > max_z ? z[i] : max_z;
    if (kTeacher) max_v = v[i] > max_v ? v[i] : max_v;
  }
  // max(s * z) = s * max(z) exactly: rounding is monotonic and s > 0.
  const float m_s = std::max(row.m_s, s * max_z);
  const float m_t = std::max(row.m_t, g * max_v);
  const float m_v = std::max(row.m_v, max_v);
  const float m_z = std::max(row.m_z, max_z);

  float d_s = 0.0f, d_t = 0.0f, d_v = 0.0f, d_z = 0.0f, t_s = 0.0f;
  TTM_SIMD_REDUCE(+ : d_s, d_t, d_v, d_z, t_s)
  for (int64_t i = 0; i < n; ++i) {
    const float e_s = exp_fp32(s * z[i] - m_s);
    d_s += e_s;
    if (kEntropy) t_s += e_s > 0.0f ? e_s * (s * z[i] - m_s) : 0.0f;  // 0 * -inf is 0 here
    if (kTeacher) d_t += exp_fp32(g * v[i] - m_t);
    if (kWeighted) d_v += exp_fp32(v[i] - m_v);
    if (kSeparateCe) d_z += exp_fp32(z[i] - m_z);
  }

  // Move the old sums into the new frames before adding this block's: sum e^(x - m') (x - m') =
  // e^(m - m') (sum e^(x - m) (x - m) + (m - m') sum e^(x - m)).
  if (kEntropy) row.t_s = exp_fp32(row.m_s - m_s) * (row.t_s + (row.m_s - m_s) * row.d_s) + t_s;
  row.d_s = row.d_s * exp_fp32(row.m_s - m_s) + d_s;
  row.d_t = row.d_t * exp_fp32(row.m_t - m_t) + d_t;
  row.m_s = m_s;
  row.m_t = m_t;
  if (kWeighted) {
    row.d_v = row.d_v * exp_fp32(row.m_v - m_v) + d_v;
    row.m_v = m_v;
  }
  if (kSeparateCe) {
    row.d_z = row.d_z * exp_fp32(row.m_z - m_z) + d_z;
    row.m_z = m_z;
  }
}

void scan(const float* z, const float* v, int64_t n, const ScanOptions& options, RowAccumulators& row) {
  if (!options.has_teacher) {
    if (options.entropy) {
      options.separate_ce ? scan_block<false, true, false, true>(z, v, n, options, row)
                          : scan_block<false, false, false, true>(z, v, n, options, row);
    } else {
      options.separate_ce ? scan_block<false, true, false>(z, v, n, options, row)
                          : scan_block<false, false, false>(z, v, n, options, row);
    }
  } else if (options.weighted) {
    options.separate_ce ? scan_block<true, true>(z, v, n, options, row)
                        : scan_block<true, false>(z, v, n, options, row);
  } else {
    options.separate_ce ? scan_block<false, true>(z, v, n, options, row)
                        : scan_block<false, false>(z, v, n, options, row);
  }
}

// q * f(y) with y = log(p / q), f(y) = (y - 1) e^y + 1 = sum_{n>=2} (n-1)/n! y^n >= 0. For |y| < 1/2 the series
// (to n = 10, below 1e-8 relative there) keeps its digits where the closed form would cancel; elsewhere the
// closed form p*y - p + q, with p*y = 0 where p = 0 (a class the teacher never picks, also when the student
// masks it too and y is NaN). Branch-free, so that the loops vectorise.
inline float kl_term(float q, float p, float y) {
  float poly = mul_add(y, 1.0f / 403200.0f, 1.0f / 45360.0f);
  poly = mul_add(y, poly, 1.0f / 5760.0f);
  poly = mul_add(y, poly, 1.0f / 840.0f);
  poly = mul_add(y, poly, 1.0f / 144.0f);
  poly = mul_add(y, poly, 1.0f / 30.0f);
  poly = mul_add(y, poly, 1.0f / 8.0f);
  poly = mul_add(y, poly, 1.0f / 3.0f);
  poly = mul_add(y, poly, 0.5f);
  const float series = q * (y * y * poly);
  const float closed = (p > 0.0f ? p * y : 0.0f) + (q - p);
  return std::fabs(y) < 0.5f ? series : closed;
}

// log(1 + x) in fp32 for x in [0, 1], branch-free so that the loops vectorise (a call to std::log1p kept the
// JSD's loop scalar, 18x slower than the forward KL's). Cephes logf on u = 1 + x (u = 2^e m, m in (0.707, 1.414],
// a degree-9 polynomial in m - 1), then the rounding of 1 + x corrected to first order: log1p(x) = log(u) +
// (x - (u - 1)) / u, where u - 1 and x - (u - 1) are exact. About 2 ulp.
inline float log1p_unit_fp32(float x) {
  const float u = 1.0f + x;
  const bool halve = u > 1.41421356f;
  const float e = halve ? 1.0f : 0.0f;
  const float t = (halve ? 0.5f * u : u) - 1.0f;
  const float t2 = t * t;
  float poly = 7.0376836292e-2f;
  poly = mul_add(poly, t, -1.1514610310e-1f);
  poly = mul_add(poly, t, 1.1676998740e-1f);
  poly = mul_add(poly, t, -1.2420140846e-1f);
  poly = mul_add(poly, t, 1.4249322787e-1f);
  poly = mul_add(poly, t, -1.6668057665e-1f);
  poly = mul_add(poly, t, 2.0000714765e-1f);
  poly = mul_add(poly, t, -2.4999993993e-1f);
  poly = mul_add(poly, t, 3.3333331174e-1f);
  float y = t * t2 * poly;
  y = mul_add(e, -2.12194440e-4f, y);  // ln2 split in two, as in exp_fp32
  y = mul_add(t2, -0.5f, y);
  const float log_u = mul_add(e, 0.693359375f, t + y);
  return log_u + (x - (u - 1.0f)) / u;
}

// log(e^x + e^y), -inf when both are -inf (where x - y would be NaN).
inline float log_add_exp(float x, float y) {
  const float high = x > y ? x : y, low = x > y ? y : x;
  return high == -INFINITY ? -INFINITY : high + log1p_unit_fp32(exp_fp32(low - high));
}

// The second pass over n columns (see GradientOptions and SecondPassSums). Per column, with log q = a - log_d_s
// and log p = b - log_d_t (a, b the logits minus their maxima), y = log(p / q):
//   forward KL: q f(y), gradient q - p;
//   reverse KL: p f(-y), gradient q (-y - D), D the row's reverse KL (options.div_grad);
//   JSD:        beta m f(log p/m) + (1 - beta) m f(log q/m), gradient (1 - beta) q (log q/m - K), K = KL(q || m);
// times kl_coef (which carries s), plus the cross-entropy's. A class of q = 0 adds no gradient: its q log q
// terms are 0 (never 0 * inf).
template <Divergence kDivergence, bool kStoreGrad, bool kHasTarget, bool kSeparateCe>
inline SecondPassSums kl_gradient_block(const float* __restrict z, const float* __restrict v, int64_t n,
                                        const GradientOptions& options, float* __restrict grad) {
  const float s = options.student_scale, g = options.teacher_scale;
  const float m_s = options.m_s, log_d_s = options.log_d_s, m_t = options.m_t, log_d_t = options.log_d_t;
  const float m_z = options.m_z, log_d_z = options.log_d_z;
  const float log_ratio = log_d_t - log_d_s;
  const float kl_coef = options.kl_coef, ce_coef = options.ce_coef;
  const float beta = options.jsd_beta, log_beta = std::log(beta), log_rest = std::log1p(-beta);
  const float div_grad = options.div_grad;
  const int64_t target_column = options.target_column;
  float kl = 0.0f, student_kl = 0.0f, entropy = 0.0f;
  TTM_SIMD_REDUCE(+ : kl, student_kl, entropy)
  for (int64_t i = 0; i < n; ++i) {
    const float a = z[i] * s - m_s;
    const float b = v[i] * g - m_t;
    const float q = exp_fp32(a - log_d_s);
    const float p = exp_fp32(b - log_d_t);
    const float log_q = a - log_d_s;
    entropy -= q > 0.0f ? q * log_q : 0.0f;
    float kl_grad = 0.0f;
    if (kDivergence == Divergence::kForwardKl) {
      kl += kl_term(q, p, (b - a) - log_ratio);
      kl_grad = q - p;
    } else if (kDivergence == Divergence::kReverseKl) {
      const float y = (a - b) + log_ratio;  // log(q / p)
      kl += kl_term(p, q, y);
      kl_grad = q > 0.0f ? q * (y - div_grad) : 0.0f;
    } else {
      const float log_p = b - log_d_t;
      const float log_m = log_add_exp(log_p + log_beta, log_q + log_rest);
      const float m = beta * p + (1.0f - beta) * q;
      const float q_term = kl_term(m, q, log_q - log_m);
      kl += beta * kl_term(m, p, log_p - log_m) + (1.0f - beta) * q_term;
      student_kl += q_term;
      kl_grad = q > 0.0f ? (1.0f - beta) * q * ((log_q - log_m) - div_grad) : 0.0f;
    }
    if (kStoreGrad) {
      float value = kl_coef * kl_grad;
      if (kHasTarget) {
        const float q_ce = kSeparateCe ? exp_fp32((z[i] - m_z) - log_d_z) : q;
        value += ce_coef * (q_ce - (i == target_column ? 1.0f : 0.0f));
      }
      grad[i] = value;
    }
  }
  SecondPassSums sums;
  sums.kl = kl;
  sums.div_grad = kDivergence == Divergence::kReverseKl ? kl : student_kl;
  sums.entropy = entropy;
  return sums;
}

template <Divergence kDivergence>
SecondPassSums kl_gradient_of(const float* z, const float* v, int64_t n, const GradientOptions& options,
                              float* grad) {
  if (grad == nullptr) return kl_gradient_block<kDivergence, false, false, false>(z, v, n, options, grad);
  if (!options.has_target) return kl_gradient_block<kDivergence, true, false, false>(z, v, n, options, grad);
  if (options.separate_ce) return kl_gradient_block<kDivergence, true, true, true>(z, v, n, options, grad);
  return kl_gradient_block<kDivergence, true, true, false>(z, v, n, options, grad);
}

SecondPassSums kl_gradient(const float* z, const float* v, int64_t n, const GradientOptions& options, float* grad) {
  switch (options.divergence) {
    case Divergence::kReverseKl: return kl_gradient_of<Divergence::kReverseKl>(z, v, n, options, grad);
    case Divergence::kJsd: return kl_gradient_of<Divergence::kJsd>(z, v, n, options, grad);
    default: return kl_gradient_of<Divergence::kForwardKl>(z, v, n, options, grad);
  }
}

void load(const void* src, Dtype dtype, int64_t n, float* __restrict dst) {
  switch (dtype) {
    case Dtype::Float32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case Dtype::BFloat16: {
      const auto* bits = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_float(uint32_t(bits[i]) << 16);
      break;
    }
    case Dtype::Float16: {
      const auto* half = static_cast<const c10::Half*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(half[i]);
      break;
    }
    case Dtype::Float64: {
      const auto* wide = static_cast<const double*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(wide[i]);
      break;
    }
  }
}

void store(const float* __restrict src, int64_t n, void* dst, Dtype dtype) {
  switch (dtype) {
    case Dtype::Float32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case Dtype::BFloat16: {
      // Round to nearest even, as c10::BFloat16 does; NaN stays a (quiet) NaN.
      auto* out = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t bits = float_to_bits(src[i]);
        const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
        out[i] = src[i] != src[i] ? uint16_t(0x7FC0) : uint16_t(rounded);
      }
      break;
    }
    case Dtype::Float16: {
      auto* out = static_cast<c10::Half*>(dst);
      for (int64_t i = 0; i < n; ++i) out[i] = c10::Half(src[i]);
      break;
    }
    case Dtype::Float64: {
      auto* out = static_cast<double*>(dst);
      for (int64_t i = 0; i < n; ++i) out[i] = src[i];
      break;
    }
  }
}

#undef TTM_SIMD_REDUCE
#undef TTM_STRINGIFY

}  // namespace

BlockKernels block_kernels() { return {TTM_ISA_NAME, scan, kl_gradient, load, store}; }

}  // namespace TTM_ISA_NAMESPACE
}  // namespace ttm_cpu
