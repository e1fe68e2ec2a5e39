// Tier backends (local, file, cxl) and the extent allocator they share.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "helpers/temp_dir.hpp"
#include "snaptier/cxl_directory.hpp"
#include "snaptier/tiers.hpp"
#include "tiers/extent_allocator.hpp"

namespace snaptier {
namespace {

std::vector<std::byte> pattern(std::size_t size, unsigned seed) {
  std::vector<std::byte> bytes(size);
  for (std::size_t i = 0; i < size; ++i) bytes[i] = static_cast<std::byte>((i * 131 + seed * 7 + (i >> 12)) & 0xFF);
  return bytes;
}

// ----- TierKind names -------------------------------------------------------------------------

TEST(TierKindTest, NamesRoundTripAndUnknownIsAnError) {
  for (TierKind k : {TierKind::local, TierKind::file, TierKind::cxl, TierKind::rdma}) {
    auto parsed = tier_kind_from_string(to_string(k));
    ASSERT_TRUE(parsed) << parsed.error().what();
    EXPECT_EQ(*parsed, k);
  }
  auto bad = tier_kind_from_string("dram");
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::invalid_argument);
  EXPECT_NE(bad.error().message.find("dram"), std::string::npos);
}

// ----- ExtentAllocator ------------------------------------------------------------------------

TEST(ExtentAllocatorTest, FirstFitAlignsAndRoundsUp) {
  ExtentAllocator a(1 << 20, 64 * 4096);
  auto first = a.allocate(100);
  ASSERT_TRUE(first);
  EXPECT_EQ(*first, (Extent{1 << 20, 4096}));
  auto second = a.allocate(4097);
  ASSERT_TRUE(second);
  EXPECT_EQ(*second, (Extent{(1 << 20) + 4096, 8192}));
  EXPECT_EQ(a.used_bytes(), 3 * 4096u);
  // Freeing the first leaves a one-page hole that first-fit reuses for a one-page request.
  ASSERT_TRUE(a.release(*first));
  auto third = a.allocate(1);
  ASSERT_TRUE(third);
  EXPECT_EQ(third->offset, first->offset);
}

TEST(ExtentAllocatorTest, CoalescesNeighboursBackIntoOneFreeRange) {
  ExtentAllocator a(0, 8 * 4096);
  std::vector<Extent> e;
  for (int i = 0; i < 4; ++i) e.push_back(*a.allocate(2 * 4096));
  EXPECT_FALSE(a.allocate(4096));  // full
  // Free in an order that needs merging with the previous, the next, and both.
  ASSERT_TRUE(a.release(e[0]));
  ASSERT_TRUE(a.release(e[2]));
  ASSERT_TRUE(a.release(e[1]));
  ASSERT_TRUE(a.release(e[3]));
  EXPECT_EQ(a.free_fragments(), 1u);
  EXPECT_EQ(a.used_bytes(), 0u);
  auto whole = a.allocate(8 * 4096);
  ASSERT_TRUE(whole);
  EXPECT_EQ(*whole, (Extent{0, 8 * 4096}));
}

TEST(ExtentAllocatorTest, OutOfSpaceFragmentationAndBadReleases) {
  ExtentAllocator a(0, 4 * 4096);
  auto x = *a.allocate(4096), y = *a.allocate(4096), z = *a.allocate(4096);
  ASSERT_TRUE(a.release(x));
  ASSERT_TRUE(a.release(z));
  auto big = a.allocate(3 * 4096);  // 3 pages free, but no 3-page hole
  ASSERT_FALSE(big);
  EXPECT_EQ(big.error().code, Errc::no_space);
  EXPECT_EQ(a.allocate(0).error().code, Errc::invalid_argument);
  EXPECT_EQ(a.release(x).error().code, Errc::invalid_argument);                  // double free
  EXPECT_EQ(a.release(Extent{y.offset, 8192}).error().code, Errc::invalid_argument);  // wrong length
  EXPECT_TRUE(a.is_allocated(y));
}

TEST(ExtentAllocatorTest, ReserveTakesExactlyTheNamedRange) {
  ExtentAllocator a(0, 8 * 4096);
  ASSERT_TRUE(a.reserve(Extent{2 * 4096, 2 * 4096}));
  EXPECT_EQ(a.reserve(Extent{3 * 4096, 4096}).error().code, Errc::already_exists);
  EXPECT_EQ(a.reserve(Extent{100, 4096}).error().code, Errc::invalid_argument);
  auto first = a.allocate(3 * 4096);  // the 2-page hole before the reservation is skipped
  ASSERT_TRUE(first);
  EXPECT_EQ(first->offset, 4 * 4096u);
  ASSERT_TRUE(a.release(Extent{2 * 4096, 2 * 4096}));
}

// ----- behaviour every tier must have ------------------------------------------------------------

void expect_round_trip_bounds_and_stats(Tier& tier) {
  const TierStats before = tier.stats();
  auto extent = tier.allocate(3 * 4096);
  ASSERT_TRUE(extent) << extent.error().what();
  EXPECT_GE(extent->length, 3 * 4096u);
  const auto data = pattern(3 * 4096, 1);
  ASSERT_TRUE(tier.write(*extent, 0, data));
  const auto patch = pattern(100, 9);
  ASSERT_TRUE(tier.write(*extent, 5000, patch));

  std::vector<std::byte> out(3 * 4096);
  ASSERT_TRUE(tier.read(*extent, 0, out));
  auto expected = data;
  std::memcpy(expected.data() + 5000, patch.data(), patch.size());
  EXPECT_EQ(out, expected);
  // A page inside the extent, addressed the way the store addresses pages.
  std::vector<std::byte> page(4096);
  ASSERT_TRUE(tier.read(Extent{extent->offset + 4096, 4096}, 0, page));
  EXPECT_EQ(0, std::memcmp(page.data(), expected.data() + 4096, 4096));

  // Out of range is an error, never a crash or a silent short read.
  std::vector<std::byte> one(1);
  EXPECT_EQ(tier.read(*extent, extent->length, one).error().code, Errc::invalid_argument);
  EXPECT_EQ(tier.read(*extent, extent->length - 10, std::span(out).first(11)).error().code,
            Errc::invalid_argument);
  EXPECT_EQ(tier.write(*extent, UINT64_MAX - 2, one).error().code, Errc::invalid_argument);
  EXPECT_FALSE(tier.read(Extent{UINT64_MAX - 4096, 4096}, 0, one));

  const TierStats after = tier.stats();
  EXPECT_EQ(after.used_bytes, before.used_bytes + extent->length);
  EXPECT_EQ(after.writes, before.writes + 2);
  EXPECT_EQ(after.reads, before.reads + 2);
  EXPECT_EQ(after.bytes_written, before.bytes_written + data.size() + patch.size());
  EXPECT_EQ(after.bytes_read, before.bytes_read + out.size() + page.size());

  ASSERT_TRUE(tier.release(*extent));
  EXPECT_EQ(tier.stats().used_bytes, before.used_bytes);
  EXPECT_FALSE(tier.release(*extent));  // double release
}

void expect_out_of_space(Tier& tier) {
  const std::uint64_t capacity = tier.stats().capacity_bytes;
  auto too_big = tier.allocate(capacity + 4096);
  ASSERT_FALSE(too_big);
  EXPECT_EQ(too_big.error().code, Errc::no_space);
  auto most = tier.allocate(capacity - tier.stats().used_bytes);
  ASSERT_TRUE(most) << most.error().what();
  auto one_more = tier.allocate(4096);
  ASSERT_FALSE(one_more);
  EXPECT_EQ(one_more.error().code, Errc::no_space);
  ASSERT_TRUE(tier.release(*most));
  EXPECT_TRUE(tier.allocate(4096));
}

TEST(LocalTierTest, RoundTripBoundsStatsAndInPlaceMap) {
  auto tier = make_local_tier(1 << 20);
  ASSERT_TRUE(tier) << tier.error().what();
  EXPECT_EQ((*tier)->kind(), TierKind::local);
  EXPECT_TRUE((*tier)->caps().byte_addressable);
  EXPECT_FALSE((*tier)->caps().shared);
  EXPECT_EQ((*tier)->stats().capacity_bytes, 1u << 20);
  expect_round_trip_bounds_and_stats(**tier);

  auto extent = *(*tier)->allocate(4096);
  const auto data = pattern(4096, 3);
  ASSERT_TRUE((*tier)->write(extent, 0, data));
  const std::byte* mapped = (*tier)->map(extent);
  ASSERT_NE(mapped, nullptr);
  EXPECT_EQ(0, std::memcmp(mapped, data.data(), data.size()));
  EXPECT_EQ((*tier)->map(Extent{1 << 20, 4096}), nullptr);
}

TEST(LocalTierTest, OutOfSpace) {
  auto tier = make_local_tier(16 * 4096);
  ASSERT_TRUE(tier);
  expect_out_of_space(**tier);
  EXPECT_EQ(make_local_tier(0).error().code, Errc::invalid_argument);
}

TEST(FileTierTest, RoundTripBoundsStatsAndNoMap) {
  testing::TempDir dir;
  auto tier = make_file_tier(dir.path() / "tier", 1 << 20);
  ASSERT_TRUE(tier) << tier.error().what();
  EXPECT_FALSE((*tier)->caps().byte_addressable);
  EXPECT_TRUE((*tier)->caps().persistent);
  expect_round_trip_bounds_and_stats(**tier);
  auto extent = *(*tier)->allocate(4096);
  EXPECT_EQ((*tier)->map(extent), nullptr);
}

TEST(FileTierTest, OutOfSpace) {
  testing::TempDir dir;
  auto tier = make_file_tier(dir.path(), 16 * 4096);
  ASSERT_TRUE(tier);
  expect_out_of_space(**tier);
}

TEST(FileTierTest, ExtentsAndDataSurviveReopen) {
  testing::TempDir dir;
  Extent kept;
  const auto data = pattern(2 * 4096, 5);
  {
    auto tier = make_file_tier(dir.path(), 1 << 20);
    ASSERT_TRUE(tier);
    auto dropped = *(*tier)->allocate(4096);
    kept = *(*tier)->allocate(2 * 4096);
    ASSERT_TRUE((*tier)->write(kept, 0, data));
    ASSERT_TRUE((*tier)->release(dropped));
  }
  auto tier = make_file_tier(dir.path(), 1 << 20);
  ASSERT_TRUE(tier);
  EXPECT_EQ((*tier)->stats().used_bytes, kept.length);
  std::vector<std::byte> out(data.size());
  ASSERT_TRUE((*tier)->read(kept, 0, out));
  EXPECT_EQ(out, data);
  // New extents never collide with the surviving one.
  auto fresh = (*tier)->allocate(4096);
  ASSERT_TRUE(fresh);
  EXPECT_NE(fresh->offset, kept.offset);
  ASSERT_TRUE((*tier)->write(*fresh, 0, pattern(4096, 6)));
  ASSERT_TRUE((*tier)->read(kept, 0, out));
  EXPECT_EQ(out, data);
}

// ----- CXL tier ----------------------------------------------------------------------------

struct CxlFixture {
  testing::TempDir dir;
  std::shared_ptr<CxlDirectory> directory;

