// The shared CXL directory: CRC32C, format/attach, publish/lookup/delete across hosts, delayed
// reuse, restart recovery, crashes mid-publication, concurrent publishing processes, and the
// cache model proving that the protocol's write-backs and invalidations are all needed.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <thread>

#include "cxl/cache_model_access.hpp"
#include "cxl/crc32c.hpp"
#include "cxl/layout.hpp"
#include "helpers/temp_dir.hpp"
#include "snaptier/cxl_directory.hpp"
#include "snaptier/tiers.hpp"

namespace snaptier {
namespace {

constexpr std::uint64_t kRegionSize = 8 << 20;

std::vector<std::byte> bytes_of(std::string_view text) {
  const auto raw = std::as_bytes(std::span(text.data(), text.size()));
  return {raw.begin(), raw.end()};
}

std::vector<std::byte> pattern(std::size_t size, unsigned seed) {
  std::vector<std::byte> bytes(size);
  for (std::size_t i = 0; i < size; ++i) bytes[i] = static_cast<std::byte>((i * 37 + seed * 101) & 0xFF);
  return bytes;
}

// Wraps an accessor and drops one kind of cache maintenance: the bug the model must expose.
class ForgetfulAccess final : public RegionAccess {
 public:
  ForgetfulAccess(std::shared_ptr<RegionAccess> inner, bool drop_writeback, bool drop_invalidate)
      : inner_(std::move(inner)), drop_writeback_(drop_writeback), drop_invalidate_(drop_invalidate) {}
  std::uint64_t size() const noexcept override { return inner_->size(); }
  void load(std::uint64_t o, std::span<std::byte> out) override { inner_->load(o, out); }
  void store(std::uint64_t o, std::span<const std::byte> in) override { inner_->store(o, in); }
  std::uint64_t load_u64(std::uint64_t o) override { return inner_->load_u64(o); }
  void store_u64(std::uint64_t o, std::uint64_t v) override { inner_->store_u64(o, v); }
  void writeback(std::uint64_t o, std::uint64_t n) override {
    if (!drop_writeback_) inner_->writeback(o, n);
  }
  void invalidate(std::uint64_t o, std::uint64_t n) override {
    if (!drop_invalidate_) inner_->invalidate(o, n);
  }
  void fence() override { inner_->fence(); }
  const std::byte* map_for_read(std::uint64_t o, std::uint64_t n) override {
    return inner_->map_for_read(o, n);
  }

 private:
  std::shared_ptr<RegionAccess> inner_;
  bool drop_writeback_;
  bool drop_invalidate_;
};

// Dies (like a host losing power) the moment the commit word is about to be stored.
class CrashAtCommitAccess final : public RegionAccess {
 public:
  explicit CrashAtCommitAccess(std::shared_ptr<RegionAccess> inner) : inner_(std::move(inner)) {}
  std::uint64_t size() const noexcept override { return inner_->size(); }
  void load(std::uint64_t o, std::span<std::byte> out) override { inner_->load(o, out); }
  void store(std::uint64_t o, std::span<const std::byte> in) override { inner_->store(o, in); }
  std::uint64_t load_u64(std::uint64_t o) override { return inner_->load_u64(o); }
  void store_u64(std::uint64_t, std::uint64_t) override { ::_exit(0); }
  void writeback(std::uint64_t o, std::uint64_t n) override { inner_->writeback(o, n); }
  void invalidate(std::uint64_t o, std::uint64_t n) override { inner_->invalidate(o, n); }
  void fence() override { inner_->fence(); }
  const std::byte* map_for_read(std::uint64_t o, std::uint64_t n) override {
    return inner_->map_for_read(o, n);
  }

 private:
  std::shared_ptr<RegionAccess> inner_;
};

struct Host {
  std::shared_ptr<RegionAccess> access;
  std::shared_ptr<CxlDirectory> directory;
  std::unique_ptr<Tier> tier;
};

class DirectoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = testing::make_region_file(dir_.path(), kRegionSize);
    region_ = *MappedRegion::open(path_);
  }

  // Replaces the fixture's region with a fresh all-zero one of `size` bytes.
  void use_region(std::uint64_t size) {
    region_.reset();
    path_ = testing::make_region_file(dir_.path(), size, "sized.cxl");
    region_ = *MappedRegion::open(path_);
  }

  // Rewrites the superblock as an agent of another layout version would have left it.
  void stamp_superblock_version(std::uint32_t version, std::uint32_t slot_size) {
    cxl::Superblock sb{};
    std::memcpy(&sb, region_->data(), sizeof sb);
    sb.version = version;
    sb.slot_size = slot_size;
    sb.crc = crc32c(std::as_bytes(std::span(&sb, 1)).first(offsetof(cxl::Superblock, crc)));
    std::memcpy(region_->data(), &sb, sizeof sb);
  }

