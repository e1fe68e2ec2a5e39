// Mapping a devdax device (or a regular file standing in for one) and the production accessor.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include "snaptier/cxl_directory.hpp"
#include "tiers/posix_util.hpp"

namespace snaptier {
namespace {

constexpr std::uint64_t kDaxAlignment = 2ull << 20;

Result<std::uint64_t> devdax_size(const struct stat& st) {
  const std::string base = "/sys/dev/char/" + std::to_string(major(st.st_rdev)) + ":" +
                           std::to_string(minor(st.st_rdev));
  for (const char* leaf : {"/size", "/device/size"}) {
    std::ifstream in(base + leaf);
    std::uint64_t size = 0;
    if (in >> size) return size;
  }
  return fail(Errc::unsupported, "cannot read the size of " + base + " (not a devdax device?)");
}

}  // namespace

Result<std::shared_ptr<MappedRegion>> MappedRegion::open(const std::filesystem::path& path,
                                                         Options options) {
  detail::UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd) {
    const int err = errno;
    const Errc code = err == ENOENT ? Errc::not_found : err == EISDIR ? Errc::invalid_argument : Errc::io;
    return fail_errno(code, "open " + path.string(), err);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return fail_errno(Errc::io, "fstat " + path.string(), errno);

  const bool device_dax = S_ISCHR(st.st_mode);
  std::uint64_t total = 0;
  if (device_dax) {
    auto size = devdax_size(st);
    if (!size) return tl::unexpected(size.error());
    total = *size;
  } else if (S_ISREG(st.st_mode)) {
    total = static_cast<std::uint64_t>(st.st_size);
  } else {
    return fail(Errc::invalid_argument, path.string() + " is neither a devdax device nor a file");
  }
  // devdax faults in 2 MiB pages and rejects smaller alignment; files only need 4 KiB.
  const std::uint64_t alignment = device_dax ? kDaxAlignment : 4096;
  if (options.offset % alignment != 0 || options.length % alignment != 0) {
    return fail(Errc::invalid_argument, path.string() + ": offset and length must be multiples of " +
                                            std::to_string(alignment) + " bytes");
  }
  if (options.offset >= total) {
    return fail(Errc::invalid_argument, path.string() + ": offset " + std::to_string(options.offset) +
                                            " is beyond its size " + std::to_string(total));
  }
  const std::uint64_t length = options.length == 0 ? total - options.offset : options.length;
  if (length > total - options.offset || length == 0) {
    return fail(Errc::invalid_argument, path.string() + ": range exceeds its size " + std::to_string(total));
  }
  void* data = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(),
                      static_cast<off_t>(options.offset));
  if (data == MAP_FAILED) return fail_errno(Errc::io, "mmap " + path.string(), errno);
  return std::shared_ptr<MappedRegion>(
      new MappedRegion(fd.release(), static_cast<std::byte*>(data), length, device_dax));
}

MappedRegion::~MappedRegion() {
  ::munmap(data_, size_);
  ::close(fd_);
}

namespace {

enum class FlushMethod { clwb, clflushopt, clflush, arm_dc, none };

FlushMethod detect_flush_method() noexcept {
#if defined(__x86_64__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
    if (ebx & (1u << 24)) return FlushMethod::clwb;
    if (ebx & (1u << 23)) return FlushMethod::clflushopt;
  }
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) && (edx & (1u << 19))) return FlushMethod::clflush;
  return FlushMethod::none;
#elif defined(__aarch64__)
  return FlushMethod::arm_dc;
#else
  return FlushMethod::none;
#endif
}

const FlushMethod kFlushMethod = detect_flush_method();
// clwb keeps the line cached, so invalidation needs clflushopt/clflush even where clwb exists.
bool has_clflushopt() noexcept {
#if defined(__x86_64__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (ebx & (1u << 23));
#else
  return false;
#endif
}
const bool kHasClflushopt = has_clflushopt();

