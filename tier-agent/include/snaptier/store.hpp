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
  // Tier::epoch() of each tier the pages went to, for tiers that track one (rdma).
  std::map<TierKind, std::uint64_t> tier_epochs;
  // Set by get() and list() when a tier's epoch moved on since put(): the pages there are gone,
  // e.g. "its RDMA pages were lost: pool epoch 12, now 34". Such a snapshot cannot be restored;
  // read_pages refuses its pages on that tier and remove() gives nothing back to it.
  std::optional<std::string> lost;
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

// Verified bytes of consecutive pages of one snapshot, from SnapshotStore::read_pages.
struct PageRun {
  const std::byte* data = nullptr;  // pages * kPageSize bytes
  std::size_t pages = 0;            // >= 1
  TierKind tier = TierKind::local;  // meaningless for a zero page
  // data points into the tier's mapping (valid while the snapshot exists), not into scratch.
  bool in_place = false;
  bool zero = false;  // one all-zero page (never stored), data points at shared zeros
};

// Pages SnapshotStore::read_pages handed out from one tier: what each tier served, and how many
// of those pages cost no tier read because the page cache had them.
struct StoreTierTraffic {
  std::uint64_t pages = 0;         // pages served (in place, copied, or from the page cache)
  std::uint64_t bytes = 0;
  std::uint64_t tier_reads = 0;    // Tier::read calls made for them (one per run of adjacent pages)
  std::uint64_t tier_bytes = 0;    // bytes those calls moved
  std::uint64_t cached_pages = 0;  // pages served without a tier read (page-cache hits and joins)
};

// The store's cache of verified pages from tiers that are not byte-addressable (rdma, file).
struct PageCacheStats {
  std::uint64_t capacity_bytes = 0;  // 0: the cache is off
  std::uint64_t used_bytes = 0;
  std::uint64_t hits = 0;         // pages served from a cached copy
  std::uint64_t joined = 0;       // pages served by waiting for another caller's read in flight
  std::uint64_t filled = 0;       // pages read from their tier, verified and cached
  std::uint64_t rejected = 0;     // pages read for the cache that failed their check: not cached
  std::uint64_t evicted = 0;
  std::uint64_t invalidated = 0;  // pages dropped because their copy was removed or replaced
};

struct StoreStats {
  std::map<TierKind, StoreTierTraffic> served;  // tiers that served at least one page
  std::uint64_t zero_pages = 0;                 // zero pages served (they live in no tier)
  PageCacheStats page_cache;
};

// Every member may be called from any number of threads at once. put() and remove() of one id
// are serialised against each other; everything else runs concurrently. A Snapshot returned by
// get() stays readable through read_pages until that id is removed (by this host or its owner).
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

  // The one way page bytes leave the store for a process or a file (demand faults, prefetch,
  // background fetch, materialize, snapshot.read): pages first, first + 1, ... of
  // snapshot.pages, at most max_pages, as long as they are stored on the tier of page `first`
  // and, on a byte-addressable tier, adjacent in its mapping. Each page's CRC32C is checked
  // where the caller will read it from: in the tier's mapping (no copy) or in `scratch` after
  // the copy, right before the run is returned. A mismatch is Errc::corrupt naming the
  // snapshot, the page (index and vaddr) and the tier. A page that fails after the first ends
  // the run before it (the next call, starting there, reports it). A zero page is a run of its
  // own: one page of zeros. `scratch` holds the copied pages (the run is cut to its size).
  // Pages of tiers that are not byte-addressable may come from the store's page cache: bytes
  // that passed the same check when they were read, for the same tier, location and CRC32C;
  // concurrent callers asking for one page wait for a single tier read of it.
  [[nodiscard]] virtual Result<PageRun> read_pages(const Snapshot& snapshot, std::size_t first,
                                                   std::size_t max_pages,
                                                   std::span<std::byte> scratch) = 0;

  // Counters since the store was made; cheap (no lock).
  [[nodiscard]] virtual StoreStats stats() const { return {}; }
};

}  // namespace snaptier
