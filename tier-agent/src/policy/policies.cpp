// The placements and restore policies of docs/restore-policies.md.
#include <algorithm>
#include <set>

#include "snaptier/restore_policy.hpp"

namespace snaptier::policy {

namespace {

Result<void> require(const std::map<TierKind, TierCaps>& available, TierKind kind, std::string_view placement) {
  if (available.contains(kind)) return {};
  return fail(Errc::unavailable, "placement " + std::string(placement) + " needs the " +
                                     std::string(to_string(kind)) + " tier, which is not up on this host");
}

class SingleTierPlacement final : public Placement {
 public:
  explicit SingleTierPlacement(TierKind kind) : kind_(kind) {}
  std::string_view name() const noexcept override { return to_string(kind_); }
  Result<TierKind> cold_tier(const std::map<TierKind, TierCaps>& available) const override {
    if (auto ok = require(available, kind_, name()); !ok) return tl::unexpected(ok.error());
    return kind_;
  }
  Result<PlacementRequest> place(std::span<const PageEntry>, const std::map<TierKind, TierCaps>& available) const override {
    auto cold = cold_tier(available);
    if (!cold) return tl::unexpected(cold.error());
    PlacementRequest request;
    request.default_tier = *cold;
    return request;
  }

 private:
  TierKind kind_;
};

// Hot pages where they can be installed fastest and shared (CXL); the cold rest in the pool,
// or on local disk where there is no pool.
class TieredPlacement final : public Placement {
 public:
  std::string_view name() const noexcept override { return "tiered"; }
  Result<TierKind> cold_tier(const std::map<TierKind, TierCaps>& available) const override {
    for (TierKind kind : {TierKind::rdma, TierKind::file}) {
      if (available.contains(kind)) return kind;
    }
    return fail(Errc::unavailable, "placement tiered needs the rdma or the file tier for its cold pages; "
                                   "neither is up on this host");
  }
  Result<PlacementRequest> place(std::span<const PageEntry> pages, const std::map<TierKind, TierCaps>& available) const override {
    if (auto ok = require(available, TierKind::cxl, name()); !ok) return tl::unexpected(ok.error());
    auto cold = cold_tier(available);
    if (!cold) return tl::unexpected(cold.error());
    PlacementRequest request;
    request.default_tier = *cold;
    request.per_page.resize(pages.size());
    const std::vector<bool> gaps = small_in_place_gaps(pages);
    for (std::size_t i = 0; i < pages.size(); ++i) {
      if ((pages[i].flags & page_hot) != 0 || gaps[i]) request.per_page[i] = TierKind::cxl;
    }
    return request;
  }
};

// A policy that maps its pages in place has nothing to map for a zero page (none is stored):
// the ones the profile saw touched (fresh pages among them) become the kernel's zero page before
// resume, one UFFDIO_ZEROPAGE per run, instead of a fault each while the function runs.
void add_touched_zero_pages(std::span<const LazyPage> pages, std::vector<std::uint64_t>& before_resume) {
  const std::set<std::uint64_t> planned(before_resume.begin(), before_resume.end());
  std::vector<std::uint64_t> zero;
  for (const auto& p : pages) {
    constexpr std::uint32_t kTouchedZero = page_hot | page_zero;
    if ((p.flags & kTouchedZero) == kTouchedZero && !planned.contains(p.vaddr)) zero.push_back(p.vaddr);
  }
  std::sort(zero.begin(), zero.end());
  before_resume.insert(before_resume.end(), zero.begin(), zero.end());
}

// The addresses of the pages `wanted` picks, in first-touch order (REAP's order; the engine
// coalesces runs).
template <typename Pick>
std::vector<std::uint64_t> in_touch_order(std::span<const LazyPage> pages, Pick wanted) {
  std::vector<const LazyPage*> picked;
  for (const auto& p : pages) {
    if (wanted(p)) picked.push_back(&p);
  }
  std::stable_sort(picked.begin(), picked.end(),
                   [](const LazyPage* a, const LazyPage* b) { return a->touch_order < b->touch_order; });
  std::vector<std::uint64_t> out;
  out.reserve(picked.size());
  for (const LazyPage* p : picked) out.push_back(p->vaddr);
  return out;
}

class Policy final : public RestorePolicy {
 public:
  // hot: the recorded working set; written: only the pages the profile saw written;
  // hot_then_cold: the working set, then the cold rest in the background after resume;
  // zero_then_hot: every zero page before resume, the non-zero working set in the background.
  enum class Prefetch { none, hot, written, hot_then_cold, zero_then_hot };
  Policy(std::string name, Mechanism mechanism, std::string placement, Prefetch prefetch, InPlace in_place = {})
      : name_(std::move(name)), mechanism_(mechanism), placement_(std::move(placement)), prefetch_(prefetch),
        in_place_(in_place) {}
  InPlace in_place() const noexcept override { return in_place_; }
  std::string_view name() const noexcept override { return name_; }
  Mechanism mechanism() const noexcept override { return mechanism_; }
  std::string_view placement() const noexcept override { return placement_; }
  lazy::TaskPrefetch plan(std::span<const LazyPage> pages) const override {
    lazy::TaskPrefetch out;
    switch (prefetch_) {
      case Prefetch::none:
        break;
      case Prefetch::hot:
        out.before_resume = in_touch_order(pages, [](const LazyPage& p) { return (p.flags & page_hot) != 0; });
        break;
      case Prefetch::written:
        out.before_resume = in_touch_order(pages, [](const LazyPage& p) { return (p.flags & page_written) != 0; });
        break;
      case Prefetch::hot_then_cold:
        out.before_resume = in_touch_order(pages, [](const LazyPage& p) { return (p.flags & page_hot) != 0; });
        for (const auto& p : pages) {
          if ((p.flags & (page_hot | page_zero)) == 0) out.background.push_back(p.vaddr);
        }
        std::sort(out.background.begin(), out.background.end());  // long runs: one read, one UFFDIO_COPY each
        break;
      case Prefetch::zero_then_hot:
        // Zero pages become the kernel's zero page (UFFDIO_ZEROPAGE, one call per run): a read
        // or a write of one never reaches the server. Fresh pages the profile saw are among them.
        for (const auto& p : pages) {
          if ((p.flags & page_zero) != 0) out.before_resume.push_back(p.vaddr);
        }
        std::sort(out.before_resume.begin(), out.before_resume.end());
        out.background = in_touch_order(pages, [](const LazyPage& p) {
          return (p.flags & page_hot) != 0 && (p.flags & page_zero) == 0;
        });
        break;
    }
    if (in_place_.pages != InPlacePages::none) add_touched_zero_pages(pages, out.before_resume);
    return out;
  }

