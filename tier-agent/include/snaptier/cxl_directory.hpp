// The directory of snapshots shared by several hosts through one CXL region that keeps no cache
// coherence between them (see docs/cxl-directory.md for the layout and the protocol).
//
// Every access to region bytes goes through RegionAccess, so the same directory code runs on
// real device memory (cache-line write-back/invalidate instructions) and under a test model of
// per-host private caches, where a forgotten write-back or invalidate becomes a visible bug.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "snaptier/error.hpp"
#include "snaptier/tier.hpp"

namespace snaptier {

// Host slots in a region. Each slot announces how far it has replayed every host's log in one
// CRC-checked struct of u32 counters (seen[kCxlMaxHosts] + crc) that must fill whole 64-byte
// lines: 63 = four lines' worth of counters minus the CRC word. Raising it grows every slot and
// is a new layout version (docs/cxl-directory.md). Kept a plain literal: the testbed reads it.
inline constexpr std::uint32_t kCxlMaxHosts = 63;
inline constexpr std::size_t kCxlMaxIdLength = 63;
inline constexpr std::uint64_t kCacheLine = 64;

// An mmapped CXL region: a devdax character device (offset and length multiples of 2 MiB) or a
// regular file standing in for one. Unmapped and closed on destruction. Immutable after open(),
// so threads may share it.
class MappedRegion {
 public:
  struct Options {
    std::uint64_t offset = 0;
    std::uint64_t length = 0;  // 0 = from offset to the end of the device or file
  };
  [[nodiscard]] static Result<std::shared_ptr<MappedRegion>> open(const std::filesystem::path& path,
                                                                  Options options);
  [[nodiscard]] static Result<std::shared_ptr<MappedRegion>> open(
      const std::filesystem::path& path) {
    return open(path, Options{});
  }
  ~MappedRegion();
  MappedRegion(const MappedRegion&) = delete;
  MappedRegion& operator=(const MappedRegion&) = delete;

  [[nodiscard]] std::byte* data() const noexcept { return data_; }
  [[nodiscard]] std::uint64_t size() const noexcept { return size_; }
  [[nodiscard]] bool is_device_dax() const noexcept { return device_dax_; }

 private:
  MappedRegion(int fd, std::byte* data, std::uint64_t size, bool device_dax)
      : fd_(fd), data_(data), size_(size), device_dax_(device_dax) {}
  int fd_;
  std::byte* data_;
  std::uint64_t size_;
  bool device_dax_;
};

// How one host reaches region bytes; every implementation may be called from any number of
// threads at once (the production one is stateless, the cache model locks). Offsets are region
// offsets. Nothing here checks bounds:
// callers (the directory, the CXL tier) validate ranges before they access.
class RegionAccess {
 public:
  virtual ~RegionAccess() = default;
  [[nodiscard]] virtual std::uint64_t size() const noexcept = 0;
  virtual void load(std::uint64_t offset, std::span<std::byte> out) = 0;
  virtual void store(std::uint64_t offset, std::span<const std::byte> in) = 0;
  // Single-copy-atomic 8-byte accesses (offset 8-byte aligned): the commit word.
  [[nodiscard]] virtual std::uint64_t load_u64(std::uint64_t offset) = 0;
  virtual void store_u64(std::uint64_t offset, std::uint64_t value) = 0;
  // Push this host's dirty lines of the range to the device (clwb / clflushopt / clflush).
  virtual void writeback(std::uint64_t offset, std::uint64_t length) = 0;
  // Drop this host's cached copy of the range so the next load reads the device.
  virtual void invalidate(std::uint64_t offset, std::uint64_t length) = 0;
  // Order earlier write-backs/invalidations before later stores and loads (sfence / mfence).
  virtual void fence() = 0;
  // Invalidates the range and returns the address through which this host's plain loads see it.
  [[nodiscard]] virtual const std::byte* map_for_read(std::uint64_t offset,
                                                      std::uint64_t length) = 0;
};

// Production access: plain loads/stores on the mapping plus cache-line instructions chosen once
// at runtime from cpuid (x86: clwb > clflushopt > clflush; arm64: dc cvac/civac; else none).
[[nodiscard]] std::shared_ptr<RegionAccess> make_direct_region_access(
    std::shared_ptr<MappedRegion> region);
// "clwb", "clflushopt", "clflush", "dc-cvac" or "compiler-barrier-only".
[[nodiscard]] std::string_view cache_writeback_method() noexcept;

struct CxlFormatOptions {
  std::uint32_t host_count = 4;               // 1..kCxlMaxHosts; each gets a slot, log and arena
  std::uint32_t log_entries_per_host = 1024;  // publications + tombstones a host may ever append
  bool overwrite_existing = false;            // formatting a region with a valid superblock
};

// Where everything is, as recorded in the superblock.
struct CxlLayout {
  std::uint64_t region_size = 0;
  std::uint64_t format_id = 0;  // random per format(): tells two formats of one region apart
  std::uint32_t host_count = 0;
  std::uint32_t log_entries_per_host = 0;
  std::uint64_t slots_offset = 0;
  std::uint64_t logs_offset = 0;
  std::uint64_t log_stride = 0;  // bytes per host log
  std::uint64_t arena_offset = 0;
  std::uint64_t arena_size = 0;  // bytes per host arena

