// Fused CPU optimizer kernels: one pass per step over raw arrays.
//
// adam_step()  Adam / AdamW update of fp32 master weights from an fp32/bf16/fp16
//              gradient with fp32 or bf16 moments, optionally writing the new
//              weights as bf16/fp16 into a second buffer in the same pass.
// grad_stats() sum of squares (fp64) and a non-finite flag in one pass.
// cast_f32()   fp32 -> bf16/fp16 with torch's rounding and NaN encoding.
//
// The arithmetic mirrors torch's _single_tensor_adam operation by operation in
// fp32 (same scalar coefficients, same fused multiply-adds), so results are
// bit-identical to torch.optim.AdamW on CPU and identical across the scalar,
// AVX2 and AVX-512 paths and any thread count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace memascend {
namespace optim {

enum class DType : uint8_t { F32 = 0, BF16 = 1, F16 = 2 };
enum class Isa : uint8_t { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// Hyper-parameters of one step, as the Python floats torch uses.
struct AdamHyper {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 0.0;
    int64_t step = 1;          // the step being taken (1 on the first call)
    bool adamw = true;         // true: decoupled decay; false: Adam with L2 (grad += wd * param)
    double grad_scale = 1.0;   // multiplies the gradient first: clip_coef / loss_scale
};

// The fp32 constants of the element-wise update, derived from AdamHyper in
// double exactly as torch derives them from Python floats.
struct AdamCoeffs {
    float grad_scale;
    float decay;          // AdamW: param *= 1 - lr * wd
    float l2;             // Adam: grad += l2 * param
    float lerp_w;         // exp_avg.lerp_(grad, 1 - beta1): weight, or weight - 1 when weight >= 0.5
    float beta2;
    float one_minus_beta2;
    float bc2_sqrt;       // sqrt(1 - beta2^step)
    float eps;
    float neg_step_size;  // -lr / (1 - beta1^step)
    bool apply_decay;
    bool apply_l2;
    bool lerp_small;      // |weight| < 0.5: m + w*(g-m), else g + (w-1)*(g-m) (torch's lerp)
};

struct AdamBuffers {
    size_t n = 0;
    float* param = nullptr;
    const void* grad = nullptr;
    void* exp_avg = nullptr;
    void* exp_avg_sq = nullptr;
    void* out = nullptr;  // optional low-precision copy of the updated weights
    DType grad_dtype = DType::F32;
    DType state_dtype = DType::F32;  // exp_avg and exp_avg_sq: F32 or BF16
    DType out_dtype = DType::BF16;   // BF16 or F16, used when out != nullptr
};

struct GradStats {
    double sumsq = 0.0;
    bool nonfinite = false;
};

AdamCoeffs make_coeffs(const AdamHyper& h);

// Public entry points: run on the active ISA, OpenMP over blocks.
void adam_step(const AdamBuffers& b, const AdamHyper& h);
GradStats grad_stats(const void* grad, DType dtype, size_t n);
void cast_f32(const float* src, void* dst, DType dst_dtype, size_t n);

// ISA selection. The best supported one is active by default.
Isa best_isa();
Isa active_isa();
bool isa_supported(Isa isa);
void set_isa(Isa isa);  // throws std::invalid_argument when unsupported
const char* isa_name(Isa isa);
bool parse_isa(const std::string& name, Isa* out);

bool parse_dtype(const std::string& name, DType* out);
const char* dtype_name(DType d);
size_t dtype_size(DType d);

// Sum-of-squares lanes: element k of a block goes to lane k % kStatLanes, on every
// ISA, so the fp64 sum does not depend on the ISA that computed it.
constexpr size_t kStatLanes = 16;

// Per-ISA range kernels over [begin, end), selected by the dispatcher.
struct KernelTable {
    void (*adam)(const AdamBuffers& b, const AdamCoeffs& c, size_t begin, size_t end);
    // Adds the squares of [begin, end) into lanes (element begin goes to lane 0).
    void (*sumsq)(const void* grad, DType dtype, size_t begin, size_t end, double* lanes);
    void (*cast)(const float* src, void* dst, DType dst_dtype, size_t begin, size_t end);
};

KernelTable scalar_kernels();
#if defined(__x86_64__)
KernelTable avx2_kernels();
KernelTable avx512_kernels();
#endif

}  // namespace optim
}  // namespace memascend
