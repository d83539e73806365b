#include "pool.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <system_error>

namespace memascend {

Arena::Arena(size_t capacity, size_t alignment, bool hugepages, bool lock)
    : capacity_(0), mapped_(0), alignment_(alignment) {
    if (alignment == 0 || (alignment & (alignment - 1)) != 0)
        throw std::invalid_argument("PinnedPool alignment must be a power of two, got " + std::to_string(alignment));
    if (capacity == 0) throw std::invalid_argument("PinnedPool capacity must be positive");
    capacity_ = round_up(capacity);
    mapped_ = capacity_;
    void* p = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        throw std::system_error(errno, std::generic_category(),
                                "PinnedPool: mmap of " + std::to_string(mapped_) + " bytes failed");
    base_ = static_cast<uint8_t*>(p);
    if (hugepages) {
#ifdef MADV_HUGEPAGE
        hugepages_ = madvise(base_, mapped_, MADV_HUGEPAGE) == 0;
#endif
    }
    if (lock) {
        // mlock also faults every page in, so the arena is resident from now on.
        if (mlock(base_, mapped_) == 0) {
            locked_ = true;
        } else {
            lock_errno_ = errno;
        }
    }
    insert_free(0, capacity_);
}

Arena::~Arena() {
    if (base_ != nullptr) {
        if (locked_) munlock(base_, mapped_);
        munmap(base_, mapped_);
    }
}

void Arena::insert_free(size_t offset, size_t size) {
    free_by_offset_.emplace(offset, size);
    free_by_size_.emplace(size, offset);
}

void Arena::erase_free(std::map<size_t, size_t>::iterator it) {
    free_by_size_.erase({it->second, it->first});
    free_by_offset_.erase(it);
}

size_t Arena::alloc(size_t nbytes) {
    if (nbytes == 0) throw std::invalid_argument("PinnedPool.alloc: nbytes must be positive");
    const size_t size = round_up(nbytes);
    std::lock_guard<std::mutex> g(mu_);
    // Best fit: the smallest free block that holds `size`; ties go to the lowest offset.
    auto fit = free_by_size_.lower_bound({size, 0});
    if (size < nbytes || fit == free_by_size_.end()) {
        size_t free_bytes = capacity_ - in_use_;
        size_t largest = free_by_size_.empty() ? 0 : free_by_size_.rbegin()->first;
        throw PoolExhausted{nbytes, free_bytes, largest};
    }
    const size_t block = fit->first, offset = fit->second;
    erase_free(free_by_offset_.find(offset));
    if (block > size) insert_free(offset + size, block - size);
    used_.emplace(offset, std::make_pair(size, nbytes));
    in_use_ += size;
    requested_ += nbytes;
    ++total_allocations_;
    if (in_use_ > peak_in_use_) peak_in_use_ = in_use_;
    return offset;
}

void Arena::free(size_t offset) {
    std::lock_guard<std::mutex> g(mu_);
    auto u = used_.find(offset);
    if (u == used_.end())
        throw std::invalid_argument("PinnedPool.free: no live block at offset " + std::to_string(offset) +
                                    " (double free?)");
    size_t start = offset, size = u->second.first;
    in_use_ -= size;
    requested_ -= u->second.second;
    used_.erase(u);
    // Coalesce with the free neighbour after, then the one before.
    auto next = free_by_offset_.lower_bound(start);
    if (next != free_by_offset_.end() && next->first == start + size) {
        size += next->second;
        erase_free(next);
    }
    auto after = free_by_offset_.lower_bound(start);
    if (after != free_by_offset_.begin()) {
        auto prev = std::prev(after);
        if (prev->first + prev->second == start) {
            start = prev->first;
            size += prev->second;
            erase_free(prev);
        }
    }
    insert_free(start, size);
}

size_t Arena::block_size(size_t offset) const {
    std::lock_guard<std::mutex> g(mu_);
    auto u = used_.find(offset);
    if (u == used_.end()) throw std::invalid_argument("PinnedPool: no live block at offset " + std::to_string(offset));
    return u->second.first;
}

PoolStats Arena::stats() const {
    std::lock_guard<std::mutex> g(mu_);
    PoolStats s;
    s.capacity = capacity_;
    s.in_use = in_use_;
    s.requested = requested_;
    s.peak_in_use = peak_in_use_;
    s.live_allocations = used_.size();
    s.total_allocations = total_allocations_;
    s.free_bytes = capacity_ - in_use_;
    s.largest_free = free_by_size_.empty() ? 0 : free_by_size_.rbegin()->first;
    s.free_blocks = free_by_offset_.size();
    s.locked = locked_;
    s.hugepages = hugepages_;
    s.lock_errno = lock_errno_;
    return s;
}

std::map<size_t, size_t> Arena::free_blocks() const {
    std::lock_guard<std::mutex> g(mu_);
    return free_by_offset_;
}

}  // namespace memascend
