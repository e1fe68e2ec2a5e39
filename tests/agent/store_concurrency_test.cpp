// The snapshot store under concurrent callers, as a burst of restores uses it: many threads
// reading one snapshot while others put and remove other ids (every byte checked, no extent lost
// or freed twice), and the page cache that lets N restores of one copy read each page of a slow
// tier once (single flight, never caching a page that failed its check, bounded, invalidated).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "cxl/cache_model_access.hpp"
#include "helpers/temp_dir.hpp"
#include "snaptier/snapshot_store.hpp"
#include "snaptier/tiers.hpp"

namespace snaptier {
namespace {

namespace fs = std::filesystem;

std::vector<std::byte> page_data(std::size_t count, unsigned seed) {
  std::vector<std::byte> data(count * kPageSize);
  std::mt19937 rng(seed);
  for (auto& b : data) b = static_cast<std::byte>(rng() & 0xFF);
  for (std::size_t p = 0; p < count; ++p) data[p * kPageSize] = std::byte{0xA5};  // never all zero
  return data;
}

Snapshot make_snapshot(const std::string& id, std::size_t pages) {
  Snapshot s;
  s.info.id = id;
  s.blobs["meta"] = {std::byte{7}};
  for (std::size_t i = 0; i < pages; ++i) s.pages.push_back(PageEntry{.vaddr = 0x400000 + i * kPageSize});
  return s;
}

// Reads every page through the store, `max_pages` at a time, and compares each byte.
::testing::AssertionResult reads_back(SnapshotStore& store, const Snapshot& snapshot, std::span<const std::byte> data,
                                      std::size_t max_pages) {
  std::vector<std::byte> scratch(max_pages * kPageSize);
  for (std::size_t i = 0; i < snapshot.pages.size();) {
    auto run = store.read_pages(snapshot, i, max_pages, scratch);
    if (!run) return ::testing::AssertionFailure() << snapshot.info.id << " page " << i << ": " << run.error().what();
    if (run->pages == 0 || std::memcmp(run->data, data.data() + i * kPageSize, run->pages * kPageSize) != 0) {
      return ::testing::AssertionFailure() << snapshot.info.id << ": run of " << run->pages << " at " << i << " differs";
    }
    i += run->pages;
  }
  return ::testing::AssertionSuccess();
}

// A tier in front of another that counts every page each read covered (by tier location), can
// be slowed down (so that concurrent readers overlap) and can fail chosen reads.
class CountingTier final : public Tier {
 public:
  CountingTier(std::shared_ptr<Tier> inner, TierKind kind) : inner_(std::move(inner)), kind_(kind) {}
  std::string_view name() const noexcept override { return to_string(kind_); }
  TierKind kind() const noexcept override { return kind_; }
  TierCaps caps() const noexcept override {
    auto caps = inner_->caps();
    caps.byte_addressable = false;
    return caps;
  }
  Result<Extent> allocate(std::uint64_t length) override { return inner_->allocate(length); }
  Result<void> release(Extent extent) override { return inner_->release(extent); }
  Result<void> read(Extent extent, std::uint64_t offset, std::span<std::byte> out) override {
    {
      std::lock_guard lock(mutex_);
      for (std::uint64_t at = 0; at < out.size(); at += kPageSize) ++page_reads_[extent.offset + offset + at];
    }
    const int n = calls_.fetch_add(1);
    if (delay_.count() > 0) std::this_thread::sleep_for(delay_);
    if (n < fail_first_) return fail(Errc::io, "scripted read failure");
    return inner_->read(extent, offset, out);
  }
  Result<void> write(Extent extent, std::uint64_t offset, std::span<const std::byte> in) override {
    return inner_->write(extent, offset, in);
  }
  TierStats stats() const override { return inner_->stats(); }

  void slow_down(std::chrono::milliseconds delay) { delay_ = delay; }
  void fail_first_reads(int n) { fail_first_ = calls_.load() + n; }
  int calls() const { return calls_.load(); }
  std::map<std::uint64_t, int> page_reads() const {
    std::lock_guard lock(mutex_);
    return page_reads_;
  }
  void reset_counts() {
    std::lock_guard lock(mutex_);
    page_reads_.clear();
    calls_ = 0;
    fail_first_ = 0;
  }

