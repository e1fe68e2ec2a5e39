// The bytes of a snaptier CXL region (docs/cxl-directory.md has the picture). Every struct is a
// whole number of 64-byte lines and every line has exactly one writer host (coherence rule 1).
#pragma once

#include <cstddef>
#include <cstdint>

#include "snaptier/cxl_directory.hpp"

namespace snaptier::cxl {

inline constexpr char kSuperblockMagic[8] = {'S', 'N', 'A', 'P', 'C', 'X', 'L', '1'};
// 1: 15 hosts, 128-byte slots (one seen line). 2: 63 hosts, 320-byte slots (four seen lines).
inline constexpr std::uint32_t kLayoutVersion = 2;
inline constexpr std::uint32_t kSlotMagic = 0x534C4F54;    // "SLOT"
inline constexpr std::uint32_t kEntryMagic = 0x454E5452;   // "ENTR"
inline constexpr std::uint32_t kRecordMagic = 0x53524543;  // "SREC"

inline constexpr std::uint64_t kSuperblockArea = 4096;
inline constexpr std::uint64_t kEntrySize = 192;      // two payload lines + commit line
inline constexpr std::uint64_t kPayloadSize = 128;
inline constexpr std::uint64_t kCommitOffset = 128;   // commit line inside an entry
inline constexpr std::uint64_t kMinArenaSize = 64 * 1024;
inline constexpr std::size_t kMaxHostNameLength = 35;

// Written once by format(); read by everybody.
struct Superblock {
  char magic[8];
  std::uint32_t version;
  std::uint32_t host_count;
  std::uint64_t region_size;
  std::uint64_t format_id;
  std::uint64_t slots_offset;
  std::uint32_t slot_size;
  std::uint32_t log_entries_per_host;
  std::uint64_t logs_offset;
  std::uint64_t log_stride;
  std::uint32_t entry_size;
  std::uint32_t reserved0;
  std::uint64_t arena_offset;
  std::uint64_t arena_size;
  std::uint8_t reserved[36];
  std::uint32_t crc;  // CRC32C of every byte before it
};
static_assert(sizeof(Superblock) == 128);

enum class SlotState : std::uint32_t { attached = 1, detached = 2 };

// Line 0 of a host slot: who holds the slot. Written only by that host.
struct SlotIdentity {
  std::uint32_t magic;
  std::uint32_t state;
  std::uint64_t attach_generation;
  std::uint64_t heartbeat_unix_ns;
  char name[36];
  std::uint32_t crc;
};
static_assert(sizeof(SlotIdentity) == 64);

// Lines 1.. of a host slot: seen[h] = how many entries of host h's log this host has replayed,
// i.e. "moved past" every epoch (= sequence) up to it. Written only by the slot's host, so every
// line still has one writer; it spans several lines, so a reader can catch some lines before and
// some after an update: the CRC over the whole struct tells (docs/cxl-directory.md).
struct SlotSeen {
  std::uint32_t seen[kCxlMaxHosts];
  std::uint32_t crc;
};
static_assert(sizeof(SlotSeen) % kCacheLine == 0, "kCxlMaxHosts + 1 counters must fill whole lines");

inline constexpr std::uint64_t kSeenOffset = sizeof(SlotIdentity);  // inside a slot
inline constexpr std::uint64_t kSlotSize = sizeof(SlotIdentity) + sizeof(SlotSeen);
static_assert(kSlotSize == 320);

enum class EntryKind : std::uint8_t { publish = 1, tombstone = 2 };

// Lines 0-1 of a log entry. Immutable once its commit word is written.
struct EntryPayload {
  char id[64];  // NUL-terminated, at most kCxlMaxIdLength bytes
  std::uint32_t magic;
  std::uint16_t owner;
  std::uint8_t kind;
  std::uint8_t visibility;
  std::uint64_t sequence;         // slot index + 1: the entry's epoch in its owner's log
  std::uint64_t target_sequence;  // tombstones: the publication they end
  std::uint64_t attach_generation;
  std::uint64_t record_offset;
  std::uint64_t record_length;
  std::uint32_t record_crc;
  std::uint32_t entry_crc;  // CRC32C of every byte before it
  std::uint8_t reserved[8];
};
static_assert(sizeof(EntryPayload) == kPayloadSize);

// The commit word: zero = nothing committed; else (entry_crc << 32) | sequence. A single aligned
// 8-byte store, so a reader sees either nothing or all of it.
[[nodiscard]] constexpr std::uint64_t commit_word(std::uint32_t entry_crc, std::uint64_t sequence) {
  return (std::uint64_t{entry_crc} << 32) | (sequence & 0xFFFFFFFFu);
}

// Start of a manifest record in the owner's arena; followed by owned extents, then the manifest.
struct RecordHeader {
  std::uint32_t magic;
  std::uint32_t owned_count;
  std::uint64_t manifest_length;
  std::uint64_t reserved[2];
};
static_assert(sizeof(RecordHeader) == 32);

struct RecordExtent {
  std::uint64_t offset;
  std::uint64_t length;
};

[[nodiscard]] inline std::uint64_t slot_offset(const CxlLayout& l, std::uint32_t host) {
  return l.slots_offset + host * kSlotSize;
}
[[nodiscard]] inline std::uint64_t seen_offset(const CxlLayout& l, std::uint32_t host) {
  return slot_offset(l, host) + kSeenOffset;
}
[[nodiscard]] inline std::uint64_t entry_offset(const CxlLayout& l, std::uint32_t host,
                                                std::uint64_t slot) {
  return l.logs_offset + host * l.log_stride + slot * kEntrySize;
}

}  // namespace snaptier::cxl