#if defined(__x86_64__)
__attribute__((target("clwb"))) void lines_clwb(const std::byte* p, const std::byte* end) {
  for (; p < end; p += kCacheLine) _mm_clwb(const_cast<std::byte*>(p));
}
__attribute__((target("clflushopt"))) void lines_clflushopt(const std::byte* p, const std::byte* end) {
  for (; p < end; p += kCacheLine) _mm_clflushopt(const_cast<std::byte*>(p));
}
void lines_clflush(const std::byte* p, const std::byte* end) {
  for (; p < end; p += kCacheLine) _mm_clflush(p);
}
#endif

class DirectRegionAccess final : public RegionAccess {
 public:
  explicit DirectRegionAccess(std::shared_ptr<MappedRegion> region)
      : region_(std::move(region)), base_(region_->data()) {}

  std::uint64_t size() const noexcept override { return region_->size(); }
  void load(std::uint64_t offset, std::span<std::byte> out) override {
    std::memcpy(out.data(), base_ + offset, out.size());
  }
  void store(std::uint64_t offset, std::span<const std::byte> in) override {
    std::memcpy(base_ + offset, in.data(), in.size());
  }
  std::uint64_t load_u64(std::uint64_t offset) override {
    return __atomic_load_n(reinterpret_cast<std::uint64_t*>(base_ + offset), __ATOMIC_ACQUIRE);
  }
  void store_u64(std::uint64_t offset, std::uint64_t value) override {
    __atomic_store_n(reinterpret_cast<std::uint64_t*>(base_ + offset), value, __ATOMIC_RELEASE);
  }

  void writeback(std::uint64_t offset, std::uint64_t length) override {
    auto [begin, end] = line_range(offset, length);
    switch (kFlushMethod) {
#if defined(__x86_64__)
      case FlushMethod::clwb: lines_clwb(begin, end); break;
      case FlushMethod::clflushopt: lines_clflushopt(begin, end); break;
      case FlushMethod::clflush: lines_clflush(begin, end); break;
#endif
#if defined(__aarch64__)
      case FlushMethod::arm_dc:
        for (auto* p = begin; p < end; p += kCacheLine) asm volatile("dc cvac, %0" ::"r"(p) : "memory");
        break;
#endif
      default: std::atomic_signal_fence(std::memory_order_seq_cst); break;
    }
  }

  void invalidate(std::uint64_t offset, std::uint64_t length) override {
    auto [begin, end] = line_range(offset, length);
#if defined(__x86_64__)
    if (kHasClflushopt) {
      lines_clflushopt(begin, end);
    } else if (kFlushMethod == FlushMethod::clflush) {
      lines_clflush(begin, end);
    }
    _mm_mfence();  // later loads must not be served before the lines are gone
#elif defined(__aarch64__)
    for (auto* p = begin; p < end; p += kCacheLine) asm volatile("dc civac, %0" ::"r"(p) : "memory");
    asm volatile("dsb sy" ::: "memory");
#else
    (void)begin;
    (void)end;
    std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
  }

  void fence() override {
#if defined(__x86_64__)
    _mm_sfence();
#elif defined(__aarch64__)
    asm volatile("dsb sy" ::: "memory");
#endif
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }

  const std::byte* map_for_read(std::uint64_t offset, std::uint64_t length) override {
    invalidate(offset, length);
    return base_ + offset;
  }

 private:
  std::pair<const std::byte*, const std::byte*> line_range(std::uint64_t offset,
                                                           std::uint64_t length) const {
    const std::uint64_t first = offset / kCacheLine * kCacheLine;
    return {base_ + first, base_ + offset + length};
  }

  std::shared_ptr<MappedRegion> region_;
  std::byte* base_;
};

}  // namespace

std::shared_ptr<RegionAccess> make_direct_region_access(std::shared_ptr<MappedRegion> region) {
  return std::make_shared<DirectRegionAccess>(std::move(region));
}

std::string_view cache_writeback_method() noexcept {
  switch (kFlushMethod) {
    case FlushMethod::clwb: return "clwb";
    case FlushMethod::clflushopt: return "clflushopt";
    case FlushMethod::clflush: return "clflush";
    case FlushMethod::arm_dc: return "dc-cvac";
    case FlushMethod::none: break;
  }
  return "compiler-barrier-only";
}

}  // namespace snaptier
