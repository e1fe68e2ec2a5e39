// Where the store puts pages that processes map in place: long runs congruent to their
// addresses modulo 2 MiB (so a private mapping can take huge pages), everything else packed.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "store/huge_layout.hpp"

namespace snaptier::store {
namespace {

constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kHuge = kHugePageSize;

std::vector<std::uint64_t> run(std::uint64_t first, std::size_t pages) {
  std::vector<std::uint64_t> out;
  for (std::size_t i = 0; i < pages; ++i) out.push_back(first + i * kPage);
  return out;
}

std::vector<std::uint64_t> join(std::vector<std::uint64_t> a, const std::vector<std::uint64_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

void expect_ordered_and_disjoint(const ExtentLayout& layout) {
  for (std::size_t i = 1; i < layout.positions.size(); ++i) {
    EXPECT_GE(layout.positions[i], layout.positions[i - 1] + kPage) << "page " << i;
  }
  if (!layout.positions.empty()) EXPECT_EQ(layout.bytes, layout.positions.back() + kPage);
}

TEST(HugeLayout, ARunHoldingAnAlignedBlockSitsAtItsAddressModuloTwoMiB) {
  const auto addresses = run(0x7f0000003000ull, 1100);  // 3 pages past a boundary: holds one whole block
  const ExtentLayout layout = lay_out_for_huge_pages(addresses, kPage);
  ASSERT_EQ(layout.positions.size(), addresses.size());
  EXPECT_TRUE(layout.aligned);
  for (std::size_t i = 0; i < addresses.size(); ++i) {
    ASSERT_EQ(layout.positions[i] % kHuge, addresses[i] % kHuge) << "page " << i;
  }
  expect_ordered_and_disjoint(layout);
  EXPECT_LT(layout.bytes, addresses.size() * kPage + kHuge);  // at most one block of padding
}

TEST(HugeLayout, ShortRunsArePackedAndNeedNoAlignment) {
  // 500 pages can hold no whole aligned block unless they start on one; neither of these does.
  const auto addresses = join(run(0x7f0000001000ull, 500), run(0x7f4000010000ull, 7));
  const ExtentLayout layout = lay_out_for_huge_pages(addresses, kPage);
  EXPECT_FALSE(layout.aligned);
  EXPECT_EQ(layout.bytes, addresses.size() * kPage);
  for (std::size_t i = 0; i < addresses.size(); ++i) EXPECT_EQ(layout.positions[i], i * kPage);
  EXPECT_EQ(lay_out_packed(addresses.size(), kPage).positions, layout.positions);
}

TEST(HugeLayout, AHoleInALongRunKeepsThePagesAfterItCongruent) {
  // A zero page (never stored) splits one region into two runs, each holding whole blocks.
  const auto addresses = join(run(0x7f0000000000ull, 700), run(0x7f0000000000ull + 701 * kPage, 900));
  const ExtentLayout layout = lay_out_for_huge_pages(addresses, kPage);
  for (std::size_t i = 0; i < addresses.size(); ++i) ASSERT_EQ(layout.positions[i] % kHuge, addresses[i] % kHuge);
  expect_ordered_and_disjoint(layout);
  EXPECT_EQ(layout.bytes, (addresses.size() + 1) * kPage);  // the hole's slot, nothing more
}

TEST(HugeLayout, RunsOfSeveralRegionsEachStartWhereTheirAddressesSay) {
  const auto addresses = join(join(run(0x7f0000000000ull, 3), run(0x7f1000123000ull, 1200)), run(0x55550000f000ull, 1200));
  const ExtentLayout layout = lay_out_for_huge_pages(addresses, kPage);
  expect_ordered_and_disjoint(layout);
  for (std::size_t i = 3; i < 1203; ++i) ASSERT_EQ(layout.positions[i] % kHuge, addresses[i] % kHuge);
  for (std::size_t i = 1203; i < addresses.size(); ++i) ASSERT_EQ(layout.positions[i] % kHuge, addresses[i] % kHuge);
  EXPECT_EQ(layout.positions[0], 0u);
  EXPECT_LT(layout.bytes, addresses.size() * kPage + 2 * kHuge);
}

TEST(HugeLayout, NothingToLayOut) {
  const ExtentLayout layout = lay_out_for_huge_pages({}, kPage);
  EXPECT_TRUE(layout.positions.empty());
  EXPECT_EQ(layout.bytes, 0u);
  EXPECT_FALSE(layout.aligned);
}

}  // namespace
}  // namespace snaptier::store