  void format(std::uint32_t hosts = 4, std::uint32_t entries = 64) {
    CacheModelAccess formatter(region_);
    auto layout = format_cxl_region(formatter, CxlFormatOptions{.host_count = hosts, .log_entries_per_host = entries});
    ASSERT_TRUE(layout) << layout.error().what();
    layout_ = *layout;
  }

  // A host with its own private cache in front of the shared bytes.
  Result<Host> attach(std::uint32_t index, std::shared_ptr<RegionAccess> access = nullptr) {
    if (!access) access = std::make_shared<CacheModelAccess>(region_);
    auto directory = CxlDirectory::attach(access, CxlAttachOptions{.host_index = index,
                                                                   .host_name = "host" + std::to_string(index)});
    if (!directory) return tl::unexpected(directory.error());
    auto tier = make_cxl_tier(*directory);
    if (!tier) return tl::unexpected(tier.error());
    return Host{access, *directory, std::move(*tier)};
  }

  // Writes `data` into a fresh arena extent of `host` and publishes it under `id`.
  static Result<CxlEntryInfo> publish_with_data(Host& host, const std::string& id, std::span<const std::byte> data,
                                                CxlVisibility visibility = CxlVisibility::published) {
    auto extent = host.tier->allocate(data.size());
    if (!extent) return tl::unexpected(extent.error());
    if (auto ok = host.tier->write(*extent, 0, data); !ok) return tl::unexpected(ok.error());
    const std::vector<Extent> owned{*extent};
    return host.directory->publish(id, bytes_of("manifest of " + id), owned, visibility);
  }

  // Looks `id` up on `host` and checks manifest and data byte for byte.
  static ::testing::AssertionResult holds(Host& host, const std::string& id, std::span<const std::byte> data) {
    auto record = host.directory->lookup(id);
    if (!record) return ::testing::AssertionFailure() << id << ": " << record.error().what();
    if (record->manifest != bytes_of("manifest of " + id)) return ::testing::AssertionFailure() << id << ": manifest differs";
    if (record->owned_extents.size() != 1) return ::testing::AssertionFailure() << id << ": extents";
    std::vector<std::byte> out(data.size());
    auto ok = host.tier->read(Extent{record->owned_extents[0].offset, data.size()}, 0, out);
    if (!ok) return ::testing::AssertionFailure() << id << ": " << ok.error().what();
    if (!std::equal(out.begin(), out.end(), data.begin())) return ::testing::AssertionFailure() << id << ": data differs";
    return ::testing::AssertionSuccess();
  }

  void flip_byte(std::uint64_t offset) { region_->data()[offset] ^= std::byte{0x40}; }

  testing::TempDir dir_;
  std::filesystem::path path_;
  std::shared_ptr<MappedRegion> region_;
  CxlLayout layout_;
};

// ----- CRC32C ---------------------------------------------------------------------------------

TEST(Crc32cTest, KnownVectors) {
  EXPECT_EQ(crc32c(std::string_view("123456789")), 0xE3069283u);
  EXPECT_EQ(crc32c(std::string_view("")), 0u);
  const std::vector<std::byte> zeros(32, std::byte{0}), ones(32, std::byte{0xFF});
  EXPECT_EQ(crc32c(zeros), 0x8A9136AAu);  // RFC 3720 B.4
  EXPECT_EQ(crc32c(ones), 0x62A8AB43u);
  std::vector<std::byte> ascending(32);
  for (int i = 0; i < 32; ++i) ascending[i] = static_cast<std::byte>(i);
  EXPECT_EQ(crc32c(ascending), 0x46DD794Eu);
}

TEST(Crc32cTest, ChainsAcrossSplitsOfEveryLength) {
  const auto data = pattern(1000, 3);
  const std::uint32_t whole = crc32c(data);
  for (std::size_t split : {0, 1, 7, 8, 9, 63, 500, 999, 1000}) {
    const auto head = std::span(data).first(split);
    const auto tail = std::span(data).subspan(split);
    EXPECT_EQ(crc32c(tail, crc32c(head)), whole) << split;
  }
}

// ----- format and attach ----------------------------------------------------------------------

TEST_F(DirectoryTest, UnformattedRegionIsReportedAndNeverFormattedImplicitly) {
  auto attached = attach(0);
  ASSERT_FALSE(attached);
  EXPECT_EQ(attached.error().code, Errc::not_found);
  EXPECT_NE(attached.error().message.find("unformatted"), std::string::npos);
  for (std::uint64_t i = 0; i < 64 * 1024; ++i) ASSERT_EQ(region_->data()[i], std::byte{0}) << i;
}

