// Block kernels compiled for AVX2 + FMA (x86-64-v3); used only on CPUs that support it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

#include "ttm_loss.h"

#if defined(TTM_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define TTM_ISA_NAMESPACE avx2
#define TTM_ISA_NAME "avx2"
#define TTM_ISA_HAS_FMA 1
#include "ttm_loss_blocks.h"
#pragma GCC pop_options

namespace ttm_cpu {
BlockKernels avx2_block_kernels() { return avx2::block_kernels(); }
}  // namespace ttm_cpu
#endif
