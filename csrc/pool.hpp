// PinnedPool: one page-locked arena reserved up front, sub-allocated exactly.
//
// Requests are rounded up to the I/O alignment (4 KiB by default) and no further.
// Free space is kept twice: by offset (to coalesce neighbours on free) and by
// (size, offset) (for best-fit lookup), both O(log n).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>

namespace memascend {

struct PoolStats {
    size_t capacity = 0;
    size_t in_use = 0;            // bytes handed out (after alignment rounding)
    size_t requested = 0;         // bytes asked for (before rounding)
    size_t peak_in_use = 0;
    size_t live_allocations = 0;
    size_t total_allocations = 0;
    size_t free_bytes = 0;
    size_t largest_free = 0;
    size_t free_blocks = 0;
    bool locked = false;
    bool hugepages = false;
    int lock_errno = 0;
};

// Thrown by alloc() when no free block is large enough.
struct PoolExhausted {
    size_t requested;
    size_t free_bytes;
    size_t largest_free;
};

class Arena {
public:
    Arena(size_t capacity, size_t alignment, bool hugepages, bool lock);
    ~Arena();
    Arena(const Arena&) = delete;
    Arena& operator=(const Arena&) = delete;

    // Returns the offset of a block of round_up(nbytes) bytes; throws PoolExhausted.
    size_t alloc(size_t nbytes);
    // Returns a block to the free lists; throws std::invalid_argument on an unknown offset.
    void free(size_t offset);
    size_t block_size(size_t offset) const;

    uint8_t* base() const { return base_; }
    size_t capacity() const { return capacity_; }
    size_t alignment() const { return alignment_; }
    size_t round_up(size_t nbytes) const { return (nbytes + alignment_ - 1) / alignment_ * alignment_; }
    PoolStats stats() const;
    // Every free block as (offset, size), in offset order (tests and diagnostics).
    std::map<size_t, size_t> free_blocks() const;

private:
    void insert_free(size_t offset, size_t size);
    void erase_free(std::map<size_t, size_t>::iterator it);

    uint8_t* base_ = nullptr;
    size_t capacity_;
    size_t mapped_;
    size_t alignment_;
    bool locked_ = false;
    bool hugepages_ = false;
    int lock_errno_ = 0;

    mutable std::mutex mu_;
    std::map<size_t, size_t> free_by_offset_;             // offset -> size
    std::set<std::pair<size_t, size_t>> free_by_size_;    // (size, offset)
    std::unordered_map<size_t, std::pair<size_t, size_t>> used_;  // offset -> (size, requested)
    size_t in_use_ = 0;
    size_t requested_ = 0;
    size_t peak_in_use_ = 0;
    size_t total_allocations_ = 0;
};

}  // namespace memascend