 private:
  std::shared_ptr<Tier> inner_;
  TierKind kind_;
  std::chrono::milliseconds delay_{0};
  std::atomic<int> fail_first_{0};
  std::atomic<int> calls_{0};
  mutable std::mutex mutex_;
  std::map<std::uint64_t, int> page_reads_;
};

class StoreConcurrencyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    local_ = std::shared_ptr<Tier>(*make_local_tier(32 << 20));
    file_ = std::shared_ptr<Tier>(*make_file_tier(dir_.path() / "file-tier", 64 << 20));
  }

  std::unique_ptr<SnapshotStore> open_store(std::map<TierKind, std::shared_ptr<Tier>> tiers,
                                            std::uint64_t page_cache_bytes = kDefaultPageCacheBytes,
                                            std::shared_ptr<CxlDirectory> directory = nullptr) {
    StoreOptions options{"hostA", dir_.path() / "state", std::move(tiers), std::move(directory)};
    options.page_cache_bytes = page_cache_bytes;
    auto store = make_snapshot_store(std::move(options));
    EXPECT_TRUE(store) << store.error().what();
    return store ? std::move(*store) : nullptr;
  }

  // Reader threads of one snapshot, started together (a burst) so that their reads overlap.
  template <class Body>
  static void burst(int threads, Body body) {
    std::barrier start(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        start.arrive_and_wait();
        body(t);
      });
    }
    for (auto& thread : pool) thread.join();
  }

  testing::TempDir dir_;
  std::shared_ptr<Tier> local_, file_;
};

