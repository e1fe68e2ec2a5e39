// The snapshot store over real tiers: zero pages, placement, manifests in the state dir and in
// the CXL directory, cross-process restore of published snapshots, bad input and corruption.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>

#include "cxl/cache_model_access.hpp"
#include "helpers/temp_dir.hpp"
#include "snaptier/snapshot_store.hpp"
#include "snaptier/tiers.hpp"
#include "snaptier/restore_policy.hpp"
#include "store/manifest.hpp"

namespace snaptier {
namespace {

namespace fs = std::filesystem;

// `count` pages; every page whose index is in `zero` is all zeros, the rest are distinct.
std::vector<std::byte> page_data(std::size_t count, std::initializer_list<std::size_t> zero = {}, unsigned seed = 1) {
  std::vector<std::byte> data(count * kPageSize);
  for (std::size_t p = 0; p < count; ++p) {
    if (std::find(zero.begin(), zero.end(), p) != zero.end()) continue;
    for (std::size_t i = 0; i < kPageSize; ++i) {
      data[p * kPageSize + i] = static_cast<std::byte>((i * 7 + p * 13 + seed * 29 + 1) & 0xFF);
    }
    data[p * kPageSize] = std::byte{0xA5};  // never all zero
  }
  return data;
}

Snapshot make_snapshot(const std::string& id, std::size_t pages) {
  Snapshot s;
  s.info.id = id;
  s.blobs["criu/pagemap.img"] = {std::byte{1}, std::byte{2}, std::byte{3}};
  s.blobs["profile"] = {};
  for (std::size_t i = 0; i < pages; ++i) {
    PageEntry p;
    p.vaddr = 0x7f0000000000ull + i * kPageSize;
    p.touch_order = static_cast<std::uint32_t>(i % 3);
    s.pages.push_back(p);
  }
  return s;
}

// Reads every page back through the store one at a time (in place where the tier maps it),
// and all of them through runs as long as the store makes them.
::testing::AssertionResult restores_exactly(SnapshotStore& store, const Snapshot& snapshot,
                                            std::span<const std::byte> data, bool expect_mapped) {
  std::vector<std::byte> scratch(snapshot.pages.size() * kPageSize);
  for (std::size_t i = 0; i < snapshot.pages.size(); ++i) {
    auto run = store.read_pages(snapshot, i, 1, std::span(scratch).first(kPageSize));
    if (!run) return ::testing::AssertionFailure() << "page " << i << ": " << run.error().what();
    if (run->pages != 1 || std::memcmp(run->data, data.data() + i * kPageSize, kPageSize) != 0) {
      return ::testing::AssertionFailure() << "page " << i << " differs";
    }
    if (expect_mapped && !run->in_place) return ::testing::AssertionFailure() << "page " << i << " not mapped in place";
  }
  for (std::size_t i = 0; i < snapshot.pages.size();) {
    auto run = store.read_pages(snapshot, i, snapshot.pages.size() - i, scratch);
    if (!run) return ::testing::AssertionFailure() << "run at page " << i << ": " << run.error().what();
    if (run->pages == 0 || std::memcmp(run->data, data.data() + i * kPageSize, run->pages * kPageSize) != 0) {
      return ::testing::AssertionFailure() << "run of " << run->pages << " at page " << i << " differs";
    }
    i += run->pages;
  }
  return ::testing::AssertionSuccess();
}

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    local_ = std::shared_ptr<Tier>(*make_local_tier(4 << 20));
    file_ = std::shared_ptr<Tier>(*make_file_tier(dir_.path() / "file-tier", 4 << 20));
  }

  std::unique_ptr<SnapshotStore> open_store(std::map<TierKind, std::shared_ptr<Tier>> tiers,
                                            std::shared_ptr<CxlDirectory> directory = nullptr,
                                            const std::string& host = "hostA", const std::string& state = "state-a") {
    auto store = make_snapshot_store(StoreOptions{host, dir_.path() / state, std::move(tiers), std::move(directory)});
    EXPECT_TRUE(store) << store.error().what();
    return store ? std::move(*store) : nullptr;
  }

