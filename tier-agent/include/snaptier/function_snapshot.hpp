// A CRIU checkpoint as a tiered snapshot (docs/restore-policies.md, "Snapshot layout").
//
// ingest() turns a checkpoint directory into a Snapshot: every page CRIU stored
// (pages-<id>.img, in pagemap order, task after task) becomes one PageEntry; every other image
// becomes a metadata blob "img:<file name>"; blob "snaptier.layout" records which page index
// range belongs to which task. materialize() does the reverse on the restoring host: the
// metadata images as files and each pages-<id>.img at its full size, holding the pages CRIU
// restores itself (or all of them) with holes where the lazy pages were. StorePageSource serves
// the lazy pages of a materialized checkpoint straight from the store's tiers.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "snaptier/criu_images.hpp"
#include "snaptier/error.hpp"
#include "snaptier/fault_engine.hpp"
#include "snaptier/lazy_pages.hpp"
#include "snaptier/restore_policy.hpp"
#include "snaptier/store.hpp"

namespace snaptier::snap {

inline constexpr const char* kLayoutBlob = "snaptier.layout";      // JSON, see Layout
inline constexpr const char* kFunctionBlob = "snaptier.function";  // JSON, written by the agent
inline constexpr const char* kImageBlobPrefix = "img:";
// JSON {"<pid>": [[vaddr, touch_order], ...]}: fresh pages (not in the snapshot, zero-filled on
// fault) the profiled invocation touched inside VMAs that CRIU serves lazily.
inline constexpr const char* kFreshBlob = "snaptier.fresh";
// JSON {"<pid>": [[start, end], ...]}: snapshot ranges the profiled invocation discarded
// (MADV_DONTNEED / MADV_REMOVE). Such a range must never be mapped in place from a file: the
// next read would see the snapshot's bytes again, not zeros. Written by every profile (empty
// lists too), so a snapshot without it predates the recording.
inline constexpr const char* kDiscardedBlob = "snaptier.discarded";
// The same for ranges the profiled invocation moved with mremap (FaultObservation::remapped_bytes):
// a mapped range that grows reads the file's next pages where anonymous memory reads zeros.
inline constexpr const char* kRemappedBlob = "snaptier.remapped";

struct TaskLayout {
  std::uint32_t pid = 0;           // pstree pid
  std::string pages_file;          // "pages-1.img"
  std::uint64_t first_page = 0;    // index of the task's first page in Snapshot::pages
  std::uint64_t page_count = 0;    // = the task's present pagemap pages
};
struct Layout {
  std::vector<TaskLayout> tasks;
};
[[nodiscard]] std::vector<std::byte> encode_layout(const Layout& layout);
[[nodiscard]] Result<Layout> decode_layout(std::span<const std::byte> bytes);

struct Ingested {
  criu::Checkpoint checkpoint;
  Snapshot snapshot;               // blobs + one PageEntry (vaddr) per stored page; no id yet
  std::vector<std::byte> data;     // pages.size() * kPageSize
  Layout layout;
};
// Reads and validates (criu::load_checkpoint) the directory. Log files and the lazy-pages
// socket are not images and are skipped; pages of a parent checkpoint are Errc::unsupported.
[[nodiscard]] Result<Ingested> ingest(const std::filesystem::path& images_dir);

// Writes `snapshot`'s images into `dir` (created; must be empty of images) and loads them back
// as a checkpoint. all_pages=false writes only the pages CRIU restores itself (non-lazy).
struct Materialized {
  criu::Checkpoint checkpoint;
  std::uint64_t pages_written = 0;
  std::uint64_t bytes_written = 0;
};
[[nodiscard]] Result<Materialized> materialize(const Snapshot& snapshot, SnapshotStore& store,
                                               const std::filesystem::path& dir, bool all_pages);

// ---- Profiling --------------------------------------------------------------------------------

// Records first touches of snapshot pages from the fault engine's observations (thread-safe:
// the server thread records, the agent freezes and reads).
class ProfileRecorder {
 public:
  void record(const FaultObservation& fault);
  void freeze();  // later faults are ignored (e.g. the digest op's)
  struct Touch {
    std::uint32_t order = 0;  // 1-based
    bool write = false;
  };
  // (pstree pid, snapshot address) -> first touch.
  [[nodiscard]] std::map<std::pair<std::int64_t, std::uint64_t>, Touch> touches() const;
  [[nodiscard]] std::uint64_t faults() const;
  // (pstree pid, [snapshot start, end)) of every discard seen (FaultObservation::discarded_bytes).
  [[nodiscard]] std::vector<std::pair<std::int64_t, std::pair<std::uint64_t, std::uint64_t>>> discards() const;
  // The same for every mremap seen (FaultObservation::remapped_bytes).
  [[nodiscard]] std::vector<std::pair<std::int64_t, std::pair<std::uint64_t, std::uint64_t>>> remaps() const;

