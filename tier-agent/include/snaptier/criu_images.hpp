// CRIU checkpoint images, read without a protobuf library (docs/schema/criu-images.md).
//
// A CRIU image file is a 32-bit head magic (IMG_COMMON_MAGIC; inventory.img has none), the
// image's own magic, then repeated [u32 little-endian length][protobuf message]. pages-*.img
// are raw page data with no header. The parsers below decode only the fields the agent needs,
// bounds-check every byte, skip unknown fields, and turn any malformed input into
// Errc::corrupt with a message naming the file, the entry and its offset. Verified against
// images written by criu 4.1.1.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "snaptier/error.hpp"

namespace snaptier::criu {

// Magics (criu/include/magic.h).
inline constexpr std::uint32_t kImgCommonMagic = 0x54564319;   // "Sarov"
inline constexpr std::uint32_t kImgServiceMagic = 0x55105940;  // "Zlatoust" (stats, irmap)
inline constexpr std::uint32_t kInventoryMagic = 0x58313116;
inline constexpr std::uint32_t kPstreeMagic = 0x50273030;
inline constexpr std::uint32_t kMmMagic = 0x57492820;
inline constexpr std::uint32_t kPagemapMagic = 0x56084025;

inline constexpr std::uint64_t kPageSize = 4096;  // CRIU images are written with the host's page size

// Bigger metadata images than this are refused (Errc::corrupt): real ones are a few KiB.
inline constexpr std::size_t kMaxMetadataImageBytes = 64u << 20;

// pagemap_entry.flags (criu/include/pagemap.h).
inline constexpr std::uint32_t kPeParent = 1u << 0;   // pages are in the parent snapshot
inline constexpr std::uint32_t kPeLazy = 1u << 1;     // pages may be restored lazily
inline constexpr std::uint32_t kPePresent = 1u << 2;  // pages are in this pages-<id>.img

// vma_entry.status bits (criu/include/image.h), the ones the agent looks at.
inline constexpr std::uint32_t kVmaAreaRegular = 1u << 0;
inline constexpr std::uint32_t kVmaAreaStack = 1u << 1;
inline constexpr std::uint32_t kVmaAreaVsyscall = 1u << 2;
inline constexpr std::uint32_t kVmaAreaVdso = 1u << 3;
inline constexpr std::uint32_t kVmaAreaHeap = 1u << 5;
inline constexpr std::uint32_t kVmaFilePrivate = 1u << 6;
inline constexpr std::uint32_t kVmaFileShared = 1u << 7;
inline constexpr std::uint32_t kVmaAnonShared = 1u << 8;
inline constexpr std::uint32_t kVmaAnonPrivate = 1u << 9;
inline constexpr std::uint32_t kVmaAreaVvar = 1u << 12;

// inventory.img (inventory_entry). CRIU 4.1.1 has no "lazy pages" flag here: laziness is per
// pagemap entry (kPeLazy).
struct InventoryEntry {
  std::uint32_t img_version = 0;  // 2 (CRTOOLS_IMAGES_V1_1) for every current CRIU
  std::optional<bool> fdinfo_per_id;
  std::optional<bool> ns_per_id;
  std::optional<std::uint32_t> root_cg_set;
  std::optional<std::uint32_t> lsmtype;
  std::optional<std::uint64_t> dump_uptime;
  std::optional<std::uint32_t> pre_dump_mode;
};

// pstree.img: one entry per task, root first.
struct PstreeEntry {
  std::uint32_t pid = 0;
  std::uint32_t ppid = 0;  // 0 for the dumped root
  std::uint32_t pgid = 0;
  std::uint32_t sid = 0;
  std::vector<std::uint32_t> threads;
};

// mm-<pid>.img: vma_entry.
struct VmaEntry {
  std::uint64_t start = 0;
  std::uint64_t end = 0;
  std::uint64_t pgoff = 0;
  std::uint64_t shmid = 0;
  std::uint32_t prot = 0;    // PROT_*
  std::uint32_t flags = 0;   // MAP_*
  std::uint32_t status = 0;  // kVma* bits
  std::int64_t fd = -1;
  std::optional<std::uint64_t> madv;
  std::optional<std::uint32_t> fdflags;

  [[nodiscard]] std::uint64_t size() const noexcept { return end - start; }
  [[nodiscard]] bool contains(std::uint64_t addr) const noexcept { return addr >= start && addr < end; }
  // CRIU's vma_entry_can_be_lazy(): private anonymous, not locked, not hugetlb, not
  // vdso/vvar/vsyscall. Only such VMAs get kPeLazy pagemap entries.
  [[nodiscard]] bool can_be_lazy() const noexcept;
};

// mm-<pid>.img: the one mm_entry.
struct MmEntry {
  std::uint64_t mm_start_code = 0, mm_end_code = 0;
  std::uint64_t mm_start_data = 0, mm_end_data = 0;
  std::uint64_t mm_start_stack = 0;
  std::uint64_t mm_start_brk = 0, mm_brk = 0;
  std::uint64_t mm_arg_start = 0, mm_arg_end = 0;
  std::uint64_t mm_env_start = 0, mm_env_end = 0;
  std::uint32_t exe_file_id = 0;
  std::vector<std::uint64_t> mm_saved_auxv;
  std::vector<VmaEntry> vmas;  // as in the image: ascending, non-overlapping (load_checkpoint checks)
  std::optional<std::int32_t> dumpable;
  std::optional<bool> thp_disabled;
};

// pagemap-<pid>.img: pagemap_entry, after normalization as CRIU does it
// (init_compat_pagemap_entry): in_parent=true becomes kPeParent; no flags at all means
// kPePresent; nr_pages is field 5 when present, else compat_nr_pages (field 2, all criu 4.1).
struct PagemapEntry {
  std::uint64_t vaddr = 0;
  std::uint64_t nr_pages = 0;
  std::uint32_t flags = 0;
  // Byte offset of this entry's first page in pages-<pages_id>.img, for entries that are
  // kPePresent (pages are stored in pagemap order, only present entries have data there).
  std::optional<std::uint64_t> data_offset;

