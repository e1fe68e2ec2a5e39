// The shared snapshot directory: per-host append-only logs in a non-coherent CXL region.
// Protocol and layout: docs/cxl-directory.md. Every region access goes through RegionAccess.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "cxl/crc32c.hpp"
#include "cxl/layout.hpp"
#include "snaptier/cxl_directory.hpp"
#include "tiers/extent_allocator.hpp"
#include "tiers/posix_util.hpp"

namespace snaptier {

using namespace cxl;

namespace {

template <class T>
std::span<const std::byte> bytes_of(const T& value) {
  return std::as_bytes(std::span(&value, 1));
}
template <class T>
std::span<std::byte> writable_bytes_of(T& value) {
  return std::as_writable_bytes(std::span(&value, 1));
}
template <class T>
std::uint32_t crc_before(const T& value, const std::uint32_t& crc_field) {
  const auto length = static_cast<std::size_t>(reinterpret_cast<const std::byte*>(&crc_field) -
                                               reinterpret_cast<const std::byte*>(&value));
  return crc32c(bytes_of(value).first(length));
}

using detail::round_up;

// Records are allocated in whole pages; entries carry the exact byte length.
Extent allocated_extent(Extent record) { return Extent{record.offset, round_up(record.length, 4096)}; }

std::uint64_t now_unix_ns() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

std::string bounded_string(const char* data, std::size_t capacity) {
  return std::string(data, strnlen(data, capacity));
}

// Ids are stored NUL-terminated in 64 bytes; anything printable without NUL fits.
Result<void> check_id(std::string_view id) {
  if (id.empty() || id.size() > kCxlMaxIdLength) {
    return fail(Errc::invalid_argument, "snapshot id must be 1.." + std::to_string(kCxlMaxIdLength) +
                                            " bytes, got " + std::to_string(id.size()));
  }
  for (char c : id) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7F) {
      return fail(Errc::invalid_argument, "snapshot id contains a control character");
    }
  }
  return {};
}

