#include "rdma/pool_storage.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstring>
#include <optional>
#include <vector>

#include <fmt/format.h>

#include "cxl/crc32c.hpp"
#include "tiers/posix_util.hpp"

namespace snaptier::rdma_detail {
namespace {

namespace fs = std::filesystem;

static_assert(std::endian::native == std::endian::little, "pool tables are little-endian");

// Table layout (docs/rdma.md, "Pool persistence"): magic, version, reserved, epoch, pool size,
// extent count, {offset, length} per extent, CRC32C of it all.
constexpr char kMagic[8] = {'S', 'N', 'A', 'P', 'P', 'O', 'O', 'L'};
constexpr std::uint32_t kVersion = 1;
constexpr std::size_t kHeader = 8 + 4 + 4 + 8 * 3;

// The pool file is the pool plus one trailer page that names its epoch: a table is trusted only
// for the file that carries its epoch (inode numbers are reused at once, so they cannot tell a
// recreated file from the original).
constexpr char kTrailerMagic[8] = {'S', 'N', 'A', 'P', 'P', 'F', 'I', 'L'};
constexpr std::uint64_t kTrailerBytes = 4096;

struct Table {
  std::uint64_t epoch = 0;
  std::uint64_t pool_size = 0;
  std::vector<Extent> extents;
};

template <class T>
void put(std::vector<std::byte>& out, T value) {
  const auto* p = reinterpret_cast<const std::byte*>(&value);
  out.insert(out.end(), p, p + sizeof value);
}

template <class T>
T get(const std::byte* at) {
  T value;
  std::memcpy(&value, at, sizeof value);
  return value;
}

std::vector<std::byte> encode(const Table& t) {
  std::vector<std::byte> out;
  out.reserve(kHeader + t.extents.size() * 16 + 4);
  for (char c : kMagic) put(out, c);
  put(out, kVersion);
  put<std::uint32_t>(out, 0);
  put(out, t.epoch);
  put(out, t.pool_size);
  put<std::uint64_t>(out, t.extents.size());
  for (const Extent& e : t.extents) {
    put(out, e.offset);
    put(out, e.length);
  }
  put(out, crc32c(out));
  return out;
}

// Errc::corrupt (with the reason) for anything but a complete table of this version.
Result<Table> decode(std::span<const std::byte> in) {
  auto torn = [](const std::string& why) { return fail(Errc::corrupt, why); };
  if (in.size() < kHeader + 4) return torn(fmt::format("truncated ({} bytes)", in.size()));
  if (std::memcmp(in.data(), kMagic, sizeof kMagic) != 0) return torn("bad magic");
  if (get<std::uint32_t>(in.data() + 8) != kVersion) {
    return torn(fmt::format("version {}", get<std::uint32_t>(in.data() + 8)));
  }
  const auto count = get<std::uint64_t>(in.data() + kHeader - 8);
  if (count > (in.size() - kHeader - 4) / 16 || in.size() != kHeader + count * 16 + 4) {
    return torn(fmt::format("{} bytes do not hold {} extents", in.size(), count));
  }
  if (crc32c(in.first(in.size() - 4)) != get<std::uint32_t>(in.data() + in.size() - 4)) {
    return torn("checksum mismatch");
  }
  Table t;
  t.epoch = get<std::uint64_t>(in.data() + 16);
  t.pool_size = get<std::uint64_t>(in.data() + 24);
  for (std::uint64_t i = 0; i < count; ++i) {
    const std::byte* at = in.data() + kHeader + i * 16;
    t.extents.push_back(Extent{get<std::uint64_t>(at), get<std::uint64_t>(at + 8)});
  }
  if (t.epoch == 0) return torn("epoch 0");
  return t;
}

Result<std::vector<std::byte>> read_all(const fs::path& path) {
  detail::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fail_errno(errno == ENOENT ? Errc::not_found : Errc::io, "open " + path.string(), errno);
  std::vector<std::byte> bytes;
  std::byte buffer[65536];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail_errno(Errc::io, "read " + path.string(), errno);
    if (n == 0) return bytes;
    bytes.insert(bytes.end(), buffer, buffer + n);
  }
}

Result<void> write_atomically(const fs::path& path, std::span<const std::byte> bytes) {
  const fs::path temporary = path.string() + ".tmp";
  detail::UniqueFd fd(::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd) return fail_errno(Errc::io, "create " + temporary.string(), errno);
  for (std::size_t done = 0; done < bytes.size();) {
    const ssize_t n = ::write(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail_errno(errno == ENOSPC ? Errc::no_space : Errc::io, "write " + temporary.string(), errno);
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd.get()) != 0) return fail_errno(Errc::io, "fsync " + temporary.string(), errno);
  fd.reset();
  if (::rename(temporary.c_str(), path.c_str()) != 0) return fail_errno(Errc::io, "rename " + temporary.string(), errno);
  detail::UniqueFd dir(::open(path.parent_path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir) (void)::fsync(dir.get());
  return {};
}

std::vector<std::byte> encode_trailer(std::uint64_t epoch, std::uint64_t pool_size) {
  std::vector<std::byte> out;
  for (char c : kTrailerMagic) put(out, c);
  put(out, epoch);
  put(out, pool_size);
  put(out, crc32c(out));
  return out;
}

// The epoch in the trailer of a pool file of `pool_size` bytes, or nullopt if it has none.
std::optional<std::uint64_t> read_trailer(int fd, std::uint64_t pool_size) {
  std::byte buffer[28];
  if (::pread(fd, buffer, sizeof buffer, static_cast<off_t>(pool_size)) != static_cast<ssize_t>(sizeof buffer)) {
    return std::nullopt;
  }
  if (std::memcmp(buffer, kTrailerMagic, sizeof kTrailerMagic) != 0) return std::nullopt;
  if (get<std::uint64_t>(buffer + 16) != pool_size) return std::nullopt;
  if (crc32c(std::span<const std::byte>(buffer, 24)) != get<std::uint32_t>(buffer + 24)) return std::nullopt;
  return get<std::uint64_t>(buffer + 8);
}

std::string mib(std::uint64_t bytes) { return fmt::format("{:.1f} MiB", static_cast<double>(bytes) / (1 << 20)); }

}  // namespace

fs::path PoolStorage::table_path(const fs::path& path) { return path.string() + ".table"; }

Result<PoolStorage> PoolStorage::open(const fs::path& path, std::uint64_t requested) {
  if (requested == 0) return fail(Errc::invalid_argument, "rdma pool: size is zero");
  const std::uint64_t size = detail::round_up(requested, detail::kTierPage);
  if (size < requested) return fail(Errc::invalid_argument, "rdma pool: size overflows");
  PoolStorage pool(size);
  pool.path_ = path;

  if (path.empty()) {
    void* data = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) return fail_errno(Errc::no_space, "rdma pool: mmap " + std::to_string(size) + " bytes", errno);
    pool.mapping_ = detail::UniqueMapping(data, size);
    pool.epoch_ = new_epoch();
    pool.origin_ = "new pool: anonymous memory (lost when the agent stops)";
    return pool;
  }

