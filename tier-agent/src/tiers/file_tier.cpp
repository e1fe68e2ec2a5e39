// File tier: one file per extent in a directory. The directory listing *is* the allocation
// state, so a restarted agent finds every extent it had (the tier is persistent without a
// separate allocation journal). Extent offsets are (file id << 40) | byte offset in the file.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <map>
#include <mutex>
#include <system_error>

#include "snaptier/tiers.hpp"
#include "tiers/posix_util.hpp"

namespace snaptier {
namespace {

constexpr unsigned kIdShift = 40;
constexpr std::uint64_t kInnerMask = (std::uint64_t{1} << kIdShift) - 1;
constexpr std::uint64_t kMaxId = (std::uint64_t{1} << (64 - kIdShift)) - 1;
constexpr std::string_view kPrefix = "extent-";
constexpr std::string_view kSuffix = ".bin";

struct ExtentFile {
  std::uint64_t length = 0;
  std::shared_ptr<detail::UniqueFd> fd;  // opened lazily; shared so a reader outlives release()
};

class FileTier final : public Tier {
 public:
  FileTier(std::filesystem::path dir, std::uint64_t capacity, std::map<std::uint64_t, ExtentFile> files,
           std::uint64_t used, std::uint64_t next_id)
      : dir_(std::move(dir)), capacity_(capacity), files_(std::move(files)), used_(used),
        next_id_(next_id) {}

  std::string_view name() const noexcept override { return "file"; }
  TierKind kind() const noexcept override { return TierKind::file; }
  TierCaps caps() const noexcept override {
    return TierCaps{.byte_addressable = false, .shared = false, .remote = false,
                    .persistent = true};
  }

  Result<Extent> allocate(std::uint64_t length) override {
    if (length == 0) return fail(Errc::invalid_argument, "file tier: allocate zero bytes");
    const std::uint64_t rounded = detail::round_up(length, detail::kTierPage);
    if (rounded > kInnerMask) return fail(Errc::invalid_argument, "file tier: extent too large");
    std::lock_guard lock(mutex_);
    if (used_ > capacity_ || rounded > capacity_ - used_) {
      return fail(Errc::no_space, "file tier " + dir_.string() + ": " +
                                      std::to_string(used_ > capacity_ ? 0 : capacity_ - used_) + " bytes free, " +
                                      std::to_string(rounded) + " requested");
    }
    if (next_id_ > kMaxId) return fail(Errc::no_space, "file tier: extent ids exhausted");
    const std::uint64_t id = next_id_++;
    const auto path = path_of(id);
    detail::UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    if (!fd) return fail_errno(Errc::io, "file tier: create " + path.string(), errno);
    if (::ftruncate(fd.get(), static_cast<off_t>(rounded)) != 0) {
      const int err = errno;
      ::unlink(path.c_str());
      return fail_errno(err == ENOSPC ? Errc::no_space : Errc::io,
                        "file tier: size " + path.string(), err);
    }
    files_.emplace(id, ExtentFile{rounded, std::make_shared<detail::UniqueFd>(std::move(fd))});
    used_ += rounded;
    return Extent{id << kIdShift, rounded};
  }

  Result<void> release(Extent extent) override {
    std::lock_guard lock(mutex_);
    const std::uint64_t id = extent.offset >> kIdShift;
    auto it = files_.find(id);
    if ((extent.offset & kInnerMask) != 0 || it == files_.end() || it->second.length != extent.length) {
      return fail(Errc::invalid_argument, "file tier: release of an extent it did not allocate");
    }
    const auto path = path_of(id);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return fail_errno(Errc::io, "file tier: unlink " + path.string(), errno);
    }
    used_ -= it->second.length;
    files_.erase(it);
    return {};
  }