  void make_region(std::uint32_t hosts = 2, std::uint64_t bytes = 8 << 20) {
    region_path_ = testing::make_region_file(dir_.path(), bytes);
    auto region = MappedRegion::open(region_path_);
    ASSERT_TRUE(region);
    region_ = *region;
    CacheModelAccess formatter(region_);
    ASSERT_TRUE(format_cxl_region(formatter, CxlFormatOptions{.host_count = hosts, .log_entries_per_host = 64}));
  }

  std::shared_ptr<CxlDirectory> attach(std::uint32_t index, const std::string& name) {
    auto directory = CxlDirectory::attach(std::make_shared<CacheModelAccess>(region_),
                                          CxlAttachOptions{.host_index = index, .host_name = name});
    EXPECT_TRUE(directory) << directory.error().what();
    return directory ? *directory : nullptr;
  }

  testing::TempDir dir_;
  std::shared_ptr<Tier> local_, file_;
  fs::path region_path_;
  std::shared_ptr<MappedRegion> region_;
};

TEST_F(StoreTest, ZeroPagesAreDetectedAndNeverStored) {
  auto store = open_store({{TierKind::local, local_}});
  const auto data = page_data(6, {1, 4});
  auto info = store->put(make_snapshot("zeros", 6), data, PlacementRequest{});
  ASSERT_TRUE(info) << info.error().what();
  EXPECT_EQ(info->page_count, 6u);
  EXPECT_EQ(info->zero_pages, 2u);
  EXPECT_EQ(info->bytes_per_tier.at(TierKind::local), 4 * kPageSize);
  EXPECT_EQ(local_->stats().used_bytes, 4 * kPageSize);
  EXPECT_FALSE(info->published);
  EXPECT_EQ(info->owner_host, "hostA");

  auto snapshot = store->get("zeros");
  ASSERT_TRUE(snapshot) << snapshot.error().what();
  EXPECT_TRUE(snapshot->pages[1].flags & page_zero);
  EXPECT_FALSE(snapshot->pages[0].flags & page_zero);
  EXPECT_EQ(snapshot->blobs.at("criu/pagemap.img").size(), 3u);
  EXPECT_TRUE(snapshot->blobs.contains("profile"));
  EXPECT_EQ(snapshot->pages[2].touch_order, 2u);
  EXPECT_TRUE(restores_exactly(*store, *snapshot, data, /*expect_mapped=*/true));
}

TEST_F(StoreTest, PerPagePlacementSpreadsPagesOverTiers) {
  auto store = open_store({{TierKind::local, local_}, {TierKind::file, file_}});
  const auto data = page_data(5);
  PlacementRequest placement{TierKind::file, {TierKind::local, std::nullopt, TierKind::local, std::nullopt, std::nullopt}};
  auto info = store->put(make_snapshot("mixed", 5), data, placement);
  ASSERT_TRUE(info) << info.error().what();
  EXPECT_EQ(info->bytes_per_tier.at(TierKind::local), 2 * kPageSize);
  EXPECT_EQ(info->bytes_per_tier.at(TierKind::file), 3 * kPageSize);
  auto snapshot = *store->get("mixed");
  EXPECT_EQ(snapshot.pages[0].tier, TierKind::local);
  EXPECT_EQ(snapshot.pages[1].tier, TierKind::file);
  EXPECT_TRUE(restores_exactly(*store, snapshot, data, false));
  std::vector<std::byte> scratch(5 * kPageSize);
  EXPECT_TRUE(store->read_pages(snapshot, 0, 1, scratch)->in_place);
  EXPECT_FALSE(store->read_pages(snapshot, 1, 1, scratch)->in_place);  // file tier is not byte addressable
}

