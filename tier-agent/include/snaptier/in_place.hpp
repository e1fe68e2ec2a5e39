// Whether this host's CXL tier can lend snapshot pages in place: a restored process maps the
// region privately (reads see the shared bytes, the kernel copies a page on its first write).
// A regular file (tmpfs, /dev/shm: the native testbed) maps privately as it is; device-dax
// refuses private mappings (drivers/dax/device.c check_vma), so on a dax device the pages are
// lent through the snaptier_cow module's /dev/snaptier-cow (tier-agent/kmod/), which maps the
// same physical range copy-on-write. The mechanism is src/inplace/ (docs/restore-policies.md,
// "In place").
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace snaptier::inplace {

// The dax device behind the CXL tier, as libdaxctl describes it.
struct DaxDevice {
  std::string name;                 // "dax0.0"
  std::string mode;                 // "devdax" (the tier maps the character device)
  std::uint64_t size = 0;           // bytes
  std::uint64_t align = 0;          // bytes; the device's mmap alignment
  std::uint64_t phys_start = 0;     // physical address of its first byte
  std::uint32_t ranges = 1;         // physical ranges it is made of (mapping in place needs one)
};

// The CXL tier's backing as a restored process would map it.
struct Backing {
  std::filesystem::path file;     // absolute path a restored process maps (the file or /dev/snaptier-cow)
  std::uint64_t file_offset = 0;  // file offset of region offset 0 (the agent maps from 0)
  bool can_map = false;           // MAP_PRIVATE of it gives copy-on-write pages
  std::string reason;             // why not, when !can_map
  std::optional<DaxDevice> device;  // set when the tier is a dax device (found or not lendable)
};

// Describes the tier's backing at `path`; for a dax device this finds it with libdaxctl and lends
// its range to /dev/snaptier-cow when the module is loaded.
[[nodiscard]] Backing describe_backing(const std::filesystem::path& path, bool device_dax);
// "in-place: yes" or "in-place: no (<reason>)", for status and refusals.
[[nodiscard]] std::string describe(const Backing& backing);
// The status object: {"can_map", "reason"?, "file", "device"?: {name, mode, size_bytes,
// align_bytes, phys_start, ranges}} (docs/schema/control.schema.json, InPlaceBacking).
[[nodiscard]] nlohmann::json to_json(const Backing& backing);

// What a restore's in-place step chose and did: a restore result's "in_place" object
// (docs/schema/control.schema.json, InPlaceStep).
struct StepReport {
  std::string pages;  // the pages the policy maps (policy::to_string(InPlacePages))
  std::string mode;   // "off", "mapped", or "copied (<why>)"
  std::string tier;   // describe(backing), or "no CXL tier"
  std::optional<std::string> prepared;  // "once for the burst": this instance copied another's images
  // When mode is "mapped": the plan's and the rewrite's counts.
  struct Mapped {
    double prepare_ms = 0;  // runs, check, rewrite (outside restore_ms, like materialize)
    std::uint64_t pages_mapped = 0;
    std::uint64_t pages_wanted = 0;
    std::uint64_t skipped_discarded = 0;
    std::uint64_t skipped_remapped = 0;
    std::uint64_t skipped_layout = 0;  // skipped_tier + skipped_vma
    std::uint64_t skipped_tier = 0;
    std::uint64_t skipped_vma = 0;
    std::uint64_t runs = 0;
    std::uint64_t vmas_before = 0;
    std::uint64_t vmas_after = 0;
    std::uint64_t bytes_cut_from_images = 0;
    std::string backing_file;
  };
  std::optional<Mapped> mapped;
};
[[nodiscard]] nlohmann::json to_json(const StepReport& report);

}  // namespace snaptier::inplace
