// Python bindings of the PinnedPool arena and its blocks.
//
// A Block owns one sub-allocation and returns it to the arena when the Block is
// destroyed. It exports its memory through the buffer protocol, so any view made
// from it (numpy.frombuffer, torch.frombuffer, memoryview) holds a reference to
// the Block and the memory can never be reused while a view is alive. The arena
// itself stays mapped until the last Block referencing it is gone.
#include <pybind11/stl.h>

#include "module.hpp"
#include "pool.hpp"

namespace py = pybind11;

namespace memascend {
namespace {

struct Block {
    std::shared_ptr<Arena> arena;
    size_t offset;
    size_t size;       // bytes owned (rounded to the alignment)
    size_t requested;  // bytes asked for

    Block(std::shared_ptr<Arena> a, size_t off, size_t sz, size_t req)
        : arena(std::move(a)), offset(off), size(sz), requested(req) {}
    Block(const Block&) = delete;  // exactly one owner returns the memory
    Block& operator=(const Block&) = delete;
    ~Block() {
        if (arena) arena->free(offset);
    }
    uintptr_t address() const { return reinterpret_cast<uintptr_t>(arena->base() + offset); }
};

py::dict stats_dict(const PoolStats& s) {
    py::dict d;
    d["capacity"] = s.capacity;
    d["in_use"] = s.in_use;
    d["requested"] = s.requested;
    d["peak_in_use"] = s.peak_in_use;
    d["live_allocations"] = s.live_allocations;
    d["total_allocations"] = s.total_allocations;
    d["free_bytes"] = s.free_bytes;
    d["largest_free"] = s.largest_free;
    d["free_blocks"] = s.free_blocks;
    // Fraction of free memory that cannot serve a request as large as all of it.
    d["fragmentation"] = s.free_bytes == 0 ? 0.0 : 1.0 - double(s.largest_free) / double(s.free_bytes);
    d["locked"] = s.locked;
    d["hugepages"] = s.hugepages;
    d["lock_errno"] = s.lock_errno;
    return d;
}

}  // namespace

void register_pool(py::module_& m) {
    py::class_<Arena, std::shared_ptr<Arena>>(m, "Arena", "One mmap'ed, optionally mlock'ed arena with exact best-fit sub-allocation.")
        .def(py::init<size_t, size_t, bool, bool>(), py::arg("capacity"), py::arg("alignment") = 4096,
             py::arg("hugepages") = false, py::arg("lock") = true, py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("base", [](const Arena& a) { return reinterpret_cast<uintptr_t>(a.base()); })
        .def_property_readonly("capacity", &Arena::capacity)
        .def_property_readonly("alignment", &Arena::alignment)
        .def("stats", [](const Arena& a) { return stats_dict(a.stats()); })
        .def("free_blocks", &Arena::free_blocks, "Free blocks as {offset: size}.")
        .def(
            "try_alloc",
            [](const std::shared_ptr<Arena>& a, size_t nbytes) -> py::object {
                try {
                    size_t off = a->alloc(nbytes);
                    return py::cast(std::make_shared<Block>(a, off, a->round_up(nbytes), nbytes));
                } catch (const PoolExhausted& e) {
                    return py::make_tuple(e.requested, e.free_bytes, e.largest_free);
                }
            },
            py::arg("nbytes"),
            "Returns a Block, or (requested, free_bytes, largest_free) when no free block is large enough.");

    py::class_<Block, std::shared_ptr<Block>>(m, "Block", py::buffer_protocol(), "One exact-size allocation from an Arena.")
        .def_property_readonly("address", &Block::address)
        .def_property_readonly("offset", [](const Block& b) { return b.offset; })
        .def_property_readonly("size", [](const Block& b) { return b.size; })
        .def_property_readonly("requested", [](const Block& b) { return b.requested; })
        .def_buffer([](Block& b) {
            return py::buffer_info(reinterpret_cast<void*>(b.address()), 1, py::format_descriptor<uint8_t>::format(), 1,
                                   {b.size}, {size_t(1)}, /*readonly=*/false);
        });

    m.def(
        "buffer_address",
        [](py::buffer buf, bool writable) {
            py::buffer_info info = buf.request(writable);
            py::ssize_t expected = info.itemsize;
            for (py::ssize_t i = info.ndim - 1; i >= 0; --i) {
                if (info.shape[i] > 1 && info.strides[i] != expected)
                    throw std::invalid_argument("buffer must be C-contiguous");
                expected *= info.shape[i];
            }
            return py::make_tuple(reinterpret_cast<uintptr_t>(info.ptr), size_t(info.size * info.itemsize));
        },
        py::arg("buffer"), py::arg("writable") = false,
        "(address, nbytes) of a contiguous Python buffer; raises if `writable` and it is read-only.");
}

}  // namespace memascend