TEST_F(StoreTest, BadRequestsAreRejectedWithReasons) {
  auto store = open_store({{TierKind::local, local_}});
  const auto data = page_data(2);
  EXPECT_EQ(store->put(make_snapshot("../escape", 2), data, {}).error().code, Errc::invalid_argument);
  EXPECT_EQ(store->put(make_snapshot("", 2), data, {}).error().code, Errc::invalid_argument);
  EXPECT_EQ(store->put(make_snapshot(std::string(64, 'x'), 2), data, {}).error().code, Errc::invalid_argument);
  EXPECT_EQ(store->put(make_snapshot("short", 3), data, {}).error().code, Errc::invalid_argument);
  PlacementRequest wrong_length{TierKind::local, {TierKind::local}};
  EXPECT_EQ(store->put(make_snapshot("w", 2), data, wrong_length).error().code, Errc::invalid_argument);
  auto missing_tier = store->put(make_snapshot("w", 2), data, PlacementRequest{TierKind::file, {}});
  ASSERT_FALSE(missing_tier);
  EXPECT_NE(missing_tier.error().message.find("file"), std::string::npos);
  ASSERT_TRUE(store->put(make_snapshot("dup", 2), data, {}));
  EXPECT_EQ(store->put(make_snapshot("dup", 2), data, {}).error().code, Errc::already_exists);
  EXPECT_EQ(store->get("nope").error().code, Errc::not_found);
  EXPECT_EQ(store->get("../../etc/passwd").error().code, Errc::invalid_argument);
  EXPECT_EQ(local_->stats().used_bytes, 2 * kPageSize);  // failed puts left nothing behind
  // A cxl tier without its directory is a configuration error.
  auto no_directory = make_snapshot_store(StoreOptions{"h", dir_.path() / "s", {{TierKind::cxl, local_}}, nullptr});
  EXPECT_EQ(no_directory.error().code, Errc::invalid_argument);
}

TEST_F(StoreTest, OutOfSpaceRollsBackEveryTier) {
  auto small = std::shared_ptr<Tier>(*make_local_tier(2 * kPageSize));
  auto store = open_store({{TierKind::local, small}, {TierKind::file, file_}});
  PlacementRequest placement{TierKind::local, {TierKind::file, std::nullopt, std::nullopt, std::nullopt}};
  auto put = store->put(make_snapshot("big", 4), page_data(4), placement);
  ASSERT_FALSE(put);
  EXPECT_EQ(put.error().code, Errc::no_space);
  EXPECT_EQ(small->stats().used_bytes, 0u);
  EXPECT_EQ(file_->stats().used_bytes, 0u);
  EXPECT_EQ(store->get("big").error().code, Errc::not_found);
}

TEST_F(StoreTest, RemoveReleasesDataAndForgetsTheSnapshot) {
  auto store = open_store({{TierKind::local, local_}, {TierKind::file, file_}});
  ASSERT_TRUE(store->put(make_snapshot("a", 3), page_data(3), PlacementRequest{TierKind::file, {}}));
  ASSERT_TRUE(store->put(make_snapshot("b", 2), page_data(2), {}));
  ASSERT_EQ(store->list()->size(), 2u);
  ASSERT_TRUE(store->remove("a"));
  EXPECT_EQ(file_->stats().used_bytes, 0u);
  EXPECT_EQ(store->get("a").error().code, Errc::not_found);
  EXPECT_EQ(store->remove("a").error().code, Errc::not_found);
  auto listed = store->list();
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].id, "b");
}

TEST_F(StoreTest, FileTierSnapshotsSurviveAStoreRestart) {
  const auto data = page_data(4, {2});
  {
    auto store = open_store({{TierKind::file, file_}});
    ASSERT_TRUE(store->put(make_snapshot("durable", 4), data, PlacementRequest{TierKind::file, {}}));
  }
  file_.reset();
  auto reopened = std::shared_ptr<Tier>(*make_file_tier(dir_.path() / "file-tier", 4 << 20));
  auto store = open_store({{TierKind::file, reopened}});
  auto snapshot = store->get("durable");
  ASSERT_TRUE(snapshot) << snapshot.error().what();
  EXPECT_TRUE(restores_exactly(*store, *snapshot, data, false));
}

