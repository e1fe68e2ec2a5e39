// Host DRAM tier: one anonymous mapping carved by the extent allocator.
#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>

#include "snaptier/tiers.hpp"
#include "tiers/extent_allocator.hpp"
#include "tiers/posix_util.hpp"

namespace snaptier {
namespace {

class LocalTier final : public Tier {
 public:
  LocalTier(detail::UniqueMapping arena, std::uint64_t capacity)
      : arena_(std::move(arena)), capacity_(capacity), allocator_(0, capacity), epoch_(new_epoch()) {}

  std::string_view name() const noexcept override { return "local"; }
  TierKind kind() const noexcept override { return TierKind::local; }
  TierCaps caps() const noexcept override {
    return TierCaps{.byte_addressable = true, .shared = false, .remote = false,
                    .persistent = false};
  }

  Result<Extent> allocate(std::uint64_t length) override {
    std::lock_guard lock(mutex_);
    return allocator_.allocate(length);
  }
  Result<void> release(Extent extent) override {
    std::lock_guard lock(mutex_);
    return allocator_.release(extent);
  }

  Result<void> read(Extent extent, std::uint64_t offset, std::span<std::byte> out) override {
    if (auto ok = detail::check_access("local", extent, offset, out.size(), 0, capacity_); !ok) {
      return ok;
    }
    std::memcpy(out.data(), arena_.data() + extent.offset + offset, out.size());
    reads_.fetch_add(1, std::memory_order_relaxed);
    bytes_read_.fetch_add(out.size(), std::memory_order_relaxed);
    return {};
  }
  Result<void> write(Extent extent, std::uint64_t offset, std::span<const std::byte> in) override {
    if (auto ok = detail::check_access("local", extent, offset, in.size(), 0, capacity_); !ok) {
      return ok;
    }
    std::memcpy(arena_.data() + extent.offset + offset, in.data(), in.size());
    writes_.fetch_add(1, std::memory_order_relaxed);
    bytes_written_.fetch_add(in.size(), std::memory_order_relaxed);
    return {};
  }

  // The arena is this process's memory: a manifest written by an earlier agent names pages
  // that went with it.
  std::uint64_t epoch() const noexcept override { return epoch_; }

  const std::byte* map(Extent extent) const noexcept override {
    if (!detail::check_access("local", extent, 0, 0, 0, capacity_)) return nullptr;
    return arena_.data() + extent.offset;
  }

  TierStats stats() const override {
    std::lock_guard lock(mutex_);
    return TierStats{.capacity_bytes = capacity_, .used_bytes = allocator_.used_bytes(),
                     .reads = reads_.load(), .writes = writes_.load(),
                     .bytes_read = bytes_read_.load(), .bytes_written = bytes_written_.load()};
  }

 private:
  detail::UniqueMapping arena_;
  std::uint64_t capacity_;
  mutable std::mutex mutex_;
  ExtentAllocator allocator_;
  std::atomic<std::uint64_t> reads_{0}, writes_{0}, bytes_read_{0}, bytes_written_{0};
  std::uint64_t epoch_;
};

}  // namespace

Result<std::unique_ptr<Tier>> make_local_tier(std::uint64_t capacity_bytes) {
  if (capacity_bytes == 0) return fail(Errc::invalid_argument, "local tier: capacity is zero");
  const std::uint64_t capacity = detail::round_up(capacity_bytes, detail::kTierPage);
  // NORESERVE: capacity is an upper bound; only pages actually written cost memory.
  void* data = ::mmap(nullptr, capacity, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (data == MAP_FAILED) return fail_errno(Errc::no_space, "local tier: mmap arena", errno);
  return std::make_unique<LocalTier>(detail::UniqueMapping(data, capacity), capacity);
}

}  // namespace snaptier