TEST_F(DirectoryTest, GarbageRegionIsCorruptAndLeftUntouched) {
  for (std::uint64_t i = 0; i < 8192; ++i) region_->data()[i] = static_cast<std::byte>(i * 7 + 1);
  auto attached = attach(0);
  ASSERT_FALSE(attached);
  EXPECT_EQ(attached.error().code, Errc::corrupt);
  EXPECT_EQ(region_->data()[100], static_cast<std::byte>(701 & 0xFF));
}

TEST_F(DirectoryTest, FormatRefusesToWipeAValidRegionUnlessAskedTo) {
  format();
  auto a = attach(0);
  ASSERT_TRUE(a);
  ASSERT_TRUE(publish_with_data(*a, "kept", pattern(4096, 1)));
  CacheModelAccess access(region_);
  auto again = format_cxl_region(access, CxlFormatOptions{});
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, Errc::already_exists);
  auto wiped = format_cxl_region(access, CxlFormatOptions{.host_count = 2, .log_entries_per_host = 16,
                                                          .overwrite_existing = true});
  ASSERT_TRUE(wiped) << wiped.error().what();
  EXPECT_NE(wiped->format_id, layout_.format_id);
  auto b = attach(1);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->directory->lookup("kept").error().code, Errc::not_found);
  EXPECT_EQ(b->directory->layout().host_count, 2u);
}

TEST_F(DirectoryTest, FlippedSuperblockByteIsCorrupt) {
  format();
  flip_byte(offsetof(cxl::Superblock, arena_size) + 1);
  auto attached = attach(0);
  ASSERT_FALSE(attached);
  EXPECT_EQ(attached.error().code, Errc::corrupt);
  EXPECT_NE(attached.error().message.find("checksum"), std::string::npos);
}

TEST_F(DirectoryTest, TruncatedRegionFileIsCorrupt) {
  format();
  region_.reset();
  std::filesystem::resize_file(path_, kRegionSize / 2);
  auto region = MappedRegion::open(path_);
  ASSERT_TRUE(region);
  auto attached = CxlDirectory::attach(make_direct_region_access(*region), {.host_index = 0, .host_name = "a"});
  ASSERT_FALSE(attached);
  EXPECT_EQ(attached.error().code, Errc::corrupt);
  EXPECT_NE(attached.error().message.find("truncated"), std::string::npos);
}

TEST_F(DirectoryTest, AttachValidatesHostIndexAndSlotOwnership) {
  format(2);
  EXPECT_EQ(attach(2).error().code, Errc::invalid_argument);
  auto a = attach(0);
  ASSERT_TRUE(a);
  auto impostor = CxlDirectory::attach(std::make_shared<CacheModelAccess>(region_),
                                       {.host_index = 0, .host_name = "someone-else"});
  ASSERT_FALSE(impostor);
  EXPECT_EQ(impostor.error().code, Errc::already_exists);
}

TEST_F(DirectoryTest, RegionOfAnOlderLayoutIsRefusedNotMisread) {
  format(2);
  {
    auto a = attach(0);
    ASSERT_TRUE(a);
    ASSERT_TRUE(publish_with_data(*a, "old", pattern(4096, 1)));
  }
  stamp_superblock_version(1, 128);  // layout 1: 15 hosts, 128-byte slots
  std::vector<std::byte> before(region_->data(), region_->data() + 64 * 1024);
  auto attached = attach(0);
  ASSERT_FALSE(attached);
  EXPECT_EQ(attached.error().code, Errc::unsupported);
  EXPECT_NE(attached.error().message.find("formatted by an older agent (layout 1); reformat"), std::string::npos)
      << attached.error().message;
  EXPECT_TRUE(std::equal(before.begin(), before.end(), region_->data()));  // nothing written
  // It still holds snapshots, so formatting over it must be asked for.
  CacheModelAccess access(region_);
  auto again = format_cxl_region(access, CxlFormatOptions{.host_count = 2});
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, Errc::already_exists);
  ASSERT_TRUE(format_cxl_region(access, CxlFormatOptions{.host_count = 2, .overwrite_existing = true}));
  auto b = attach(1);
  ASSERT_TRUE(b) << b.error().what();
  EXPECT_EQ(b->directory->lookup("old").error().code, Errc::not_found);
}

TEST_F(DirectoryTest, RegionOfANewerLayoutIsRefused) {
  format(2);
  stamp_superblock_version(cxl::kLayoutVersion + 1, cxl::kSlotSize);
  auto attached = attach(0);
  ASSERT_FALSE(attached);
  EXPECT_EQ(attached.error().code, Errc::unsupported);
  EXPECT_NE(attached.error().message.find("newer agent"), std::string::npos) << attached.error().message;
}