std::string describe_host(std::uint32_t host, const std::string& name) {
  return "host " + std::to_string(host) + (name.empty() ? "" : " (" + name + ")");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Superblock

namespace {

Result<CxlLayout> compute_layout(std::uint64_t region_size, const CxlFormatOptions& o) {
  if (o.host_count == 0 || o.host_count > kCxlMaxHosts) {
    return fail(Errc::invalid_argument, "host_count must be 1.." + std::to_string(kCxlMaxHosts));
  }
  if (o.log_entries_per_host == 0 || o.log_entries_per_host > (1u << 24)) {
    return fail(Errc::invalid_argument, "log_entries_per_host must be 1..16777216");
  }
  CxlLayout l;
  l.region_size = region_size;
  l.host_count = o.host_count;
  l.log_entries_per_host = o.log_entries_per_host;
  l.slots_offset = kSuperblockArea;
  l.logs_offset = l.slots_offset + round_up(std::uint64_t{o.host_count} * kSlotSize, 4096);
  l.log_stride = round_up(std::uint64_t{o.log_entries_per_host} * kEntrySize, 4096);
  l.arena_offset = l.logs_offset + l.log_stride * o.host_count;
  if (region_size < l.arena_offset + kMinArenaSize * o.host_count) {
    return fail(Errc::no_space, "region of " + std::to_string(region_size) +
                                    " bytes is too small for " + std::to_string(o.host_count) +
                                    " hosts with " + std::to_string(o.log_entries_per_host) +
                                    "-entry logs");
  }
  l.arena_size = (region_size - l.arena_offset) / o.host_count / 4096 * 4096;
  return l;
}

}  // namespace

Result<CxlLayout> read_cxl_layout(RegionAccess& region) {
  if (region.size() < kSuperblockArea) {
    return fail(Errc::corrupt, "CXL region is " + std::to_string(region.size()) +
                                   " bytes: too small to hold a superblock (truncated?)");
  }
  Superblock sb{};
  region.invalidate(0, sizeof sb);
  region.load(0, writable_bytes_of(sb));
  const auto raw = bytes_of(sb);
  if (std::all_of(raw.begin(), raw.end(), [](std::byte b) { return b == std::byte{0}; })) {
    return fail(Errc::not_found, "CXL region is unformatted (superblock is all zero); format it explicitly");
  }
  if (std::memcmp(sb.magic, kSuperblockMagic, sizeof sb.magic) != 0) {
    return fail(Errc::corrupt, "CXL region has no snaptier superblock (garbage or another format); "
                               "refusing to use it, format it explicitly");
  }
  if (crc_before(sb, sb.crc) != sb.crc) {
    return fail(Errc::corrupt, "CXL superblock checksum mismatch");
  }
  // Other layouts put slots and logs elsewhere: refuse them rather than misread them.
  if (sb.version < kLayoutVersion) {
    return fail(Errc::unsupported,
                "CXL region was formatted by an older agent (layout " + std::to_string(sb.version) +
                    "); reformat it (this agent reads layout " + std::to_string(kLayoutVersion) +
                    "; zero the region's first 4 KiB and start the agent that has format = true)");
  }
  if (sb.version > kLayoutVersion) {
    return fail(Errc::unsupported, "CXL region was formatted by a newer agent (layout " +
                                       std::to_string(sb.version) + "); this agent reads layout " +
                                       std::to_string(kLayoutVersion) + ": upgrade it");
  }
  if (sb.region_size > region.size()) {
    return fail(Errc::corrupt, "CXL region is truncated: superblock says " +
                                   std::to_string(sb.region_size) + " bytes, mapping has " +
                                   std::to_string(region.size()));
  }
  auto expected = compute_layout(sb.region_size, CxlFormatOptions{sb.host_count, sb.log_entries_per_host, false});
  if (!expected || expected->slots_offset != sb.slots_offset || expected->logs_offset != sb.logs_offset ||
      expected->log_stride != sb.log_stride || expected->arena_offset != sb.arena_offset ||
      expected->arena_size != sb.arena_size || sb.slot_size != kSlotSize || sb.entry_size != kEntrySize) {
    return fail(Errc::corrupt, "CXL superblock geometry is inconsistent");
  }
  expected->format_id = sb.format_id;
  return *expected;
}

Result<CxlLayout> format_cxl_region(RegionAccess& region, const CxlFormatOptions& options) {
  auto layout = compute_layout(region.size(), options);
  if (!layout) return layout;
  if (!options.overwrite_existing) {
    // A directory of another layout version holds snapshots just the same.
    auto existing = read_cxl_layout(region);
    if (existing || existing.error().code == Errc::unsupported) {
      return fail(Errc::already_exists,
                  "CXL region already holds a snaptier directory" +
                      (existing ? std::string() : " (" + existing.error().message + ")") +
                      "; set overwrite_existing to wipe it");
    }
  }
  std::random_device entropy;
  layout->format_id = (std::uint64_t{entropy()} << 32) | entropy();

  // Kill the old superblock first: a crash mid-format then leaves an unformatted region, never a
  // valid superblock over half-cleared logs.
  const std::vector<std::byte> zeros(64 * 1024);
  region.store(0, std::span(zeros).first(kSuperblockArea));
  region.writeback(0, kSuperblockArea);
  region.fence();
  for (std::uint64_t offset = layout->slots_offset; offset < layout->arena_offset; offset += zeros.size()) {
    const auto chunk = std::min<std::uint64_t>(zeros.size(), layout->arena_offset - offset);
    region.store(offset, std::span(zeros).first(chunk));
    region.writeback(offset, chunk);
  }
  region.fence();

  Superblock sb{};
  std::memcpy(sb.magic, kSuperblockMagic, sizeof sb.magic);
  sb.version = kLayoutVersion;
  sb.host_count = layout->host_count;
  sb.region_size = layout->region_size;
  sb.format_id = layout->format_id;
  sb.slots_offset = layout->slots_offset;
  sb.slot_size = kSlotSize;
  sb.log_entries_per_host = layout->log_entries_per_host;
  sb.logs_offset = layout->logs_offset;
  sb.log_stride = layout->log_stride;
  sb.entry_size = kEntrySize;
  sb.arena_offset = layout->arena_offset;
  sb.arena_size = layout->arena_size;
  sb.crc = crc_before(sb, sb.crc);
  region.store(0, bytes_of(sb));
  region.writeback(0, sizeof sb);
  region.fence();
  return layout;
}

// ---------------------------------------------------------------------------------------------
// Directory state

namespace {
struct LiveEntry {
  CxlEntryInfo info;
  std::uint32_t record_crc = 0;
};
struct PendingFree {
  Extent extent;
  std::uint64_t freed_at = 0;  // sequence of the tombstone in this host's log
};
}  // namespace

struct CxlDirectory::State {
  std::shared_ptr<RegionAccess> region;
  CxlLayout layout;
  CxlAttachOptions options;
  mutable std::mutex mutex;

  std::vector<std::uint64_t> cursor;                          // per host: next log slot to replay
  std::vector<std::map<std::string, LiveEntry>> live;         // per host: id -> live entry
  std::vector<std::string> host_names;
  std::vector<CxlProblem> problems;

  ExtentAllocator arena{0, 0};
  std::map<std::uint64_t, std::vector<Extent>> own_extents;   // live own entry seq -> extents
  std::vector<PendingFree> pending;
  std::uint64_t attach_generation = 0;
  std::vector<std::uint32_t> announced;

  std::uint32_t self() const { return options.host_index; }

  // --- entries ---------------------------------------------------------------------------

  // Reads the payload named by a non-zero commit word; re-reads both a bounded number of times
  // because the commit may be observed before the payload reaches this host on a weaker path.
  Result<EntryPayload> read_entry(std::uint32_t host, std::uint64_t slot, std::uint64_t word) {
    const std::uint64_t at = entry_offset(layout, host, slot);
    std::string reason;
    for (unsigned attempt = 0; attempt <= options.read_retries; ++attempt) {
      if (attempt > 0) {
        std::this_thread::yield();
        region->invalidate(at + kCommitOffset, kCacheLine);
        word = region->load_u64(at + kCommitOffset);
      }
      EntryPayload p{};
      region->invalidate(at, kPayloadSize);
      region->load(at, writable_bytes_of(p));
      if (p.magic != kEntryMagic) {
        reason = "bad entry magic";
      } else if (crc_before(p, p.entry_crc) != p.entry_crc) {
        reason = "entry checksum mismatch";
      } else if (word != commit_word(p.entry_crc, p.sequence)) {
        reason = "commit word does not match the entry";
      } else if (p.sequence != slot + 1 || p.owner != host) {
        reason = "entry is in the wrong log slot";
      } else if (p.kind != static_cast<std::uint8_t>(EntryKind::publish) &&
                 p.kind != static_cast<std::uint8_t>(EntryKind::tombstone)) {
        reason = "unknown entry kind";
      } else {
        return p;
      }
    }
    EntryPayload hint{};
    region->load(at, writable_bytes_of(hint));
    problems.push_back(CxlProblem{host, slot, bounded_string(hint.id, sizeof hint.id), reason});
    return fail(Errc::corrupt, describe_host(host, host_names[host]) + " log slot " +
                                   std::to_string(slot) + ": " + reason);
  }

  void apply(std::uint32_t host, const EntryPayload& p) {
    const std::string id = bounded_string(p.id, sizeof p.id);
    if (p.kind == static_cast<std::uint8_t>(EntryKind::publish)) {
      LiveEntry e;
      e.info = CxlEntryInfo{id, host, host_names[host], p.sequence,
                            static_cast<CxlVisibility>(p.visibility),
                            Extent{p.record_offset, p.record_length}};
      e.record_crc = p.record_crc;
      live[host][id] = e;
    } else {
      auto it = live[host].find(id);
      if (it != live[host].end() && it->second.info.sequence == p.target_sequence) live[host].erase(it);
    }
  }

  Result<void> replay(std::uint32_t host) {
    while (cursor[host] < layout.log_entries_per_host) {
      const std::uint64_t at = entry_offset(layout, host, cursor[host]);
      region->invalidate(at + kCommitOffset, kCacheLine);
      const std::uint64_t word = region->load_u64(at + kCommitOffset);
      if (word == 0) break;  // the end of the log (or a publication still in flight)
      auto entry = read_entry(host, cursor[host], word);
      if (entry) apply(host, *entry);
      ++cursor[host];
    }
    return {};
  }

  // --- slots -------------------------------------------------------------------------------

  std::optional<SlotIdentity> read_identity(std::uint32_t host) {
    SlotIdentity id{};
    const std::uint64_t at = slot_offset(layout, host);
    region->invalidate(at, sizeof id);
    region->load(at, writable_bytes_of(id));
    if (id.magic != kSlotMagic || crc_before(id, id.crc) != id.crc) return std::nullopt;
    return id;
  }

  void write_identity(SlotState state) {
    SlotIdentity id{};
    id.magic = kSlotMagic;
    id.state = static_cast<std::uint32_t>(state);
    id.attach_generation = attach_generation;
    id.heartbeat_unix_ns = now_unix_ns();
    std::memcpy(id.name, options.host_name.data(), options.host_name.size());
    id.crc = crc_before(id, id.crc);
    const std::uint64_t at = slot_offset(layout, self());
    region->store(at, bytes_of(id));
    region->writeback(at, sizeof id);
    region->fence();
  }

  // Rule 7: tell the owners how far this host has replayed their logs.
  void announce() {
    std::vector<std::uint32_t> seen(kCxlMaxHosts, 0);
    for (std::uint32_t h = 0; h < layout.host_count; ++h) seen[h] = static_cast<std::uint32_t>(cursor[h]);
    if (seen == announced) return;
    SlotSeen line{};
    std::copy(seen.begin(), seen.end(), line.seen);
    line.crc = crc_before(line, line.crc);
    const std::uint64_t at = seen_offset(layout, self());
    region->store(at, bytes_of(line));
    region->writeback(at, sizeof line);  // every line of it, the CRC's line included
    region->fence();
    announced = std::move(seen);
  }

  // The lowest "seen[self]" over every other attached host; a slot we cannot read is treated
  // as attached and having seen nothing (reuse waits rather than risks).
  std::uint64_t slowest_reader_of_self() {
    std::uint64_t slowest = UINT64_MAX;
    for (std::uint32_t h = 0; h < layout.host_count; ++h) {
      if (h == self()) continue;
      SlotIdentity raw{};
      region->invalidate(slot_offset(layout, h), sizeof raw);
      region->load(slot_offset(layout, h), writable_bytes_of(raw));
      const auto bytes = bytes_of(raw);
      if (std::all_of(bytes.begin(), bytes.end(), [](std::byte b) { return b == std::byte{0}; })) continue;
      auto identity = read_identity(h);
      if (identity && identity->state == static_cast<std::uint32_t>(SlotState::detached)) continue;
      const auto line = identity ? read_seen(h) : std::nullopt;
      slowest = std::min<std::uint64_t>(slowest, line ? line->seen[self()] : 0);
    }
    return slowest;
  }

  // The seen lines are loaded one after another while their host may be writing them back, so a
  // load can mix lines from before and after an announcement; the CRC over all of them catches
  // that. Bounded retries, then "not readable" (the caller then assumes nothing was seen).
  std::optional<SlotSeen> read_seen(std::uint32_t host) {
    const std::uint64_t at = seen_offset(layout, host);
    for (unsigned attempt = 0; attempt <= options.read_retries; ++attempt) {
      if (attempt > 0) std::this_thread::yield();
      SlotSeen line{};
      region->invalidate(at, sizeof line);
      region->load(at, writable_bytes_of(line));
      if (crc_before(line, line.crc) == line.crc) return line;
    }
    return std::nullopt;
  }

  void reclaim() {
    if (pending.empty()) return;
    const std::uint64_t slowest = slowest_reader_of_self();
    std::erase_if(pending, [&](const PendingFree& p) {
      if (p.freed_at > slowest) return false;
      (void)arena.release(p.extent);
      return true;
    });
  }

  void refresh_names() {
    for (std::uint32_t h = 0; h < layout.host_count; ++h) {
      if (h == self()) continue;
      if (auto identity = read_identity(h)) host_names[h] = bounded_string(identity->name, sizeof identity->name);
    }
  }

  Result<void> refresh() {
    refresh_names();
    for (std::uint32_t h = 0; h < layout.host_count; ++h) {
      if (auto ok = replay(h); !ok) return ok;
    }
    announce();
    reclaim();
    return {};
  }

  // --- records -----------------------------------------------------------------------------

  bool inside_arena(std::uint32_t host, Extent e) const {
    const std::uint64_t begin = layout.arena_begin(host);
    return e.length > 0 && e.offset >= begin && e.length <= layout.arena_size &&
           e.offset - begin <= layout.arena_size - e.length;
  }

  Result<CxlRecord> read_record(const LiveEntry& entry) {
    const CxlEntryInfo& info = entry.info;
    const std::string where = "manifest record of '" + info.id + "' (" +
                              describe_host(info.owner_host, host_names[info.owner_host]) + ")";
    if (!inside_arena(info.owner_host, info.record) || info.record.length < sizeof(RecordHeader)) {
      return fail(Errc::corrupt, where + ": extent lies outside the owner's arena");
    }
    std::vector<std::byte> bytes(info.record.length);
    bool ok = false;
    for (unsigned attempt = 0; attempt <= options.read_retries && !ok; ++attempt) {
      if (attempt > 0) std::this_thread::yield();
      region->invalidate(info.record.offset, info.record.length);
      region->load(info.record.offset, bytes);
      ok = crc32c(bytes) == entry.record_crc;
    }
    if (!ok) return fail(Errc::corrupt, where + ": checksum mismatch");
    RecordHeader header{};
    std::memcpy(&header, bytes.data(), sizeof header);
    const std::uint64_t extents_bytes = std::uint64_t{header.owned_count} * sizeof(RecordExtent);
    if (header.magic != kRecordMagic ||
        sizeof header + extents_bytes + header.manifest_length != bytes.size()) {
      return fail(Errc::corrupt, where + ": malformed header");
    }
    CxlRecord record;
    record.entry = info;
    record.owned_extents.resize(header.owned_count);
    for (std::uint32_t i = 0; i < header.owned_count; ++i) {
      RecordExtent e{};
      std::memcpy(&e, bytes.data() + sizeof header + i * sizeof e, sizeof e);
      record.owned_extents[i] = Extent{e.offset, e.length};
      if (!inside_arena(info.owner_host, record.owned_extents[i])) {
        return fail(Errc::corrupt, where + ": owned extent outside the owner's arena");
      }
    }
    const auto* manifest = bytes.data() + sizeof header + extents_bytes;
    record.manifest.assign(manifest, manifest + header.manifest_length);
    return record;
  }

  // --- own log -----------------------------------------------------------------------------

  // Rule 3: payload, write back, fence, then the commit word in its own line, write back, fence.
  Result<std::uint64_t> append(EntryPayload payload) {
    const std::uint64_t slot = cursor[self()];
    if (slot >= layout.log_entries_per_host) {
      return fail(Errc::no_space, "the log of " + describe_host(self(), options.host_name) + " is full (" +
                                      std::to_string(layout.log_entries_per_host) +
                                      " entries; compaction is not implemented)");
    }
    payload.magic = kEntryMagic;
    payload.owner = static_cast<std::uint16_t>(self());
    payload.sequence = slot + 1;
    payload.attach_generation = attach_generation;
    payload.entry_crc = crc_before(payload, payload.entry_crc);
    const std::uint64_t at = entry_offset(layout, self(), slot);
    region->store(at, bytes_of(payload));
    region->writeback(at, kPayloadSize);
    region->fence();
    region->store_u64(at + kCommitOffset, commit_word(payload.entry_crc, payload.sequence));
    region->writeback(at + kCommitOffset, kCacheLine);
    region->fence();
    ++cursor[self()];
    return payload.sequence;
  }

  Result<Extent> allocate(std::uint64_t length) {
    auto extent = arena.allocate(length);
    if (!extent && extent.error().code == Errc::no_space && !pending.empty()) {
      if (auto ok = refresh(); !ok) return tl::unexpected(ok.error());
      extent = arena.allocate(length);
    }
    return extent;
  }

  bool is_committed(Extent e) const {
    for (const auto& [seq, extents] : own_extents) {
      for (const Extent& owned : extents) {
        if (e.offset < owned.offset + owned.length && owned.offset < e.offset + e.length) return true;
      }
    }
    return false;
  }

  // Attach-time recovery of this host's arena from its own log (rule 6).
  void recover_own_arena(const std::vector<std::pair<EntryPayload, std::uint64_t>>& tombstoned) {
    for (const auto& [id, entry] : live[self()]) {
      auto record = read_record(entry);
      std::vector<Extent> extents{allocated_extent(entry.info.record)};
      if (record) {
        extents.insert(extents.end(), record->owned_extents.begin(), record->owned_extents.end());
      } else {
        problems.push_back(CxlProblem{self(), entry.info.sequence - 1, id,
                                      "own record unreadable at recovery; only its extent is kept: " +
                                          record.error().message});
      }
      std::vector<Extent> kept;
      for (const Extent& e : extents) {
        if (arena.reserve(e)) kept.push_back(e);
      }
      own_extents[entry.info.sequence] = std::move(kept);
    }
    // A tombstoned record that still verifies was not reused yet: its extents wait for rule 7
    // unless some live entry already took them (then they were reclaimed before the restart).
    for (const auto& [publication, tombstone_sequence] : tombstoned) {
      LiveEntry dead;
      dead.info = CxlEntryInfo{bounded_string(publication.id, sizeof publication.id), self(),
                               options.host_name, publication.sequence,
                               static_cast<CxlVisibility>(publication.visibility),
                               Extent{publication.record_offset, publication.record_length}};
      dead.record_crc = publication.record_crc;
      auto record = read_record(dead);
      if (!record) continue;
      std::vector<Extent> extents{allocated_extent(dead.info.record)};
      extents.insert(extents.end(), record->owned_extents.begin(), record->owned_extents.end());
      for (const Extent& e : extents) {
        if (arena.reserve(e)) pending.push_back(PendingFree{e, tombstone_sequence});
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// CxlDirectory

CxlDirectory::CxlDirectory(std::unique_ptr<State> state) : state_(std::move(state)) {}
CxlDirectory::~CxlDirectory() = default;

Result<std::shared_ptr<CxlDirectory>> CxlDirectory::attach(std::shared_ptr<RegionAccess> region,
                                                           CxlAttachOptions options) {
  if (!region) return fail(Errc::invalid_argument, "attach: no region");
  if (options.host_name.empty() || options.host_name.size() > kMaxHostNameLength) {
    return fail(Errc::invalid_argument, "host name must be 1.." + std::to_string(kMaxHostNameLength) + " bytes");
  }
  auto layout = read_cxl_layout(*region);
  if (!layout) return tl::unexpected(layout.error());
  if (options.host_index >= layout->host_count) {
    return fail(Errc::invalid_argument, "host index " + std::to_string(options.host_index) +
                                            " but the region is formatted for " +
                                            std::to_string(layout->host_count) + " hosts");
  }

  auto state = std::make_unique<State>();
  State& s = *state;
  s.region = std::move(region);
  s.layout = *layout;
  s.options = std::move(options);
  s.cursor.assign(s.layout.host_count, 0);
  s.live.resize(s.layout.host_count);
  s.host_names.resize(s.layout.host_count);
  s.host_names[s.self()] = s.options.host_name;
  s.arena = ExtentAllocator(s.layout.arena_begin(s.self()), s.layout.arena_size);

  if (auto previous = s.read_identity(s.self())) {
    const std::string holder = bounded_string(previous->name, sizeof previous->name);
    if (previous->state == static_cast<std::uint32_t>(SlotState::attached) && holder != s.options.host_name) {
      return fail(Errc::already_exists, "host index " + std::to_string(s.self()) + " is held by '" +
                                            holder + "'");
    }
    s.attach_generation = previous->attach_generation + 1;
  } else {
    s.attach_generation = 1;
  }

  // Replay this host's own log first, noting which publications were later tombstoned.
  s.refresh_names();
  std::vector<std::pair<EntryPayload, std::uint64_t>> tombstoned;
  {
    std::map<std::uint64_t, EntryPayload> publications;
    auto& cursor = s.cursor[s.self()];
    while (cursor < s.layout.log_entries_per_host) {
      const std::uint64_t at = entry_offset(s.layout, s.self(), cursor);
      s.region->invalidate(at + kCommitOffset, kCacheLine);
      const std::uint64_t word = s.region->load_u64(at + kCommitOffset);
      if (word == 0) break;
      auto entry = s.read_entry(s.self(), cursor, word);
      if (entry) {
        if (entry->kind == static_cast<std::uint8_t>(EntryKind::publish)) {
          publications[entry->sequence] = *entry;
        } else if (auto it = publications.find(entry->target_sequence); it != publications.end()) {
          tombstoned.emplace_back(it->second, entry->sequence);
        }
        s.apply(s.self(), *entry);
      }
      ++cursor;
    }
  }
  s.recover_own_arena(tombstoned);
  s.write_identity(SlotState::attached);
  if (auto ok = s.refresh(); !ok) return tl::unexpected(ok.error());
  return std::shared_ptr<CxlDirectory>(new CxlDirectory(std::move(state)));
}

const CxlLayout& CxlDirectory::layout() const noexcept { return state_->layout; }
std::uint32_t CxlDirectory::host_index() const noexcept { return state_->self(); }
const std::string& CxlDirectory::host_name() const noexcept { return state_->options.host_name; }
RegionAccess& CxlDirectory::region() const noexcept { return *state_->region; }

Result<CxlEntryInfo> CxlDirectory::publish(std::string_view id, std::span<const std::byte> manifest,
                                           std::span<const Extent> owned_extents,
                                           CxlVisibility visibility) {
  State& s = *state_;
  std::lock_guard lock(s.mutex);
  if (auto ok = check_id(id); !ok) return tl::unexpected(ok.error());
  if (visibility != CxlVisibility::published && visibility != CxlVisibility::owner_only) {
    return fail(Errc::invalid_argument, "publish: unknown visibility");
  }
  if (auto ok = s.refresh(); !ok) return tl::unexpected(ok.error());
  const std::string key(id);
  if (s.live[s.self()].contains(key)) {
    return fail(Errc::already_exists, "snapshot '" + key + "' is already in this host's log");
  }
  if (visibility == CxlVisibility::published) {
    for (std::uint32_t h = 0; h < s.layout.host_count; ++h) {
      auto it = s.live[h].find(key);
      if (it != s.live[h].end() && it->second.info.visibility == CxlVisibility::published) {
        return fail(Errc::already_exists, "snapshot '" + key + "' is already published by " +
                                              describe_host(h, s.host_names[h]));
      }
    }
  }
  for (const Extent& e : owned_extents) {
    if (!s.arena.is_allocated(e) || s.is_committed(e)) {
      return fail(Errc::invalid_argument, "publish '" + key + "': extent {" + std::to_string(e.offset) +
                                              ", " + std::to_string(e.length) +
                                              "} is not an unpublished allocation of this host's arena");
    }
  }
  if (s.cursor[s.self()] >= s.layout.log_entries_per_host) {
    return fail(Errc::no_space, "the log of this host is full");
  }

  // The record: header, owned extents, manifest; written back before the entry names it.
  RecordHeader header{};
  header.magic = kRecordMagic;
  header.owned_count = static_cast<std::uint32_t>(owned_extents.size());
  header.manifest_length = manifest.size();
  std::vector<std::byte> record(sizeof header + owned_extents.size() * sizeof(RecordExtent) + manifest.size());
  std::memcpy(record.data(), &header, sizeof header);
  for (std::size_t i = 0; i < owned_extents.size(); ++i) {
    const RecordExtent e{owned_extents[i].offset, owned_extents[i].length};
    std::memcpy(record.data() + sizeof header + i * sizeof e, &e, sizeof e);
  }
  if (!manifest.empty()) {
    std::memcpy(record.data() + sizeof header + owned_extents.size() * sizeof(RecordExtent),
                manifest.data(), manifest.size());
  }
  auto extent = s.allocate(record.size());
  if (!extent) return tl::unexpected(extent.error());
  s.region->store(extent->offset, record);
  s.region->writeback(extent->offset, record.size());
  // (the fence inside append() orders this write-back, and the owned extents' write-backs done
  // by the tier, before the commit word)

  EntryPayload payload{};
  std::memcpy(payload.id, key.data(), key.size());
  payload.kind = static_cast<std::uint8_t>(EntryKind::publish);
  payload.visibility = static_cast<std::uint8_t>(visibility);
  payload.record_offset = extent->offset;
  payload.record_length = record.size();
  payload.record_crc = crc32c(record);
  auto sequence = s.append(payload);
  if (!sequence) {
    (void)s.arena.release(*extent);
    return tl::unexpected(sequence.error());
  }

  std::vector<Extent> extents{*extent};
  extents.insert(extents.end(), owned_extents.begin(), owned_extents.end());
  s.own_extents[*sequence] = std::move(extents);
  LiveEntry entry;
  entry.info = CxlEntryInfo{key, s.self(), s.options.host_name, *sequence, visibility,
                            Extent{extent->offset, record.size()}};
  entry.record_crc = payload.record_crc;
  s.live[s.self()][key] = entry;
  return entry.info;
}

Result<CxlRecord> CxlDirectory::lookup(std::string_view id) {
  State& s = *state_;
  std::lock_guard lock(s.mutex);
  if (auto ok = check_id(id); !ok) return tl::unexpected(ok.error());
  if (auto ok = s.refresh(); !ok) return tl::unexpected(ok.error());
  const std::string key(id);
  // Concurrent publications of one id by two hosts cannot be prevented without shared atomics;
  // every host resolves them the same way: the lowest host index wins.
  for (std::uint32_t h = 0; h < s.layout.host_count; ++h) {
    auto it = s.live[h].find(key);
    if (it == s.live[h].end()) continue;
    if (it->second.info.visibility == CxlVisibility::published || h == s.self()) {
      return s.read_record(it->second);
    }
  }
  for (const CxlProblem& p : s.problems) {
    if (p.id_hint == key) {
      return fail(Errc::corrupt, "snapshot '" + key + "': its log entry (" +
                                     describe_host(p.host, s.host_names[p.host]) + ", slot " +
                                     std::to_string(p.slot) + ") is unreadable: " + p.reason);
    }
  }
  return fail(Errc::not_found, "snapshot '" + key + "' is not in the CXL directory");
}

Result<std::vector<CxlEntryInfo>> CxlDirectory::list() {
  State& s = *state_;
  std::lock_guard lock(s.mutex);
  if (auto ok = s.refresh(); !ok) return tl::unexpected(ok.error());
  std::map<std::string, CxlEntryInfo> winners;
  for (std::uint32_t h = 0; h < s.layout.host_count; ++h) {
    for (const auto& [id, entry] : s.live[h]) {
      if (entry.info.visibility != CxlVisibility::published && h != s.self()) continue;
      CxlEntryInfo info = entry.info;
      info.owner_name = s.host_names[h];
      winners.try_emplace(id, std::move(info));
    }
  }
  std::vector<CxlEntryInfo> out;
  for (auto& [id, info] : winners) out.push_back(std::move(info));
  return out;
}

Result<void> CxlDirectory::remove(std::string_view id) {
  State& s = *state_;
  std::lock_guard lock(s.mutex);
  if (auto ok = check_id(id); !ok) return ok;
  if (auto ok = s.refresh(); !ok) return ok;
  const std::string key(id);
  auto it = s.live[s.self()].find(key);
  if (it == s.live[s.self()].end()) {
    for (std::uint32_t h = 0; h < s.layout.host_count; ++h) {
      auto other = s.live[h].find(key);
      if (other != s.live[h].end() && other->second.info.visibility == CxlVisibility::published) {
        return fail(Errc::permission_denied, "snapshot '" + key + "' is owned by " +
                                                 describe_host(h, s.host_names[h]) +
                                                 "; only its owner may delete it");
      }
    }
    return fail(Errc::not_found, "snapshot '" + key + "' is not in the CXL directory");
  }
  EntryPayload tombstone{};
  std::memcpy(tombstone.id, key.data(), key.size());
  tombstone.kind = static_cast<std::uint8_t>(EntryKind::tombstone);
  tombstone.visibility = static_cast<std::uint8_t>(it->second.info.visibility);
  tombstone.target_sequence = it->second.info.sequence;
  auto sequence = s.append(tombstone);
  if (!sequence) return tl::unexpected(sequence.error());

  auto owned = s.own_extents.find(it->second.info.sequence);
  if (owned != s.own_extents.end()) {
    for (const Extent& e : owned->second) s.pending.push_back(PendingFree{e, *sequence});
    s.own_extents.erase(owned);
  }
  s.live[s.self()].erase(it);
  s.reclaim();
  return {};
}

Result<void> CxlDirectory::refresh() {
  std::lock_guard lock(state_->mutex);
  return state_->refresh();
}

std::vector<CxlProblem> CxlDirectory::problems() const {
  std::lock_guard lock(state_->mutex);
  return state_->problems;
}

Result<Extent> CxlDirectory::allocate(std::uint64_t length) {
  std::lock_guard lock(state_->mutex);
  return state_->allocate(length);
}

Result<void> CxlDirectory::release(Extent extent) {
  std::lock_guard lock(state_->mutex);
  if (state_->is_committed(extent)) {
    return fail(Errc::invalid_argument, "release: extent is named by a committed entry; remove the entry");
  }
  return state_->arena.release(extent);
}

std::uint64_t CxlDirectory::arena_used_bytes() const {
  std::lock_guard lock(state_->mutex);
  return state_->arena.used_bytes();
}

std::uint64_t CxlDirectory::arena_pending_bytes() const {
  std::lock_guard lock(state_->mutex);
  std::uint64_t total = 0;
  for (const auto& p : state_->pending) total += p.extent.length;
  return total;
}

Result<void> CxlDirectory::detach() {
  std::lock_guard lock(state_->mutex);
  state_->write_identity(SlotState::detached);
  return {};
}

}  // namespace snaptier
