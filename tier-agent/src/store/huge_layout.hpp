// Where one snapshot's pages go inside a tier extent that processes map in place (CXL): in order,
// except that a page of a run of consecutive addresses long enough to hold a whole 2 MiB-aligned
// block lands at a position congruent to its address modulo 2 MiB. A private mapping of the
// tier's file at those addresses can then take whole huge pages where the file has them (a
// shmem file with huge pages: one fault maps 512 pages instead of fault-around's 16; a 150 MiB
// first touch measured natively at 0.6 ms against 23-49 ms). Runs too short to hold a block stay
// packed, so small snapshots take no more room than before.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace snaptier::store {

inline constexpr std::uint64_t kHugePageSize = 2ull << 20;

struct ExtentLayout {
  std::vector<std::uint64_t> positions;  // byte offset of each page from a kHugePageSize-aligned origin
  std::uint64_t bytes = 0;               // from the origin to the end of the last page
  bool aligned = false;                  // some position was padded: the origin must be aligned
};

// `addresses`: the pages' addresses in the order they are stored (each a multiple of
// `page_size`). Positions never go backwards and never overlap.
[[nodiscard]] ExtentLayout lay_out_for_huge_pages(std::span<const std::uint64_t> addresses, std::uint64_t page_size,
                                                  std::uint64_t huge_size = kHugePageSize);

// The consecutive layout (tiers nobody maps).
[[nodiscard]] ExtentLayout lay_out_packed(std::size_t pages, std::uint64_t page_size);

}  // namespace snaptier::store