TEST_F(StoreConcurrencyTest, ReadersOfOneSnapshotWhileOthersPutAndRemoveOtherIds) {
  std::shared_ptr<MappedRegion> region = *MappedRegion::open(testing::make_region_file(dir_.path(), 32 << 20));
  {
    CacheModelAccess formatter(region);
    ASSERT_TRUE(format_cxl_region(formatter, CxlFormatOptions{.host_count = 2, .log_entries_per_host = 4096}));
  }
  auto directory = *CxlDirectory::attach(std::make_shared<CacheModelAccess>(region),
                                         CxlAttachOptions{.host_index = 0, .host_name = "hostA"});
  auto cxl = std::shared_ptr<Tier>(*make_cxl_tier(directory));
  auto store = open_store({{TierKind::local, local_}, {TierKind::file, file_}, {TierKind::cxl, cxl}},
                          kDefaultPageCacheBytes, directory);

  // The restored snapshot spreads over every tier, zero pages included.
  constexpr std::size_t kPages = 96;
  auto base_data = page_data(kPages, 1);
  for (std::size_t p = 5; p < kPages; p += 17) std::fill_n(base_data.begin() + p * kPageSize, kPageSize, std::byte{0});
  PlacementRequest spread{TierKind::file, {}};
  for (std::size_t p = 0; p < kPages; ++p) spread.per_page.push_back(std::array{TierKind::file, TierKind::local, TierKind::cxl}[p % 3]);
  ASSERT_TRUE(store->put(make_snapshot("base", kPages), base_data, spread));
  const auto used_before = std::array{local_->stats().used_bytes, file_->stats().used_bytes, directory->arena_used_bytes()};

  constexpr int kReaders = 8;
  constexpr int kWriters = 3;
  constexpr int kRounds = 12;
  std::atomic<int> failures{0};
  std::mutex log_mutex;
  std::vector<std::string> log;
  auto note = [&](std::string what) {
    ++failures;
    std::lock_guard lock(log_mutex);
    log.push_back(std::move(what));
  };
  burst(kReaders + kWriters, [&](int t) {
    if (t < kReaders) {
      for (int round = 0; round < kRounds; ++round) {
        // A restore looks the snapshot up and reads it, some page by page, some in long runs.
        auto snapshot = store->get("base");
        if (!snapshot) return note("get base: " + snapshot.error().what());
        auto listed = store->list();
        if (!listed || std::none_of(listed->begin(), listed->end(), [](const SnapshotInfo& i) { return i.id == "base"; })) {
          return note("list misses base");
        }
        if (auto ok = reads_back(*store, *snapshot, base_data, t % 2 == 0 ? 1 : 32); !ok) return note(std::string(ok.message()));
      }
      return;
    }
    const int w = t - kReaders;
    for (int round = 0; round < kRounds; ++round) {
      const std::string id = "w" + std::to_string(w) + "-" + std::to_string(round);
      const std::size_t pages = 8 + static_cast<std::size_t>(round % 5) * 8;
      const auto data = page_data(pages, static_cast<unsigned>(100 + t * 50 + round));
      const TierKind tier = std::array{TierKind::local, TierKind::file, TierKind::cxl}[(w + round) % 3];
      if (auto put = store->put(make_snapshot(id, pages), data, PlacementRequest{tier, {}}); !put) {
        return note("put " + id + ": " + put.error().what());
      }
      auto snapshot = store->get(id);
      if (!snapshot) return note("get " + id + ": " + snapshot.error().what());
      if (auto ok = reads_back(*store, *snapshot, data, 4); !ok) return note(std::string(ok.message()));
      if (round % 3 != 2) {  // every third one stays
        if (auto removed = store->remove(id); !removed) return note("remove " + id + ": " + removed.error().what());
      }
    }
  });
  EXPECT_EQ(failures.load(), 0) << (log.empty() ? "" : log.front());

  // What stayed is exactly what was kept: nothing lost, nothing listed twice.
  auto listed = store->list();
  ASSERT_TRUE(listed) << listed.error().what();
  std::vector<std::string> ids;
  for (const auto& info : *listed) ids.push_back(info.id);
  std::vector<std::string> expected{"base"};
  for (int w = 0; w < kWriters; ++w) {
    for (int round = 2; round < kRounds; round += 3) expected.push_back("w" + std::to_string(w) + "-" + std::to_string(round));
  }
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(ids, expected);
  // Every kept snapshot still reads back; then removing them all gives every byte back.
  for (const std::string& id : expected) {
    if (id == "base") continue;
    ASSERT_TRUE(store->remove(id)) << id;
  }
  EXPECT_EQ(local_->stats().used_bytes, used_before[0]);
  EXPECT_EQ(file_->stats().used_bytes, used_before[1]);
  ASSERT_TRUE(directory->refresh());
  EXPECT_EQ(directory->arena_used_bytes(), used_before[2]) << "CXL arena space of removed snapshots is back";
  auto base = store->get("base");
  ASSERT_TRUE(base);
  EXPECT_TRUE(reads_back(*store, *base, base_data, kPages));

  const StoreStats stats = store->stats();
  for (TierKind kind : {TierKind::local, TierKind::file, TierKind::cxl}) {
    ASSERT_TRUE(stats.served.contains(kind)) << to_string(kind);
    EXPECT_GT(stats.served.at(kind).pages, 0u);
  }
  EXPECT_EQ(stats.served.at(TierKind::cxl).tier_reads, 0u) << "CXL pages are read in place";
  EXPECT_EQ(stats.served.at(TierKind::cxl).cached_pages, 0u) << "and never cached";
  EXPECT_GT(stats.served.at(TierKind::file).cached_pages, 0u);
  EXPECT_GT(stats.zero_pages, 0u);
}

