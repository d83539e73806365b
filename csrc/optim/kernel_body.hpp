// The element-wise kernels, written once over a small SIMD interface V and
// compiled once per ISA: each kernels_<isa>.cpp includes this header inside its
// own `#pragma GCC target` region, after the standard headers. Everything here
// has internal linkage, so the AVX-512 copy of a function can never be picked
// by the linker for the scalar path.
//
// Interface of V (S1 below is the one-lane reference):
//   F, W                          vector of W floats
//   set1, loadf, storef, add, sub, mul, div, sqrt, fma (fused, one rounding)
//   load<D>(base, i), store<D>(base, i, x)   W elements of dtype D at index i
//   Acc, acc_load, acc_store, acc16<D>       16 fp64 sum-of-squares lanes
//
// The arithmetic copies torch's _single_tensor_adam op by op (see AdamCoeffs);
// fused multiply-adds are used exactly where torch's CPU kernels use them (lerp,
// addcmul, add with alpha), nowhere else: the including file turns off the
// compiler's own contraction with -ffp-contract=off.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "optim/optim.hpp"

namespace memascend {
namespace optim {
namespace {

inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

// Round to nearest even. NaN becomes 0xFFFF, as torch's vectorized conversion
// (which .to(torch.bfloat16) uses on x86) produces.
inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFu;
    return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Exact; NaN keeps sign and payload and becomes quiet, like F16C's vcvtph2ps.
inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    const uint32_t mant = h & 0x3FFu;
    if (exp == 0x1F) return bits_f32(sign | 0x7F800000u | (mant ? 0x00400000u | (mant << 13) : 0u));
    if (exp != 0) return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
    const float mag = float(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
    return bits_f32(sign | f32_bits(mag));
}

// Round to nearest even, overflow to inf, subnormals exact; NaN keeps sign and
// the top payload bits and becomes quiet, like F16C's vcvtps2ph (torch on x86).
inline uint16_t f32_to_f16(float f) {
    const uint32_t u = f32_bits(f);
    const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
    if (a >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // >= 65520 rounds to inf
    if (a >= 0x38800000u) {                                 // normal half (>= 2^-14)
        // Re-bias the exponent (-112 << 23) and round the 13 dropped bits to even.
        return uint16_t(sign | ((a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13));
    }
    if (a < 0x33000000u) return sign;  // <= 2^-25 rounds to zero (2^-25 ties to even)
    // Subnormal half: units of 2^-24.
    const uint32_t e = a >> 23;  // 102..112
    const uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return uint16_t(sign | q);
}

template <DType D>
inline float load_one(const void* base, size_t i) {
    if constexpr (D == DType::F32) {
        return static_cast<const float*>(base)[i];
    } else if constexpr (D == DType::BF16) {
        return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    } else {
        return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
    }
}

template <DType D>
inline void store_one(void* base, size_t i, float x) {
    if constexpr (D == DType::F32) {
        static_cast<float*>(base)[i] = x;
    } else if constexpr (D == DType::BF16) {
        static_cast<uint16_t*>(base)[i] = f32_to_bf16(x);
    } else {
        static_cast<uint16_t*>(base)[i] = f32_to_f16(x);
    }
}

// One lane: the reference semantics, the whole scalar path and every SIMD tail.
struct S1 {
    using F = float;
    static constexpr size_t W = 1;
    static F set1(float x) { return x; }
    static F loadf(const float* p) { return *p; }
    static void storef(float* p, F x) { *p = x; }
    static F add(F a, F b) { return a + b; }
    static F sub(F a, F b) { return a - b; }
    static F mul(F a, F b) { return a * b; }
    static F div(F a, F b) { return a / b; }
    // Builtins, not std::sqrt/std::fma: those are defined outside this file's
    // optimize/target region, so GCC would not inline them here.
    static F sqrt(F a) { return __builtin_sqrtf(a); }
    static F fma(F a, F b, F c) { return __builtin_fmaf(a, b, c); }
    template <DType D>
    static F load(const void* base, size_t i) { return load_one<D>(base, i); }
    template <DType D>
    static void store(void* base, size_t i, F x) { store_one<D>(base, i, x); }

    struct Acc {
        double l[kStatLanes];
    };
    static Acc acc_load(const double* lanes) {
        Acc a;
        for (size_t j = 0; j < kStatLanes; ++j) a.l[j] = lanes[j];
        return a;
    }
    static void acc_store(const Acc& a, double* lanes) {
        for (size_t j = 0; j < kStatLanes; ++j) lanes[j] = a.l[j];
    }
    template <DType D>
    static void acc16(Acc& a, const void* g, size_t i) {
        for (size_t j = 0; j < kStatLanes; ++j) {
            const double x = load_one<D>(g, i + j);
            a.l[j] += x * x;  // x*x is exact in fp64, so this equals the SIMD fma
        }
    }
};

// No output buffer.
constexpr int kNoOut = -1;

// W elements starting at i. Order and rounding follow torch's _single_tensor_adam:
//   param.mul_(1 - lr*wd)                      AdamW           (mul)
//   grad = grad.add(param, alpha=wd)           Adam with L2    (fma(param, wd, grad))
//   exp_avg.lerp_(grad, 1 - beta1)                             (fma(w, g - m, m) or fma(w - 1, g - m, g))
//   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1-beta2) (mul, then fma((1-beta2)*g, g, v))
//   denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)           (sqrt, div, add)
//   param.addcdiv_(exp_avg, denom, value=-step_size)           (p + (-step_size*m) / denom)
template <class V, DType G, DType S, int O>
inline void adam_block(const AdamBuffers& b, const AdamCoeffs& c, size_t i) {
    using F = typename V::F;
    F g = V::mul(V::template load<G>(b.grad, i), V::set1(c.grad_scale));
    F p = V::loadf(b.param + i);
    if (c.apply_decay) p = V::mul(p, V::set1(c.decay));
    if (c.apply_l2) g = V::fma(p, V::set1(c.l2), g);
    F m = V::template load<S>(b.exp_avg, i);
    F v = V::template load<S>(b.exp_avg_sq, i);
    const F diff = V::sub(g, m);
    m = V::fma(V::set1(c.lerp_w), diff, c.lerp_small ? m : g);
    v = V::mul(v, V::set1(c.beta2));
    v = V::fma(V::mul(V::set1(c.one_minus_beta2), g), g, v);
    const F denom = V::add(V::div(V::sqrt(v), V::set1(c.bc2_sqrt)), V::set1(c.eps));
    p = V::add(p, V::div(V::mul(V::set1(c.neg_step_size), m), denom));
    V::storef(b.param + i, p);
    V::template store<S>(b.exp_avg, i, m);
    V::template store<S>(b.exp_avg_sq, i, v);
    if constexpr (O != kNoOut) V::template store<static_cast<DType>(O)>(b.out, i, p);
}

template <class V, DType G, DType S, int O>
void adam_range(const AdamBuffers& b, const AdamCoeffs& c, size_t begin, size_t end) {
    size_t i = begin;
    for (; i + V::W <= end; i += V::W) adam_block<V, G, S, O>(b, c, i);
    for (; i < end; ++i) adam_block<S1, G, S, O>(b, c, i);
}

template <class V, DType G, DType S>
void adam_pick_out(const AdamBuffers& b, const AdamCoeffs& c, size_t begin, size_t end) {
    if (b.out == nullptr) return adam_range<V, G, S, kNoOut>(b, c, begin, end);
    if (b.out_dtype == DType::BF16) return adam_range<V, G, S, int(DType::BF16)>(b, c, begin, end);
    return adam_range<V, G, S, int(DType::F16)>(b, c, begin, end);
}

template <class V, DType G>
void adam_pick_state(const AdamBuffers& b, const AdamCoeffs& c, size_t begin, size_t end) {
    if (b.state_dtype == DType::BF16) return adam_pick_out<V, G, DType::BF16>(b, c, begin, end);
    return adam_pick_out<V, G, DType::F32>(b, c, begin, end);
}

template <class V>
void adam_kernel(const AdamBuffers& b, const AdamCoeffs& c, size_t begin, size_t end) {
    switch (b.grad_dtype) {
        case DType::F32: return adam_pick_state<V, DType::F32>(b, c, begin, end);
        case DType::BF16: return adam_pick_state<V, DType::BF16>(b, c, begin, end);
        case DType::F16: return adam_pick_state<V, DType::F16>(b, c, begin, end);
    }
}

template <class V, DType D>
void sumsq_range(const void* g, size_t begin, size_t end, double* lanes) {
    typename V::Acc acc = V::acc_load(lanes);
    size_t i = begin;
    for (; i + kStatLanes <= end; i += kStatLanes) V::template acc16<D>(acc, g, i);
    V::acc_store(acc, lanes);
    for (size_t j = 0; i < end; ++i, ++j) {
        const double x = load_one<D>(g, i);
        lanes[j] += x * x;
    }
}

template <class V>
void sumsq_kernel(const void* g, DType d, size_t begin, size_t end, double* lanes) {
    switch (d) {
        case DType::F32: return sumsq_range<V, DType::F32>(g, begin, end, lanes);
        case DType::BF16: return sumsq_range<V, DType::BF16>(g, begin, end, lanes);
        case DType::F16: return sumsq_range<V, DType::F16>(g, begin, end, lanes);
    }
}

template <class V, DType D>
void cast_range(const float* src, void* dst, size_t begin, size_t end) {
    size_t i = begin;
    for (; i + V::W <= end; i += V::W) V::template store<D>(dst, i, V::loadf(src + i));
    for (; i < end; ++i) store_one<D>(dst, i, src[i]);
}

template <class V>
void cast_kernel(const float* src, void* dst, DType d, size_t begin, size_t end) {
    switch (d) {
        case DType::F32: return cast_range<V, DType::F32>(src, dst, begin, end);
        case DType::BF16: return cast_range<V, DType::BF16>(src, dst, begin, end);
        case DType::F16: return cast_range<V, DType::F16>(src, dst, begin, end);
    }
}

template <class V>
KernelTable make_table() {
    return KernelTable{&adam_kernel<V>, &sumsq_kernel<V>, &cast_kernel<V>};
}

}  // namespace
}  // namespace optim
}  // namespace memascend
