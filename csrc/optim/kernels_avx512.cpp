// AVX-512F path (16 floats per vector), compiled for that target only here and
// selected at run time when the CPU and OS support it.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "optim/optim.hpp"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#else
// Without fp-contract=off GCC fuses _mm512_mul_ps + _mm512_add_ps into FMAs and
// the results would no longer match torch bit for bit.
#pragma GCC optimize("fp-contract=off")
// GCC 12's AVX-512 headers trip a false -Wmaybe-uninitialized (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#endif

#include "optim/kernel_body.hpp"

namespace memascend {
namespace optim {
namespace {

struct V512 {
    using F = __m512;
    static constexpr size_t W = 16;
    static F set1(float x) { return _mm512_set1_ps(x); }
    static F loadf(const float* p) { return _mm512_loadu_ps(p); }
    static void storef(float* p, F x) { _mm512_storeu_ps(p, x); }
    static F add(F a, F b) { return _mm512_add_ps(a, b); }
    static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
    static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    static F div(F a, F b) { return _mm512_div_ps(a, b); }
    static F sqrt(F a) { return _mm512_sqrt_ps(a); }
    static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }

    static __m256i load_u16(const void* base, size_t i) {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
    }
    static void store_u16(void* base, size_t i, __m256i x) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i), x);
    }

    template <DType D>
    static F load(const void* base, size_t i) {
        if constexpr (D == DType::F32) {
            return _mm512_loadu_ps(static_cast<const float*>(base) + i);
        } else if constexpr (D == DType::BF16) {
            return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load_u16(base, i)), 16));
        } else {
            return _mm512_cvtph_ps(load_u16(base, i));
        }
    }

    template <DType D>
    static void store(void* base, size_t i, F x) {
        if constexpr (D == DType::F32) {
            _mm512_storeu_ps(static_cast<float*>(base) + i, x);
        } else if constexpr (D == DType::BF16) {
            // Round to nearest even on the bits; NaN -> 0xFFFF (see f32_to_bf16).
            const __m512i u = _mm512_castps_si512(x);
            const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
            __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
            const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
            r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0xFFFF));
            store_u16(base, i, _mm512_cvtepi32_epi16(r));  // every lane <= 0xFFFF: plain narrowing
        } else {
            store_u16(base, i, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
    }

    struct Acc {
        __m512d lo, hi;  // lanes 0-7, 8-15
    };
    static Acc acc_load(const double* l) { return Acc{_mm512_loadu_pd(l), _mm512_loadu_pd(l + 8)}; }
    static void acc_store(const Acc& a, double* l) {
        _mm512_storeu_pd(l, a.lo);
        _mm512_storeu_pd(l + 8, a.hi);
    }
    template <DType D>
    static void acc16(Acc& a, const void* g, size_t i) {
        const F x = load<D>(g, i);
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
        const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
        a.lo = _mm512_fmadd_pd(lo, lo, a.lo);
        a.hi = _mm512_fmadd_pd(hi, hi, a.hi);
    }
};

}  // namespace

KernelTable avx512_kernels() { return make_table<V512>(); }

}  // namespace optim
}  // namespace memascend

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // __x86_64__