// The smallest region a 63-host directory fits in: the numbers the testbed sizes devices by.
TEST_F(DirectoryTest, SmallestRegionForSixtyThreeHosts) {
  struct Case {
    std::uint32_t entries;
    std::uint64_t minimum;
  };
  // 4 KiB superblock + 63 slots of 320 B (20 KiB) + 63 logs + 63 arenas of at least 64 KiB.
  for (const Case c : {Case{16, 4411392}, Case{1024, 16539648}}) {
    const CxlFormatOptions options{.host_count = 63, .log_entries_per_host = c.entries};
    use_region(c.minimum - 4096);
    CacheModelAccess small(region_);
    auto refused = format_cxl_region(small, options);
    ASSERT_FALSE(refused) << c.entries;
    EXPECT_EQ(refused.error().code, Errc::no_space);
    use_region(c.minimum);
    CacheModelAccess exact(region_);
    auto layout = format_cxl_region(exact, options);
    ASSERT_TRUE(layout) << c.entries << ": " << layout.error().what();
    EXPECT_EQ(layout->arena_size, 64u * 1024);
    EXPECT_EQ(layout->arena_begin(62) + layout->arena_size, c.minimum);
  }
}

// ----- publish / lookup / delete ------------------------------------------------------------------

TEST_F(DirectoryTest, PublishedOnOneHostIsFoundByteExactOnAnother) {
  format();
  auto a = attach(0), b = attach(1);
  ASSERT_TRUE(a && b);
  const auto data = pattern(3 * 4096, 5);
  auto info = publish_with_data(*a, "fn-resize:v1", data);
  ASSERT_TRUE(info) << info.error().what();
  EXPECT_EQ(info->sequence, 1u);
  EXPECT_EQ(info->owner_host, 0u);

  EXPECT_TRUE(holds(*b, "fn-resize:v1", data));
  auto listed = b->directory->list();
  ASSERT_TRUE(listed);
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].id, "fn-resize:v1");
  EXPECT_EQ((*listed)[0].owner_name, "host0");
  // In place: the mapped bytes on B are the published bytes.
  auto record = b->directory->lookup("fn-resize:v1");
  const std::byte* mapped = b->tier->map(record->owned_extents[0]);
  ASSERT_NE(mapped, nullptr);
  EXPECT_EQ(0, std::memcmp(mapped, data.data(), data.size()));
}

TEST_F(DirectoryTest, DuplicateIdsBadIdsAndFullLogsAreRejected) {
  format(4, 3);
  auto a = attach(0), b = attach(1);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(publish_with_data(*a, "x", pattern(4096, 1)));
  EXPECT_EQ(publish_with_data(*b, "x", pattern(4096, 2)).error().code, Errc::already_exists);
  EXPECT_EQ(a->directory->publish("x", {}, {}).error().code, Errc::already_exists);
  EXPECT_EQ(a->directory->publish("", {}, {}).error().code, Errc::invalid_argument);
  EXPECT_EQ(a->directory->publish(std::string(64, 'a'), {}, {}).error().code, Errc::invalid_argument);
  EXPECT_EQ(a->directory->lookup(std::string("a\nb")).error().code, Errc::invalid_argument);
  // Owned extents must be unpublished allocations of the publisher's own arena.
  const std::vector<Extent> foreign{Extent{layout_.arena_begin(1), 4096}};
  EXPECT_EQ(a->directory->publish("y", {}, foreign).error().code, Errc::invalid_argument);
  ASSERT_TRUE(a->directory->publish("y", {}, {}));
  ASSERT_TRUE(a->directory->publish("z", {}, {}));
  auto full = a->directory->publish("w", {}, {});
  ASSERT_FALSE(full);
  EXPECT_EQ(full.error().code, Errc::no_space);
}

TEST_F(DirectoryTest, OnlyTheOwnerDeletesAndOthersStopSeeingIt) {
  format();
  auto a = attach(0), b = attach(1);
  ASSERT_TRUE(a && b);
  const auto data = pattern(4096, 3);
  ASSERT_TRUE(publish_with_data(*a, "snap", data));
  ASSERT_TRUE(holds(*b, "snap", data));
  auto denied = b->directory->remove("snap");
  ASSERT_FALSE(denied);
  EXPECT_EQ(denied.error().code, Errc::permission_denied);
  EXPECT_TRUE(holds(*b, "snap", data));
  ASSERT_TRUE(a->directory->remove("snap"));
  EXPECT_EQ(b->directory->lookup("snap").error().code, Errc::not_found);
  EXPECT_EQ(a->directory->remove("snap").error().code, Errc::not_found);
  // The id is free again, for any host.
  const auto second = pattern(4096, 4);
  ASSERT_TRUE(publish_with_data(*b, "snap", second));
  EXPECT_TRUE(holds(*a, "snap", second));
}

