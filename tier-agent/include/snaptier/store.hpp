// The snapshot store: a snapshot is an id, opaque metadata blobs, a page table, and page data
// in extents on any tiers. Policies read pages through it; they never see a transport.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "snaptier/error.hpp"
#include "snaptier/tier.hpp"

namespace snaptier {

inline constexpr std::uint64_t kPageSize = 4096;

// Per-page flags, filled by ingest (zero) and by profiling (the rest).
enum PageFlags : std::uint32_t {
  page_zero = 1u << 0,     // all zero bytes: never stored in any tier
  page_hot = 1u << 1,      // touched by the profiled invocation
  page_written = 1u << 2,  // first touched by a write fault, or written later
  page_read_only = 1u << 3,
  page_checksummed = 1u << 4,  // PageEntry::crc32c holds the CRC32C of the stored bytes
};

struct PageEntry {
  std::uint64_t vaddr = 0;           // page address in the snapshotted process (or blob offset)
  TierKind tier = TierKind::local;   // meaningless for zero pages
  std::uint64_t location = 0;        // byte offset of the page inside the tier (extent-relative
                                     // offsets are resolved at put time)
  std::uint32_t flags = 0;
  std::uint32_t touch_order = 0;     // 0 = never touched; else 1-based first-touch order
  std::uint32_t crc32c = 0;          // valid if flags has page_checksummed (set by put)
};

struct SnapshotInfo {
  std::string id;
  std::string owner_host;
  std::uint64_t created_unix_ns = 0;
  std::uint64_t page_count = 0;
  std::uint64_t zero_pages = 0;
  std::map<TierKind, std::uint64_t> bytes_per_tier;
  bool published = false;  // visible to other hosts through the shared CXL directory
};

struct Snapshot {
  SnapshotInfo info;
  std::map<std::string, std::vector<std::byte>> blobs;  // opaque metadata (CRIU images, profile)
  std::vector<PageEntry> pages;
};

// What put() should do with page data: which tier each non-zero page goes to.
struct PlacementRequest {
  TierKind default_tier = TierKind::local;
  std::vector<std::optional<TierKind>> per_page;  // empty, or one per page overriding default
};

class SnapshotStore {
 public:
  virtual ~SnapshotStore() = default;

  // Stores page data (one kPageSize page per PageEntry, `data` is pages.size()*kPageSize bytes;
  // zero pages are detected and not stored) and metadata. Fills tier/location in the result.
  [[nodiscard]] virtual Result<SnapshotInfo> put(Snapshot snapshot, std::span<const std::byte> data,
                                                 const PlacementRequest& placement) = 0;
  [[nodiscard]] virtual Result<Snapshot> get(const std::string& id) = 0;
  [[nodiscard]] virtual Result<std::vector<SnapshotInfo>> list() = 0;
  [[nodiscard]] virtual Result<void> remove(const std::string& id) = 0;

  // Reads one page of a stored snapshot into `out` (kPageSize bytes). Zero pages read as zeros.
  [[nodiscard]] virtual Result<void> read_page(const Snapshot& snapshot, const PageEntry& page,
                                               std::span<std::byte> out) = 0;
  // For byte-addressable tiers: the page's bytes in place (no copy), else nullptr.
  [[nodiscard]] virtual const std::byte* map_page(const PageEntry& page) = 0;
};

}  // namespace snaptier