 private:
  mutable std::mutex mutex_;
  bool frozen_ = false;
  std::uint64_t faults_ = 0;
  std::vector<std::pair<std::int64_t, std::pair<std::uint64_t, std::uint64_t>>> discards_;
  std::vector<std::pair<std::int64_t, std::pair<std::uint64_t, std::uint64_t>>> remaps_;
  std::map<std::pair<std::int64_t, std::uint64_t>, Touch> touches_;
};

struct ProfileSummary {
  std::uint64_t faults = 0;     // faults seen during the profiled invocation
  std::uint64_t hot = 0;        // snapshot pages touched
  std::uint64_t cold = 0;       // stored pages not touched (zero pages excluded)
  std::uint64_t written = 0;    // hot pages first touched by a write, or found changed after
  std::uint64_t read_only = 0;  // hot pages neither
  std::uint64_t zero = 0;       // all-zero pages (never stored)
  std::uint64_t hot_zero = 0;   // zero pages that were touched
  std::uint64_t changed_after_read = 0;  // written pages whose first touch was a read
  std::uint64_t fresh = 0;      // touched pages that are not in the snapshot (kFreshBlob)
  std::uint64_t discards = 0;   // MADV_DONTNEED / REMOVE events seen (kDiscardedBlob)
  std::uint64_t remaps = 0;     // mremap / REMAP events seen (kRemappedBlob)
};
void to_json(nlohmann::json& j, const ProfileSummary& s);

// Sets page_hot/page_written/page_read_only/touch_order (and page_zero) on ingested.snapshot's
// pages. `restored_pid` (host pid of the profiled task, or 0): pages first touched by a read are
// compared with the memory of that live process through /proc/PID/mem, so a page written after
// a read fault counts as written too. Single-task checkpoints only for that comparison.
[[nodiscard]] ProfileSummary apply_profile(Ingested& ingested, const ProfileRecorder& recorder, pid_t restored_pid);

// ---- Serving lazy pages from the store ------------------------------------------------------

class StorePageSource final : public lazy::LazySource {
 public:
  // `checkpoint` is the materialized one (its pagemaps and VMAs give the lazy ranges);
  // `snapshot`'s layout maps them to page entries.
  [[nodiscard]] static Result<std::shared_ptr<StorePageSource>> open(std::shared_ptr<SnapshotStore> store,
                                                                     Snapshot snapshot,
                                                                     const criu::Checkpoint& checkpoint);
  ~StorePageSource() override;

  [[nodiscard]] Result<PageFill> fetch(TaskId task, std::uint64_t vaddr, std::size_t max_pages,
                                       std::span<std::byte> buffer) override;
  // fetch only reads what open() built and calls SnapshotStore::read_pages, which any number of
  // threads may call at once: the engine may prefetch from it on several threads.
  [[nodiscard]] bool concurrent_fetch() const noexcept override { return true; }
  [[nodiscard]] bool has_task(TaskId task) const noexcept override;
  [[nodiscard]] std::vector<std::uint64_t> lazy_pages(TaskId task) const override;

  // The lazy pages of `task` with their flags, for a RestorePolicy's plan; plus the profiled
  // fresh pages (kFreshBlob) as hot zero pages.
  [[nodiscard]] std::vector<policy::LazyPage> policy_view(TaskId task) const;

  struct Impl;

 private:
  explicit StorePageSource(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace snaptier::snap