  Result<void> read(Extent extent, std::uint64_t offset, std::span<std::byte> out) override {
    auto fd = locate(extent, offset, out.size());
    if (!fd) return tl::unexpected(fd.error());
    const off_t position = static_cast<off_t>((extent.offset & kInnerMask) + offset);
    std::size_t done = 0;
    while (done < out.size()) {
      const ssize_t n = ::pread((*fd)->get(), out.data() + done, out.size() - done,
                                position + static_cast<off_t>(done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return fail_errno(Errc::io, "file tier: pread", errno);
      if (n == 0) return fail(Errc::corrupt, "file tier: extent file is shorter than its extent");
      done += static_cast<std::size_t>(n);
    }
    reads_.fetch_add(1, std::memory_order_relaxed);
    bytes_read_.fetch_add(out.size(), std::memory_order_relaxed);
    return {};
  }

  Result<void> write(Extent extent, std::uint64_t offset, std::span<const std::byte> in) override {
    auto fd = locate(extent, offset, in.size());
    if (!fd) return tl::unexpected(fd.error());
    const off_t position = static_cast<off_t>((extent.offset & kInnerMask) + offset);
    std::size_t done = 0;
    while (done < in.size()) {
      const ssize_t n = ::pwrite((*fd)->get(), in.data() + done, in.size() - done,
                                 position + static_cast<off_t>(done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return fail_errno(errno == ENOSPC ? Errc::no_space : Errc::io, "file tier: pwrite", errno);
      done += static_cast<std::size_t>(n);
    }
    writes_.fetch_add(1, std::memory_order_relaxed);
    bytes_written_.fetch_add(in.size(), std::memory_order_relaxed);
    return {};
  }

  TierStats stats() const override {
    std::lock_guard lock(mutex_);
    return TierStats{.capacity_bytes = capacity_, .used_bytes = used_, .reads = reads_.load(),
                     .writes = writes_.load(), .bytes_read = bytes_read_.load(),
                     .bytes_written = bytes_written_.load()};
  }

 private:
  std::filesystem::path path_of(std::uint64_t id) const {
    return dir_ / (std::string(kPrefix) + std::to_string(id) + std::string(kSuffix));
  }

  // Validates the access and returns the (lazily opened) descriptor of the extent's file. The
  // extent may be a sub-range of an allocated one (a page inside a snapshot's extent).
  Result<std::shared_ptr<detail::UniqueFd>> locate(Extent extent, std::uint64_t offset,
                                                   std::uint64_t size) {
    std::lock_guard lock(mutex_);
    auto it = files_.find(extent.offset >> kIdShift);
    if (it == files_.end()) {
      return fail(Errc::invalid_argument, "file tier: extent {" + std::to_string(extent.offset) +
                                              "} names no extent file");
    }
    if (auto ok = detail::check_access("file", Extent{extent.offset & kInnerMask, extent.length},
                                       offset, size, 0, it->second.length);
        !ok) {
      return tl::unexpected(ok.error());
    }
    if (!it->second.fd) {
      const auto path = path_of(it->first);
      detail::UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
      if (!fd) return fail_errno(Errc::io, "file tier: open " + path.string(), errno);
      it->second.fd = std::make_shared<detail::UniqueFd>(std::move(fd));
    }
    return it->second.fd;
  }

  std::filesystem::path dir_;
  std::uint64_t capacity_;
  mutable std::mutex mutex_;
  std::map<std::uint64_t, ExtentFile> files_;
  std::uint64_t used_;
  std::uint64_t next_id_;
  std::atomic<std::uint64_t> reads_{0}, writes_{0}, bytes_read_{0}, bytes_written_{0};
};

}  // namespace

Result<std::unique_ptr<Tier>> make_file_tier(const std::filesystem::path& directory,
                                             std::uint64_t capacity_bytes) {
  if (capacity_bytes == 0) return fail(Errc::invalid_argument, "file tier: capacity is zero");
  std::error_code ec;
  std::filesystem::create_directories(directory, ec);
  if (ec) return fail(Errc::io, "file tier: create " + directory.string() + ": " + ec.message());

  // Rebuild the allocation state from the extent files left by a previous run.
  std::map<std::uint64_t, ExtentFile> files;
  std::uint64_t used = 0;
  std::uint64_t next_id = 1;
  for (const auto& entry : std::filesystem::directory_iterator(directory, ec)) {
    const std::string name = entry.path().filename().string();
    if (!name.starts_with(kPrefix) || !name.ends_with(kSuffix)) continue;
    const std::string_view digits(name.data() + kPrefix.size(),
                                  name.size() - kPrefix.size() - kSuffix.size());
    std::uint64_t id = 0;
    auto [end, err] = std::from_chars(digits.data(), digits.data() + digits.size(), id);
    if (err != std::errc{} || end != digits.data() + digits.size() || id == 0 || id > kMaxId) continue;
    struct stat st {};
    if (::stat(entry.path().c_str(), &st) != 0) {
      return fail_errno(Errc::io, "file tier: stat " + entry.path().string(), errno);
    }
    files.emplace(id, ExtentFile{static_cast<std::uint64_t>(st.st_size), nullptr});
    used += static_cast<std::uint64_t>(st.st_size);
    next_id = std::max(next_id, id + 1);
  }
  if (ec) return fail(Errc::io, "file tier: list " + directory.string() + ": " + ec.message());
  return std::make_unique<FileTier>(directory, capacity_bytes, std::move(files), used, next_id);
}

}  // namespace snaptier
