#include "cxl/cache_model_access.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <new>

#include <sys/mman.h>

namespace snaptier {

namespace {
constexpr std::uint64_t kWords = kCacheLine / 8;

detail::UniqueMapping anonymous_copy(std::uint64_t size) {
  if (size == 0) return {};
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  return detail::UniqueMapping(p, size);
}
}  // namespace

CacheModelAccess::CacheModelAccess(std::shared_ptr<MappedRegion> shared, bool prefetch_page)
    : shared_region_(std::move(shared)),
      shared_(shared_region_->data()),
      size_(shared_region_->size()),
      prefetch_page_(prefetch_page),
      copy_(anonymous_copy(size_)),
      present_((size_ + kCacheLine - 1) / kCacheLine, 0),
      dirty_(present_.size(), 0) {}

// Lines move as 8-byte single-copy-atomic words, as they do between a CPU and memory, so another
// process polling the shared bytes never sees a torn commit word. A word that did not change is
// not rewritten: threads of this host reading a page in place (through map_for_read) while
// another thread maps the same page again then share the copy without a data race.
void CacheModelAccess::fetch_line(std::uint64_t line) {
  auto* src = reinterpret_cast<std::uint64_t*>(shared_ + line * kCacheLine);
  auto* dst = reinterpret_cast<std::uint64_t*>(copy_.data() + line * kCacheLine);
  for (std::uint64_t i = 0; i < kWords; ++i) {
    const std::uint64_t word = __atomic_load_n(src + i, __ATOMIC_ACQUIRE);
    if (dst[i] != word) dst[i] = word;
  }
  present_[line] = 1;
}

void CacheModelAccess::miss(std::uint64_t line) {
  fetch_line(line);
  if (!prefetch_page_) return;
  constexpr std::uint64_t kLinesPerPage = 4096 / kCacheLine;
  const std::uint64_t first = line / kLinesPerPage * kLinesPerPage;
  for (std::uint64_t l = first; l < std::min<std::uint64_t>(first + kLinesPerPage, present_.size()); ++l) {
    if (!present_[l]) fetch_line(l);
  }
}

void CacheModelAccess::writeback_line(std::uint64_t line) {
  auto* src = reinterpret_cast<std::uint64_t*>(copy_.data() + line * kCacheLine);
  auto* dst = reinterpret_cast<std::uint64_t*>(shared_ + line * kCacheLine);
  for (std::uint64_t i = 0; i < kWords; ++i) __atomic_store_n(dst + i, src[i], __ATOMIC_RELEASE);
  dirty_[line] = 0;
}

void CacheModelAccess::load(std::uint64_t offset, std::span<std::byte> out) {
  if (out.empty()) return;
  std::lock_guard lock(mutex_);
  for (std::uint64_t line = offset / kCacheLine; line <= (offset + out.size() - 1) / kCacheLine; ++line) {
    if (!present_[line]) miss(line);
  }
  std::memcpy(out.data(), copy_.data() + offset, out.size());
}

void CacheModelAccess::store(std::uint64_t offset, std::span<const std::byte> in) {
  if (in.empty()) return;
  std::lock_guard lock(mutex_);
  for (std::uint64_t line = offset / kCacheLine; line <= (offset + in.size() - 1) / kCacheLine; ++line) {
    if (!present_[line]) miss(line);  // write-allocate
    dirty_[line] = 1;
  }
  std::memcpy(copy_.data() + offset, in.data(), in.size());
}

std::uint64_t CacheModelAccess::load_u64(std::uint64_t offset) {
  std::uint64_t value = 0;
  load(offset, std::as_writable_bytes(std::span(&value, 1)));
  return value;
}

void CacheModelAccess::store_u64(std::uint64_t offset, std::uint64_t value) {
  store(offset, std::as_bytes(std::span(&value, 1)));
}

void CacheModelAccess::writeback(std::uint64_t offset, std::uint64_t length) {
  if (length == 0) return;
  std::lock_guard lock(mutex_);
  for (std::uint64_t line = offset / kCacheLine; line <= (offset + length - 1) / kCacheLine; ++line) {
    if (dirty_[line]) writeback_line(line);
  }
}

void CacheModelAccess::invalidate(std::uint64_t offset, std::uint64_t length) {
  if (length == 0) return;
  std::lock_guard lock(mutex_);
  for (std::uint64_t line = offset / kCacheLine; line <= (offset + length - 1) / kCacheLine; ++line) {
    if (dirty_[line]) writeback_line(line);  // clflushopt writes a dirty line back first
    present_[line] = 0;
  }
}

void CacheModelAccess::fence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

const std::byte* CacheModelAccess::map_for_read(std::uint64_t offset, std::uint64_t length) {
  invalidate(offset, length);
  if (length > 0) {
    std::lock_guard lock(mutex_);
    for (std::uint64_t line = offset / kCacheLine; line <= (offset + length - 1) / kCacheLine; ++line) {
      fetch_line(line);
    }
  }
  return copy_.data() + offset;
}

std::uint64_t CacheModelAccess::dirty_lines() const {
  std::lock_guard lock(mutex_);
  std::uint64_t n = 0;
  for (auto d : dirty_) n += d;
  return n;
}

}  // namespace snaptier
