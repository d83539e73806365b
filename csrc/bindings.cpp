// engine._native: the native core. Not linked against torch: it works on raw
// addresses and Python buffers; engine/ wraps it into torch tensors.
#include "module.hpp"

PYBIND11_MODULE(_native, m) {
    m.doc() = "MemAscend native core: PinnedPool, AsyncIO and fused CPU optimizer kernels";
#ifdef MEMASCEND_HAVE_URING
    m.attr("HAVE_URING") = true;
#else
    m.attr("HAVE_URING") = false;
#endif
#ifdef MEMASCEND_HAVE_OPENMP
    m.attr("HAVE_OPENMP") = true;
#else
    m.attr("HAVE_OPENMP") = false;
#endif
    memascend::register_pool(m);
    memascend::register_aio(m);
    memascend::register_optim(m);
}
