// io_uring backend (liburing). One ring; the submitting thread and a reaper thread
// share it: submission happens under the AsyncIO mutex, the reaper blocks in
// io_uring_wait_cqe without it (SQ and CQ are independent), then takes the mutex
// to record results and refill the ring from the pending queue. Buffers inside a
// registered region (the PinnedPool arena) use READ_FIXED/WRITE_FIXED.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "aio.hpp"

#ifdef MEMASCEND_HAVE_URING
#include <liburing.h>
#endif

namespace memascend {

#ifdef MEMASCEND_HAVE_URING
namespace {

constexpr uint64_t kWake = ~uint64_t(0);
// The kernel refuses a registered buffer larger than 1 GiB.
constexpr size_t kMaxRegisteredIovec = size_t(1) << 30;

struct UringInitError {
    int err;
};

class UringIO final : public AsyncIO {
public:
    UringIO(size_t block_size, size_t alignment, size_t queue_depth) : AsyncIO(block_size, alignment), qd_(queue_depth) {
        if (queue_depth == 0 || queue_depth > 4096)
            throw std::invalid_argument("io_uring queue_depth must be in [1, 4096], got " + std::to_string(queue_depth));
        int r = io_uring_queue_init(unsigned(queue_depth), &ring_, 0);
        if (r < 0) throw UringInitError{-r};
        reaper_ = std::thread([this] { run(); });
    }

    ~UringIO() override {
        close_all_files();  // waits for every outstanding chunk
        {
            std::lock_guard<std::mutex> g(mu_);
            stop_ = true;
            io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
            io_uring_prep_nop(sqe);
            io_uring_sqe_set_data64(sqe, kWake);
            io_uring_submit(&ring_);
        }
        reaper_.join();
        if (!regions_.empty()) io_uring_unregister_buffers(&ring_);
        io_uring_queue_exit(&ring_);
    }

    const char* backend() const override { return "uring"; }
    size_t queue_depth() const override { return qd_; }
    size_t registered_bytes() const override {
        std::lock_guard<std::mutex> g(mu_);
        size_t n = 0;
        for (auto& v : regions_) n += v.iov_len;
        return n;
    }

    int register_regions(const std::vector<std::pair<uintptr_t, size_t>>& regions) {
        std::unique_lock<std::mutex> g(mu_);
        done_cv_.wait(g, [&] { return inflight_.empty() && pending_.empty(); });
        if (!regions_.empty()) {
            io_uring_unregister_buffers(&ring_);
            regions_.clear();
        }
        std::vector<iovec> iovs;
        for (auto [addr, len] : regions)
            for (size_t pos = 0; pos < len; pos += kMaxRegisteredIovec)
                iovs.push_back(iovec{reinterpret_cast<void*>(addr + pos), std::min(kMaxRegisteredIovec, len - pos)});
        if (iovs.empty()) return 0;
        int r = io_uring_register_buffers(&ring_, iovs.data(), unsigned(iovs.size()));
        if (r == 0) regions_ = std::move(iovs);
        return r;
    }

protected:
    void start(Chunk c) override {
        pending_.push_back(c);
        fill();
    }

private:
    int fixed_index(const uint8_t* p, size_t len) const {
        for (size_t i = 0; i < regions_.size(); ++i) {
            auto* b = static_cast<const uint8_t*>(regions_[i].iov_base);
            if (p >= b && p + len <= b + regions_[i].iov_len) return int(i);
        }
        return -1;
    }

    // Moves pending chunks into the ring up to the queue depth. mu_ held.
    void fill() {
        unsigned prepared = 0;
        while (inflight_.size() < qd_ && !pending_.empty()) {
            io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
            if (sqe == nullptr) break;
            Chunk c = pending_.front();
            pending_.pop_front();
            uint8_t* p = c.addr + c.done;
            const unsigned len = unsigned(c.attempt_len());
            const uint64_t off = c.offset + c.done;
            const int idx = fixed_index(p, len);
            if (c.op == Op::Read) {
                if (idx >= 0) io_uring_prep_read_fixed(sqe, c.fd, p, len, off, idx);
                else io_uring_prep_read(sqe, c.fd, p, len, off);
            } else {
                if (idx >= 0) io_uring_prep_write_fixed(sqe, c.fd, p, len, off, idx);
                else io_uring_prep_write(sqe, c.fd, p, len, off);
            }
            io_uring_sqe_set_data64(sqe, c.id);
            inflight_.emplace(c.id, c);
            ++prepared;
        }
        if (prepared == 0) return;
        for (int attempt = 0;; ++attempt) {
            int r = io_uring_submit(&ring_);
            if (r >= 0) return;
            if ((r != -EAGAIN && r != -EBUSY && r != -EINTR) || attempt > 10000)
                throw std::runtime_error(std::string("io_uring_submit failed: ") + std::strerror(-r));
            std::this_thread::yield();
        }
    }

    void run() {
        for (;;) {
            io_uring_cqe* cqe = nullptr;
            int r = io_uring_wait_cqe(&ring_, &cqe);
            if (r < 0) {
                if (r != -EINTR && r != -EAGAIN) std::fprintf(stderr, "memascend: io_uring_wait_cqe: %s\n", std::strerror(-r));
                continue;
            }
            std::lock_guard<std::mutex> g(mu_);
            unsigned head, seen = 0;
            io_uring_for_each_cqe(&ring_, head, cqe) {
                ++seen;
                const uint64_t id = io_uring_cqe_get_data64(cqe);
                if (id == kWake) continue;
                auto it = inflight_.find(id);
                Chunk c = it->second;
                inflight_.erase(it);
                on_result(c, cqe->res);
            }
            io_uring_cq_advance(&ring_, seen);
            fill();
            done_cv_.notify_all();
            if (stop_ && inflight_.empty() && pending_.empty()) return;
        }
    }

    size_t qd_;
    io_uring ring_{};
    std::thread reaper_;
    std::deque<Chunk> pending_;
    std::unordered_map<uint64_t, Chunk> inflight_;
    std::vector<iovec> regions_;
    bool stop_ = false;
};

}  // namespace

std::unique_ptr<AsyncIO> make_uring_io(size_t block_size, size_t alignment, size_t queue_depth, int* err) {
    try {
        return std::make_unique<UringIO>(block_size, alignment, queue_depth);
    } catch (const UringInitError& e) {
        *err = e.err;
        return nullptr;
    }
}

int uring_register_buffers(AsyncIO& io, const std::vector<std::pair<uintptr_t, size_t>>& regions) {
    auto* u = dynamic_cast<UringIO*>(&io);
    if (u == nullptr) return -EOPNOTSUPP;
    return u->register_regions(regions);
}

#else  // built without liburing

std::unique_ptr<AsyncIO> make_uring_io(size_t, size_t, size_t, int* err) {
    *err = ENOSYS;
    return nullptr;
}

int uring_register_buffers(AsyncIO&, const std::vector<std::pair<uintptr_t, size_t>>&) { return -EOPNOTSUPP; }

#endif

}  // namespace memascend