 private:
  std::string name_;
  Mechanism mechanism_;
  std::string placement_;
  Prefetch prefetch_;
  InPlace in_place_;
};

}  // namespace

// Read-only hot pages are mapped in place, one file mapping per run contiguous in the process
// and in CXL, and CRIU creates each mapping (and the anonymous piece between two) one by one:
// scattered hot pages (lookup_table: 8,846 in 6,512 runs, 13,163 VMAs, ~130 ms of restore
// natively) cost more in mappings than the cold pages between them cost in CXL.
std::vector<bool> small_in_place_gaps(std::span<const PageEntry> pages) {
  auto fillable = [&](std::size_t i) { return (pages[i].flags & (page_hot | page_written | page_zero)) == 0; };
  auto next_to = [&](std::size_t a) { return pages[a + 1].vaddr == pages[a].vaddr + kPageSize; };
  std::vector<bool> out(pages.size(), false);
  for (std::size_t i = 0; i + 1 < pages.size(); ++i) {
    if (!read_only_hot(pages[i]) || !next_to(i) || !fillable(i + 1)) continue;
    std::size_t end = i + 1;  // the gap is [i + 1, end)
    while (end < pages.size() && fillable(end) && end - (i + 1) <= kInPlaceGapPages && next_to(end - 1)) ++end;
    const std::size_t length = end - (i + 1);
    if (length > kInPlaceGapPages || end >= pages.size() || !next_to(end - 1) || !read_only_hot(pages[end])) continue;
    for (std::size_t k = i + 1; k < end; ++k) out[k] = true;
    i = end - 1;
  }
  return out;
}

std::vector<std::unique_ptr<Placement>> all_placements() {
  std::vector<std::unique_ptr<Placement>> out;
  out.push_back(std::make_unique<TieredPlacement>());
  out.push_back(std::make_unique<SingleTierPlacement>(TierKind::cxl));
  out.push_back(std::make_unique<SingleTierPlacement>(TierKind::rdma));
  out.push_back(std::make_unique<SingleTierPlacement>(TierKind::local));
  return out;
}

Result<std::unique_ptr<Placement>> make_placement(std::string_view name) {
  std::string known;
  for (auto& p : all_placements()) {
    if (p->name() == name) return std::move(p);
    known += (known.empty() ? "" : ", ") + std::string(p->name());
  }
  return fail(Errc::invalid_argument, "unknown placement '" + std::string(name) + "' (" + known + ")");
}

Result<void> require_readable(const SnapshotInfo& info, const std::map<TierKind, TierCaps>& available) {
  if (info.lost) return fail(Errc::unavailable, "'" + info.id + "': " + *info.lost);
  for (const auto& [tier, bytes] : info.bytes_per_tier) {
    if (bytes == 0 || available.contains(tier)) continue;
    return fail(Errc::unavailable, "'" + info.id + "' keeps pages on the " + std::string(to_string(tier)) +
                                       " tier, which is not up on this host");
  }
  return {};
}

std::string variant_id(std::string_view base, std::string_view placement) {
  if (placement == "tiered") return std::string(base);
  return std::string(base) + ":" + std::string(placement);
}

std::string_view to_string(Mechanism mechanism) noexcept {
  switch (mechanism) {
    case Mechanism::criu_eager: return "criu-eager";
    case Mechanism::criu_lazy: return "criu-lazy";
    case Mechanism::criu_remote: return "criu-remote";
    case Mechanism::snaptier_lazy: return "snaptier-lazy";
  }
  return "unknown";
}

lazy::TaskPrefetch RestorePolicy::plan(std::span<const LazyPage>) const { return {}; }

std::string_view to_string(InPlacePages pages) noexcept {
  switch (pages) {
    case InPlacePages::none: return "no pages";
    case InPlacePages::read_only_hot: return "read-only hot pages";
    case InPlacePages::all_stored: return "every stored page";
    case InPlacePages::all_unwritten: return "every stored page the profile did not see written";
  }
  return "unknown";
}

namespace {

// Every restore policy, once: `tierctl policies`, the schema's PolicyName (a test compares
// them) and `tb matrix` all come from here.
struct PolicyEntry {
  const char* name;
  Mechanism mechanism;
  const char* placement;
  Policy::Prefetch prefetch;
  InPlace in_place;
  const char* description;
};

const std::vector<PolicyEntry>& policy_table() {
  using P = Policy::Prefetch;
  static const std::vector<PolicyEntry> table{
      {"criu-eager", Mechanism::criu_eager, "cxl", P::none, {},
       "criu restore from complete images on local storage (every page copied before resume)"},
      {"criu-lazy", Mechanism::criu_lazy, "cxl", P::none, {}, "CRIU's own lazy-pages daemon over complete local images"},
      {"criu-remote", Mechanism::criu_remote, "cxl", P::none, {},
       "CRIU's page server on the snapshot host, pages fetched over the network on demand"},
      {"lazy-cxl", Mechanism::snaptier_lazy, "cxl", P::none, {}, "every page on demand from the CXL copy"},
      {"lazy-rdma", Mechanism::snaptier_lazy, "rdma", P::none, {}, "every page on demand from the RDMA pool"},
      // The local placement: what the copy policies reach when their source is this host's DRAM.
      {"lazy-local", Mechanism::snaptier_lazy, "local", P::none, {},
       "every page on demand from the snapshot host's local DRAM tier (the copy policies' source at memory speed; "
       "restores on the snapshot host only)"},
      // REAP: the recorded working set installed in one go before resume, from one tier.
      {"reap", Mechanism::snaptier_lazy, "cxl", P::hot, {},
       "REAP: the profiled working set copied in before resume, the rest on demand (CXL copy)"},
      {"reap-local", Mechanism::snaptier_lazy, "local", P::hot, {},
       "REAP from the snapshot host's local DRAM tier: the working set copied in before resume at memory speed, the "
       "rest on demand (restores on the snapshot host only)"},
      {"aquifer", Mechanism::snaptier_lazy, "tiered", P::hot_then_cold, {},
       "Aquifer: hot pages copied from CXL before resume, cold ones from RDMA (or file) in the background after "
       "resume and on demand"},
      // FaaSnap: zero regions to the kernel, the loading set concurrently with the invocation.
      {"faasnap", Mechanism::snaptier_lazy, "cxl", P::zero_then_hot, {},
       "FaaSnap: zero pages handed to the kernel before resume (no server round trip), the profiled non-zero "
       "working set fetched from CXL in the background while the function runs, the rest on demand"},
      {"trenv", Mechanism::snaptier_lazy, "cxl", P::none, InPlace{InPlacePages::all_stored, true},
       "TrEnv: every stored page mapped in place from CXL, a write copies"},
      // CXLfork's migrate-on-write with its dirty-page prefetch: the written pages are left
      // lazy, and the plan installs exactly them.
      {"cxlfork", Mechanism::snaptier_lazy, "cxl", P::written, InPlace{InPlacePages::all_unwritten, true},
       "CXLfork: every stored page mapped in place from CXL except the ones the profile saw written, which are "
       "copied into local DRAM before resume"},
      // Where the CXL tier cannot map privately it copies, as aquifer does.
      {"tiered", Mechanism::snaptier_lazy, "tiered", P::hot, InPlace{InPlacePages::read_only_hot, false},
       "read-only hot pages mapped in place from CXL, written hot pages copied before resume, cold pages on demand "
       "from RDMA (or file), zero pages nowhere"},
  };
  return table;
}

// The tiers a restore host needs for a placement: one of each inner list.
std::vector<std::vector<std::string>> tiers_of(std::string_view placement) {
  if (placement == "tiered") return {{"cxl"}, {"rdma", "file"}};
  return {{std::string(placement)}};
}

}  // namespace

std::vector<std::string> policy_names() {
  std::vector<std::string> out;
  for (const auto& e : policy_table()) out.emplace_back(e.name);
  return out;
}

std::vector<PolicyInfo> describe_policies() {
  std::vector<PolicyInfo> out;
  for (const auto& e : policy_table()) {
    // criu-remote reads its pages on the snapshot host: the restoring host needs none of its tiers.
    out.push_back(PolicyInfo{e.name, std::string(to_string(e.mechanism)), e.placement,
                             e.mechanism == Mechanism::criu_remote ? std::vector<std::vector<std::string>>{}
                                                                   : tiers_of(e.placement),
                             e.in_place, e.description});
  }
  return out;
}

Result<std::unique_ptr<RestorePolicy>> make_policy(std::string_view name) {
  for (const auto& e : policy_table()) {
    if (name == e.name) return std::make_unique<Policy>(e.name, e.mechanism, e.placement, e.prefetch, e.in_place);
  }
  std::string known;
  for (const auto& n : policy_names()) known += (known.empty() ? "" : ", ") + n;
  return fail(Errc::invalid_argument, "unknown restore policy '" + std::string(name) + "' (known: " + known + ")");
}

std::unique_ptr<RestorePolicy> make_bare_policy(std::string_view placement) {
  return std::make_unique<Policy>("bare", Mechanism::snaptier_lazy, std::string(placement), Policy::Prefetch::none);
}

}  // namespace snaptier::policy