TEST_F(StoreTest, CorruptAndTruncatedManifestsAreReported) {
  auto store = open_store({{TierKind::local, local_}});
  ASSERT_TRUE(store->put(make_snapshot("flip", 2), page_data(2), {}));
  ASSERT_TRUE(store->put(make_snapshot("cut", 2), page_data(2), {}));
  const fs::path manifests = dir_.path() / "state-a" / "manifests";
  {
    std::fstream f(manifests / "flip.snapman", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(40);
    f.put('\x7f');
  }
  fs::resize_file(manifests / "cut.snapman", fs::file_size(manifests / "cut.snapman") - 9);
  auto flipped = store->get("flip");
  ASSERT_FALSE(flipped);
  EXPECT_EQ(flipped.error().code, Errc::corrupt);
  EXPECT_NE(flipped.error().message.find("checksum"), std::string::npos);
  auto cut = store->get("cut");
  ASSERT_FALSE(cut);
  EXPECT_EQ(cut.error().code, Errc::corrupt);
  EXPECT_NE(cut.error().message.find("truncated"), std::string::npos);
  EXPECT_TRUE(store->list()->empty());  // unreadable manifests are not listed
  // A manifest renamed to another id is caught too.
  ASSERT_TRUE(store->put(make_snapshot("real", 1), page_data(1), {}));
  fs::copy_file(manifests / "real.snapman", manifests / "alias.snapman");
  EXPECT_EQ(store->get("alias").error().code, Errc::corrupt);
}

TEST_F(StoreTest, CorruptPageDataFailsItsChecksum) {
  auto store = open_store({{TierKind::file, file_}});
  ASSERT_TRUE(store->put(make_snapshot("pages", 2), page_data(2), PlacementRequest{TierKind::file, {}}));
  auto snapshot = *store->get("pages");
  // Damage page 1 behind the store's back, in the extent file on disk.
  for (const auto& entry : fs::directory_iterator(dir_.path() / "file-tier")) {
    std::fstream f(entry.path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(kPageSize + 77));
    f.put('\x01');
  }
  std::vector<std::byte> scratch(2 * kPageSize);
  auto good = store->read_pages(snapshot, 0, 2, scratch);
  ASSERT_TRUE(good) << good.error().what();
  EXPECT_EQ(good->pages, 1u) << "the run ends before the damaged page";
  auto damaged = store->read_pages(snapshot, 1, 1, scratch);
  ASSERT_FALSE(damaged);
  EXPECT_EQ(damaged.error().code, Errc::corrupt);
  for (const char* part : {"snapshot 'pages'", "page 1 ", "vaddr 0x7f0000001000", "tier file", "checksum"}) {
    EXPECT_NE(damaged.error().message.find(part), std::string::npos) << part << " not in: " << damaged.error().message;
  }
  EXPECT_EQ(store->read_pages(snapshot, 0, 1, std::span(scratch).first(100)).error().code, Errc::invalid_argument);
  EXPECT_EQ(store->read_pages(snapshot, 2, 1, scratch).error().code, Errc::invalid_argument);
  // A stored page without a checksum is as untrustworthy as one that fails it.
  Snapshot unchecked = snapshot;
  unchecked.pages[0].flags &= ~page_checksummed;
  EXPECT_EQ(store->read_pages(unchecked, 0, 1, scratch).error().code, Errc::corrupt);
}

TEST_F(StoreTest, SharedSnapshotIsPublishedAndRestoredByAnotherProcessInPlace) {
  make_region(2);
  const auto data = page_data(8, {3});
  {
    auto directory = attach(0, "hostA");
    auto cxl = std::shared_ptr<Tier>(*make_cxl_tier(directory));
    auto store = open_store({{TierKind::local, local_}, {TierKind::cxl, cxl}}, directory);
    auto info = store->put(make_snapshot("shared-fn", 8), data, PlacementRequest{TierKind::cxl, {}});
    ASSERT_TRUE(info) << info.error().what();
    EXPECT_TRUE(info->published);
    EXPECT_FALSE(fs::exists(dir_.path() / "state-a" / "manifests" / "shared-fn.snapman"));
  }

  // Host B is another process with its own mapping of the region file, cache and state dir.
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto region = MappedRegion::open(region_path_);
    if (!region) ::_exit(30);
    region_ = *region;
    auto directory = attach(1, "hostB");
    if (!directory) ::_exit(31);
    auto cxl = std::shared_ptr<Tier>(*make_cxl_tier(directory));
    auto store = make_snapshot_store(StoreOptions{"hostB", dir_.path() / "state-b", {{TierKind::cxl, cxl}}, directory});
    if (!store) ::_exit(32);
    auto snapshot = (*store)->get("shared-fn");
    if (!snapshot || snapshot->info.owner_host != "hostA" || !snapshot->info.published) ::_exit(33);
    if (!restores_exactly(**store, *snapshot, data, /*expect_mapped=*/true)) ::_exit(34);
    auto listed = (*store)->list();
    if (!listed || listed->size() != 1) ::_exit(35);
    auto removed = (*store)->remove("shared-fn");
    if (removed || removed.error().code != Errc::permission_denied) ::_exit(36);
    if (cxl->stats().bytes_read != 0) ::_exit(37);  // every page read (and checked) in place
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "see the _exit codes in the child";

  // The owner removes it; afterwards nobody finds it.
  auto directory = attach(0, "hostA");
  auto cxl = std::shared_ptr<Tier>(*make_cxl_tier(directory));
  auto store = open_store({{TierKind::cxl, cxl}}, directory);
  ASSERT_TRUE(store->get("shared-fn"));
  ASSERT_TRUE(store->remove("shared-fn"));
  EXPECT_EQ(store->get("shared-fn").error().code, Errc::not_found);
  auto other = attach(1, "hostB");
  EXPECT_EQ(other->lookup("shared-fn").error().code, Errc::not_found);
}

TEST_F(StoreTest, CxlPagesOfLongRunsSitAtTheirAddressModuloTwoMiBAndShortOnesArePacked) {
  make_region(1, 32 << 20);
  auto directory = attach(0, "hostA");
  auto cxl = std::shared_ptr<Tier>(*make_cxl_tier(directory));
  auto store = open_store({{TierKind::local, local_}, {TierKind::cxl, cxl}}, directory);
  constexpr std::uint64_t kHuge = 2 << 20;

  // 1,100 pages from 3 pages past a 2 MiB boundary (a whole block from page 509 on), one zero
  // page after the block.
  Snapshot big = make_snapshot("long-run", 1100);
  for (auto& page : big.pages) page.vaddr += 3 * kPageSize;
  const auto big_data = page_data(1100, {1050});
  auto info = store->put(big, big_data, PlacementRequest{TierKind::cxl, {}});
  ASSERT_TRUE(info) << info.error().what();
  auto stored = store->get("long-run");
  ASSERT_TRUE(stored);
  for (std::size_t i = 0; i < 1050; ++i) {  // the run holding the block
    const PageEntry& page = stored->pages[i];
    ASSERT_EQ(page.location % kHuge, page.vaddr % kHuge) << "page at " << std::hex << page.vaddr;
  }
  for (std::size_t i = 1052; i < stored->pages.size(); ++i) {  // the short run after the zero page: packed
    EXPECT_EQ(stored->pages[i].location, stored->pages[i - 1].location + kPageSize);
  }
  EXPECT_EQ(stored->pages[1051].location, stored->pages[1049].location + kPageSize);
  EXPECT_TRUE(restores_exactly(*store, *stored, big_data, /*expect_mapped=*/true));

  Snapshot small = make_snapshot("short-run", 8);
  for (auto& page : small.pages) page.vaddr += 5 * kPageSize;
  const auto small_data = page_data(8);
  ASSERT_TRUE(store->put(small, small_data, PlacementRequest{TierKind::cxl, {}}));
  auto short_run = store->get("short-run");
  ASSERT_TRUE(short_run);
  for (std::size_t i = 1; i < short_run->pages.size(); ++i) {
    EXPECT_EQ(short_run->pages[i].location, short_run->pages[0].location + i * kPageSize);
  }
  EXPECT_TRUE(restores_exactly(*store, *short_run, small_data, /*expect_mapped=*/true));
  // The padding is given back with the snapshot.
  const std::uint64_t used = directory->arena_used_bytes();
  ASSERT_TRUE(store->remove("long-run"));
  EXPECT_GE(used - directory->arena_used_bytes(), 1099 * kPageSize);
}

TEST_F(StoreTest, MixedPlacementStaysPrivateButKeepsItsCxlSpaceAcrossRestarts) {
  make_region(2);
  const auto data = page_data(4);
  PlacementRequest placement{TierKind::cxl, {TierKind::local, std::nullopt, std::nullopt, std::nullopt}};
  Snapshot stored;
  {
    auto directory = attach(0, "hostA");
    auto cxl = std::shared_ptr<Tier>(*make_cxl_tier(directory));
    auto store = open_store({{TierKind::local, local_}, {TierKind::cxl, cxl}}, directory);
    auto info = store->put(make_snapshot("half", 4), data, placement);
    ASSERT_TRUE(info) << info.error().what();
    EXPECT_FALSE(info->published);
    stored = *store->get("half");
    EXPECT_EQ(attach(1, "hostB")->lookup("half").error().code, Errc::not_found);
  }
  // A restarted host must not hand out the CXL pages of its private snapshot again.
  auto directory = attach(0, "hostA");
  EXPECT_GE(directory->arena_used_bytes(), 3 * kPageSize);
  auto cxl = std::shared_ptr<Tier>(*make_cxl_tier(directory));
  auto fresh = cxl->allocate(3 * kPageSize);
  ASSERT_TRUE(fresh);
  ASSERT_TRUE(cxl->write(*fresh, 0, std::vector<std::byte>(3 * kPageSize, std::byte{0xEE})));
  auto store = open_store({{TierKind::local, local_}, {TierKind::cxl, cxl}}, directory);
  Snapshot cxl_part = stored;  // pages 1-3, the CXL ones
  cxl_part.pages.erase(cxl_part.pages.begin());
  EXPECT_TRUE(restores_exactly(*store, cxl_part, std::span(data).subspan(kPageSize), /*expect_mapped=*/true));
  ASSERT_TRUE(store->remove("half"));
  EXPECT_EQ(store->get("half").error().code, Errc::not_found);
}

TEST_F(StoreTest, CorruptPublishedManifestIsReported) {
  make_region(2);
  auto directory = attach(0, "hostA");
  auto cxl = std::shared_ptr<Tier>(*make_cxl_tier(directory));
  auto store = open_store({{TierKind::cxl, cxl}}, directory);
  ASSERT_TRUE(store->put(make_snapshot("pub", 2), page_data(2), PlacementRequest{TierKind::cxl, {}}));
  auto record = directory->lookup("pub");
  ASSERT_TRUE(record);
  region_->data()[record->entry.record.offset + record->entry.record.length - 20] ^= std::byte{1};
  auto reader = attach(1, "hostB");
  auto reader_cxl = std::shared_ptr<Tier>(*make_cxl_tier(reader));
  auto reader_store = open_store({{TierKind::cxl, reader_cxl}}, reader, "hostB", "state-b");
  auto got = reader_store->get("pub");
  ASSERT_FALSE(got);
  EXPECT_EQ(got.error().code, Errc::corrupt);
}

// A tier that behaves like an RDMA pool client as far as the store can tell: shared, remote, and
// with an epoch that changes when its storage is replaced (here: set by the test). The bytes
// live in a local tier; `lose()` wipes them and moves the epoch, as a rebooted memory node does.
class EpochTier final : public Tier {
 public:
  explicit EpochTier(std::uint64_t epoch) : inner_(*make_local_tier(4 << 20)), epoch_(epoch) {}
  std::string_view name() const noexcept override { return "rdma"; }
  TierKind kind() const noexcept override { return TierKind::rdma; }
  TierCaps caps() const noexcept override { return TierCaps{.shared = true, .remote = true}; }
  Result<Extent> allocate(std::uint64_t length) override { return inner_->allocate(length); }
  Result<void> release(Extent extent) override {
    ++releases_;
    return inner_->release(extent);
  }
  Result<void> read(Extent e, std::uint64_t offset, std::span<std::byte> out) override { return inner_->read(e, offset, out); }
  Result<void> write(Extent e, std::uint64_t offset, std::span<const std::byte> in) override {
    return inner_->write(e, offset, in);
  }
  TierStats stats() const override { return inner_->stats(); }
  std::uint64_t epoch() const noexcept override { return epoch_.load(); }

  void set_epoch(std::uint64_t epoch) { epoch_ = epoch; }
  int releases() const { return releases_; }

 private:
  std::unique_ptr<Tier> inner_;
  std::atomic<std::uint64_t> epoch_;
  int releases_ = 0;
};

TEST_F(StoreTest, SnapshotsRecordTheRdmaEpochAndAreLostWhenThePoolIsNew) {
  auto rdma = std::make_shared<EpochTier>(11);
  const auto data = page_data(4, {1});
  {
    auto store = open_store({{TierKind::local, local_}, {TierKind::rdma, rdma}});
    // Pages 0 and 2 on rdma, page 3 local.
    PlacementRequest placement{TierKind::rdma, {std::nullopt, std::nullopt, std::nullopt, TierKind::local}};
    auto info = store->put(make_snapshot("remote", 4), data, placement);
    ASSERT_TRUE(info) << info.error().what();
    EXPECT_EQ(info->tier_epochs, (std::map<TierKind, std::uint64_t>{{TierKind::rdma, 11}, {TierKind::local, local_->epoch()}}));
    ASSERT_TRUE(store->put(make_snapshot("local-only", 2), page_data(2), PlacementRequest{TierKind::local, {}}));
  }
  // The epochs are in the manifest: a restarted store still knows them.
  auto store = open_store({{TierKind::local, local_}, {TierKind::rdma, rdma}});
  auto snapshot = store->get("remote");
  ASSERT_TRUE(snapshot) << snapshot.error().what();
  EXPECT_EQ(snapshot->info.tier_epochs.at(TierKind::rdma), 11u);
  EXPECT_FALSE(snapshot->info.lost);
  EXPECT_TRUE(restores_exactly(*store, *snapshot, data, false));

  // Unknown (a tier that never connected) is not taken for a loss.
  rdma->set_epoch(0);
  EXPECT_FALSE(store->get("remote")->info.lost);

  rdma->set_epoch(22);  // the memory node came back with a new pool
  auto listed = store->list();
  ASSERT_TRUE(listed);
  ASSERT_EQ(listed->size(), 2u);
  for (const auto& info : *listed) {
    if (info.id == "local-only") {
      EXPECT_FALSE(info.lost);
    } else {
      ASSERT_TRUE(info.lost);
      EXPECT_EQ(*info.lost, "its RDMA pages were lost: pool epoch 11, now 22");
    }
  }
  auto lost = store->get("remote");
  ASSERT_TRUE(lost) << "a lost snapshot can still be looked at (and deleted)";
  ASSERT_TRUE(lost->info.lost);
  // Nothing from the new pool is served as the old pages, and the pages on other tiers still are.
  std::vector<std::byte> scratch(4 * kPageSize);
  auto refused = store->read_pages(*lost, 0, 1, scratch);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::unavailable);
  EXPECT_EQ(refused.error().message, "snapshot 'remote': its RDMA pages were lost: pool epoch 11, now 22");
  auto local_page = store->read_pages(*lost, 3, 1, scratch);
  ASSERT_TRUE(local_page) << local_page.error().what();
  // Every restore policy refuses it before starting, with the reason.
  auto refused_restore = policy::require_readable(lost->info, {{TierKind::local, TierCaps{}}, {TierKind::rdma, rdma->caps()}});
  ASSERT_FALSE(refused_restore);
  EXPECT_EQ(refused_restore.error().message, "'remote': its RDMA pages were lost: pool epoch 11, now 22");
  // Deleting gives nothing back to the new pool: those offsets are not this snapshot's there.
  const int releases = rdma->releases();
  ASSERT_TRUE(store->remove("remote"));
  EXPECT_EQ(rdma->releases(), releases);
  EXPECT_EQ(store->get("remote").error().code, Errc::not_found);
}