TEST_F(StoreConcurrencyTest, PutAndRemoveOfOneIdFromManyThreadsNeverLeakOrFreeTwice) {
  auto store = open_store({{TierKind::local, local_}, {TierKind::file, file_}});
  const auto data = page_data(16, 3);
  std::atomic<int> failures{0};
  burst(6, [&](int t) {
    for (int round = 0; round < 20; ++round) {
      const TierKind tier = t % 2 == 0 ? TierKind::local : TierKind::file;
      if ((t + round) % 2 == 0) {
        auto put = store->put(make_snapshot("contended", 16), data, PlacementRequest{tier, {}});
        if (!put && put.error().code != Errc::already_exists) ++failures;
      } else {
        auto removed = store->remove("contended");
        if (!removed && removed.error().code != Errc::not_found) ++failures;
      }
      // Whatever a reader finds is whole.
      if (auto snapshot = store->get("contended")) {
        auto ok = reads_back(*store, *snapshot, data, 16);
        // A remove may win between get and read: then the read fails, it never returns wrong bytes.
        if (!ok && std::string(ok.message()).find("differs") != std::string::npos) ++failures;
      }
    }
  });
  EXPECT_EQ(failures.load(), 0);
  const bool exists = store->get("contended").has_value();
  const std::uint64_t used = local_->stats().used_bytes + file_->stats().used_bytes;
  EXPECT_EQ(used, exists ? 16 * kPageSize : 0u);
  if (exists) {
    ASSERT_TRUE(store->remove("contended"));
  }
  EXPECT_EQ(local_->stats().used_bytes + file_->stats().used_bytes, 0u);
}

// ----- the page cache: read once for many readers ----------------------------------------------

class PageCacheTest : public StoreConcurrencyTest {
 protected:
  void SetUp() override {
    StoreConcurrencyTest::SetUp();
    counting_ = std::make_shared<CountingTier>(file_, TierKind::file);
  }
  std::shared_ptr<CountingTier> counting_;
};

TEST_F(PageCacheTest, ABurstOfReadersReadsEachPageFromItsTierOnce) {
  auto store = open_store({{TierKind::file, counting_}});
  constexpr std::size_t kPages = 64;
  constexpr int kReaders = 16;
  const auto data = page_data(kPages, 5);
  ASSERT_TRUE(store->put(make_snapshot("fn", kPages), data, PlacementRequest{TierKind::file, {}}));
  auto snapshot = *store->get("fn");
  counting_->slow_down(std::chrono::milliseconds(2));  // the reads of a burst overlap

  std::atomic<int> failures{0};
  burst(kReaders, [&](int t) {
    // Demand faults one page at a time, in different orders, and prefetch-sized runs.
    const std::size_t max_pages = t % 4 == 3 ? 8 : 1;
    std::vector<std::byte> scratch(max_pages * kPageSize);
    std::vector<std::size_t> order(kPages);
    for (std::size_t i = 0; i < kPages; ++i) order[i] = t % 2 == 0 ? i : kPages - 1 - i;
    for (std::size_t i : order) {
      auto run = store->read_pages(snapshot, i, max_pages, scratch);
      if (!run || std::memcmp(run->data, data.data() + i * kPageSize, run->pages * kPageSize) != 0) ++failures;
      if (run && run->in_place) ++failures;
    }
  });
  EXPECT_EQ(failures.load(), 0);

  // Every page came from the tier exactly once, however the reads were grouped.
  const auto reads = counting_->page_reads();
  EXPECT_EQ(reads.size(), kPages);
  for (const auto& [location, count] : reads) EXPECT_EQ(count, 1) << "page at " << location;
  const StoreStats stats = store->stats();
  const StoreTierTraffic& file = stats.served.at(TierKind::file);
  EXPECT_EQ(file.tier_bytes, kPages * kPageSize);
  EXPECT_EQ(file.tier_reads, static_cast<std::uint64_t>(counting_->calls()));
  EXPECT_EQ(stats.page_cache.filled, kPages);
  EXPECT_EQ(stats.page_cache.used_bytes, kPages * kPageSize);
  EXPECT_EQ(stats.page_cache.rejected, 0u);
  EXPECT_GT(stats.page_cache.joined, 0u) << "some readers waited for a read in flight";
  EXPECT_EQ(file.cached_pages, stats.page_cache.hits + stats.page_cache.joined);
  EXPECT_GE(file.pages, kReaders * kPages);  // runs may cover pages a reader does not ask for again
}