  std::error_code ec;
  if (path.has_parent_path()) fs::create_directories(path.parent_path(), ec);
  if (ec) return fail(Errc::io, "rdma pool: create " + path.parent_path().string() + ": " + ec.message());
  const fs::path table = table_path(path);

  // Decide whether the file's contents can be kept: only with an intact table whose epoch the
  // file itself carries.
  std::string fresh_reason;
  std::optional<Table> kept;
  detail::UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd && errno != ENOENT) return fail_errno(Errc::io, "rdma pool: open " + path.string(), errno);
  if (fd) {
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      return fail_errno(Errc::unavailable, "rdma pool: " + path.string() + " is in use by another agent", errno);
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) return fail_errno(Errc::io, "rdma pool: stat " + path.string(), errno);
    auto bytes = read_all(table);
    Result<Table> decoded = fail(Errc::not_found, "no table");
    if (bytes) decoded = decode(*bytes);
    if (!decoded) {
      fresh_reason = bytes ? "the table " + table.string() + " is damaged (" + decoded.error().message + "); not trusted"
                           : "no table beside " + path.string() + " (" + bytes.error().message + ")";
    } else if (static_cast<std::uint64_t>(st.st_size) != decoded->pool_size + kTrailerBytes ||
               read_trailer(fd.get(), decoded->pool_size) != decoded->epoch) {
      fresh_reason = "the table " + table.string() + " belongs to another file than " + path.string() +
                     " (the file does not carry its epoch); not trusted";
    } else if (decoded->pool_size != size) {
      return fail(Errc::invalid_argument,
                  fmt::format("rdma pool: {} holds a pool of {} bytes with {} extents, pool_size asks for {}; set "
                              "pool_size back, or delete {} and {} to start an empty pool",
                              path.string(), decoded->pool_size, decoded->extents.size(), size, path.string(),
                              table.string()));
    } else {
      kept = std::move(*decoded);
      for (const Extent& e : kept->extents) {
        if (auto ok = pool.allocator_.reserve(e); !ok) {
          fresh_reason = fmt::format("the table {} lists extent {{{}, {}}}, which is not a free range: {}; not trusted",
                                     table.string(), e.offset, e.length, ok.error().message);
          kept.reset();
          pool.allocator_ = ExtentAllocator(0, size);
          break;
        }
      }
    }
    if (!kept) {
      // Start over with a new file: its pages are fresh zeros and the old ones are freed.
      fd.reset();
      if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
        return fail_errno(Errc::io, "rdma pool: remove the untrusted " + path.string(), errno);
      }
    }
  } else {
    fresh_reason = "no pool file " + path.string() + " (first start, or the memory node restarted)";
  }

  std::uint64_t epoch = kept ? kept->epoch : new_epoch();
  if (!fd) {
    fd = detail::UniqueFd(::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    if (!fd) return fail_errno(Errc::io, "rdma pool: create " + path.string(), errno);
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      return fail_errno(Errc::unavailable, "rdma pool: " + path.string() + " is in use by another agent", errno);
    }
    // Reserve every page now: a full tmpfs must fail here, not as SIGBUS on a later touch.
    if (int err = ::posix_fallocate(fd.get(), 0, static_cast<off_t>(size + kTrailerBytes)); err != 0) {
      (void)::unlink(path.c_str());
      return fail_errno(err == ENOSPC ? Errc::no_space : Errc::io,
                        "rdma pool: allocate " + std::to_string(size + kTrailerBytes) + " bytes for " + path.string(),
                        err);
    }
    const auto trailer = encode_trailer(epoch, size);
    if (::pwrite(fd.get(), trailer.data(), trailer.size(), static_cast<off_t>(size)) !=
            static_cast<ssize_t>(trailer.size()) ||
        ::fsync(fd.get()) != 0) {
      const int err = errno;
      (void)::unlink(path.c_str());
      return fail_errno(Errc::io, "rdma pool: write the trailer of " + path.string(), err);
    }
  }
  void* data = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (data == MAP_FAILED) return fail_errno(Errc::no_space, "rdma pool: mmap " + path.string(), errno);
  pool.mapping_ = detail::UniqueMapping(data, size);
  pool.fd_ = std::move(fd);
  pool.epoch_ = epoch;
  if (kept) {
    pool.recovered_ = true;
    pool.origin_ = fmt::format("kept {} extents ({}) from {}", kept->extents.size(), mib(pool.used_bytes()), table.string());
    return pool;
  }
  pool.origin_ = "new pool: " + fresh_reason;
  if (auto ok = pool.save(); !ok) return tl::unexpected(ok.error());
  return pool;
}

Result<void> PoolStorage::save() const {
  if (path_.empty()) return {};
  Table t{.epoch = epoch_, .pool_size = size(), .extents = {}};
  t.extents = allocator_.allocated();
  if (auto ok = write_atomically(table_path(path_), encode(t)); !ok) {
    return fail(ok.error().code, "rdma pool: save the allocation table: " + ok.error().message);
  }
  return {};
}

Result<Extent> PoolStorage::allocate(std::uint64_t length) {
  auto extent = allocator_.allocate(length);
  if (!extent) return extent;
  if (auto ok = save(); !ok) {
    (void)allocator_.release(*extent);
    return tl::unexpected(ok.error());
  }
  return extent;
}

Result<void> PoolStorage::release(Extent extent) {
  if (auto ok = allocator_.release(extent); !ok) return ok;
  if (auto ok = save(); !ok) {
    (void)allocator_.reserve(extent);  // memory and table keep agreeing
    return ok;
  }
  return {};
}

}  // namespace snaptier::rdma_detail
