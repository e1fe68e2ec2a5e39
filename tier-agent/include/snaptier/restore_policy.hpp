// Placements and restore policies (docs/restore-policies.md).
//
// A snapshot's pages are stored once per *placement* (which tier each page goes to, decided
// from the page profile); a *restore policy* picks one stored placement, a restore mechanism
// and which pages to install before the restored tasks resume. Both are small classes that see
// page flags and tier kinds only: the store moves the bytes, the fault engine installs them.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "snaptier/error.hpp"
#include "snaptier/lazy_pages.hpp"
#include "snaptier/store.hpp"
#include "snaptier/tier.hpp"

namespace snaptier::policy {

// ---- Placements ------------------------------------------------------------------------------

class Placement {
 public:
  virtual ~Placement() = default;
  [[nodiscard]] virtual std::string_view name() const noexcept = 0;  // "tiered", "cxl", "rdma", "local"
  // Where the pages the profile did not find hot go (every page, for a single-tier placement),
  // given the tiers this host has up; Errc::unavailable names what is missing.
  [[nodiscard]] virtual Result<TierKind> cold_tier(const std::map<TierKind, TierCaps>& available) const = 0;
  // The tier of every page (zero pages are never stored, whatever this says); its default_tier
  // is cold_tier(available). `available` are the tiers this host has up; Errc::unavailable
  // names a missing one.
  [[nodiscard]] virtual Result<PlacementRequest> place(std::span<const PageEntry> pages,
                                                       const std::map<TierKind, TierCaps>& available) const = 0;
};

// "cxl" / "rdma": every page on that tier. "tiered": profiled-hot pages on CXL (byte-addressable,
// shared by the hosts of one device); cold pages in the RDMA pool (cluster-wide, slower) when it
// is up, else in the file tier (local disk: a host without a memory node keeps them there, and
// the copy is then private to that host: the file tier is not shared).
[[nodiscard]] std::vector<std::unique_ptr<Placement>> all_placements();
[[nodiscard]] Result<std::unique_ptr<Placement>> make_placement(std::string_view name);

// Whether this host can read every stored page of a snapshot (a restore reads each page from
// the tier that holds it): Errc::unavailable naming the first tier that holds pages and is not
// in `available`, or saying why its pages are lost (SnapshotInfo::lost).
[[nodiscard]] Result<void> require_readable(const SnapshotInfo& info, const std::map<TierKind, TierCaps>& available);

// The stored id of `base`'s copy under a placement: "tiered" keeps the base id, the others
// append ":<placement>" (':' is never part of a base id).
[[nodiscard]] std::string variant_id(std::string_view base, std::string_view placement);

// ---- Restore policies ------------------------------------------------------------------------

enum class Mechanism : std::uint8_t {
  criu_eager,     // `criu restore` from complete images on local storage
  criu_lazy,      // CRIU's own `criu lazy-pages` daemon over complete local images
  criu_remote,    // CRIU's page server on the snapshot host + `criu lazy-pages --page-server`
  snaptier_lazy,  // `criu restore --lazy-pages --leave-stopped`, the agent serves the uffds
};
[[nodiscard]] std::string_view to_string(Mechanism mechanism) noexcept;

// One lazy page of a task as a policy sees it: the snapshot page's flags and profile order.
struct LazyPage {
  std::uint64_t vaddr = 0;
  std::uint32_t flags = 0;        // PageFlags
  std::uint32_t touch_order = 0;  // 0 = not touched by the profiled invocation
  TierKind tier = TierKind::local;
};

// Which stored pages a policy uses where they lie in the CXL region, mapped privately (the
// kernel copies a page on its first write) instead of copied in (docs/restore-policies.md,
// "In place"). `required`: a host whose CXL tier cannot map privately refuses the policy;
// otherwise such a host copies those pages as the policy would without mapping.
// all_unwritten: every stored page but those the profile saw written (cxlfork copies those).
enum class InPlacePages : std::uint8_t { none, read_only_hot, all_stored, all_unwritten };
struct InPlace {
  InPlacePages pages = InPlacePages::none;
  bool required = false;
};
[[nodiscard]] std::string_view to_string(InPlacePages pages) noexcept;

class RestorePolicy {
 public:
  virtual ~RestorePolicy() = default;
  [[nodiscard]] virtual std::string_view name() const noexcept = 0;
  [[nodiscard]] virtual Mechanism mechanism() const noexcept = 0;
  // Which stored placement the restore reads ("cxl" for the CRIU baselines too: they copy
  // complete images out of it before the timed restore starts).
  [[nodiscard]] virtual std::string_view placement() const noexcept = 0;
  // snaptier_lazy only: what to install before resume and in the background (snapshot
  // addresses of `pages`, in the order to install them). Default: everything on demand.
  [[nodiscard]] virtual lazy::TaskPrefetch plan(std::span<const LazyPage> pages) const;
  // snaptier_lazy only. Mapped pages are never lazy pages, so plan() does not see them.
  [[nodiscard]] virtual InPlace in_place() const noexcept { return {}; }
};

// criu-eager, criu-lazy, criu-remote, lazy-cxl, lazy-rdma, reap, aquifer, trenv, cxlfork, tiered.
[[nodiscard]] std::vector<std::string> policy_names();

// What `tierctl policies` lists (the agent's status "policies").
struct PolicyInfo {
  std::string name;
  std::string mechanism;           // to_string(Mechanism)
  std::string placement;           // the stored copy it reads
  std::vector<std::vector<std::string>> tiers;  // the restore host needs one tier of each inner list
  InPlace in_place;
  std::string description;         // one line
};
[[nodiscard]] std::vector<PolicyInfo> describe_policies();
[[nodiscard]] Result<std::unique_ptr<RestorePolicy>> make_policy(std::string_view name);

// A page the profiled invocation read and never wrote: what `tiered` maps in place.
[[nodiscard]] inline bool read_only_hot(const PageEntry& page) noexcept {
  return (page.flags & page_hot) != 0 && (page.flags & page_read_only) != 0 &&
         (page.flags & (page_written | page_zero)) == 0;
}

// The tiered placement also stores in CXL the cold pages of a gap of at most this many between
// two read-only hot pages adjacent in address, and the in-place step maps them with the two
// (one mapping instead of three). A gap page costs 4 KiB of CXL; a mapping ~10 us of restore.
inline constexpr std::size_t kInPlaceGapPages = 8;
// Marks those gap pages of `pages` (sorted by task and address, as a Snapshot holds them).
[[nodiscard]] std::vector<bool> small_in_place_gaps(std::span<const PageEntry> pages);

// Not a policy a user picks: the reference restore of a result's limit (bare_restore_ms). The
// agent's lazy-pages server over `placement`'s copy, nothing installed before resume, nothing
// mapped in place: CRIU's rebuild of the process with no page data to move but what CRIU
// restores itself.
[[nodiscard]] std::unique_ptr<RestorePolicy> make_bare_policy(std::string_view placement);

}  // namespace snaptier::policy
