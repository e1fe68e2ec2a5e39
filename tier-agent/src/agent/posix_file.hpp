// RAII for the agent's file work: descriptors and read-only mappings close on every path.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <utility>
#include <vector>

#include "snaptier/error.hpp"

namespace snaptier::agent_detail {

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
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  [[nodiscard]] int get() const noexcept { return fd_; }
  void reset() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// A whole regular file mapped read-only (nothing mapped for an empty file).
class ReadOnlyMapping {
 public:
  [[nodiscard]] static Result<ReadOnlyMapping> open(const std::filesystem::path& path) {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) return fail_errno(errno == ENOENT ? Errc::not_found : Errc::io, "open " + path.string(), errno);
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) return fail_errno(Errc::io, "stat " + path.string(), errno);
    if (!S_ISREG(st.st_mode)) return fail(Errc::invalid_argument, path.string() + " is not a regular file");
    ReadOnlyMapping mapping;
    mapping.size_ = static_cast<std::size_t>(st.st_size);
    if (mapping.size_ == 0) return mapping;
    void* data = ::mmap(nullptr, mapping.size_, PROT_READ, MAP_PRIVATE, fd.get(), 0);
    if (data == MAP_FAILED) return fail_errno(Errc::io, "mmap " + path.string(), errno);
    mapping.data_ = static_cast<const std::byte*>(data);
    return mapping;
  }

  ReadOnlyMapping() = default;
  ReadOnlyMapping(ReadOnlyMapping&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  ReadOnlyMapping& operator=(ReadOnlyMapping&& other) noexcept {
    if (this != &other) {
      unmap();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  ~ReadOnlyMapping() { unmap(); }

  [[nodiscard]] std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }

 private:
  void unmap() noexcept {
    if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
  }
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// Writes all of `iov` at `offset`, continuing after short writes.
[[nodiscard]] inline Result<void> pwritev_all(int fd, std::vector<iovec> iov, std::uint64_t offset,
                                              const std::filesystem::path& path) {
  std::size_t first = 0;
  while (first < iov.size()) {
    ssize_t written = ::pwritev(fd, iov.data() + first, static_cast<int>(iov.size() - first), static_cast<off_t>(offset));
    if (written < 0) {
      if (errno == EINTR) continue;
      return fail_errno(Errc::io, "write " + path.string(), errno);
    }
    offset += static_cast<std::uint64_t>(written);
    auto left = static_cast<std::size_t>(written);
    while (first < iov.size() && left >= iov[first].iov_len) left -= iov[first++].iov_len;
    if (first < iov.size()) {
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + left;
      iov[first].iov_len -= left;
    }
  }
  return {};
}

}  // namespace snaptier::agent_detail
