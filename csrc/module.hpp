// Each native component registers its own Python bindings; bindings.cpp calls them.
#pragma once
#include <pybind11/pybind11.h>

namespace memascend {
void register_pool(pybind11::module_& m);
void register_aio(pybind11::module_& m);
void register_optim(pybind11::module_& m);
}  // namespace memascend
