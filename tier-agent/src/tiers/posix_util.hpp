// RAII owners for file descriptors and mappings, and the range check every tier shares.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "snaptier/error.hpp"
#include "snaptier/tier.hpp"

namespace snaptier::detail {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  ~UniqueFd() { reset(); }
  [[nodiscard]] int get() const noexcept { return fd_; }
  [[nodiscard]] int release() noexcept { return std::exchange(fd_, -1); }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  void reset() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

class UniqueMapping {
 public:
  UniqueMapping() = default;
  UniqueMapping(void* data, std::size_t size) noexcept : data_(data), size_(size) {}
  UniqueMapping(UniqueMapping&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  UniqueMapping& operator=(UniqueMapping&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  ~UniqueMapping() { reset(); }
  [[nodiscard]] std::byte* data() const noexcept { return static_cast<std::byte*>(data_); }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  void reset() noexcept {
    if (data_ != nullptr) ::munmap(data_, size_);
    data_ = nullptr;
    size_ = 0;
  }

 private:
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

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
