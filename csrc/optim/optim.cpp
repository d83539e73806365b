// Dispatch of the fused optimizer kernels: coefficients, ISA selection and
// OpenMP over fixed-size blocks.
#include "optim/optim.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

// The coefficient arithmetic must round like Python's (no contraction into FMAs).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace memascend {
namespace optim {
namespace {

// Elements per OpenMP task. Any split gives the same result (the update is
// element-wise and every path rounds the same way); blocks only bound the
// scheduling granularity. A multiple of every vector width.
constexpr size_t kBlock = size_t(1) << 15;
// Sum-of-squares partials are per fixed chunk and added in order, so the norm
// does not depend on the number of threads.
constexpr size_t kStatChunk = size_t(1) << 16;
static_assert(kBlock % 64 == 0 && kStatChunk % kStatLanes == 0, "block sizes");

bool cpu_has_f16c() {
#if defined(__x86_64__)
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
    return (ecx & bit_F16C) != 0;
#else
    return false;
#endif
}

Isa detect_best() {
#if defined(__x86_64__)
    __builtin_cpu_init();
    // __builtin_cpu_supports also checks that the OS saves the AVX/AVX-512 state.
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
    if (avx2 && __builtin_cpu_supports("avx512f")) return Isa::Avx512;
    if (avx2) return Isa::Avx2;
#endif
    return Isa::Scalar;
}

std::atomic<int> g_active{-1};

KernelTable table_for(Isa isa) {
    switch (isa) {
#if defined(__x86_64__)
        // Only called for a supported ISA: these functions are compiled for it.
        case Isa::Avx512: return avx512_kernels();
        case Isa::Avx2: return avx2_kernels();
#endif
        default: return scalar_kernels();
    }
}

struct Tables {
    KernelTable t[3];
    Tables() {
        const Isa best = best_isa();
        for (int i = 0; i < 3; ++i)
            t[i] = (i <= int(best)) ? table_for(Isa(i)) : scalar_kernels();
    }
};

const KernelTable& active_table() {
    static const Tables tables;
    return tables.t[int(active_isa())];
}

}  // namespace

AdamCoeffs make_coeffs(const AdamHyper& h) {
    // Same expressions, in double, as torch's _single_tensor_adam with Python
    // floats; each constant is rounded to fp32 once, where torch converts the
    // Scalar argument of the corresponding kernel.
    AdamCoeffs c{};
    c.grad_scale = float(h.grad_scale);
    c.apply_decay = h.adamw && h.weight_decay != 0.0;
    c.decay = float(1.0 - h.lr * h.weight_decay);
    c.apply_l2 = !h.adamw && h.weight_decay != 0.0;
    c.l2 = float(h.weight_decay);
    const float w = float(1.0 - h.beta1);
    c.lerp_small = std::fabs(w) < 0.5f;
    c.lerp_w = c.lerp_small ? w : w - 1.0f;
    c.beta2 = float(h.beta2);
    c.one_minus_beta2 = float(1.0 - h.beta2);
    const double step = double(h.step);
    const double bias_correction1 = 1.0 - std::pow(h.beta1, step);
    const double bias_correction2 = 1.0 - std::pow(h.beta2, step);
    const double step_size = h.lr / bias_correction1;
    c.bc2_sqrt = float(std::pow(bias_correction2, 0.5));  // Python's `** 0.5` is pow(), not sqrt()
    c.eps = float(h.eps);
    c.neg_step_size = float(-step_size);
    return c;
}

Isa best_isa() {
    static const Isa best = detect_best();
    return best;
}

bool isa_supported(Isa isa) { return int(isa) <= int(best_isa()); }

Isa active_isa() {
    const int a = g_active.load(std::memory_order_relaxed);
    return a < 0 ? best_isa() : Isa(a);
}

void set_isa(Isa isa) {
    if (!isa_supported(isa))
        throw std::invalid_argument(std::string("optimizer ISA '") + isa_name(isa) +
                                    "' is not supported by this CPU (best: '" + isa_name(best_isa()) + "')");
    g_active.store(int(isa), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::Avx512: return "avx512";
        case Isa::Avx2: return "avx2";
        default: return "scalar";
    }
}

bool parse_isa(const std::string& name, Isa* out) {
    if (name == "scalar") *out = Isa::Scalar;
    else if (name == "avx2") *out = Isa::Avx2;
    else if (name == "avx512") *out = Isa::Avx512;
    else return false;
    return true;
}

bool parse_dtype(const std::string& name, DType* out) {
    if (name == "float32" || name == "fp32") *out = DType::F32;
    else if (name == "bfloat16" || name == "bf16") *out = DType::BF16;
    else if (name == "float16" || name == "fp16" || name == "half") *out = DType::F16;
    else return false;
    return true;
}

const char* dtype_name(DType d) {
    switch (d) {
        case DType::BF16: return "bfloat16";
        case DType::F16: return "float16";
        default: return "float32";
    }
}

size_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

void adam_step(const AdamBuffers& b, const AdamHyper& h) {
    if (b.n == 0) return;
    const AdamCoeffs c = make_coeffs(h);
    const KernelTable& t = active_table();
    const int64_t nblocks = int64_t((b.n + kBlock - 1) / kBlock);
#if defined(MEMASCEND_HAVE_OPENMP)
#pragma omp parallel for schedule(static) if (nblocks > 1)
#endif
    for (int64_t k = 0; k < nblocks; ++k) {
        const size_t begin = size_t(k) * kBlock;
        t.adam(b, c, begin, std::min(b.n, begin + kBlock));
    }
}

GradStats grad_stats(const void* grad, DType dtype, size_t n) {
    GradStats s;
    if (n == 0) return s;
    const KernelTable& t = active_table();
    const int64_t nchunks = int64_t((n + kStatChunk - 1) / kStatChunk);
    std::vector<double> partial(size_t(nchunks), 0.0);
#if defined(MEMASCEND_HAVE_OPENMP)
#pragma omp parallel for schedule(static) if (nchunks > 1)
#endif
    for (int64_t k = 0; k < nchunks; ++k) {
        const size_t begin = size_t(k) * kStatChunk;
        double lanes[kStatLanes] = {};
        t.sumsq(grad, dtype, begin, std::min(n, begin + kStatChunk), lanes);
        double sum = 0.0;
        for (double l : lanes) sum += l;
        partial[size_t(k)] = sum;
    }
    for (double p : partial) s.sumsq += p;
    // A square of a finite fp32/bf16/fp16 value is at most ~1.2e77, so the fp64
    // sum of any realistic count of them stays finite: the sum is non-finite
    // exactly when some element is inf or NaN. No separate pass or flag needed.
    s.nonfinite = !std::isfinite(s.sumsq);
    return s;
}

void cast_f32(const float* src, void* dst, DType dst_dtype, size_t n) {
    if (n == 0) return;
    const KernelTable& t = active_table();
    const int64_t nblocks = int64_t((n + kBlock - 1) / kBlock);
#if defined(MEMASCEND_HAVE_OPENMP)
#pragma omp parallel for schedule(static) if (nblocks > 1)
#endif
    for (int64_t k = 0; k < nblocks; ++k) {
        const size_t begin = size_t(k) * kBlock;
        t.cast(src, dst, dst_dtype, begin, std::min(n, begin + kBlock));
    }
}

}  // namespace optim
}  // namespace memascend
