// The memory node's pool storage without verbs: pool contents and the allocation table survive
// a restart of the pool (a new PoolStorage on the same file, as a restarted agent makes), a torn,
// corrupt or foreign table is detected and not trusted (the pool starts empty under a new
// epoch), and a pool whose file is gone gets a new epoch.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <vector>

#include "cxl/crc32c.hpp"
#include "helpers/temp_dir.hpp"
#include "rdma/pool_storage.hpp"

namespace snaptier::rdma_detail {
namespace {

namespace fs = std::filesystem;
constexpr std::uint64_t MiB = 1 << 20;

void fill(const PoolStorage& pool, Extent e, std::uint8_t seed) {
  for (std::uint64_t i = 0; i < e.length; ++i) pool.data()[e.offset + i] = static_cast<std::byte>((i * 31 + seed) & 0xff);
}

bool holds(const PoolStorage& pool, Extent e, std::uint8_t seed) {
  for (std::uint64_t i = 0; i < e.length; ++i) {
    if (pool.data()[e.offset + i] != static_cast<std::byte>((i * 31 + seed) & 0xff)) return false;
  }
  return true;
}

class PoolStorageTest : public ::testing::Test {
 protected:
  fs::path pool_path() const { return dir_.path() / "shm" / "snaptier-pool-mem0"; }
  testing::TempDir dir_;
};

TEST_F(PoolStorageTest, ContentsTableAndEpochSurviveARestart) {
  std::uint64_t epoch = 0;
  Extent a, b, freed;
  {
    auto pool = PoolStorage::open(pool_path(), 4 * MiB);
    ASSERT_TRUE(pool) << pool.error().what();
    EXPECT_FALSE(pool->recovered());
    EXPECT_NE(pool->origin().find("no pool file"), std::string::npos) << pool->origin();
    epoch = pool->epoch();
    EXPECT_NE(epoch, 0u);
    EXPECT_LT(epoch, std::uint64_t{1} << 53);
    a = *pool->allocate(64 * 1024);
    freed = *pool->allocate(4096);
    b = *pool->allocate(MiB);
    ASSERT_TRUE(pool->release(freed));
    fill(*pool, a, 1);
    fill(*pool, b, 2);
    EXPECT_TRUE(fs::exists(PoolStorage::table_path(pool_path())));
  }
  auto pool = PoolStorage::open(pool_path(), 4 * MiB);
  ASSERT_TRUE(pool) << pool.error().what();
  EXPECT_TRUE(pool->recovered()) << pool->origin();
  EXPECT_EQ(pool->epoch(), epoch);
  EXPECT_EQ(pool->used_bytes(), a.length + b.length);
  EXPECT_NE(pool->origin().find("kept 2 extents"), std::string::npos) << pool->origin();
  EXPECT_TRUE(holds(*pool, a, 1));
  EXPECT_TRUE(holds(*pool, b, 2));
  // The range released before the restart is free again, the kept extents are allocated
  // (releasable exactly once).
  auto again = pool->allocate(4096);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->offset, freed.offset) << "first fit finds the range released before the restart";
  EXPECT_TRUE(pool->release(a));
  EXPECT_FALSE(pool->release(a));
}

TEST_F(PoolStorageTest, AGoneFileMeansANewEpochAndAnEmptyPool) {
  std::uint64_t epoch = 0;
  {
    auto pool = PoolStorage::open(pool_path(), 2 * MiB);
    ASSERT_TRUE(pool);
    epoch = pool->epoch();
    ASSERT_TRUE(pool->allocate(MiB));
  }
  fs::remove(pool_path());  // what a reboot does to /dev/shm (the table alone is not enough)
  auto pool = PoolStorage::open(pool_path(), 2 * MiB);
  ASSERT_TRUE(pool) << pool.error().what();
  EXPECT_FALSE(pool->recovered());
  EXPECT_NE(pool->epoch(), epoch);
  EXPECT_EQ(pool->used_bytes(), 0u);
}

TEST_F(PoolStorageTest, ATableForAnotherFileIsNotTrusted) {
  std::uint64_t epoch = 0;
  {
    auto pool = PoolStorage::open(pool_path(), 2 * MiB);
    ASSERT_TRUE(pool);
    epoch = pool->epoch();
    ASSERT_TRUE(pool->allocate(MiB));
  }
  // Someone recreated the pool file: same name and size (likely the same inode number, too),
  // different contents.
  fs::remove(pool_path());
  { std::ofstream(pool_path()).put('x'); }
  fs::resize_file(pool_path(), 2 * MiB + 4096);
  auto pool = PoolStorage::open(pool_path(), 2 * MiB);
  ASSERT_TRUE(pool) << pool.error().what();
  EXPECT_FALSE(pool->recovered());
  EXPECT_NE(pool->origin().find("another file"), std::string::npos) << pool->origin();
  EXPECT_NE(pool->epoch(), epoch);
  EXPECT_EQ(pool->used_bytes(), 0u);
  EXPECT_EQ(pool->data()[0], std::byte{0}) << "an untrusted pool starts from fresh memory";
}

class DamagedTableTest : public PoolStorageTest, public ::testing::WithParamInterface<const char*> {};

TEST_P(DamagedTableTest, IsDetectedAndThePoolStartsOverUnderANewEpoch) {
  std::uint64_t epoch = 0;
  {
    auto pool = PoolStorage::open(pool_path(), 2 * MiB);
    ASSERT_TRUE(pool);
    epoch = pool->epoch();
    ASSERT_TRUE(pool->allocate(8192));
    ASSERT_TRUE(pool->allocate(4096));
  }
  const fs::path table = PoolStorage::table_path(pool_path());
  std::vector<char> bytes(fs::file_size(table));
  std::ifstream(table, std::ios::binary).read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  const std::string damage = GetParam();
  if (damage == "torn") {
    bytes.resize(bytes.size() - 9);  // a write cut short (not what rename lets happen, but a disk might)
  } else if (damage == "flipped") {
    bytes[44] ^= 0x10;  // inside the first extent record
  } else if (damage == "empty") {
    bytes.clear();
  } else if (damage == "overlap") {
    // A well-formed table whose extents overlap: checksum recomputed, so only the content check
    // can catch it. Offset of extent 2 := offset of extent 1 (records start at byte 40).
    std::memcpy(bytes.data() + 40 + 16, bytes.data() + 40, 8);
    std::vector<std::byte> body(bytes.size() - 4);
    std::memcpy(body.data(), bytes.data(), body.size());
    const std::uint32_t crc = crc32c(body);
    std::memcpy(bytes.data() + body.size(), &crc, 4);
  }
  std::ofstream(table, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));

