// CXL tier: page data in the shared region, allocated from this host's arena through the
// directory. Writes are written back at once (they become visible to other hosts only through a
// later publish, whose fence orders them before the commit word); reads invalidate first.
#include <atomic>

#include "snaptier/cxl_directory.hpp"
#include "snaptier/tiers.hpp"
#include "tiers/posix_util.hpp"

namespace snaptier {
namespace {

class CxlTier final : public Tier {
 public:
  explicit CxlTier(std::shared_ptr<CxlDirectory> directory)
      : directory_(std::move(directory)),
        region_(directory_->region()),
        arena_begin_(directory_->layout().arena_offset),
        arena_limit_(directory_->layout().arena_size * directory_->layout().host_count) {}

  std::string_view name() const noexcept override { return "cxl"; }
  TierKind kind() const noexcept override { return TierKind::cxl; }
  TierCaps caps() const noexcept override {
    return TierCaps{.byte_addressable = true, .shared = true, .remote = false, .persistent = true};
  }

  Result<Extent> allocate(std::uint64_t length) override { return directory_->allocate(length); }
  Result<void> release(Extent extent) override { return directory_->release(extent); }

  // Any host's arena may be read (that is the point of sharing); only data areas, never the
  // superblock, slots or logs.
  Result<void> read(Extent extent, std::uint64_t offset, std::span<std::byte> out) override {
    if (auto ok = detail::check_access("cxl", extent, offset, out.size(), arena_begin_, arena_limit_); !ok) {
      return ok;
    }
    region_.invalidate(extent.offset + offset, out.size());
    region_.load(extent.offset + offset, out);
    reads_.fetch_add(1, std::memory_order_relaxed);
    bytes_read_.fetch_add(out.size(), std::memory_order_relaxed);
    return {};
  }

  Result<void> write(Extent extent, std::uint64_t offset, std::span<const std::byte> in) override {
    const auto& layout = directory_->layout();
    const std::uint64_t own_begin = layout.arena_begin(directory_->host_index());
    // Rule 1 and 6: a host writes only inside its own arena.
    if (auto ok = detail::check_access("cxl", extent, offset, in.size(), own_begin, layout.arena_size); !ok) {
      return ok;
    }
    region_.store(extent.offset + offset, in);
    region_.writeback(extent.offset + offset, in.size());
    region_.fence();
    writes_.fetch_add(1, std::memory_order_relaxed);
    bytes_written_.fetch_add(in.size(), std::memory_order_relaxed);
    return {};
  }

  const std::byte* map(Extent extent) const noexcept override {
    if (!detail::check_access("cxl", extent, 0, 0, arena_begin_, arena_limit_)) return nullptr;
    return region_.map_for_read(extent.offset, extent.length);
  }

  TierStats stats() const override {
    return TierStats{.capacity_bytes = directory_->layout().arena_size,
                     .used_bytes = directory_->arena_used_bytes(), .reads = reads_.load(),
                     .writes = writes_.load(), .bytes_read = bytes_read_.load(),
                     .bytes_written = bytes_written_.load()};
  }

 private:
  std::shared_ptr<CxlDirectory> directory_;
  RegionAccess& region_;
  std::uint64_t arena_begin_;
  std::uint64_t arena_limit_;
  std::atomic<std::uint64_t> reads_{0}, writes_{0}, bytes_read_{0}, bytes_written_{0};
};

}  // namespace

Result<std::unique_ptr<Tier>> make_cxl_tier(std::shared_ptr<CxlDirectory> directory) {
  if (!directory) return fail(Errc::invalid_argument, "cxl tier: no directory");
  return std::make_unique<CxlTier>(std::move(directory));
}

}  // namespace snaptier
