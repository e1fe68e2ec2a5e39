// Rewrites a checkpoint so that CRIU itself maps runs of pages from a file instead of restoring
// them (docs/restore-policies.md, "In place"; facts in ../shared/in-place-mapping.md): each run
// becomes its own VMA_AREA_REGULAR|VMA_FILE_PRIVATE vma_entry, MAP_PRIVATE, pgoff = the run's
// offset in the file, naming a new regular-file entry of files.img; its pages leave
// pagemap-<pid>.img and their bytes leave pages-<id>.img. The rest of the VMA stays anonymous
// (and lazy, if it was). CRIU maps such a VMA with MAP_PRIVATE|MAP_FIXED and never registers it
// with the lazy-pages uffd: reads see the file's bytes, a write takes the kernel's copy-on-write.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <vector>

#include "snaptier/criu_images.hpp"
#include "snaptier/error.hpp"

namespace snaptier::criu {

struct MappedRun {
  std::uint64_t vaddr = 0;        // page aligned, in the dumped task
  std::uint64_t pages = 0;        // >= 1
  std::uint64_t file_offset = 0;  // page aligned byte offset of the run's first page in the file
  friend bool operator==(const MappedRun&, const MappedRun&) = default;
};

struct MappingRewrite {
  std::filesystem::path backing_file;  // absolute, as the restoring CRIU will open it
  std::map<std::uint32_t, std::vector<MappedRun>> runs;  // pstree pid -> ascending, disjoint runs
};

struct RewriteResult {
  std::uint32_t file_id = 0;       // the files.img entry the mapped VMAs name (0: nothing mapped)
  std::uint64_t pages_mapped = 0;
  std::uint64_t vmas_before = 0;   // over all tasks
  std::uint64_t vmas_after = 0;
  std::uint64_t bytes_cut = 0;     // left pages-*.img
};

// Whether pages of `vma` may become a private file mapping: a private anonymous VMA CRIU could
// serve lazily, not a (grows-down) stack, without madvise state a file mapping refuses
// (WIPEONFORK, KEEPONFORK).
[[nodiscard]] bool can_map_in_place(const VmaEntry& vma) noexcept;

// Each run must lie inside a VMA can_map_in_place() accepts and every one of its pages must be a present page of the pagemap:
// Errc::invalid_argument otherwise, before any file is touched. Malformed images are
// Errc::corrupt. The new images are written beside the old ones and renamed over them; holes of
// pages-<id>.img (the lazy pages a materialized checkpoint leaves out) stay holes.
[[nodiscard]] Result<RewriteResult> rewrite_for_mapping(const std::filesystem::path& dir, const MappingRewrite& request);

}  // namespace snaptier::criu
