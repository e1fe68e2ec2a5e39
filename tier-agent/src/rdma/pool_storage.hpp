// The memory node's pool memory and its allocation table, without verbs (the pool server
// registers data() with the NIC). With a path, the pool is a file (tmpfs or hugetlbfs: memory
// that outlives the agent, not the machine) of the pool's size plus one trailer page naming its
// epoch, and the table is `<path>.table`, rewritten
// atomically (temp + fsync + rename) on every allocate and release; a restarted agent maps the
// same file and keeps the table's extents. Whenever the contents cannot be trusted (no file, no
// table, a torn or foreign table) the pool starts empty under a new random epoch, which is how
// compute hosts learn that snapshots with pages there were lost.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>

#include "core/unique_fd.hpp"
#include "snaptier/error.hpp"
#include "snaptier/tier.hpp"
#include "tiers/extent_allocator.hpp"

namespace snaptier::rdma_detail {

class PoolStorage {
 public:
  // path empty: anonymous memory, a new epoch every time. Fails with invalid_argument if an
  // intact pool of another size is there (nothing is thrown away behind the operator's back),
  // unavailable if another agent holds the pool file, no_space if the file system is full.
  [[nodiscard]] static Result<PoolStorage> open(const std::filesystem::path& path, std::uint64_t size);

  [[nodiscard]] std::byte* data() const noexcept { return mapping_.data(); }
  [[nodiscard]] std::uint64_t size() const noexcept { return allocator_.capacity(); }
  [[nodiscard]] std::uint64_t epoch() const noexcept { return epoch_; }
  [[nodiscard]] std::uint64_t used_bytes() const noexcept { return allocator_.used_bytes(); }
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
  // How this pool came to be: "kept 3 extents (12 MiB) from <table>" or "new pool: <why>".
  [[nodiscard]] const std::string& origin() const noexcept { return origin_; }
  [[nodiscard]] bool recovered() const noexcept { return recovered_; }

  // Not thread-safe (the pool server serialises). A change is on disk before it returns; if
  // the table cannot be written the change is undone and the call fails with io.
  [[nodiscard]] Result<Extent> allocate(std::uint64_t length);
  [[nodiscard]] Result<void> release(Extent extent);

  [[nodiscard]] static std::filesystem::path table_path(const std::filesystem::path& path);

 private:
  PoolStorage(std::uint64_t size) : allocator_(0, size) {}
  [[nodiscard]] Result<void> save() const;

  std::filesystem::path path_;
  detail::UniqueFd fd_;  // holds the flock that keeps a second agent off the pool file
  detail::UniqueMapping mapping_;
  ExtentAllocator allocator_;
  std::uint64_t epoch_ = 0;
  std::string origin_;
  bool recovered_ = false;
};

}  // namespace snaptier::rdma_detail