  [[nodiscard]] std::uint64_t arena_begin(std::uint32_t host) const noexcept {
    return arena_offset + std::uint64_t{host} * arena_size;
  }
};

// Explicitly (re)initialises a region: zeroes slots and logs, then writes the superblock last.
[[nodiscard]] Result<CxlLayout> format_cxl_region(RegionAccess& region,
                                                  const CxlFormatOptions& options);
// Reads and verifies the superblock. An all-zero region is Errc::not_found ("unformatted"),
// anything else that is not a valid superblock is Errc::corrupt. Never formats.
[[nodiscard]] Result<CxlLayout> read_cxl_layout(RegionAccess& region);

struct CxlAttachOptions {
  std::uint32_t host_index = 0;  // this host's slot/log/arena; unique per attached host
  std::string host_name;         // recorded in the slot; at most 35 bytes
  unsigned read_retries = 8;     // bounded retries before an entry is reported corrupt
};

enum class CxlVisibility : std::uint8_t {
  published = 1,         // every attached host finds it
  owner_only = 2,        // only records the owner's arena extents (manifest kept elsewhere)
};

struct CxlEntryInfo {
  std::string id;
  std::uint32_t owner_host = 0;
  std::string owner_name;
  std::uint64_t sequence = 0;  // 1-based position in the owner's log; doubles as the epoch
  CxlVisibility visibility = CxlVisibility::published;
  Extent record;               // region extent of the manifest record
};

struct CxlRecord {
  CxlEntryInfo entry;
  std::vector<std::byte> manifest;   // the opaque bytes given to publish()
  std::vector<Extent> owned_extents;  // arena extents that live and die with the entry
};

// Something a replay could not use; kept so lookups can say "corrupt" instead of "not found".
struct CxlProblem {
  std::uint32_t host = 0;
  std::uint64_t slot = 0;
  std::string id_hint;  // the id bytes as read, possibly damaged
  std::string reason;
};

// One per host, shared by all its threads: every member may be called concurrently (one mutex
// guards the replay state); other hosts and processes share only region bytes (the protocol).
class CxlDirectory {
 public:
  // Verifies the superblock, replays every host's log, recovers this host's arena (live entries
  // keep their extents; uncommitted space is free; tombstoned space waits for rule 7), claims the
  // slot and announces what it has seen.
  [[nodiscard]] static Result<std::shared_ptr<CxlDirectory>> attach(
      std::shared_ptr<RegionAccess> region, CxlAttachOptions options);
  ~CxlDirectory();
  CxlDirectory(const CxlDirectory&) = delete;
  CxlDirectory& operator=(const CxlDirectory&) = delete;

  [[nodiscard]] const CxlLayout& layout() const noexcept;
  [[nodiscard]] std::uint32_t host_index() const noexcept;
  [[nodiscard]] const std::string& host_name() const noexcept;
  [[nodiscard]] RegionAccess& region() const noexcept;

  // Writes `manifest` plus the list of owned extents into a record in this host's arena and
  // appends a committed log entry naming it. Owned extents must be allocated from this directory
  // and their bytes already written back.
  [[nodiscard]] Result<CxlEntryInfo> publish(std::string_view id,
                                             std::span<const std::byte> manifest,
                                             std::span<const Extent> owned_extents,
                                             CxlVisibility visibility = CxlVisibility::published);
  // Published entries of every host, plus this host's owner_only entries.
  [[nodiscard]] Result<CxlRecord> lookup(std::string_view id);
  [[nodiscard]] Result<std::vector<CxlEntryInfo>> list();
  // Appends a tombstone. Only the owner may remove; the entry's extents are reused only after
  // every attached host has announced that it replayed past the tombstone.
  [[nodiscard]] Result<void> remove(std::string_view id);
  // Replays new log entries of all hosts, announces progress, reclaims extents now safe to reuse.
  [[nodiscard]] Result<void> refresh();
  [[nodiscard]] std::vector<CxlProblem> problems() const;

  // This host's arena. release() is for extents never named by a committed entry.
  [[nodiscard]] Result<Extent> allocate(std::uint64_t length);
  [[nodiscard]] Result<void> release(Extent extent);
  [[nodiscard]] std::uint64_t arena_used_bytes() const;
  [[nodiscard]] std::uint64_t arena_pending_bytes() const;  // freed, waiting for other hosts

  // Marks the slot detached so this host no longer holds back reuse of other hosts' extents.
  [[nodiscard]] Result<void> detach();

  struct State;

 private:
  explicit CxlDirectory(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

// Calls `directory->refresh()` every `interval` on a thread of its own, so that a host that is
// idle still replays the logs and announces what it has seen: without it, the space another
// host frees stays pending (rule 7) until this host next uses the directory. A failed refresh
// is kept (last_error) and tried again at the next tick. Stops and joins when destroyed.
class CxlAnnouncer {
 public:
  CxlAnnouncer(std::shared_ptr<CxlDirectory> directory, std::chrono::milliseconds interval);
  ~CxlAnnouncer();
  CxlAnnouncer(const CxlAnnouncer&) = delete;
  CxlAnnouncer& operator=(const CxlAnnouncer&) = delete;

  [[nodiscard]] std::uint64_t refreshes() const noexcept;  // completed, successful or not
  [[nodiscard]] std::optional<Error> last_error() const;   // of the latest refresh; none if it succeeded

  struct State;

 private:
  std::unique_ptr<State> state_;
};

}  // namespace snaptier
