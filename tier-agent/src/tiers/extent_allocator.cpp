#include "tiers/extent_allocator.hpp"

#include <algorithm>
#include <iterator>
#include <string>

namespace snaptier {

namespace {
std::string describe(Extent e) {
  return "{" + std::to_string(e.offset) + ", " + std::to_string(e.length) + "}";
}
}  // namespace

ExtentAllocator::ExtentAllocator(std::uint64_t base, std::uint64_t capacity,
                                 std::uint64_t alignment)
    : base_(base), capacity_(capacity / alignment * alignment), alignment_(alignment) {
  if (capacity_ > 0) free_.emplace(base_, capacity_);
}

Result<Extent> ExtentAllocator::allocate(std::uint64_t length) {
  if (length == 0) return fail(Errc::invalid_argument, "allocate: zero length");
  if (length > capacity_) {
    return fail(Errc::no_space, "allocate " + std::to_string(length) + " bytes: capacity is " +
                                    std::to_string(capacity_));
  }
  const std::uint64_t rounded = (length + alignment_ - 1) / alignment_ * alignment_;
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < rounded) continue;
    const Extent extent{it->first, rounded};
    const std::uint64_t rest = it->second - rounded;
    free_.erase(it);
    if (rest > 0) free_.emplace(extent.offset + rounded, rest);
    allocated_.emplace(extent.offset, rounded);
    used_ += rounded;
    return extent;
  }
  return fail(Errc::no_space, "allocate " + std::to_string(rounded) + " bytes: " +
                                  std::to_string(capacity_ - used_) + " free in " +
                                  std::to_string(free_.size()) + " fragments, largest " +
                                  std::to_string(largest_free()));
}

Result<void> ExtentAllocator::release(Extent extent) {
  auto it = allocated_.find(extent.offset);
  if (it == allocated_.end() || it->second != extent.length) {
    return fail(Errc::invalid_argument, "release " + describe(extent) + ": not an allocated extent");
  }
  allocated_.erase(it);
  used_ -= extent.length;

  std::uint64_t offset = extent.offset;
  std::uint64_t length = extent.length;
  auto next = free_.lower_bound(offset);
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      offset = prev->first;
      length += prev->second;
      free_.erase(prev);
    }
  }
  if (next != free_.end() && offset + length == next->first) {
    length += next->second;
    free_.erase(next);
  }
  free_.emplace(offset, length);
  return {};
}

Result<void> ExtentAllocator::reserve(Extent extent) {
  if (extent.length == 0 || extent.offset % alignment_ != 0 || extent.length % alignment_ != 0) {
    return fail(Errc::invalid_argument, "reserve " + describe(extent) + ": not aligned");
  }
  auto it = free_.upper_bound(extent.offset);
  if (it == free_.begin()) {
    return fail(Errc::already_exists, "reserve " + describe(extent) + ": range is not free");
  }
  --it;
  const std::uint64_t free_begin = it->first;
  const std::uint64_t free_end = it->first + it->second;
  if (extent.offset + extent.length > free_end) {
    return fail(Errc::already_exists, "reserve " + describe(extent) + ": range is not free");
  }
  free_.erase(it);
  if (extent.offset > free_begin) free_.emplace(free_begin, extent.offset - free_begin);
  const std::uint64_t end = extent.offset + extent.length;
  if (end < free_end) free_.emplace(end, free_end - end);
  allocated_.emplace(extent.offset, extent.length);
  used_ += extent.length;
  return {};
}

bool ExtentAllocator::is_allocated(Extent extent) const {
  auto it = allocated_.find(extent.offset);
  return it != allocated_.end() && it->second == extent.length;
}

std::uint64_t ExtentAllocator::largest_free() const {
  std::uint64_t largest = 0;
  for (const auto& [offset, length] : free_) largest = std::max(largest, length);
  return largest;
}

std::vector<Extent> ExtentAllocator::allocated() const {
  std::vector<Extent> out;
  out.reserve(allocated_.size());
  for (const auto& [offset, length] : allocated_) out.push_back(Extent{offset, length});
  return out;
}

}  // namespace snaptier
