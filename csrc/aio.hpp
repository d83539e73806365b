// AsyncIO: asynchronous file I/O on raw host addresses, with two backends behind
// one interface: io_uring (liburing) and a pool of pread/pwrite threads.
//
// A request (file, offset, address, nbytes) is split into block_size chunks.
// Every chunk's completion result is checked: an error is recorded against its
// request with the file, offset and byte count; a short transfer is completed by
// resubmitting the remainder; a read that hits end of file is an error.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace memascend {

enum class Op { Read, Write };

struct IOError {
    int err;  // errno; EIO-like for end of file, 0 never
    std::string message;
    std::string path;
    uint64_t offset;
    size_t nbytes;
    Op op;
};

struct Chunk {
    uint64_t id = 0;
    uint64_t request = 0;
    int file = -1;
    int fd = -1;
    Op op = Op::Read;
    uint64_t offset = 0;  // of the chunk's first byte
    uint8_t* addr = nullptr;
    size_t nbytes = 0;    // chunk length
    size_t done = 0;      // bytes already transferred
    size_t cap = 0;       // test fault: transfer at most this much on the next attempt (0 = no cap)
    size_t remaining() const { return nbytes - done; }
    size_t attempt_len() const { return cap != 0 && cap < remaining() ? cap : remaining(); }
};

struct IOStats {
    uint64_t requests = 0, chunks = 0, bytes_read = 0, bytes_written = 0;
    uint64_t short_resubmits = 0, retries = 0, errors = 0;
    size_t in_flight_requests = 0;
};

class AsyncIO {
public:
    AsyncIO(size_t block_size, size_t alignment);
    virtual ~AsyncIO() = default;

    virtual const char* backend() const = 0;
    virtual size_t queue_depth() const = 0;
    virtual size_t registered_bytes() const { return 0; }

    // Takes ownership of `fd` (closed by close_file or on destruction).
    int add_file(int fd, const std::string& path, bool direct);
    // Waits for the file's outstanding chunks, then closes it.
    void close_file(int file);
    std::string file_path(int file) const;

    uint64_t submit(Op op, int file, uint64_t offset, uintptr_t addr, size_t nbytes);
    bool poll(uint64_t request);
    // Blocks until the request completes, retires it, returns its error if it failed.
    std::optional<IOError> wait(uint64_t request);
    // Blocks until no request is incomplete (requests stay known until waited).
    void wait_idle();

    // Test hook: the nth chunk attempt from now (1-based) fails with -err,
    // or, when err == 0, transfers only half of its bytes (a short count).
    void inject_fault(uint64_t nth, int err);

    IOStats stats() const;
    size_t block_size() const { return block_size_; }
    size_t alignment() const { return alignment_; }

protected:
    struct Request {
        size_t chunks_left = 0;
        bool done = false;
        std::optional<IOError> error;
    };
    struct File {
        int fd;
        std::string path;
        bool direct;
        bool open;
        size_t active_chunks;
    };

    // Hands a chunk to the backend. Called with mu_ held.
    virtual void start(Chunk c) = 0;
    // Records the result of one attempt of a chunk; resubmits remainders. mu_ held.
    void on_result(Chunk c, long res);
    // Stops backend threads; subclasses call it first thing in their destructor.
    void close_all_files();

    mutable std::mutex mu_;
    std::condition_variable done_cv_;

private:
    void dispatch(Chunk c);  // applies injected faults, then start(); mu_ held
    void finish_chunk(const Chunk& c, std::optional<IOError> err);

    size_t block_size_, alignment_;
    std::vector<File> files_;
    std::unordered_map<uint64_t, Request> requests_;
    uint64_t next_request_ = 1, next_chunk_ = 1;
    size_t incomplete_ = 0;
    IOStats stats_;
    uint64_t fault_countdown_ = 0;
    int fault_err_ = 0;
};

std::unique_ptr<AsyncIO> make_thread_io(size_t block_size, size_t alignment, size_t threads);
// Returns nullptr (and sets *err) when io_uring is compiled out or io_uring_setup fails.
std::unique_ptr<AsyncIO> make_uring_io(size_t block_size, size_t alignment, size_t queue_depth, int* err);
// Registers [addr, addr+len) regions as fixed buffers; returns 0 or -errno.
int uring_register_buffers(AsyncIO& io, const std::vector<std::pair<uintptr_t, size_t>>& regions);

}  // namespace memascend