  auto pool = PoolStorage::open(pool_path(), 2 * MiB);
  ASSERT_TRUE(pool) << pool.error().what();
  EXPECT_FALSE(pool->recovered()) << pool->origin();
  EXPECT_NE(pool->origin().find("not trusted"), std::string::npos) << pool->origin();
  EXPECT_NE(pool->epoch(), epoch);
  EXPECT_EQ(pool->used_bytes(), 0u);
  // The new table is intact: a further restart keeps the new epoch.
  const std::uint64_t fresh = pool->epoch();
  pool = PoolStorage::open("", MiB);  // drop the first one (releases the file lock)
  auto reopened = PoolStorage::open(pool_path(), 2 * MiB);
  ASSERT_TRUE(reopened) << reopened.error().what();
  EXPECT_TRUE(reopened->recovered()) << reopened->origin();
  EXPECT_EQ(reopened->epoch(), fresh);
}

INSTANTIATE_TEST_SUITE_P(Damage, DamagedTableTest, ::testing::Values("torn", "flipped", "empty", "overlap"));

TEST_F(PoolStorageTest, AnIntactPoolOfAnotherSizeIsRefusedNotWiped) {
  Extent kept;
  {
    auto pool = PoolStorage::open(pool_path(), 2 * MiB);
    ASSERT_TRUE(pool);
    kept = *pool->allocate(4096);
    fill(*pool, kept, 9);
  }
  auto bigger = PoolStorage::open(pool_path(), 4 * MiB);
  ASSERT_FALSE(bigger);
  EXPECT_EQ(bigger.error().code, Errc::invalid_argument);
  EXPECT_NE(bigger.error().message.find("delete"), std::string::npos) << bigger.error().message;
  auto same = PoolStorage::open(pool_path(), 2 * MiB);
  ASSERT_TRUE(same) << same.error().what();
  EXPECT_TRUE(holds(*same, kept, 9));
}

TEST_F(PoolStorageTest, ASecondAgentOnTheSameFileIsRefused) {
  auto first = PoolStorage::open(pool_path(), MiB);
  ASSERT_TRUE(first);
  auto second = PoolStorage::open(pool_path(), MiB);
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().code, Errc::unavailable) << second.error().what();
}

TEST_F(PoolStorageTest, AnonymousPoolsGetANewEpochEveryTime) {
  auto a = PoolStorage::open("", MiB);
  auto b = PoolStorage::open("", MiB);
  ASSERT_TRUE(a && b);
  EXPECT_NE(a->epoch(), b->epoch());
  EXPECT_FALSE(a->recovered());
  ASSERT_TRUE(a->allocate(4096));
  EXPECT_FALSE(PoolStorage::open(pool_path(), 0));
}

}  // namespace
}  // namespace snaptier::rdma_detail
