// Step 5 of a function snapshot (docs/restore-policies.md): one stored copy per placement, kept
// apart from FunctionService so it can be tested without CRIU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <span>

#include <nlohmann/json.hpp>

#include "snaptier/error.hpp"
#include "snaptier/store.hpp"
#include "snaptier/tier.hpp"

namespace snaptier::agent_detail {

struct StoredCopies {
  nlohmann::json variants = nlohmann::json::array();  // {id, placement, cold_tier, pages, ...}
  nlohmann::json skipped = nlohmann::json::array();   // {placement, reason}
  std::uint64_t zero_pages = 0;
};

// Stores `snapshot` (its id is the base id) once per placement, each copy with
// `function_blob` + {placement, cold_tier} as its snaptier.function blob. Every placement's
// previous copy is removed first. A copy that cannot be made (a tier it needs is not up in
// `up`, or the store refuses it) is listed in `skipped` with the reason. Errors: a previous
// copy that cannot be removed, or no copy stored at all.
[[nodiscard]] Result<StoredCopies> store_copies(SnapshotStore& store, const Snapshot& snapshot,
                                                std::span<const std::byte> data,
                                                const nlohmann::json& function_blob,
                                                const std::map<TierKind, TierCaps>& up);

}  // namespace snaptier::agent_detail
