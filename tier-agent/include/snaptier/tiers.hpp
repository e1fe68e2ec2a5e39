// Factories for the tier backends. Each returns a ready Tier or an Error; nothing throws.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>

#include "snaptier/error.hpp"
#include "snaptier/tier.hpp"

namespace snaptier {

class CxlDirectory;

// Every tier made here is safe to call from any number of threads at once (see Tier).

// Host DRAM: one anonymous mapping of `capacity_bytes` (rounded up to 4 KiB), first-fit extents.
// Not persistent; map() returns in-place pointers.
[[nodiscard]] Result<std::unique_ptr<Tier>> make_local_tier(std::uint64_t capacity_bytes);

// A directory on disk, one file per extent (so the allocation state is the directory listing and
// survives restarts). Extent offsets encode the extent file id in their upper bits.
[[nodiscard]] Result<std::unique_ptr<Tier>> make_file_tier(const std::filesystem::path& directory,
                                                           std::uint64_t capacity_bytes);

// The shared CXL region seen through an attached directory: extents are allocated in this host's
// arena of the region, offsets are region offsets (valid on every attached host), map() returns
// in-place pointers after invalidating the mapped lines.
[[nodiscard]] Result<std::unique_ptr<Tier>> make_cxl_tier(std::shared_ptr<CxlDirectory> directory);

}  // namespace snaptier