  [[nodiscard]] std::uint64_t bytes() const noexcept { return nr_pages * kPageSize; }
  [[nodiscard]] std::uint64_t end() const noexcept { return vaddr + bytes(); }
  [[nodiscard]] bool present() const noexcept { return (flags & kPePresent) != 0; }
  [[nodiscard]] bool lazy() const noexcept { return (flags & kPeLazy) != 0; }
  [[nodiscard]] bool in_parent() const noexcept { return (flags & kPeParent) != 0; }
};

struct Pagemap {
  std::uint32_t pages_id = 0;  // pagemap_head: the data is in pages-<pages_id>.img
  std::vector<PagemapEntry> entries;
  std::uint64_t present_pages = 0;  // sum of nr_pages over present entries
  [[nodiscard]] std::uint64_t present_bytes() const noexcept { return present_pages * kPageSize; }
};

// --- Parsers over one image's bytes. `name` is used in error messages ("pagemap-7.img"). ---
// Each validates the framing (magics, lengths), the wire format, required fields and value
// ranges of one file. Cross-file checks are load_checkpoint's.
[[nodiscard]] Result<InventoryEntry> parse_inventory(std::span<const std::byte> image,
                                                     std::string_view name = "inventory.img");
[[nodiscard]] Result<std::vector<PstreeEntry>> parse_pstree(std::span<const std::byte> image,
                                                            std::string_view name = "pstree.img");
[[nodiscard]] Result<MmEntry> parse_mm(std::span<const std::byte> image, std::string_view name = "mm.img");
// Also checks the entries themselves: page-aligned vaddr, nr_pages > 0, no address overflow,
// ascending and non-overlapping, not both present and in-parent; fills data_offset.
[[nodiscard]] Result<Pagemap> parse_pagemap(std::span<const std::byte> image,
                                            std::string_view name = "pagemap.img");

// Reads a whole metadata image (refusing files over kMaxMetadataImageBytes).
// Errc::not_found if it does not exist, Errc::io on other failures.
[[nodiscard]] Result<std::vector<std::byte>> read_image_file(const std::filesystem::path& path);

// --- A whole checkpoint directory. ---
struct Task {
  PstreeEntry pstree;
  // Absent together for a task without memory images (a zombie); present together otherwise.
  std::optional<MmEntry> mm;
  std::optional<Pagemap> pagemap;
  std::filesystem::path pages_path;  // pages-<pages_id>.img (empty without a pagemap)
  std::uint64_t pages_file_bytes = 0;
};

struct Checkpoint {
  std::filesystem::path dir;
  InventoryEntry inventory;
  std::vector<Task> tasks;  // pstree order: root first

  [[nodiscard]] const Task* find(std::uint32_t pid) const noexcept;
};

// Reads inventory.img, pstree.img and, per task, mm-<pid>.img, pagemap-<pid>.img and the size
// of pages-<pages_id>.img, and checks that they agree (Errc::corrupt naming file and entry):
// - inventory img_version is 1 or 2 (else Errc::unsupported);
// - pstree: at least one task, unique pids, ppid 0 or a pid of the tree, the root's ppid
//   is not in the tree;
// - VMAs: page aligned, start < end, ascending, non-overlapping;
// - pagemap entries lie inside the VMAs (an entry may span adjacent VMAs, as CRIU merges
//   contiguous pages of neighbouring VMAs);
// - pages-<id>.img is exactly present_pages * kPageSize bytes, and no two tasks share one;
// - mm and pagemap images exist for a task, or neither does.
// Errc::not_found if the directory, inventory.img or pstree.img is missing.
// Pages of kPeParent entries live in the parent checkpoint (--prev-images-dir); they are
// listed, not followed.
[[nodiscard]] Result<Checkpoint> load_checkpoint(const std::filesystem::path& dir);


// --- Before `criu restore` reads a directory. ---
// criu 4.1.1 reads a pages-<id>.img with a preadv() loop that treats 0 bytes read as "try
// again" (criu/pie/restorer.c, criu/pagemap.c process_async_reads): a pages file shorter than
// its pagemap says makes the restored task spin at 100% CPU forever instead of failing.
// Every pagemap-*.img of `dir` (tasks' and shared memory's) is parsed, and the bytes CRIU reads
// from its pages-<pages_id>.img must be there: the entries flagged PE_PRESENT, in pagemap order
// (the only entries that advance CRIU's offset in the pages file). PE_PARENT entries live in
// the parent checkpoint and PE_LAZY entries without PE_PRESENT (`criu dump --lazy-pages`) are
// served by a page server: neither needs a byte here. A PE_LAZY|PE_PRESENT entry (a plain dump)
// does, since an eager restore and `criu lazy-pages` read it from the file. A longer file is
// fine (CRIU never reads past what its pagemap names). A short or missing pages file, or an
// unreadable pagemap, is Errc::corrupt naming the file, the bytes expected and found.
struct PagesFileCheck {
  std::filesystem::path pagemap, pages;
  std::uint64_t needed_bytes = 0;  // present pages * kPageSize
  std::uint64_t file_bytes = 0;
};
[[nodiscard]] Result<std::vector<PagesFileCheck>> check_pages_files(const std::filesystem::path& dir);

}  // namespace snaptier::criu
