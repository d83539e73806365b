// Python bindings of the fused optimizer kernels. Buffers are integer addresses
// plus an element count and dtype names, so the same kernels serve torch tensors
// (engine/optim/kernels.py) and raw PinnedPool blocks. Every kernel releases the
// GIL. Bad arguments raise ValueError (std::invalid_argument).
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "module.hpp"
#include "optim/optim.hpp"

namespace py = pybind11;

namespace memascend {
namespace {

using optim::DType;

DType dtype_arg(const std::string& name, const char* what) {
    DType d;
    if (!optim::parse_dtype(name, &d))
        throw std::invalid_argument(std::string(what) + ": unknown dtype '" + name +
                                    "' (expected 'float32', 'bfloat16' or 'float16')");
    return d;
}

size_t count_arg(int64_t n) {
    if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
    return size_t(n);
}

struct Span {
    const char* name;
    uintptr_t addr;
    size_t bytes;
};

// Non-null and aligned to the element size whenever there is something to touch.
void check_buffer(const char* name, uintptr_t addr, size_t n, DType d) {
    if (n == 0) return;
    if (addr == 0) throw std::invalid_argument(std::string(name) + " is a null pointer with n=" + std::to_string(n));
    if (addr % optim::dtype_size(d) != 0)
        throw std::invalid_argument(std::string(name) + " address " + std::to_string(addr) + " is not aligned to its " +
                                    optim::dtype_name(d) + " element size");
}

// A written buffer overlapping any other buffer would corrupt the update.
void check_disjoint(const std::vector<Span>& spans, size_t first_written) {
    for (size_t i = first_written; i < spans.size(); ++i) {
        for (size_t j = 0; j < spans.size(); ++j) {
            if (i == j || (j >= first_written && j < i)) continue;
            const Span& a = spans[i];
            const Span& b = spans[j];
            if (a.bytes == 0 || b.bytes == 0) continue;
            if (a.addr < b.addr + b.bytes && b.addr < a.addr + a.bytes)
                throw std::invalid_argument(std::string(a.name) + " overlaps " + b.name);
        }
    }
}

void adam_step_py(int64_t n_, uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, int64_t step,
                  double lr, double beta1, double beta2, double eps, double weight_decay, bool adamw,
                  double grad_scale, const std::string& grad_dtype, const std::string& state_dtype, uintptr_t out,
                  const std::string& out_dtype) {
    const size_t n = count_arg(n_);
    optim::AdamBuffers b;
    b.n = n;
    b.grad_dtype = dtype_arg(grad_dtype, "grad_dtype");
    b.state_dtype = dtype_arg(state_dtype, "state_dtype");
    b.out_dtype = dtype_arg(out_dtype, "out_dtype");
    if (b.state_dtype == DType::F16)
        throw std::invalid_argument("state_dtype must be 'float32' or 'bfloat16', got 'float16'");
    if (out != 0 && b.out_dtype == DType::F32)
        throw std::invalid_argument("out_dtype must be 'bfloat16' or 'float16' (the weights themselves are fp32)");
    if (step < 1) throw std::invalid_argument("step must be >= 1 (the step being taken), got " + std::to_string(step));
    check_buffer("param", param, n, DType::F32);
    check_buffer("grad", grad, n, b.grad_dtype);
    check_buffer("exp_avg", exp_avg, n, b.state_dtype);
    check_buffer("exp_avg_sq", exp_avg_sq, n, b.state_dtype);
    if (out != 0) check_buffer("out", out, n, b.out_dtype);
    const size_t sb = n * optim::dtype_size(b.state_dtype);
    std::vector<Span> spans = {{"grad", grad, n * optim::dtype_size(b.grad_dtype)},
                               {"param", param, n * 4},
                               {"exp_avg", exp_avg, sb},
                               {"exp_avg_sq", exp_avg_sq, sb}};
    if (out != 0) spans.push_back({"out", out, n * 2});
    check_disjoint(spans, 1);

    b.param = reinterpret_cast<float*>(param);
    b.grad = reinterpret_cast<const void*>(grad);
    b.exp_avg = reinterpret_cast<void*>(exp_avg);
    b.exp_avg_sq = reinterpret_cast<void*>(exp_avg_sq);
    b.out = out != 0 ? reinterpret_cast<void*>(out) : nullptr;

    optim::AdamHyper h;
    h.lr = lr;
    h.beta1 = beta1;
    h.beta2 = beta2;
    h.eps = eps;
    h.weight_decay = weight_decay;
    h.step = step;
    h.adamw = adamw;
    h.grad_scale = grad_scale;

    py::gil_scoped_release release;
    optim::adam_step(b, h);
}

py::tuple grad_stats_py(int64_t n_, uintptr_t grad, const std::string& dtype) {
    const size_t n = count_arg(n_);
    const DType d = dtype_arg(dtype, "dtype");
    check_buffer("grad", grad, n, d);
    optim::GradStats s;
    {
        py::gil_scoped_release release;
        s = optim::grad_stats(reinterpret_cast<const void*>(grad), d, n);
    }
    return py::make_tuple(s.sumsq, s.nonfinite);
}

void cast_py(int64_t n_, uintptr_t src, uintptr_t dst, const std::string& dtype) {
    const size_t n = count_arg(n_);
    const DType d = dtype_arg(dtype, "dtype");
    if (d == DType::F32) throw std::invalid_argument("cast_fp32 target dtype must be 'bfloat16' or 'float16'");
    check_buffer("src", src, n, DType::F32);
    check_buffer("dst", dst, n, d);
    check_disjoint({{"src", src, n * 4}, {"dst", dst, n * 2}}, 1);
    py::gil_scoped_release release;
    optim::cast_f32(reinterpret_cast<const float*>(src), reinterpret_cast<void*>(dst), d, n);
}

optim::Isa isa_arg(const std::string& name) {
    optim::Isa isa;
    if (!optim::parse_isa(name, &isa))
        throw std::invalid_argument("unknown optimizer ISA '" + name + "' (expected 'scalar', 'avx2' or 'avx512')");
    return isa;
}

}  // namespace

void register_optim(py::module_& m) {
    m.def("adam_step", &adam_step_py, py::arg("n"), py::arg("param"), py::arg("grad"), py::arg("exp_avg"),
          py::arg("exp_avg_sq"), py::kw_only(), py::arg("step"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
          py::arg("eps"), py::arg("weight_decay"), py::arg("adamw") = true, py::arg("grad_scale") = 1.0,
          py::arg("grad_dtype") = "float32", py::arg("state_dtype") = "float32", py::arg("out") = 0,
          py::arg("out_dtype") = "bfloat16",
          "One fused Adam/AdamW step over n elements, in place.\n\n"
          "param: fp32 master weights; grad: grad_dtype (float32/bfloat16/float16), multiplied by grad_scale\n"
          "first; exp_avg/exp_avg_sq: state_dtype (float32/bfloat16); out (optional, 0 = none): receives the\n"
          "updated weights as out_dtype (bfloat16/float16). adamw=False is Adam with L2 (grad += wd*param).\n"
          "step is the step being taken (1 on the first call). Matches torch's single-tensor AdamW bit for bit.");
    m.def("grad_stats", &grad_stats_py, py::arg("n"), py::arg("grad"), py::arg("dtype") = "float32",
          "(sum of squares accumulated in fp64, any element inf/NaN) of n elements, in one pass.");
    m.def("cast_fp32", &cast_py, py::arg("n"), py::arg("src"), py::arg("dst"), py::arg("dtype"),
          "Converts n fp32 values to dtype (bfloat16/float16), rounding to nearest even like torch.");
    m.def("optim_isa", [] { return std::string(optim::isa_name(optim::active_isa())); },
          "The instruction set the optimizer kernels run on now.");
    m.def("optim_isas", [] {
        std::vector<std::string> out;
        for (int i = 0; i <= int(optim::best_isa()); ++i) out.emplace_back(optim::isa_name(optim::Isa(i)));
        return out;
    }, "Instruction sets this CPU supports, slowest first.");
    m.def("set_optim_isa", [](const std::string& name) { optim::set_isa(isa_arg(name)); }, py::arg("name"),
          "Selects the kernels' instruction set ('scalar', 'avx2', 'avx512'); ValueError when unsupported.");
}

}  // namespace memascend
