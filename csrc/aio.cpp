#include "aio.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace memascend {
namespace {

const char* op_name(Op op) { return op == Op::Read ? "read" : "write"; }

std::string describe(const Chunk& c, const std::string& path) {
    return std::string(op_name(c.op)) + " of " + std::to_string(c.remaining()) + " bytes at offset " +
           std::to_string(c.offset + c.done) + " of '" + path + "'";
}

}  // namespace

AsyncIO::AsyncIO(size_t block_size, size_t alignment) : block_size_(block_size), alignment_(alignment) {
    if (alignment == 0 || (alignment & (alignment - 1)) != 0)
        throw std::invalid_argument("AsyncIO alignment must be a power of two");
    if (block_size == 0 || block_size % alignment != 0)
        throw std::invalid_argument("AsyncIO block_size must be a positive multiple of the alignment (" +
                                    std::to_string(alignment) + "), got " + std::to_string(block_size));
}

int AsyncIO::add_file(int fd, const std::string& path, bool direct) {
    std::lock_guard<std::mutex> g(mu_);
    files_.push_back(File{fd, path, direct, true, 0});
    return int(files_.size() - 1);
}

void AsyncIO::close_file(int file) {
    std::unique_lock<std::mutex> g(mu_);
    if (file < 0 || size_t(file) >= files_.size()) throw std::invalid_argument("unknown file id " + std::to_string(file));
    File& f = files_[file];
    if (!f.open) return;
    done_cv_.wait(g, [&] { return files_[file].active_chunks == 0; });
    files_[file].open = false;
    ::close(files_[file].fd);
}

void AsyncIO::close_all_files() {
    std::unique_lock<std::mutex> g(mu_);
    done_cv_.wait(g, [&] { return incomplete_ == 0; });
    for (File& f : files_)
        if (f.open) {
            f.open = false;
            ::close(f.fd);
        }
}

std::string AsyncIO::file_path(int file) const {
    std::lock_guard<std::mutex> g(mu_);
    if (file < 0 || size_t(file) >= files_.size()) throw std::invalid_argument("unknown file id " + std::to_string(file));
    return files_[file].path;
}

uint64_t AsyncIO::submit(Op op, int file, uint64_t offset, uintptr_t addr, size_t nbytes) {
    std::lock_guard<std::mutex> g(mu_);
    if (file < 0 || size_t(file) >= files_.size()) throw std::invalid_argument("unknown file id " + std::to_string(file));
    File& f = files_[file];
    if (!f.open) throw std::invalid_argument(std::string(op_name(op)) + " on closed file '" + f.path + "'");
    if (addr == 0 && nbytes > 0) throw std::invalid_argument("null buffer address");
    if (f.direct) {
        // O_DIRECT needs buffer, offset and length aligned; the kernel would return
        // EINVAL for the whole request, so reject it here with the reason.
        const char* what = addr % alignment_ ? "buffer address" : offset % alignment_ ? "file offset" : nbytes % alignment_ ? "length" : nullptr;
        if (what)
            throw std::invalid_argument(std::string("O_DIRECT ") + op_name(op) + " on '" + f.path + "': " + what +
                                        " is not a multiple of " + std::to_string(alignment_) + " (address " +
                                        std::to_string(addr) + ", offset " + std::to_string(offset) + ", length " +
                                        std::to_string(nbytes) + ")");
    }
    const uint64_t id = next_request_++;
    Request& r = requests_[id];
    ++stats_.requests;
    if (nbytes == 0) {
        r.done = true;
        return id;
    }
    r.chunks_left = (nbytes + block_size_ - 1) / block_size_;
    ++incomplete_;
    for (size_t pos = 0; pos < nbytes; pos += block_size_) {
        Chunk c;
        c.id = next_chunk_++;
        c.request = id;
        c.file = file;
        c.fd = f.fd;
        c.op = op;
        c.offset = offset + pos;
        c.addr = reinterpret_cast<uint8_t*>(addr) + pos;
        c.nbytes = std::min(block_size_, nbytes - pos);
        ++f.active_chunks;
        ++stats_.chunks;
        dispatch(c);
    }
    return id;
}

void AsyncIO::dispatch(Chunk c) {
    if (fault_countdown_ != 0 && --fault_countdown_ == 0) {
        if (fault_err_ != 0) {
            on_result(c, -long(fault_err_));
            return;
        }
        // A short count needs at least one aligned unit left over to resubmit.
        size_t half = c.remaining() / 2 / alignment_ * alignment_;
        c.cap = half != 0 ? half : c.remaining();
    }
    start(c);
}

void AsyncIO::on_result(Chunk c, long res) {
    const std::string& path = files_[c.file].path;
    c.cap = 0;
    if (res == -EINTR || res == -EAGAIN) {
        ++stats_.retries;
        dispatch(c);
        return;
    }
    if (res < 0) {
        const int e = int(-res);
        finish_chunk(c, IOError{e, describe(c, path) + " failed: " + std::strerror(e) + " (errno " + std::to_string(e) + ")",
                                path, c.offset + c.done, c.remaining(), c.op});
        return;
    }
    if (res == 0) {
        const int e = c.op == Op::Read ? EIO : ENOSPC;
        const std::string why = c.op == Op::Read ? " hit end of file after " + std::to_string(c.done) + " of " +
                                                       std::to_string(c.nbytes) + " bytes of this chunk"
                                                 : " wrote 0 bytes (device full?)";
        finish_chunk(c, IOError{e, describe(c, path) + why, path, c.offset + c.done, c.remaining(), c.op});
        return;
    }
    if (c.op == Op::Read)
        stats_.bytes_read += uint64_t(res);
    else
        stats_.bytes_written += uint64_t(res);
    c.done += size_t(res);
    if (c.done < c.nbytes) {
        ++stats_.short_resubmits;
        dispatch(c);
        return;
    }
    finish_chunk(c, std::nullopt);
}

void AsyncIO::finish_chunk(const Chunk& c, std::optional<IOError> err) {
    --files_[c.file].active_chunks;
    Request& r = requests_.at(c.request);
    if (err) {
        ++stats_.errors;
        if (!r.error) r.error = std::move(err);  // the first failure names the request
    }
    if (--r.chunks_left == 0) {
        r.done = true;
        --incomplete_;
    }
    done_cv_.notify_all();
}

bool AsyncIO::poll(uint64_t request) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = requests_.find(request);
    if (it == requests_.end()) throw std::invalid_argument("unknown or already retired request " + std::to_string(request));
    return it->second.done;
}

std::optional<IOError> AsyncIO::wait(uint64_t request) {
    std::unique_lock<std::mutex> g(mu_);
    auto it = requests_.find(request);
    if (it == requests_.end()) throw std::invalid_argument("unknown or already retired request " + std::to_string(request));
    done_cv_.wait(g, [&] { return it->second.done; });
    std::optional<IOError> err = std::move(it->second.error);
    requests_.erase(it);
    return err;
}

void AsyncIO::wait_idle() {
    std::unique_lock<std::mutex> g(mu_);
    done_cv_.wait(g, [&] { return incomplete_ == 0; });
}

void AsyncIO::inject_fault(uint64_t nth, int err) {
    std::lock_guard<std::mutex> g(mu_);
    fault_countdown_ = nth;
    fault_err_ = err;
}

IOStats AsyncIO::stats() const {
    std::lock_guard<std::mutex> g(mu_);
    IOStats s = stats_;
    s.in_flight_requests = incomplete_;
    return s;
}

}  // namespace memascend
