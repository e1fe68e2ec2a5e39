// SnapshotStore over any set of tiers. Host-private manifests live in <state_dir>/manifests;
// manifests of snapshots whose data is entirely on shared tiers are published in the CXL
// directory, where every attached host finds them and reads the pages in place.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>
#include <optional>
#include <set>
#include <system_error>

#include <fmt/format.h>

#include "cxl/crc32c.hpp"
#include "snaptier/snapshot_store.hpp"
#include "store/huge_layout.hpp"
#include "store/manifest.hpp"
#include "store/page_cache.hpp"
#include "tiers/posix_util.hpp"

namespace snaptier {

bool is_valid_snapshot_id(std::string_view id) noexcept {
  if (id.empty() || id.size() > kCxlMaxIdLength || id.front() == '.') return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == ':' || c == '-';
  });
}

namespace {

namespace fs = std::filesystem;

alignas(4096) constexpr std::array<std::byte, kPageSize> kZeroPage{};

void prefetch_page(const std::byte* page) {
  for (std::uint64_t line = 0; line < kPageSize; line += 64) __builtin_prefetch(page + line);
}

bool is_zero_page(std::span<const std::byte> page) {
  return std::memcmp(page.data(), kZeroPage.data(), kPageSize) == 0;
}

std::uint64_t now_unix_ns() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

Result<void> check_id(const std::string& id) {
  if (!is_valid_snapshot_id(id)) {
    return fail(Errc::invalid_argument, "bad snapshot id '" + id +
                                            "': use 1..63 characters of [A-Za-z0-9._:-], not starting with '.'");
  }
  return {};
}

// Writes a file so that a crash leaves either the old state or the complete new file.
Result<void> write_file_atomically(const fs::path& path, std::span<const std::byte> bytes) {
  const fs::path temporary = path.string() + ".tmp";
  detail::UniqueFd fd(::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd) return fail_errno(Errc::io, "create " + temporary.string(), errno);
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail_errno(Errc::io, "write " + temporary.string(), errno);
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd.get()) != 0) return fail_errno(Errc::io, "fsync " + temporary.string(), errno);
  fd.reset();
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    return fail_errno(Errc::io, "rename " + temporary.string(), errno);
  }
  detail::UniqueFd dir(::open(path.parent_path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir) (void)::fsync(dir.get());
  return {};
}

Result<std::vector<std::byte>> read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return fail(Errc::not_found, "cannot open " + path.string());
  std::vector<char> raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return fail(Errc::io, "read " + path.string());
  std::vector<std::byte> bytes(raw.size());
  if (!raw.empty()) std::memcpy(bytes.data(), raw.data(), raw.size());
  return bytes;
}

class TieredSnapshotStore final : public SnapshotStore {
 public:
  explicit TieredSnapshotStore(StoreOptions options)
      : options_(std::move(options)),
        cache_(options_.verify_page_checksums ? options_.page_cache_bytes : 0) {}