TEST_F(PageCacheTest, ACorruptPageIsNeverCachedAndEveryReaderGetsCorrupt) {
  auto store = open_store({{TierKind::file, counting_}});
  const auto data = page_data(4, 6);
  ASSERT_TRUE(store->put(make_snapshot("bad", 4), data, PlacementRequest{TierKind::file, {}}));
  auto snapshot = *store->get("bad");
  // Damage page 2 in the extent file on disk.
  fs::path extent_file;
  for (const auto& entry : fs::directory_iterator(dir_.path() / "file-tier")) extent_file = entry.path();
  auto poke = [&](std::byte value) {
    std::fstream f(extent_file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(2 * kPageSize + 100));
    f.put(static_cast<char>(value));
  };
  poke(data[2 * kPageSize + 100] ^ std::byte{0x10});
  counting_->slow_down(std::chrono::milliseconds(5));

  constexpr int kReaders = 12;
  std::atomic<int> corrupt{0}, other{0};
  burst(kReaders, [&](int t) {
    std::vector<std::byte> scratch(4 * kPageSize);
    // Half ask for page 2 itself, half for a run from page 0 that ends before it.
    if (t % 2 == 0) {
      auto run = store->read_pages(snapshot, 2, 1, scratch);
      if (!run && run.error().code == Errc::corrupt &&
          run.error().message.find("page 2 ") != std::string::npos) {
        ++corrupt;
      } else {
        ++other;
      }
    } else {
      auto run = store->read_pages(snapshot, 0, 4, scratch);
      if (!run || run->pages != 2 || std::memcmp(run->data, data.data(), 2 * kPageSize) != 0) ++other;
    }
  });
  EXPECT_EQ(corrupt.load(), kReaders / 2);
  EXPECT_EQ(other.load(), 0);
  auto stats = store->stats().page_cache;
  EXPECT_GT(stats.rejected, 0u);
  // Pages 0 and 1, and page 3 if a run's read covered it; never page 2.
  EXPECT_GE(stats.used_bytes, 2 * kPageSize);
  EXPECT_LE(stats.used_bytes, 3 * kPageSize);

  // Still corrupt on the next read, which goes to the tier again (nothing bad was kept), and
  // good once the bytes are repaired (nothing was remembered as bad either).
  std::vector<std::byte> scratch(kPageSize);
  const int page2_reads = counting_->page_reads()[snapshot.pages[2].location];
  EXPECT_EQ(store->read_pages(snapshot, 2, 1, scratch).error().code, Errc::corrupt);
  EXPECT_EQ(counting_->page_reads()[snapshot.pages[2].location], page2_reads + 1);
  poke(data[2 * kPageSize + 100]);
  auto repaired = store->read_pages(snapshot, 2, 1, scratch);
  ASSERT_TRUE(repaired) << repaired.error().what();
  EXPECT_EQ(std::memcmp(repaired->data, data.data() + 2 * kPageSize, kPageSize), 0);
}

TEST_F(PageCacheTest, WaitersOfAFailedTierReadReadThePageThemselves) {
  auto store = open_store({{TierKind::file, counting_}});
  const auto data = page_data(1, 7);
  ASSERT_TRUE(store->put(make_snapshot("flaky", 1), data, PlacementRequest{TierKind::file, {}}));
  auto snapshot = *store->get("flaky");
  counting_->slow_down(std::chrono::milliseconds(20));
  counting_->fail_first_reads(1);

  constexpr int kReaders = 8;
  std::atomic<int> good{0}, io{0};
  burst(kReaders, [&](int) {
    std::vector<std::byte> scratch(kPageSize);
    auto run = store->read_pages(snapshot, 0, 1, scratch);
    if (run && std::memcmp(run->data, data.data(), kPageSize) == 0) ++good;
    if (!run && run.error().code == Errc::io) ++io;
  });
  // Only the reader whose tier read failed sees the failure; its waiters were not failed with it.
  EXPECT_EQ(io.load(), 1);
  EXPECT_EQ(good.load(), kReaders - 1);
  EXPECT_EQ(store->stats().page_cache.filled, 1u);
}

