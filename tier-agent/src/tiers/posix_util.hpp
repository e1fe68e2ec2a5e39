// The range check every tier shares (RAII owners live in core/unique_fd.hpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "core/unique_fd.hpp"
#include "snaptier/error.hpp"
#include "snaptier/tier.hpp"

namespace snaptier::detail {

inline constexpr std::uint64_t kTierPage = 4096;

[[nodiscard]] inline std::uint64_t round_up(std::uint64_t value, std::uint64_t alignment) noexcept {
  return (value + alignment - 1) / alignment * alignment;
}

// [offset, offset+size) must lie inside the extent, and the extent inside [base, base+limit).
[[nodiscard]] inline Result<void> check_access(std::string_view tier, Extent extent,
                                               std::uint64_t offset, std::uint64_t size,
                                               std::uint64_t base, std::uint64_t limit) {
  const bool extent_ok = extent.offset >= base && extent.length <= limit &&
                         extent.offset - base <= limit - extent.length;
  const bool range_ok = offset <= extent.length && size <= extent.length - offset;
  if (!extent_ok || !range_ok) {
    return fail(Errc::invalid_argument,
                std::string(tier) + ": access [" + std::to_string(offset) + ", +" +
                    std::to_string(size) + ") of extent {" + std::to_string(extent.offset) + ", " +
                    std::to_string(extent.length) + "} is out of range");
  }
  return {};
}

}  // namespace snaptier::detail