// The local tier is the agent's own memory: a restarted agent has a new one, and a manifest
// left by the earlier agent must not be served from it (its offsets now hold nothing, or pages
// of a newer snapshot).
TEST_F(StoreTest, LocalPagesOfAnEarlierAgentAreLostNotServed) {
  const auto data = page_data(3);
  {
    auto store = open_store({{TierKind::local, local_}, {TierKind::file, file_}});
    PlacementRequest placement{TierKind::local, {std::nullopt, TierKind::file, std::nullopt}};
    ASSERT_TRUE(store->put(make_snapshot("in-dram", 3), data, placement));
    EXPECT_TRUE(restores_exactly(*store, *store->get("in-dram"), data, false));
  }
  auto restarted_local = std::shared_ptr<Tier>(*make_local_tier(4 << 20));
  ASSERT_NE(restarted_local->epoch(), 0u);
  EXPECT_LT(restarted_local->epoch(), std::uint64_t{1} << 53) << "exact in JSON (schema: Epoch)";
  ASSERT_NE(restarted_local->epoch(), local_->epoch()) << "every local tier is its own storage";
  // A newer snapshot takes the same offsets in the new arena.
  auto store = open_store({{TierKind::local, restarted_local}, {TierKind::file, file_}});
  const auto newer = page_data(3, {}, 7);
  ASSERT_TRUE(store->put(make_snapshot("newer", 3), newer, PlacementRequest{TierKind::local, {}}));
  auto lost = store->get("in-dram");
  ASSERT_TRUE(lost) << lost.error().what();
  ASSERT_TRUE(lost->info.lost);
  EXPECT_NE(lost->info.lost->find("local pages were lost"), std::string::npos) << *lost->info.lost;
  std::vector<std::byte> scratch(3 * kPageSize);
  auto refused = store->read_pages(*lost, 0, 1, scratch);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::unavailable);
  auto on_file = store->read_pages(*lost, 1, 1, scratch);
  ASSERT_TRUE(on_file) << on_file.error().what();
  EXPECT_EQ(std::memcmp(on_file->data, data.data() + kPageSize, kPageSize), 0);
  // Deleting it gives nothing of the new arena back: those offsets are the newer snapshot's.
  const std::uint64_t used = restarted_local->stats().used_bytes;
  ASSERT_TRUE(store->remove("in-dram"));
  EXPECT_EQ(restarted_local->stats().used_bytes, used);
  EXPECT_TRUE(restores_exactly(*store, *store->get("newer"), newer, false));
}

