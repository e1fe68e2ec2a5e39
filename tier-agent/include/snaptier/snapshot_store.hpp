// The factory for the SnapshotStore (store.hpp): manifests of host-private snapshots live in a
// state directory, manifests of snapshots whose pages are all on shared tiers are published in
// the CXL directory so that every attached host can restore them in place.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>

#include "snaptier/cxl_directory.hpp"
#include "snaptier/error.hpp"
#include "snaptier/store.hpp"
#include "snaptier/tier.hpp"

namespace snaptier {

inline constexpr std::uint64_t kDefaultPageCacheBytes = 64ull << 20;

struct StoreOptions {
  std::string host_name;
  std::filesystem::path state_dir;                    // created if missing
  std::map<TierKind, std::shared_ptr<Tier>> tiers;    // any subset
  std::shared_ptr<CxlDirectory> cxl_directory;        // required if tiers has a cxl tier
  // read_pages checks each page's CRC32C; false only to measure what the check costs.
  bool verify_page_checksums = true;
  // Verified pages of non-byte-addressable tiers (rdma, file) kept in DRAM so that concurrent
  // restores of one copy read each page from its tier once; 0 turns the cache off. Only used
  // while verify_page_checksums is on (a cached page must have passed its check).
  std::uint64_t page_cache_bytes = kDefaultPageCacheBytes;
};

[[nodiscard]] Result<std::unique_ptr<SnapshotStore>> make_snapshot_store(StoreOptions options);

// Snapshot ids: 1..63 characters of [A-Za-z0-9._:-], not starting with '.'.
[[nodiscard]] bool is_valid_snapshot_id(std::string_view id) noexcept;

}  // namespace snaptier
