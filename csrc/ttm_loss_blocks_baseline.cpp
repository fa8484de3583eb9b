// Block kernels for the compiler's default instruction set (SSE2 on x86-64); every CPU can run them.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

#include "ttm_loss.h"

#define TTM_ISA_NAMESPACE baseline
#define TTM_ISA_NAME "baseline"
#define TTM_ISA_HAS_FMA 0
#include "ttm_loss_blocks.h"

namespace ttm_cpu {
BlockKernels baseline_block_kernels() { return baseline::block_kernels(); }
}  // namespace ttm_cpu
