// AVX2 + FMA + F16C path (8 floats per vector), compiled for that target only
// here and selected at run time when the CPU has it.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "optim/optim.hpp"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
// Without fp-contract=off GCC fuses _mm256_mul_ps + _mm256_add_ps into FMAs and
// the results would no longer match torch bit for bit.
#pragma GCC optimize("fp-contract=off")
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#include "optim/kernel_body.hpp"

namespace memascend {
namespace optim {
namespace {

struct V256 {
    using F = __m256;
    static constexpr size_t W = 8;
    static F set1(float x) { return _mm256_set1_ps(x); }
    static F loadf(const float* p) { return _mm256_loadu_ps(p); }
    static void storef(float* p, F x) { _mm256_storeu_ps(p, x); }
    static F add(F a, F b) { return _mm256_add_ps(a, b); }
    static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
    static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
    static F div(F a, F b) { return _mm256_div_ps(a, b); }
    static F sqrt(F a) { return _mm256_sqrt_ps(a); }
    static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }

    static __m128i load_u16(const void* base, size_t i) {
        return _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    }
    static void store_u16(void* base, size_t i, __m128i x) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i), x);
    }

    template <DType D>
    static F load(const void* base, size_t i) {
        if constexpr (D == DType::F32) {
            return _mm256_loadu_ps(static_cast<const float*>(base) + i);
        } else if constexpr (D == DType::BF16) {
            return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load_u16(base, i)), 16));
        } else {
            return _mm256_cvtph_ps(load_u16(base, i));
        }
    }

    template <DType D>
    static void store(void* base, size_t i, F x) {
        if constexpr (D == DType::F32) {
            _mm256_storeu_ps(static_cast<float*>(base) + i, x);
        } else if constexpr (D == DType::BF16) {
            // Round to nearest even on the bits; NaN -> 0xFFFF (see f32_to_bf16).
            const __m256i u = _mm256_castps_si256(x);
            const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
            __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
            const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
            r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), nan);
            // Every lane is <= 0xFFFF, so the unsigned saturating pack just narrows.
            store_u16(base, i, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
        } else {
            store_u16(base, i, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
    }

    struct Acc {
        __m256d a0, a1, a2, a3;  // lanes 0-3, 4-7, 8-11, 12-15
    };
    static Acc acc_load(const double* l) {
        return Acc{_mm256_loadu_pd(l), _mm256_loadu_pd(l + 4), _mm256_loadu_pd(l + 8), _mm256_loadu_pd(l + 12)};
    }
    static void acc_store(const Acc& a, double* l) {
        _mm256_storeu_pd(l, a.a0);
        _mm256_storeu_pd(l + 4, a.a1);
        _mm256_storeu_pd(l + 8, a.a2);
        _mm256_storeu_pd(l + 12, a.a3);
    }
    static __m256d sq_add(__m128 x, __m256d acc) {
        const __m256d d = _mm256_cvtps_pd(x);
        return _mm256_fmadd_pd(d, d, acc);
    }
    template <DType D>
    static void acc16(Acc& a, const void* g, size_t i) {
        const F x0 = load<D>(g, i);
        const F x1 = load<D>(g, i + 8);
        a.a0 = sq_add(_mm256_castps256_ps128(x0), a.a0);
        a.a1 = sq_add(_mm256_extractf128_ps(x0, 1), a.a1);
        a.a2 = sq_add(_mm256_castps256_ps128(x1), a.a2);
        a.a3 = sq_add(_mm256_extractf128_ps(x1, 1), a.a3);
    }
};

}  // namespace

KernelTable avx2_kernels() { return make_table<V256>(); }

}  // namespace optim
}  // namespace memascend

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // __x86_64__