TEST_F(DirectoryTest, OwnerOnlyEntriesAreInvisibleToOtherHosts) {
  format();
  auto a = attach(0), b = attach(1);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(publish_with_data(*a, "private", pattern(4096, 1), CxlVisibility::owner_only));
  EXPECT_EQ(b->directory->lookup("private").error().code, Errc::not_found);
  EXPECT_TRUE(b->directory->list()->empty());
  EXPECT_TRUE(a->directory->lookup("private"));
  // Another host may publish the same id: owner_only entries do not take the shared name.
  EXPECT_TRUE(publish_with_data(*b, "private", pattern(4096, 2)));
}

// The widest directory: every one of kCxlMaxHosts hosts publishes and finds everybody else's
// snapshot, and the seen counters of the last host (in the last line of every slot's seen
// struct) gate reuse like those of the first.
TEST_F(DirectoryTest, EveryHostOfTheWidestDirectoryPublishesAndSeesAllOthers) {
  constexpr std::uint32_t kHosts = kCxlMaxHosts;
  constexpr std::uint32_t kLast = kHosts - 1;
  use_region(5 << 20);
  format(kHosts, 16);
  auto id_of = [](std::uint32_t h) { return "wide-" + std::to_string(h); };
  auto data_of = [](std::uint32_t h) { return pattern(4096, h); };
  std::vector<Host> hosts;
  for (std::uint32_t h = 0; h < kHosts; ++h) {
    auto host = attach(h);
    ASSERT_TRUE(host) << h << ": " << host.error().what();
    hosts.push_back(std::move(*host));
    ASSERT_TRUE(publish_with_data(hosts.back(), id_of(h), data_of(h))) << h;
  }
  for (std::uint32_t reader = 0; reader < kHosts; ++reader) {
    auto listed = hosts[reader].directory->list();
    ASSERT_TRUE(listed) << reader;
    ASSERT_EQ(listed->size(), kHosts) << reader;
    for (const CxlEntryInfo& info : *listed) {
      EXPECT_EQ(info.id, id_of(info.owner_host));
      EXPECT_EQ(info.owner_name, "host" + std::to_string(info.owner_host));
    }
    for (std::uint32_t owner : {0u, kLast, (reader + 1) % kHosts}) {
      EXPECT_TRUE(holds(hosts[reader], id_of(owner), data_of(owner))) << reader << " reads " << owner;
    }
  }
  for (std::uint32_t owner : {kLast, 0u}) {
    ASSERT_TRUE(hosts[owner].directory->remove(id_of(owner)));
    EXPECT_GT(hosts[owner].directory->arena_pending_bytes(), 0u) << owner;
    // Until the last of the others has announced the tombstone, the extents stay pending.
    const std::uint32_t last_other = owner == kLast ? kLast - 1 : kLast;
    for (std::uint32_t h = 0; h < kHosts; ++h) {
      if (h == owner) continue;
      EXPECT_EQ(hosts[h].directory->lookup(id_of(owner)).error().code, Errc::not_found);
      ASSERT_TRUE(hosts[owner].directory->refresh());
      EXPECT_EQ(hosts[owner].directory->arena_pending_bytes() == 0, h == last_other) << owner << " after " << h;
    }
  }
  for (const Host& host : hosts) EXPECT_TRUE(host.directory->problems().empty());
}

// ----- rule 7: delayed reuse ----------------------------------------------------------------------

TEST_F(DirectoryTest, FreedExtentsWaitUntilEveryAttachedHostMovedPastTheTombstone) {
  format(3);
  auto a = attach(0), b = attach(1);
  ASSERT_TRUE(a && b);
  const auto data = pattern(2 * 4096, 9);
  ASSERT_TRUE(publish_with_data(*a, "old", data));
  auto record = *b->directory->lookup("old");  // B has seen the publication, not the delete
  const Extent freed = record.owned_extents[0];
  const std::uint64_t used = a->directory->arena_used_bytes();
  ASSERT_TRUE(a->directory->remove("old"));
  EXPECT_GT(a->directory->arena_pending_bytes(), 0u);
  EXPECT_EQ(a->directory->arena_used_bytes(), used);

  // While B may still read it, A's new allocations stay clear of the freed extent...
  auto fresh = a->tier->allocate(freed.length);
  ASSERT_TRUE(fresh);
  EXPECT_TRUE(fresh->offset >= freed.offset + freed.length || fresh->offset + fresh->length <= freed.offset);
  ASSERT_TRUE(a->tier->write(*fresh, 0, pattern(freed.length, 1)));
  std::vector<std::byte> out(data.size());
  ASSERT_TRUE(b->tier->read(freed, 0, out));
  EXPECT_EQ(out, data);

  // ...and once B replayed past the tombstone (and said so), A reuses it.
  ASSERT_TRUE(b->directory->refresh());
  ASSERT_TRUE(a->directory->refresh());
  EXPECT_EQ(a->directory->arena_pending_bytes(), 0u);
  auto reused = a->tier->allocate(freed.length);
  ASSERT_TRUE(reused);
  EXPECT_LE(reused->offset, freed.offset);
}

