// io_uring backend (liburing).
//
// One I/O thread owns the ring: it alone prepares SQEs, submits and reaps. Read
// and write completions are delivered as task_work to the *submitting* thread,
// so letting the Python thread submit while another thread reaps would bounce
// every completion between the two. Callers instead queue chunks under the
// AsyncIO mutex and, when the I/O thread sleeps in io_uring_submit_and_wait,
// wake it through an eventfd whose read is kept armed on the ring. Buffers inside
// a registered region (the PinnedPool arena) use READ_FIXED/WRITE_FIXED.
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
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
        // One extra SQ entry for the armed eventfd read.
        int r = io_uring_queue_init(unsigned(queue_depth + 1), &ring_, 0);
        if (r < 0) throw UringInitError{-r};
        wake_fd_ = eventfd(0, EFD_CLOEXEC);
        if (wake_fd_ < 0) {
            int e = errno;
            io_uring_queue_exit(&ring_);
            throw UringInitError{e};
        }
        arm_wake();
        thread_ = std::thread([this] { run(); });
    }

    ~UringIO() override {
        close_all_files();  // waits for every outstanding chunk
        {
            std::lock_guard<std::mutex> g(mu_);
            stop_ = true;
            wake_locked();
        }
        thread_.join();
        if (!regions_.empty()) io_uring_unregister_buffers(&ring_);
        io_uring_queue_exit(&ring_);
        ::close(wake_fd_);
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
        done_cv_.wait(g, [&] { return inflight_ == 0 && pending_.empty(); });
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
        wake_locked();
    }

private:
    // Wakes the I/O thread if it sleeps in the kernel. mu_ held.
    void wake_locked() {
        if (!sleeping_) return;
        sleeping_ = false;
        uint64_t one = 1;
        while (::write(wake_fd_, &one, sizeof one) < 0 && errno == EINTR) {
        }
    }

    void arm_wake() {
        io_uring_sqe* sqe = io_uring_get_sqe(&ring_);  // always available: qd_ + 1 entries
        io_uring_prep_read(sqe, wake_fd_, &wake_buf_, sizeof wake_buf_, 0);
        io_uring_sqe_set_data64(sqe, kWake);
    }

    int fixed_index(const uint8_t* p, size_t len) const {
        for (size_t i = 0; i < regions_.size(); ++i) {
            auto* b = static_cast<const uint8_t*>(regions_[i].iov_base);
            if (p >= b && p + len <= b + regions_[i].iov_len) return int(i);
        }
        return -1;
    }

    // Prepares SQEs for pending chunks up to the queue depth. mu_ held; I/O thread only.
    void prepare() {
        while (inflight_ < qd_ && !pending_.empty()) {
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
            slots_.emplace(c.id, c);
            ++inflight_;
        }
    }

    void run() {
        std::unique_lock<std::mutex> g(mu_);
        for (;;) {
            prepare();
            if (stop_ && inflight_ == 0 && pending_.empty()) return;
            sleeping_ = true;
            g.unlock();
            // Submits what prepare() queued and sleeps until at least one completion.
            int r = io_uring_submit_and_wait(&ring_, 1);
            g.lock();
            sleeping_ = false;
            if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY && r != -ETIME)
                std::fprintf(stderr, "memascend: io_uring_submit_and_wait: %s\n", std::strerror(-r));
            unsigned head, seen = 0;
            io_uring_cqe* cqe;
            bool rearm = false;
            io_uring_for_each_cqe(&ring_, head, cqe) {
                ++seen;
                const uint64_t id = io_uring_cqe_get_data64(cqe);
                if (id == kWake) {
                    rearm = true;
                    continue;
                }
                auto it = slots_.find(id);
                Chunk c = it->second;
                slots_.erase(it);
                --inflight_;
                on_result(c, cqe->res);  // may requeue into pending_
            }
            io_uring_cq_advance(&ring_, seen);
            if (rearm) arm_wake();
            if (seen) done_cv_.notify_all();
        }
    }

    size_t qd_;
    io_uring ring_{};
    int wake_fd_ = -1;
    uint64_t wake_buf_ = 0;
    std::thread thread_;
    std::deque<Chunk> pending_;
    std::unordered_map<uint64_t, Chunk> slots_;
    size_t inflight_ = 0;
    std::vector<iovec> regions_;
    bool sleeping_ = false;
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