TEST_F(StoreTest, ManifestsWithoutEpochsStayVersionOneAndEpochsRoundTrip) {
  Manifest plain;
  plain.snapshot = make_snapshot("plain", 1);
  plain.snapshot.info.page_count = 1;
  const auto v1 = encode_manifest(plain);
  std::uint32_t version = 0;
  std::memcpy(&version, v1.data() + 8, 4);
  EXPECT_EQ(version, 1u) << "readable by agents from before epochs";
  auto decoded = decode_manifest(v1);
  ASSERT_TRUE(decoded) << decoded.error().what();
  EXPECT_TRUE(decoded->snapshot.info.tier_epochs.empty());

  Manifest with = plain;
  with.snapshot.info.tier_epochs = {{TierKind::rdma, (std::uint64_t{1} << 53) - 1}};
  const auto v2 = encode_manifest(with);
  std::memcpy(&version, v2.data() + 8, 4);
  EXPECT_EQ(version, 2u);
  decoded = decode_manifest(v2);
  ASSERT_TRUE(decoded) << decoded.error().what();
  EXPECT_EQ(decoded->snapshot.info.tier_epochs, with.snapshot.info.tier_epochs);
  // The epoch table is inside the checksum.
  auto damaged = v2;
  damaged[damaged.size() - 6] ^= std::byte{1};
  EXPECT_EQ(decode_manifest(damaged).error().code, Errc::corrupt);
}

}  // namespace
}  // namespace snaptier