TEST_F(DirectoryTest, AnIdleHostsAnnouncerLetsTheOwnerReuseWhatItFreed) {
  format(2);
  auto a = attach(0), b = attach(1);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(publish_with_data(*a, "old", pattern(2 * 4096, 3)));
  ASSERT_TRUE(b->directory->lookup("old"));  // B saw the publication, then goes idle
  ASSERT_TRUE(a->directory->remove("old"));
  ASSERT_TRUE(a->directory->refresh());
  EXPECT_GT(a->directory->arena_pending_bytes(), 0u);  // B said nothing since

  {
    CxlAnnouncer announcer(b->directory, std::chrono::milliseconds(5));
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (a->directory->arena_pending_bytes() != 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      ASSERT_TRUE(a->directory->refresh());
    }
    EXPECT_EQ(a->directory->arena_pending_bytes(), 0u) << "B's announcer never announced the tombstone";
    EXPECT_GT(announcer.refreshes(), 0u);
    EXPECT_FALSE(announcer.last_error().has_value());
  }
  // Destroyed: it stopped (no thread left to touch B's directory).
  ASSERT_TRUE(publish_with_data(*a, "new", pattern(4096, 4)));
  ASSERT_TRUE(a->directory->remove("new"));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_TRUE(a->directory->refresh());
  EXPECT_GT(a->directory->arena_pending_bytes(), 0u);
}

// A reader loads another host's seen lines one by one while that host may be writing them back:
// a mix of lines from before and after an announcement must count as "not seen yet".
TEST_F(DirectoryTest, TornSeenAnnouncementHoldsBackReuse) {
  format(3);
  auto a = attach(0), b = attach(1);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(publish_with_data(*a, "s", pattern(4096, 1)));
  ASSERT_TRUE(b->directory->lookup("s"));
  constexpr std::uint64_t kSize = sizeof(cxl::SlotSeen);
  std::byte* seen = region_->data() + cxl::seen_offset(layout_, 1);
  const std::vector<std::byte> before(seen, seen + kSize);
  ASSERT_TRUE(a->directory->remove("s"));
  ASSERT_TRUE(b->directory->refresh());  // B announces seen[0] = 2 (past the tombstone)
  const std::vector<std::byte> after(seen, seen + kSize);
  ASSERT_NE(before, after);
  ASSERT_GE(kSize, 2 * kCacheLine);
  // The first line (with seen[0]) already new, the last (with the CRC) still old.
  std::memcpy(seen + kSize - kCacheLine, before.data() + kSize - kCacheLine, kCacheLine);
  ASSERT_TRUE(a->directory->refresh());
  EXPECT_GT(a->directory->arena_pending_bytes(), 0u);
  std::memcpy(seen, after.data(), kSize);  // B's write-back completes
  ASSERT_TRUE(a->directory->refresh());
  EXPECT_EQ(a->directory->arena_pending_bytes(), 0u);
}

TEST_F(DirectoryTest, DetachedHostsDoNotHoldBackReuse) {
  format(3);
  auto a = attach(0), b = attach(1);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(publish_with_data(*a, "s", pattern(4096, 1)));
  ASSERT_TRUE(b->directory->detach());
  ASSERT_TRUE(a->directory->remove("s"));
  EXPECT_EQ(a->directory->arena_pending_bytes(), 0u);
}

// ----- restart and crash recovery --------------------------------------------------------------------

