// Snapshot pages used where they lie in the CXL region (docs/restore-policies.md, "In place"):
// which runs of a snapshot can be mapped privately from the region's file, their CRC32C checked
// in place right before the restore, the checkpoint rewritten so CRIU maps them
// (criu/inplace_rewrite.hpp), and what the restored tree then holds in local DRAM and maps
// from CXL.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "criu/inplace_rewrite.hpp"
#include "snaptier/criu_images.hpp"
#include "snaptier/error.hpp"
#include "snaptier/in_place.hpp"
#include "snaptier/restore_policy.hpp"
#include "snaptier/store.hpp"

namespace snaptier::inplace {

struct RunPages {
  std::uint32_t pid = 0;
  std::size_t first_index = 0;  // of the run's first page in Snapshot::pages
  criu::MappedRun run;
};

struct Plan {
  criu::MappingRewrite rewrite;
  std::vector<RunPages> runs;
  std::uint64_t pages = 0;               // mapped
  std::uint64_t wanted = 0;              // pages the selection asked for
  std::uint64_t skipped_discarded = 0;   // the profile saw them MADV_DONTNEEDed or REMOVEd
  std::uint64_t skipped_remapped = 0;    // the profile saw them mremapped (a mapping would grow into the file)
  std::uint64_t skipped_layout = 0;      // skipped_tier + skipped_vma
  std::uint64_t skipped_tier = 0;        // not stored on the CXL tier (or without a CRC32C)
  std::uint64_t skipped_vma = 0;         // in a VMA criu::can_map_in_place() refuses
};

// The runs of `snapshot` to map: selected pages that are stored on the CXL tier with a CRC32C,
// lie in a VMA criu::can_map_in_place() accepts, were never discarded nor mremapped in the profile
// (snap::kDiscardedBlob, snap::kRemappedBlob), grouped into runs contiguous both in virtual address (one VMA) and in
// the region (one pgoff each). `materialized` is the checkpoint materialize() wrote for it.
// Errc::unavailable if the backing cannot map; Errc::unsupported for a snapshot profiled before
// discards were recorded.
[[nodiscard]] Result<Plan> plan_runs(const Snapshot& snapshot, const criu::Checkpoint& materialized,
                                     policy::InPlacePages selection, const Backing& backing);

// Checks every page of every run against its CRC32C where the process will read it (the tier's
// mapping of the same file), right before the restore: Errc::corrupt naming snapshot, page and
// tier on the first mismatch.
[[nodiscard]] Result<void> verify_runs(SnapshotStore& store, const Snapshot& snapshot, const Plan& plan);

// The in-place step of a restore, between materialize() and the restore itself: plan_runs,
// verify_runs, criu::rewrite_for_mapping of `images`, and the checkpoint loaded back (its
// pagemaps no longer list the mapped pages, so nothing serves them lazily).
struct Prepared {
  Plan plan;
  criu::RewriteResult rewrite;
  criu::Checkpoint checkpoint;
  double ms = 0;  // all of it (like materialize, outside the timed restore)
};
[[nodiscard]] Result<Prepared> prepare(SnapshotStore& store, const Snapshot& snapshot,
                                       const std::filesystem::path& images, const criu::Checkpoint& materialized,
                                       policy::InPlacePages selection, const Backing& backing);

// A policy that requires mapping in place (trenv) on a host that cannot (devdax, no CXL tier):
// Errc::unavailable with the sentence why, before anything starts.
[[nodiscard]] Result<void> admit(const policy::RestorePolicy& policy, const std::optional<Backing>& backing);
// What a restore maps: the policy's pages if the host can map them, else none (tiered copies).
[[nodiscard]] policy::InPlacePages selection(const policy::RestorePolicy& policy, const std::optional<Backing>& backing);
// The result's "in_place" report before the restore: pages, mode, tier.
[[nodiscard]] StepReport describe_choice(const policy::RestorePolicy& policy, const std::optional<Backing>& backing);
// Adds the plan's and the rewrite's counts to it.
void report(const Prepared& prepared, StepReport& out);

// What a restored tree holds, from /proc/PID/smaps of each task (root and descendants).
struct MemoryUse {
  std::uint64_t local_anonymous_bytes = 0;  // "Anonymous:" over every VMA (smaps_rollup)
  std::uint64_t cxl_mapped_bytes = 0;       // resident pages of the mapped ranges still shared with the file
  std::uint64_t mapped_cow_bytes = 0;       // private copies taken by writes into the mapped ranges
};
[[nodiscard]] MemoryUse measure(pid_t root, const std::filesystem::path& backing);

}  // namespace snaptier::inplace