  explicit CxlFixture(std::uint64_t size = 8 << 20, std::uint32_t hosts = 2) {
    auto path = testing::make_region_file(dir.path(), size);
    auto region = MappedRegion::open(path);
    EXPECT_TRUE(region) << region.error().what();
    auto access = make_direct_region_access(*region);
    auto layout = format_cxl_region(*access, CxlFormatOptions{.host_count = hosts, .log_entries_per_host = 64});
    EXPECT_TRUE(layout) << layout.error().what();
    auto attached = CxlDirectory::attach(access, CxlAttachOptions{.host_index = 1, .host_name = "hostB"});
    EXPECT_TRUE(attached) << attached.error().what();
    directory = *attached;
  }
};

TEST(CxlTierTest, RoundTripBoundsStatsInOwnArena) {
  CxlFixture fx;
  auto tier = make_cxl_tier(fx.directory);
  ASSERT_TRUE(tier) << tier.error().what();
  const TierCaps caps = (*tier)->caps();
  EXPECT_TRUE(caps.byte_addressable && caps.shared && caps.persistent);
  EXPECT_FALSE(caps.remote);
  EXPECT_EQ((*tier)->stats().capacity_bytes, fx.directory->layout().arena_size);
  expect_round_trip_bounds_and_stats(**tier);

  auto extent = (*tier)->allocate(2 * 4096);
  ASSERT_TRUE(extent);
  const auto& layout = fx.directory->layout();
  EXPECT_GE(extent->offset, layout.arena_begin(1));
  EXPECT_LE(extent->offset + extent->length, layout.arena_begin(1) + layout.arena_size);
  const auto data = pattern(2 * 4096, 7);
  ASSERT_TRUE((*tier)->write(*extent, 0, data));
  const std::byte* mapped = (*tier)->map(*extent);
  ASSERT_NE(mapped, nullptr);
  EXPECT_EQ(0, std::memcmp(mapped, data.data(), data.size()));
  // The region's metadata is not tier data: neither readable nor mappable through the tier.
  std::vector<std::byte> out(64);
  EXPECT_EQ((*tier)->read(Extent{0, 4096}, 0, out).error().code, Errc::invalid_argument);
  EXPECT_EQ((*tier)->map(Extent{0, 4096}), nullptr);
  // Another host's arena is readable but never writable from here.
  EXPECT_TRUE((*tier)->read(Extent{layout.arena_begin(0), 4096}, 0, out));
  EXPECT_EQ((*tier)->write(Extent{layout.arena_begin(0), 4096}, 0, out).error().code, Errc::invalid_argument);
}

TEST(CxlTierTest, OutOfSpaceInTheArena) {
  CxlFixture fx(2 << 20, 2);
  auto tier = make_cxl_tier(fx.directory);
  ASSERT_TRUE(tier);
  expect_out_of_space(**tier);
}

TEST(CxlRegionTest, OpenChecksPathRangeAndAlignment) {
  testing::TempDir dir;
  EXPECT_EQ(MappedRegion::open(dir.path() / "missing").error().code, Errc::not_found);
  auto path = testing::make_region_file(dir.path(), 1 << 20);
  EXPECT_EQ(MappedRegion::open(path, {.offset = 100, .length = 0}).error().code, Errc::invalid_argument);
  EXPECT_EQ(MappedRegion::open(path, {.offset = 0, .length = 2 << 20}).error().code, Errc::invalid_argument);
  auto window = MappedRegion::open(path, {.offset = 4096, .length = 8192});
  ASSERT_TRUE(window);
  EXPECT_EQ((*window)->size(), 8192u);
  EXPECT_FALSE((*window)->is_device_dax());
  EXPECT_EQ(MappedRegion::open(dir.path()).error().code, Errc::invalid_argument);
}

}  // namespace
}  // namespace snaptier
