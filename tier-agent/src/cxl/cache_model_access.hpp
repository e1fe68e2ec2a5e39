// A RegionAccess for tests that models one host's private, non-coherent cache in front of the
// shared bytes: loads are served from this host's copy of a line once it has been fetched, and
// only invalidate() makes the next load fetch again; stores stay in the copy until writeback()
// (or an invalidate of a dirty line, as clflushopt does). Write-backs copy whole 64-byte lines,
// so two hosts writing one line clobber each other here exactly as on hardware. A miss also
// pulls in the other lines of its 4 KiB page, as hardware prefetchers do, so stale copies of
// lines this host never asked for exist too.
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "core/unique_fd.hpp"
#include "snaptier/cxl_directory.hpp"

namespace snaptier {

class CacheModelAccess final : public RegionAccess {
 public:
  explicit CacheModelAccess(std::shared_ptr<MappedRegion> shared, bool prefetch_page = true);

  std::uint64_t size() const noexcept override { return size_; }
  void load(std::uint64_t offset, std::span<std::byte> out) override;
  void store(std::uint64_t offset, std::span<const std::byte> in) override;
  std::uint64_t load_u64(std::uint64_t offset) override;
  void store_u64(std::uint64_t offset, std::uint64_t value) override;
  void writeback(std::uint64_t offset, std::uint64_t length) override;
  void invalidate(std::uint64_t offset, std::uint64_t length) override;
  void fence() override;
  const std::byte* map_for_read(std::uint64_t offset, std::uint64_t length) override;

  // Lines written but not yet written back (what a crash of this host would lose).
  [[nodiscard]] std::uint64_t dirty_lines() const;

 private:
  void fetch_line(std::uint64_t line);
  void miss(std::uint64_t line);
  void writeback_line(std::uint64_t line);

  std::shared_ptr<MappedRegion> shared_region_;
  std::byte* shared_;
  std::uint64_t size_;
  bool prefetch_page_;
  mutable std::mutex mutex_;
  detail::UniqueMapping copy_;  // lazily zero-filled pages: a model costs what it touches
  std::vector<std::uint8_t> present_;
  std::vector<std::uint8_t> dirty_;
};

}  // namespace snaptier