TEST_F(DirectoryTest, RestartedHostRecoversItsArenaFromItsLog) {
  format(2);
  const auto live_data = pattern(2 * 4096, 2);
  Extent live_extent;
  std::uint64_t used_before = 0;
  {
    auto a = attach(0);
    ASSERT_TRUE(a);
    ASSERT_TRUE(publish_with_data(*a, "gone", pattern(4096, 1)));
    ASSERT_TRUE(publish_with_data(*a, "live", live_data));
    ASSERT_TRUE(a->directory->remove("gone"));
    used_before = a->directory->arena_used_bytes();
    // Allocated and written but never published: lost with the process.
    auto orphan = a->tier->allocate(8 * 4096);
    ASSERT_TRUE(orphan && a->tier->write(*orphan, 0, pattern(4096, 3)));
    live_extent = a->directory->lookup("live")->owned_extents[0];
  }
  auto a = attach(0);
  ASSERT_TRUE(a) << a.error().what();
  EXPECT_TRUE(holds(*a, "live", live_data));
  EXPECT_EQ(a->directory->lookup("gone").error().code, Errc::not_found);
  EXPECT_EQ(a->directory->arena_used_bytes(), used_before);  // the orphan is free again
  for (int i = 0; i < 8; ++i) {
    auto e = a->tier->allocate(4096);
    ASSERT_TRUE(e);
    EXPECT_TRUE(e->offset >= live_extent.offset + live_extent.length || e->offset + e->length <= live_extent.offset);
  }
  // The log continues after the recovered entries.
  auto next = publish_with_data(*a, "after-restart", pattern(4096, 4));
  ASSERT_TRUE(next);
  EXPECT_EQ(next->sequence, 4u);
}

TEST_F(DirectoryTest, HostKilledBeforeCommitLeavesNothingVisibleAndItsSpaceIsReclaimed) {
  format(2);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto access = std::make_shared<CrashAtCommitAccess>(std::make_shared<CacheModelAccess>(region_));
    auto a = attach(0, access);
    if (!a) ::_exit(10);
    (void)publish_with_data(*a, "torn", pattern(4 * 4096, 5));
    ::_exit(11);  // not reached: the commit store kills the host
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 0);

  auto b = attach(1);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->directory->lookup("torn").error().code, Errc::not_found);
  EXPECT_TRUE(b->directory->problems().empty());
  auto a = attach(0);
  ASSERT_TRUE(a) << a.error().what();
  EXPECT_EQ(a->directory->arena_used_bytes(), 0u);
  const auto data = pattern(4096, 6);
  auto again = publish_with_data(*a, "torn", data);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->sequence, 1u);  // the uncommitted slot is reused
  EXPECT_TRUE(holds(*b, "torn", data));
}

// ----- the cache model catches missing cache maintenance ------------------------------------------

TEST_F(DirectoryTest, CacheModelCatchesAPublisherThatSkipsWriteBack) {
  format();
  auto model = std::make_shared<CacheModelAccess>(region_);
  auto sloppy = attach(0, std::make_shared<ForgetfulAccess>(model, /*drop_writeback=*/true, false));
  auto reader = attach(1);
  ASSERT_TRUE(sloppy && reader);
  const auto data = pattern(4096, 8);
  ASSERT_TRUE(publish_with_data(*sloppy, "unflushed", data));
  EXPECT_TRUE(sloppy->directory->lookup("unflushed"));  // the writer sees its own cache...
  EXPECT_GT(model->dirty_lines(), 0u);
  auto seen = reader->directory->lookup("unflushed");  // ...nobody else does
  ASSERT_FALSE(seen);
  EXPECT_EQ(seen.error().code, Errc::not_found);

  // The same steps with the protocol's write-backs are visible.
  auto careful = attach(2);
  ASSERT_TRUE(careful);
  ASSERT_TRUE(publish_with_data(*careful, "flushed", data));
  EXPECT_TRUE(holds(*reader, "flushed", data));
}

TEST_F(DirectoryTest, CacheModelCatchesAReaderThatSkipsInvalidation) {
  format();
  auto writer = attach(0);
  auto stale = attach(1, std::make_shared<ForgetfulAccess>(std::make_shared<CacheModelAccess>(region_), false,
                                                           /*drop_invalidate=*/true));
  auto fresh = attach(2);
  ASSERT_TRUE(writer && stale && fresh);
  // Both readers have already read host 0's (empty) log into their caches at attach.
  const auto data = pattern(4096, 2);
  ASSERT_TRUE(publish_with_data(*writer, "new", data));
  EXPECT_EQ(stale->directory->lookup("new").error().code, Errc::not_found);
  EXPECT_TRUE(holds(*fresh, "new", data));
}

TEST_F(DirectoryTest, CacheModelCatchesTwoWritersInOneLine) {
  // Not a directory bug but the model's contract: a line written by two hosts loses one write.
  format();
  CacheModelAccess a(region_), b(region_);
  const std::uint64_t line = layout_.arena_begin(0);
  const auto x = pattern(8, 1), y = pattern(8, 2);
  a.store(line, x);
  b.store(line + 8, y);
  a.writeback(line, 64);
  b.writeback(line, 64);
  std::vector<std::byte> out(8);
  CacheModelAccess c(region_);
  c.load(line, out);
  EXPECT_NE(out, x);  // B's write-back of its whole line clobbered A's bytes
}

