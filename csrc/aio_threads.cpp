// Thread-pool backend: worker threads doing pread/pwrite, for systems where
// io_uring is compiled out or disabled.
#include <unistd.h>

#include <cerrno>
#include <thread>

#include "aio.hpp"

namespace memascend {
namespace {

class ThreadIO final : public AsyncIO {
public:
    ThreadIO(size_t block_size, size_t alignment, size_t threads) : AsyncIO(block_size, alignment), threads_(threads) {
        if (threads == 0) throw std::invalid_argument("AsyncIO threads backend needs at least one thread");
        for (size_t i = 0; i < threads; ++i) workers_.emplace_back([this] { run(); });
    }

    ~ThreadIO() override {
        close_all_files();  // waits for outstanding chunks first
        {
            std::lock_guard<std::mutex> g(mu_);
            stop_ = true;
        }
        work_cv_.notify_all();
        for (auto& t : workers_) t.join();
    }

    const char* backend() const override { return "threads"; }
    size_t queue_depth() const override { return threads_; }

protected:
    void start(Chunk c) override {
        queue_.push_back(c);
        work_cv_.notify_one();
    }

private:
    void run() {
        std::unique_lock<std::mutex> g(mu_);
        for (;;) {
            work_cv_.wait(g, [&] { return stop_ || !queue_.empty(); });
            if (queue_.empty()) return;  // stop_ and nothing left
            Chunk c = queue_.front();
            queue_.pop_front();
            g.unlock();
            const size_t len = c.attempt_len();
            const off_t off = off_t(c.offset + c.done);
            ssize_t res = c.op == Op::Read ? ::pread(c.fd, c.addr + c.done, len, off)
                                           : ::pwrite(c.fd, c.addr + c.done, len, off);
            long result = res < 0 ? -long(errno) : long(res);
            g.lock();
            on_result(c, result);
        }
    }

    size_t threads_;
    std::vector<std::thread> workers_;
    std::deque<Chunk> queue_;
    std::condition_variable work_cv_;
    bool stop_ = false;
};

}  // namespace

std::unique_ptr<AsyncIO> make_thread_io(size_t block_size, size_t alignment, size_t threads) {
    return std::make_unique<ThreadIO>(block_size, alignment, threads);
}

}  // namespace memascend
