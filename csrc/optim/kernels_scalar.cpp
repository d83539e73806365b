// Portable path: one lane at a time (any architecture; the reference semantics).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "optim/optim.hpp"

// Fused multiply-adds only where written (std::fma), as in torch's kernels.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "optim/kernel_body.hpp"

namespace memascend {
namespace optim {

KernelTable scalar_kernels() { return make_table<S1>(); }

}  // namespace optim
}  // namespace memascend
