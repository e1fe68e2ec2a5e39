#include "store/huge_layout.hpp"

namespace snaptier::store {

namespace {
std::uint64_t align_up(std::uint64_t value, std::uint64_t to) { return (value + to - 1) / to * to; }
}  // namespace

ExtentLayout lay_out_for_huge_pages(std::span<const std::uint64_t> addresses, std::uint64_t page_size,
                                    std::uint64_t huge_size) {
  ExtentLayout layout;
  layout.positions.reserve(addresses.size());
  std::uint64_t next = 0;  // first free byte after the pages placed so far
  std::size_t k = 0;
  while (k < addresses.size()) {
    std::size_t end = k + 1;  // [k, end): consecutive addresses
    while (end < addresses.size() && addresses[end] == addresses[end - 1] + page_size) ++end;
    const std::uint64_t first = addresses[k];
    const std::uint64_t last_end = addresses[end - 1] + page_size;
    std::uint64_t at = next;
    if (align_up(first, huge_size) + huge_size <= last_end) {
      at += (first - at) % huge_size;  // the smallest position >= next congruent to `first`
      layout.aligned = true;
    }
    for (std::size_t i = k; i < end; ++i) layout.positions.push_back(at + (i - k) * page_size);
    next = at + (end - k) * page_size;
    k = end;
  }
  layout.bytes = next;
  return layout;
}

ExtentLayout lay_out_packed(std::size_t pages, std::uint64_t page_size) {
  ExtentLayout layout;
  layout.positions.reserve(pages);
  for (std::size_t i = 0; i < pages; ++i) layout.positions.push_back(i * page_size);
  layout.bytes = pages * page_size;
  return layout;
}

}  // namespace snaptier::store
