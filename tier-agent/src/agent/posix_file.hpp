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

#include "core/unique_fd.hpp"
#include "snaptier/error.hpp"

namespace snaptier::agent_detail {

using detail::UniqueFd;
using detail::UniqueMapping;

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
    const auto size = static_cast<std::size_t>(st.st_size);
    if (size == 0) return mapping;
    void* data = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
    if (data == MAP_FAILED) return fail_errno(Errc::io, "mmap " + path.string(), errno);
    mapping.mapping_ = UniqueMapping(data, size);
    return mapping;
  }

  [[nodiscard]] std::span<const std::byte> bytes() const noexcept { return {mapping_.data(), mapping_.size()}; }

 private:
  UniqueMapping mapping_;
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