// ----- corruption --------------------------------------------------------------------------------

TEST_F(DirectoryTest, FlippedEntryByteIsReportedCorrupt) {
  format();
  auto a = attach(0);
  ASSERT_TRUE(a);
  ASSERT_TRUE(publish_with_data(*a, "victim", pattern(4096, 1)));
  ASSERT_TRUE(publish_with_data(*a, "bystander", pattern(4096, 2)));
  flip_byte(cxl::entry_offset(layout_, 0, 0) + offsetof(cxl::EntryPayload, record_offset) + 2);
  auto b = attach(1);
  ASSERT_TRUE(b);
  auto lookup = b->directory->lookup("victim");
  ASSERT_FALSE(lookup);
  EXPECT_EQ(lookup.error().code, Errc::corrupt);
  EXPECT_NE(lookup.error().message.find("checksum"), std::string::npos);
  ASSERT_EQ(b->directory->problems().size(), 1u);
  EXPECT_TRUE(holds(*b, "bystander", pattern(4096, 2)));  // later entries still replay
}

TEST_F(DirectoryTest, MismatchedCommitWordIsReportedCorrupt) {
  format();
  auto a = attach(0);
  ASSERT_TRUE(a);
  ASSERT_TRUE(publish_with_data(*a, "victim", pattern(4096, 1)));
  flip_byte(cxl::entry_offset(layout_, 0, 0) + cxl::kCommitOffset);  // sequence bits
  auto b = attach(1);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->directory->lookup("victim").error().code, Errc::corrupt);
}

TEST_F(DirectoryTest, FlippedManifestByteIsReportedCorrupt) {
  format();
  auto a = attach(0);
  ASSERT_TRUE(a);
  auto info = publish_with_data(*a, "victim", pattern(4096, 1));
  ASSERT_TRUE(info);
  flip_byte(info->record.offset + info->record.length - 3);
  auto b = attach(1);
  ASSERT_TRUE(b);
  auto lookup = b->directory->lookup("victim");
  ASSERT_FALSE(lookup);
  EXPECT_EQ(lookup.error().code, Errc::corrupt);
  EXPECT_NE(lookup.error().message.find("manifest record"), std::string::npos);
}

// ----- several processes publishing at once --------------------------------------------------------

TEST_F(DirectoryTest, ConcurrentPublishersInSeparateProcesses) {
  constexpr std::uint32_t kWriters = 4;
  constexpr int kPerWriter = 12;
  format(kWriters + 1, 64);
  auto id_of = [](std::uint32_t host, int i) { return "h" + std::to_string(host) + "-snap-" + std::to_string(i); };
  auto data_of = [](std::uint32_t host, int i) { return pattern(4096 * (1 + i % 3), host * 100 + i); };

  std::vector<pid_t> children;
  for (std::uint32_t host = 0; host < kWriters; ++host) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      // Each process is a host with its own private cache over the shared file mapping.
      auto region = MappedRegion::open(path_);
      if (!region) ::_exit(20);
      region_ = *region;
      auto me = attach(host);
      if (!me) ::_exit(21);
      std::mt19937 rng(host);
      for (int i = 0; i < kPerWriter; ++i) {
        if (!publish_with_data(*me, id_of(host, i), data_of(host, i))) ::_exit(22);
        std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
        // Read whatever the others have published so far; anything visible must be intact.
        const std::uint32_t other = (host + 1 + rng() % (kWriters - 1)) % kWriters;
        const int j = static_cast<int>(rng() % kPerWriter);
        auto record = me->directory->lookup(id_of(other, j));
        if (record) {
          if (!holds(*me, id_of(other, j), data_of(other, j))) ::_exit(23);
        } else if (record.error().code != Errc::not_found) {
          ::_exit(24);
        }
      }
      ::_exit(me->directory->problems().empty() ? 0 : 25);
    }
    children.push_back(pid);
  }
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 0);
  }
  auto verifier = attach(kWriters);
  ASSERT_TRUE(verifier);
  auto listed = verifier->directory->list();
  ASSERT_TRUE(listed);
  EXPECT_EQ(listed->size(), kWriters * kPerWriter);
  for (std::uint32_t host = 0; host < kWriters; ++host) {
    for (int i = 0; i < kPerWriter; ++i) EXPECT_TRUE(holds(*verifier, id_of(host, i), data_of(host, i)));
  }
  EXPECT_TRUE(verifier->directory->problems().empty());
}

}  // namespace
}  // namespace snaptier
