// First-fit extent allocator with a coalescing free list. Used by the local tier and by each
// host's CXL arena. Not thread-safe: its owner serialises calls.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "snaptier/error.hpp"
#include "snaptier/tier.hpp"

namespace snaptier {

class ExtentAllocator {
 public:
  // Manages [base, base + capacity); capacity is rounded down to the alignment.
  ExtentAllocator(std::uint64_t base, std::uint64_t capacity, std::uint64_t alignment = 4096);

  // Lengths are rounded up to the alignment; the returned extent has the rounded length.
  [[nodiscard]] Result<Extent> allocate(std::uint64_t length);
  // Only an extent exactly as allocate()/reserve() returned it.
  [[nodiscard]] Result<void> release(Extent extent);
  // Takes a specific free range (recovery rebuilds allocation state this way).
  [[nodiscard]] Result<void> reserve(Extent extent);
  [[nodiscard]] bool is_allocated(Extent extent) const;

  [[nodiscard]] std::uint64_t base() const noexcept { return base_; }
  [[nodiscard]] std::uint64_t capacity() const noexcept { return capacity_; }
  [[nodiscard]] std::uint64_t used_bytes() const noexcept { return used_; }
  [[nodiscard]] std::uint64_t largest_free() const;
  [[nodiscard]] std::size_t free_fragments() const noexcept { return free_.size(); }
  // Every allocated extent, by offset (what a persisted allocation table records).
  [[nodiscard]] std::vector<Extent> allocated() const;

 private:
  std::uint64_t base_;
  std::uint64_t capacity_;
  std::uint64_t alignment_;
  std::uint64_t used_ = 0;
  std::map<std::uint64_t, std::uint64_t> free_;       // offset -> length, disjoint, coalesced
  std::map<std::uint64_t, std::uint64_t> allocated_;  // offset -> length
};

}  // namespace snaptier