  Result<SnapshotInfo> put(Snapshot snapshot, std::span<const std::byte> data,
                           const PlacementRequest& placement) override {
    const std::string id = snapshot.info.id;
    if (auto ok = check_id(id); !ok) return tl::unexpected(ok.error());
    const IdHold hold = hold_id(id);
    // Pages another host's earlier copy under this id left here are unreachable (their
    // generation differs); dropping them gives their space back now.
    cache_.invalidate(id);
    auto& pages = snapshot.pages;
    if (data.size() != pages.size() * kPageSize) {
      return fail(Errc::invalid_argument, "put '" + id + "': " + std::to_string(pages.size()) +
                                              " pages need " + std::to_string(pages.size() * kPageSize) +
                                              " bytes of data, got " + std::to_string(data.size()));
    }
    if (!placement.per_page.empty() && placement.per_page.size() != pages.size()) {
      return fail(Errc::invalid_argument, "put '" + id + "': per_page placement has " +
                                              std::to_string(placement.per_page.size()) + " entries for " +
                                              std::to_string(pages.size()) + " pages");
    }
    if (auto exists = find(id); exists || exists.error().code != Errc::not_found) {
      if (exists) return fail(Errc::already_exists, "snapshot '" + id + "' already exists");
      return tl::unexpected(exists.error());
    }

    // Classify pages; zero pages are never stored.
    std::map<TierKind, std::vector<std::size_t>> pages_per_tier;
    SnapshotInfo& info = snapshot.info;
    info.owner_host = options_.host_name;
    info.created_unix_ns = now_unix_ns();
    info.page_count = pages.size();
    info.zero_pages = 0;
    info.bytes_per_tier.clear();
    for (std::size_t i = 0; i < pages.size(); ++i) {
      const auto page = data.subspan(i * kPageSize, kPageSize);
      pages[i].flags &= ~(page_zero | page_checksummed);
      if (is_zero_page(page)) {
        pages[i].flags |= page_zero;
        pages[i].tier = TierKind::local;
        pages[i].location = 0;
        pages[i].crc32c = 0;
        ++info.zero_pages;
        continue;
      }
      const TierKind tier = (!placement.per_page.empty() && placement.per_page[i])
                                ? *placement.per_page[i] : placement.default_tier;
      if (!options_.tiers.contains(tier)) {
        return fail(Errc::invalid_argument, "put '" + id + "': page " + std::to_string(i) +
                                                " is placed on tier " + std::string(to_string(tier)) +
                                                ", which this store does not have");
      }
      pages_per_tier[tier].push_back(i);
    }

    // One extent per tier; on any failure give back what was taken (not to storage that was
    // replaced meanwhile: the extent is not ours there).
    std::vector<OwnedExtent> extents;
    info.tier_epochs.clear();
    auto rollback = [&] {
      for (const auto& e : extents) {
        if (!lost_on(info, e.tier)) (void)options_.tiers.at(e.tier)->release(e.extent);
      }
    };
    for (const auto& [tier_kind, indices] : pages_per_tier) {
      Tier& tier = *options_.tiers.at(tier_kind);
      if (const std::uint64_t epoch = tier.epoch(); epoch != 0) info.tier_epochs[tier_kind] = epoch;
      // Pages that processes map in place (a shared, byte-addressable tier) are laid out for
      // huge pages; elsewhere packed.
      const bool mapped_in_place = tier.caps().byte_addressable && tier.caps().shared;
      std::vector<std::uint64_t> addresses;
      if (mapped_in_place) {
        addresses.reserve(indices.size());
        for (const std::size_t i : indices) addresses.push_back(pages[i].vaddr);
      }
      const store::ExtentLayout layout = mapped_in_place ? store::lay_out_for_huge_pages(addresses, kPageSize)
                                                         : store::lay_out_packed(indices.size(), kPageSize);
      // Room to move the layout's origin to a huge-page boundary of the tier.
      const std::uint64_t slack = layout.aligned ? store::kHugePageSize - kPageSize : 0;
      auto extent = tier.allocate(layout.bytes + slack);
      if (!extent) {
        rollback();
        return fail(extent.error().code, "put '" + id + "': " + extent.error().message);
      }
      extents.push_back(OwnedExtent{tier_kind, *extent});
      const std::uint64_t origin =
          layout.aligned ? (store::kHugePageSize - extent->offset % store::kHugePageSize) % store::kHugePageSize : 0;
      // Stage contiguous runs so each tier sees few large writes (matters for file and rdma).
      constexpr std::size_t kStagePages = 256;
      std::vector<std::byte> stage;
      stage.reserve(std::min(indices.size(), kStagePages) * kPageSize);
      std::uint64_t staged_at = 0;  // extent-relative offset of the stage's first byte
      for (std::size_t k = 0; k < indices.size(); ++k) {
        const std::size_t i = indices[k];
        const auto page = data.subspan(i * kPageSize, kPageSize);
        const std::uint64_t at = origin + layout.positions[k];
        if (stage.empty()) staged_at = at;
        stage.insert(stage.end(), page.begin(), page.end());
        pages[i].tier = tier_kind;
        pages[i].location = extent->offset + at;
        pages[i].crc32c = crc32c(page);
        pages[i].flags |= page_checksummed;
        const bool last = k + 1 == indices.size();
        const bool gap = !last && origin + layout.positions[k + 1] != at + kPageSize;
        if (stage.size() == kStagePages * kPageSize || last || gap) {
          if (auto ok = tier.write(*extent, staged_at, stage); !ok) {
            rollback();
            return fail(ok.error().code, "put '" + id + "': write to " + std::string(tier.name()) +
                                             ": " + ok.error().message);
          }
          stage.clear();
        }
      }
      info.bytes_per_tier[tier_kind] = indices.size() * kPageSize;
      if (auto why = lost_on(info, tier_kind)) {
        rollback();
        return fail(Errc::unavailable, "put '" + id + "': " + *why + " while it was written");
      }
    }

    const bool all_shared = std::all_of(pages_per_tier.begin(), pages_per_tier.end(), [&](const auto& kv) {
      return options_.tiers.at(kv.first)->caps().shared;
    });
    auto directory = options_.cxl_directory;
    info.published = all_shared && directory != nullptr;
    std::vector<Extent> arena_extents;
    for (const auto& e : extents) {
      if (e.tier == TierKind::cxl) arena_extents.push_back(e.extent);
    }
    const auto manifest = encode_manifest(Manifest{snapshot, extents});

    if (info.published) {
      auto published = directory->publish(id, manifest, arena_extents, CxlVisibility::published);
      if (!published) {
        rollback();
        return tl::unexpected(published.error());
      }
      return info;
    }
    // Private snapshot: its CXL extents are still recorded in the directory (owner_only) so that
    // a restarted host's arena recovery keeps them.
    if (!arena_extents.empty()) {
      auto recorded = directory->publish(id, {}, arena_extents, CxlVisibility::owner_only);
      if (!recorded) {
        rollback();
        return tl::unexpected(recorded.error());
      }
    }
    if (auto ok = write_file_atomically(manifest_path(id), manifest); !ok) {
      if (!arena_extents.empty()) (void)directory->remove(id);
      for (const auto& e : extents) {
        if (e.tier != TierKind::cxl) (void)options_.tiers.at(e.tier)->release(e.extent);
      }
      return tl::unexpected(ok.error());
    }
    return info;
  }

