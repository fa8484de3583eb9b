// Block kernels compiled for AVX-512 (x86-64-v4) with 512-bit vectors; used only on CPUs that support it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

#include "ttm_loss.h"

#if defined(TTM_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,prefer-vector-width=512")
#define TTM_ISA_NAMESPACE avx512
#define TTM_ISA_NAME "avx512"
#define TTM_ISA_HAS_FMA 1
#include "ttm_loss_blocks.h"
#pragma GCC pop_options

namespace ttm_cpu {
BlockKernels avx512_block_kernels() { return avx512::block_kernels(); }
}  // namespace ttm_cpu
#endif