TEST_F(PageCacheTest, RemovingACopyDropsItsPagesAndAReputIdIsReadAfresh) {
  auto store = open_store({{TierKind::file, counting_}});
  const auto first = page_data(8, 8);
  ASSERT_TRUE(store->put(make_snapshot("fn:file", 8), first, PlacementRequest{TierKind::file, {}}));
  auto old_copy = *store->get("fn:file");
  ASSERT_TRUE(reads_back(*store, old_copy, first, 8));
  EXPECT_EQ(store->stats().page_cache.used_bytes, 8 * kPageSize);
  ASSERT_TRUE(store->remove("fn:file"));
  EXPECT_EQ(store->stats().page_cache.used_bytes, 0u);
  EXPECT_EQ(store->stats().page_cache.invalidated, 8u);

  const auto second = page_data(8, 9);
  ASSERT_TRUE(store->put(make_snapshot("fn:file", 8), second, PlacementRequest{TierKind::file, {}}));
  auto new_copy = *store->get("fn:file");
  counting_->reset_counts();
  ASSERT_TRUE(reads_back(*store, new_copy, second, 8));
  EXPECT_EQ(counting_->page_reads().size(), 8u) << "the new copy's pages come from the tier";
  ASSERT_TRUE(reads_back(*store, new_copy, second, 8));
  EXPECT_EQ(counting_->calls(), 1) << "and then from the cache";
}

TEST_F(PageCacheTest, TheCacheStaysWithinItsCapacity) {
  constexpr std::uint64_t kCapacity = 16 * kPageSize;
  auto store = open_store({{TierKind::file, counting_}}, kCapacity);
  const auto data = page_data(100, 10);
  ASSERT_TRUE(store->put(make_snapshot("big", 100), data, PlacementRequest{TierKind::file, {}}));
  auto snapshot = *store->get("big");
  burst(4, [&](int) { EXPECT_TRUE(reads_back(*store, snapshot, data, 3)); });
  const auto stats = store->stats().page_cache;
  EXPECT_EQ(stats.capacity_bytes, kCapacity);
  EXPECT_LE(stats.used_bytes, kCapacity);
  EXPECT_GT(stats.evicted, 0u);
  EXPECT_EQ(stats.filled - stats.evicted, stats.used_bytes / kPageSize);
}

TEST_F(PageCacheTest, ZeroCapacityTurnsTheCacheOff) {
  auto store = open_store({{TierKind::file, counting_}}, 0);
  const auto data = page_data(4, 11);
  ASSERT_TRUE(store->put(make_snapshot("plain", 4), data, PlacementRequest{TierKind::file, {}}));
  auto snapshot = *store->get("plain");
  burst(3, [&](int) { EXPECT_TRUE(reads_back(*store, snapshot, data, 1)); });
  EXPECT_EQ(counting_->calls(), 12);
  const auto stats = store->stats();
  EXPECT_EQ(stats.page_cache.capacity_bytes, 0u);
  EXPECT_EQ(stats.page_cache.filled, 0u);
  EXPECT_EQ(stats.served.at(TierKind::file).cached_pages, 0u);
  EXPECT_EQ(stats.served.at(TierKind::file).tier_reads, 12u);
}

TEST_F(PageCacheTest, AnEntryNamingOtherBytesIsNeverServedFromTheCache) {
  auto store = open_store({{TierKind::file, counting_}});
  const auto data = page_data(2, 12);
  ASSERT_TRUE(store->put(make_snapshot("pair", 2), data, PlacementRequest{TierKind::file, {}}));
  auto snapshot = *store->get("pair");
  ASSERT_TRUE(reads_back(*store, snapshot, data, 2));  // both cached
  std::vector<std::byte> scratch(kPageSize);
  // Same copy and page index, but the entry points at page 1's bytes with page 0's CRC: the
  // cache must not hand out page 0, and the read itself must fail its check.
  Snapshot forged = snapshot;
  forged.pages[0].location = snapshot.pages[1].location;
  EXPECT_EQ(store->read_pages(forged, 0, 1, scratch).error().code, Errc::corrupt);
  Snapshot unchecked = snapshot;
  unchecked.pages[0].flags &= ~page_checksummed;
  EXPECT_EQ(store->read_pages(unchecked, 0, 1, scratch).error().code, Errc::corrupt);
}

}  // namespace
}  // namespace snaptier