  Result<Snapshot> get(const std::string& id) override {
    auto manifest = find(id);
    if (!manifest) return tl::unexpected(manifest.error());
    mark_lost(manifest->snapshot.info);
    return std::move(manifest->snapshot);
  }

  Result<std::vector<SnapshotInfo>> list() override {
    std::map<std::string, SnapshotInfo> found;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(manifests_dir(), ec)) {
      if (entry.path().extension() != ".snapman") continue;
      auto bytes = read_file(entry.path());
      if (!bytes) continue;
      // A damaged manifest is reported by get(id); list() shows what is readable.
      if (auto m = decode_manifest(*bytes)) found.emplace(m->snapshot.info.id, m->snapshot.info);
    }
    if (ec) return fail(Errc::io, "list " + manifests_dir().string() + ": " + ec.message());
    if (options_.cxl_directory) {
      auto entries = options_.cxl_directory->list();
      if (!entries) return tl::unexpected(entries.error());
      for (const auto& entry : *entries) {
        if (entry.visibility != CxlVisibility::published) continue;
        auto record = options_.cxl_directory->lookup(entry.id);
        if (!record) continue;
        if (auto m = decode_manifest(record->manifest)) found.emplace(entry.id, m->snapshot.info);
      }
    }
    std::vector<SnapshotInfo> out;
    for (auto& [id, info] : found) {
      mark_lost(info);
      out.push_back(std::move(info));
    }
    return out;
  }

  // Unpublishes first (manifest file or directory tombstone), then gives the extents back: a
  // get() that races with remove() finds either the whole snapshot or nothing, never a manifest
  // whose extents were already handed to another put().
  Result<void> remove(const std::string& id) override {
    if (auto ok = check_id(id); !ok) return ok;
    const IdHold hold = hold_id(id);
    auto removed = remove_held(id);
    if (removed) cache_.invalidate(id);
    return removed;
  }

  Result<PageRun> read_pages(const Snapshot& snapshot, std::size_t first, std::size_t max_pages,
                             std::span<std::byte> scratch) override {
    const auto& pages = snapshot.pages;
    if (first >= pages.size() || max_pages == 0) {
      return fail(Errc::invalid_argument, "read_pages: snapshot '" + snapshot.info.id + "' has " +
                                              std::to_string(pages.size()) + " pages; asked for " +
                                              std::to_string(max_pages) + " from page " + std::to_string(first));
    }
    const PageEntry& head = pages[first];
    if (head.flags & page_zero) {
      zero_served_.fetch_add(1, std::memory_order_relaxed);
      return PageRun{.data = kZeroPage.data(), .pages = 1, .tier = head.tier, .in_place = true, .zero = true};
    }
    auto found = options_.tiers.find(head.tier);
    if (found == options_.tiers.end()) {
      return fail(Errc::unsupported, describe(snapshot, first) + ", which this store does not have");
    }
    Tier& tier = *found->second;
    if (auto why = lost_on(snapshot.info, head.tier)) {
      return fail(Errc::unavailable, "snapshot '" + snapshot.info.id + "': " + *why);
    }
    const std::size_t limit = std::min(max_pages, pages.size() - first);
    auto same_tier = [&](std::size_t i) { return (pages[i].flags & page_zero) == 0 && pages[i].tier == head.tier; };
    PageRun run{.tier = head.tier};

    if (const std::byte* mapped = tier.map(Extent{head.location, kPageSize})) {
      std::size_t n = 1;
      while (n < limit && same_tier(first + n) &&
             tier.map(Extent{pages[first + n].location, kPageSize}) == mapped + n * kPageSize) {
        ++n;
      }
      run.data = mapped;
      run.in_place = true;
      // Checked in the mapping the caller copies from: no extra copy of the bytes. The check is
      // the first to touch each page, and hardware prefetchers stop at page boundaries: asking
      // for the next page while checking this one makes the check ~1.5x faster on cold pages.
      for (run.pages = 0; run.pages < n; ++run.pages) {
        if (run.pages + 1 < n) prefetch_page(mapped + (run.pages + 1) * kPageSize);
        if (auto ok = verify(snapshot, first + run.pages, mapped + run.pages * kPageSize); !ok) {
          if (run.pages > 0) break;
          return tl::unexpected(ok.error());
        }
      }
      return served(run);
    }

    const std::size_t fit = std::min(limit, scratch.size() / kPageSize);
    if (fit == 0) {
      return fail(Errc::invalid_argument, "read_pages: " + describe(snapshot, first) +
                                              " is copied, and the buffer holds less than a page");
    }
    run.data = scratch.data();
    if (cache_.capacity_bytes() > 0) return served(read_through_cache(snapshot, first, fit, scratch, tier));
    while (run.pages < fit && same_tier(first + run.pages)) {
      // Pages adjacent in the tier are read with one call (one pread, one RDMA read).
      const std::size_t at = first + run.pages;
      std::size_t group = 1;
      while (run.pages + group < fit && same_tier(at + group) &&
             pages[at + group].location == pages[at].location + group * kPageSize) {
        ++group;
      }
      auto slot = scratch.subspan(run.pages * kPageSize, group * kPageSize);
      Result<void> ok = read_tier(tier, head.tier, pages[at].location, slot);
      if (!ok) {
        if (run.pages > 0) break;  // serve what was read; the next call reports the error
        return fail(ok.error().code, describe(snapshot, at) + ": " + ok.error().message);
      }
      for (std::size_t k = 0; k < group; ++k, ++run.pages) {
        if (ok = verify(snapshot, at + k, slot.data() + k * kPageSize); !ok) {
          if (run.pages > 0) return served(run);
          return tl::unexpected(ok.error());
        }
      }
    }
    return served(run);
  }

  StoreStats stats() const override {
    StoreStats out;
    for (TierKind kind : {TierKind::local, TierKind::file, TierKind::cxl, TierKind::rdma}) {
      const Traffic& t = traffic(kind);
      StoreTierTraffic row{.pages = t.pages.load(std::memory_order_relaxed),
                           .bytes = t.pages.load(std::memory_order_relaxed) * kPageSize,
                           .tier_reads = t.tier_reads.load(std::memory_order_relaxed),
                           .tier_bytes = t.tier_bytes.load(std::memory_order_relaxed),
                           .cached_pages = t.cached_pages.load(std::memory_order_relaxed)};
      if (row.pages > 0 || row.tier_reads > 0) out.served.emplace(kind, row);
    }
    out.zero_pages = zero_served_.load(std::memory_order_relaxed);
    out.page_cache = cache_.stats();
    return out;
  }

  Result<void> prepare() {
    std::error_code ec;
    fs::create_directories(manifests_dir(), ec);
    if (ec) return fail(Errc::io, "create " + manifests_dir().string() + ": " + ec.message());
    return {};
  }

 private:
  // put() and remove() of one id run one at a time; other ids and every reader go on meanwhile.
  class IdHold {
   public:
    IdHold(TieredSnapshotStore& store, std::string id) : store_(store), id_(std::move(id)) {}
    IdHold(const IdHold&) = delete;
    IdHold& operator=(const IdHold&) = delete;
    ~IdHold() {
      {
        std::lock_guard lock(store_.ids_mutex_);
        store_.busy_ids_.erase(id_);
      }
      store_.id_released_.notify_all();
    }

   private:
    TieredSnapshotStore& store_;
    std::string id_;
  };

  [[nodiscard]] IdHold hold_id(const std::string& id) {
    std::unique_lock lock(ids_mutex_);
    id_released_.wait(lock, [&] { return !busy_ids_.contains(id); });
    busy_ids_.insert(id);
    return IdHold(*this, id);
  }

  Result<void> remove_held(const std::string& id) {
    const fs::path path = manifest_path(id);
    if (fs::exists(path)) {
      auto bytes = read_file(path);
      if (!bytes) return tl::unexpected(bytes.error());
      auto manifest = decode_manifest(*bytes);
      if (!manifest) {
        return fail(Errc::corrupt, "remove '" + id + "': " + manifest.error().message +
                                       " (extents cannot be released; delete " + path.string() +
                                       " by hand)");
      }
      const bool has_cxl = std::any_of(manifest->extents.begin(), manifest->extents.end(),
                                       [](const OwnedExtent& e) { return e.tier == TierKind::cxl; });
      if (has_cxl && options_.cxl_directory) {
        if (auto ok = options_.cxl_directory->remove(id); !ok && ok.error().code != Errc::not_found) {
          return ok;
        }
      }
      std::error_code ec;
      fs::remove(path, ec);
      if (ec) return fail(Errc::io, "remove " + path.string() + ": " + ec.message());
      release_private_extents(*manifest);
      return {};
    }
    if (!options_.cxl_directory) return fail(Errc::not_found, "snapshot '" + id + "' not found");
    auto record = options_.cxl_directory->lookup(id);
    if (!record) return tl::unexpected(record.error());
    // The tombstone goes first: it also checks that this host owns the snapshot.
    if (auto ok = options_.cxl_directory->remove(id); !ok) return ok;
    // Extents on other shared tiers (rdma) are released at once; only CXL arena space waits for
    // every host to move past the tombstone.
    if (auto manifest = decode_manifest(record->manifest)) release_private_extents(*manifest);
    return {};
  }

  // Gives back a removed snapshot's extents on every tier but CXL (whose arena space the
  // directory frees once every host has moved past the tombstone).
  void release_private_extents(const Manifest& manifest) {
    for (const auto& e : manifest.extents) {
      // Storage that was replaced: the extent belongs to nobody, or to someone else.
      if (e.tier == TierKind::cxl || lost_on(manifest.snapshot.info, e.tier)) continue;
      if (auto tier = options_.tiers.find(e.tier); tier != options_.tiers.end()) {
        (void)tier->second->release(e.extent);
      }
    }
  }

  // Per tier: what read_pages handed out. Relaxed atomics: the numbers are for reports.
  struct Traffic {
    std::atomic<std::uint64_t> pages{0}, tier_reads{0}, tier_bytes{0}, cached_pages{0};
  };
  Traffic& traffic(TierKind kind) { return traffic_[static_cast<std::size_t>(kind) % traffic_.size()]; }
  const Traffic& traffic(TierKind kind) const {
    return traffic_[static_cast<std::size_t>(kind) % traffic_.size()];
  }

  Result<PageRun> served(Result<PageRun> run) {
    if (run && !run->zero) traffic(run->tier).pages.fetch_add(run->pages, std::memory_order_relaxed);
    return run;
  }

  Result<void> read_tier(Tier& tier, TierKind kind, std::uint64_t location, std::span<std::byte> out) {
    auto ok = tier.read(Extent{location, out.size()}, 0, out);
    Traffic& t = traffic(kind);
    t.tier_reads.fetch_add(1, std::memory_order_relaxed);
    if (ok) t.tier_bytes.fetch_add(out.size(), std::memory_order_relaxed);
    return ok;
  }

  static store_detail::PageKey cache_key(const Snapshot& snapshot, std::size_t index) {
    return store_detail::PageKey{snapshot.info.id, snapshot.info.created_unix_ns, index};
  }
  static store_detail::PageIdentity cache_identity(const PageEntry& page) {
    return store_detail::PageIdentity{page.tier, page.location, page.crc32c};
  }

  // read_pages' copy path through the page cache: each page is served from the cache, from
  // another caller's read in flight, or read here (runs of pages adjacent in the tier with one
  // call, as without the cache) and cached once it passed its check. Only a page that was
  // checksummed at put() is looked up: one without a checksum fails verify() as before.
  Result<PageRun> read_through_cache(const Snapshot& snapshot, std::size_t first, std::size_t fit,
                                     std::span<std::byte> scratch, Tier& tier) {
    using store_detail::PageCache;
    const auto& pages = snapshot.pages;
    const TierKind kind = pages[first].tier;
    auto same_tier = [&](std::size_t i) { return (pages[i].flags & page_zero) == 0 && pages[i].tier == kind; };
    auto cacheable = [&](std::size_t i) { return (pages[i].flags & page_checksummed) != 0; };
    PageRun run{.data = scratch.data(), .tier = kind};
    while (run.pages < fit && same_tier(first + run.pages)) {
      const std::size_t at = first + run.pages;
      const auto out = scratch.subspan(run.pages * kPageSize, kPageSize);
      PageCache::Acquired got;
      if (cacheable(at)) got = cache_.acquire(cache_key(snapshot, at), cache_identity(pages[at]), out);
      switch (got.outcome) {
        case PageCache::Outcome::hit:
        case PageCache::Outcome::joined:
          traffic(kind).cached_pages.fetch_add(1, std::memory_order_relaxed);
          ++run.pages;
          continue;
        case PageCache::Outcome::failed:
          if (run.pages > 0) return run;
          return tl::unexpected(*got.error);
        case PageCache::Outcome::bypass:
        case PageCache::Outcome::claimed:
          break;
      }
      // Read here: this page, and the following ones that are adjacent in the tier and that no
      // one has (claiming never waits, so a reader holding claims never waits for another).
      std::vector<PageCache::Claim> claims;
      claims.push_back(std::move(got.claim));
      if (got.outcome == PageCache::Outcome::claimed) {
        while (run.pages + claims.size() < fit) {
          const std::size_t next = at + claims.size();
          if (!same_tier(next) || !cacheable(next) ||
              pages[next].location != pages[at].location + claims.size() * kPageSize) {
            break;
          }
          auto claim = cache_.try_claim(cache_key(snapshot, next), cache_identity(pages[next]));
          if (!claim) break;
          claims.push_back(std::move(claim));
        }
      }
      const std::size_t group = claims.size();
      auto slot = scratch.subspan(run.pages * kPageSize, group * kPageSize);
      if (auto ok = read_tier(tier, kind, pages[at].location, slot); !ok) {
        // Dropping the claims lets their waiters try the read themselves.
        if (run.pages > 0) return run;
        return fail(ok.error().code, describe(snapshot, at) + ": " + ok.error().message);
      }
      // Every page of the group is checked and handed to its waiters, even past one that fails;
      // this caller's run ends before the first failure.
      std::optional<Error> failure;
      for (std::size_t k = 0; k < group; ++k) {
        const auto page = slot.subspan(k * kPageSize, kPageSize);
        auto ok = verify(snapshot, at + k, page.data());
        if (ok) {
          if (claims[k]) cache_.fill(std::move(claims[k]), page);
          if (!failure) ++run.pages;
          continue;
        }
        if (claims[k]) cache_.reject(std::move(claims[k]), ok.error());
        if (!failure) failure = ok.error();
      }
      if (failure) {
        if (run.pages > 0) return run;
        return tl::unexpected(*failure);
      }
    }
    return run;
  }

  fs::path manifests_dir() const { return options_.state_dir / "manifests"; }
  fs::path manifest_path(const std::string& id) const { return manifests_dir() / (id + ".snapman"); }

  // The manifest of `id` from the state dir, else from the CXL directory.
  Result<Manifest> find(const std::string& id) {
    if (auto ok = check_id(id); !ok) return tl::unexpected(ok.error());
    const fs::path path = manifest_path(id);
    std::error_code ec;
    if (fs::exists(path, ec)) {
      auto bytes = read_file(path);
      if (!bytes) return tl::unexpected(bytes.error());
      return checked(id, decode_manifest(*bytes), path.string());
    }
    if (options_.cxl_directory) {
      auto record = options_.cxl_directory->lookup(id);
      if (record && record->entry.visibility == CxlVisibility::published) {
        return checked(id, decode_manifest(record->manifest), "the CXL directory");
      }
      if (!record && record.error().code != Errc::not_found) return tl::unexpected(record.error());
    }
    return fail(Errc::not_found, "snapshot '" + id + "' not found");
  }

  static Result<Manifest> checked(const std::string& id, Result<Manifest> manifest, const std::string& where) {
    if (!manifest) {
      return fail(manifest.error().code, "snapshot '" + id + "' in " + where + ": " + manifest.error().message);
    }
    if (manifest->snapshot.info.id != id) {
      return fail(Errc::corrupt, "snapshot '" + id + "' in " + where + ": manifest names '" +
                                     manifest->snapshot.info.id + "'");
    }
    return manifest;
  }

  // Why the pages `info` keeps on `kind` are gone, if they are: the tier's epoch is known and
  // is not the one they were written under. An unknown epoch (tier never connected) is not
  // taken for a loss.
  std::optional<std::string> lost_on(const SnapshotInfo& info, TierKind kind) const {
    auto recorded = info.tier_epochs.find(kind);
    if (recorded == info.tier_epochs.end()) return std::nullopt;
    auto tier = options_.tiers.find(kind);
    if (tier == options_.tiers.end()) return std::nullopt;
    const std::uint64_t now = tier->second->epoch();
    if (now == 0 || now == recorded->second) return std::nullopt;
    if (kind == TierKind::local) {
      return fmt::format("its local pages were lost: they were in the memory of an earlier agent (local tier epoch "
                         "{}, now {})", recorded->second, now);
    }
    std::string name(to_string(kind));
    if (kind == TierKind::rdma) name = "RDMA";
    return fmt::format("its {} pages were lost: pool epoch {}, now {}", name, recorded->second, now);
  }

  void mark_lost(SnapshotInfo& info) const {
    info.lost.reset();
    for (const auto& [kind, epoch] : info.tier_epochs) {
      if (auto why = lost_on(info, kind)) {
        info.lost = std::move(why);
        return;
      }
    }
  }

  // "snapshot 'fn': page 9 (vaddr 0x10001000) on tier cxl"
  static std::string describe(const Snapshot& snapshot, std::size_t index) {
    const PageEntry& page = snapshot.pages[index];
    return fmt::format("snapshot '{}': page {} (vaddr {:#x}) on tier {}", snapshot.info.id, index, page.vaddr,
                       to_string(page.tier));
  }

  // Every stored page carries a CRC32C set by put(), and the manifest that holds it is itself
  // checksummed: a stored page without one is as damaged as one that fails it.
  Result<void> verify(const Snapshot& snapshot, std::size_t index, const std::byte* bytes) const {
    if (!options_.verify_page_checksums) return {};
    const PageEntry& page = snapshot.pages[index];
    if ((page.flags & page_checksummed) == 0) {
      return fail(Errc::corrupt, describe(snapshot, index) + " has no checksum");
    }
    const std::uint32_t got = crc32c(std::span(bytes, kPageSize));
    if (got != page.crc32c) {
      return fail(Errc::corrupt, describe(snapshot, index) +
                                     fmt::format(" fails its checksum (CRC32C {:08x}, stored {:08x})", got, page.crc32c));
    }
    return {};
  }

  StoreOptions options_;
  store_detail::PageCache cache_;
  std::array<Traffic, 5> traffic_;  // by TierKind value
  std::atomic<std::uint64_t> zero_served_{0};
  std::mutex ids_mutex_;
  std::condition_variable id_released_;
  std::set<std::string> busy_ids_;
};

}  // namespace

Result<std::unique_ptr<SnapshotStore>> make_snapshot_store(StoreOptions options) {
  if (options.host_name.empty()) return fail(Errc::invalid_argument, "store: host name is empty");
  if (options.state_dir.empty()) return fail(Errc::invalid_argument, "store: state directory is empty");
  for (const auto& [kind, tier] : options.tiers) {
    if (!tier) return fail(Errc::invalid_argument, "store: tier " + std::string(to_string(kind)) + " is null");
    if (tier->kind() != kind) {
      return fail(Errc::invalid_argument, "store: tier registered as " + std::string(to_string(kind)) +
                                              " reports kind " + std::string(to_string(tier->kind())));
    }
  }
  if (options.tiers.contains(TierKind::cxl) && !options.cxl_directory) {
    return fail(Errc::invalid_argument, "store: a cxl tier needs the CXL directory it allocates from");
  }
  auto store = std::make_unique<TieredSnapshotStore>(std::move(options));
  if (auto ok = store->prepare(); !ok) return tl::unexpected(ok.error());
  return std::unique_ptr<SnapshotStore>(std::move(store));
}

}  // namespace snaptier
