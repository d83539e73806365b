// Python bindings of AsyncIO. Addresses are plain integers; keeping the memory
// behind them alive until the request is waited is the caller's job (the Python
// wrapper in engine/storage/aio.py holds a reference to every buffer in flight).
#include <pybind11/stl.h>

#include <cstring>

#include "aio.hpp"
#include "module.hpp"

namespace py = pybind11;

namespace memascend {
namespace {

struct PyAsyncIO {
    std::unique_ptr<AsyncIO> io;
};

py::object error_tuple(const std::optional<IOError>& e) {
    if (!e) return py::none();
    return py::make_tuple(e->err, e->message, e->path, e->offset, e->nbytes, e->op == Op::Read ? "read" : "write");
}

}  // namespace

void register_aio(py::module_& m) {
    py::class_<PyAsyncIO>(m, "AsyncIO", "Native asynchronous I/O engine (io_uring or thread pool).")
        .def(py::init([](const std::string& backend, size_t block_size, size_t alignment, size_t queue_depth,
                         size_t threads) {
                 PyAsyncIO p;
                 if (backend == "uring") {
                     int err = 0;
                     p.io = make_uring_io(block_size, alignment, queue_depth, &err);
                     if (!p.io)
                         throw std::runtime_error(std::string("io_uring backend unavailable: ") +
                                                  (err == ENOSYS ? "not compiled in (liburing missing at build time)"
                                                                 : std::strerror(err)));
                 } else if (backend == "threads") {
                     p.io = make_thread_io(block_size, alignment, threads);
                 } else {
                     throw std::invalid_argument("unknown AsyncIO backend '" + backend + "' (expected 'uring' or 'threads')");
                 }
                 return p;
             }),
             py::arg("backend"), py::arg("block_size"), py::arg("alignment"), py::arg("queue_depth"), py::arg("threads"))
        .def_property_readonly("backend", [](const PyAsyncIO& p) { return std::string(p.io->backend()); })
        .def_property_readonly("queue_depth", [](const PyAsyncIO& p) { return p.io->queue_depth(); })
        .def_property_readonly("block_size", [](const PyAsyncIO& p) { return p.io->block_size(); })
        .def_property_readonly("alignment", [](const PyAsyncIO& p) { return p.io->alignment(); })
        .def_property_readonly("registered_bytes", [](const PyAsyncIO& p) { return p.io->registered_bytes(); })
        .def("add_file", [](PyAsyncIO& p, int fd, const std::string& path, bool direct) { return p.io->add_file(fd, path, direct); })
        .def("close_file", [](PyAsyncIO& p, int file) { p.io->close_file(file); }, py::call_guard<py::gil_scoped_release>())
        .def("submit", [](PyAsyncIO& p, bool write, int file, uint64_t offset, uintptr_t addr, size_t nbytes) {
                 return p.io->submit(write ? Op::Write : Op::Read, file, offset, addr, nbytes);
             }, py::arg("write"), py::arg("file"), py::arg("offset"), py::arg("address"), py::arg("nbytes"),
             py::call_guard<py::gil_scoped_release>())
        .def("poll", [](PyAsyncIO& p, uint64_t id) { return p.io->poll(id); })
        .def("wait", [](PyAsyncIO& p, uint64_t id) {
                 std::optional<IOError> e;
                 {
                     py::gil_scoped_release nogil;
                     e = p.io->wait(id);
                 }
                 return error_tuple(e);
             }, "Waits and retires a request; returns None or (errno, message, path, offset, nbytes, op).")
        .def("wait_idle", [](PyAsyncIO& p) { p.io->wait_idle(); }, py::call_guard<py::gil_scoped_release>())
        .def("register_buffers", [](PyAsyncIO& p, const std::vector<std::pair<uintptr_t, size_t>>& regions) {
                 return uring_register_buffers(*p.io, regions);
             }, py::call_guard<py::gil_scoped_release>(), "Registers fixed buffers (io_uring only); returns 0 or -errno.")
        .def("inject_fault", [](PyAsyncIO& p, uint64_t nth, int err) { p.io->inject_fault(nth, err); },
             py::arg("nth"), py::arg("errno"), "Test hook: chunk attempt `nth` from now fails with -errno, or is short when errno is 0.")
        .def("stats", [](const PyAsyncIO& p) {
            IOStats s = p.io->stats();
            py::dict d;
            d["requests"] = s.requests;
            d["chunks"] = s.chunks;
            d["bytes_read"] = s.bytes_read;
            d["bytes_written"] = s.bytes_written;
            d["short_resubmits"] = s.short_resubmits;
            d["retries"] = s.retries;
            d["errors"] = s.errors;
            d["in_flight_requests"] = s.in_flight_requests;
            return d;
        })
        .def("close", [](PyAsyncIO& p) { p.io.reset(); }, py::call_guard<py::gil_scoped_release>(),
             "Waits for outstanding I/O, closes every file and stops the backend.");
}

}  // namespace memascend
