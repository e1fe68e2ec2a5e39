// Whether this host's CXL tier can lend snapshot pages in place: a restored process maps the
// region's file privately (reads see the shared bytes, the kernel copies a page on its first
// write). The mechanism is src/inplace/ (docs/restore-policies.md, "In place").
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

namespace snaptier::inplace {

// The CXL tier's backing as a restored process would map it.
struct Backing {
  std::filesystem::path file;     // absolute path of the region's device or file on this host
  std::uint64_t file_offset = 0;  // file offset of region offset 0 (the agent maps from 0)
  bool can_map = false;           // MAP_PRIVATE of it gives copy-on-write pages
  std::string reason;             // why not, when !can_map
};
// A regular file (tmpfs, /dev/shm: the native testbed) maps privately; device-dax refuses any
// private mapping (drivers/dax/device.c check_vma).
[[nodiscard]] Backing describe_backing(const std::filesystem::path& path, bool device_dax);
// "in-place: yes" or "in-place: no (<reason>)", for status and refusals.
[[nodiscard]] std::string describe(const Backing& backing);

}  // namespace snaptier::inplace
