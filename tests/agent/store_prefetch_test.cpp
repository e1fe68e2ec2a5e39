// Parallel prefetch from the snapshot store: several installer threads call
// SnapshotStore::read_pages at once (CRC32C checked, file tier through the page cache) and every
// page lands with its bytes. A region of this process is registered with a real userfaultfd; the
// prefetch installs every page, so reading it afterwards cannot fault.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "core/unique_fd.hpp"
#include "helpers/temp_dir.hpp"
#include "snaptier/fault_engine.hpp"
#include "snaptier/snapshot_store.hpp"
#include "snaptier/tiers.hpp"

namespace snaptier {
namespace {

constexpr std::size_t kPages = 3072;

// Snapshot page i is at region page i; zero pages of the snapshot are answered zero.
class StoreSource final : public PageSource {
 public:
  StoreSource(SnapshotStore& store, Snapshot snapshot, std::uint64_t base)
      : store_(store), snapshot_(std::move(snapshot)), base_(base) {}
  Result<PageFill> fetch(TaskId, std::uint64_t vaddr, std::size_t max_pages, std::span<std::byte> buffer) override {
    {
      std::lock_guard lock(mutex_);
      threads_.insert(std::this_thread::get_id());
    }
    auto run = store_.read_pages(snapshot_, (vaddr - base_) / kPageSize, max_pages, buffer);
    if (!run) return tl::unexpected(run.error());
    return PageFill{run->zero ? PageAnswer::zero : PageAnswer::copy, run->tier, run->pages, run->data};
  }
  bool concurrent_fetch() const noexcept override { return true; }  // read_pages: any threads
  std::size_t thread_count() {
    std::lock_guard lock(mutex_);
    return threads_.size();
  }

 private:
  SnapshotStore& store_;
  Snapshot snapshot_;
  std::uint64_t base_;
  std::mutex mutex_;
  std::set<std::thread::id> threads_;
};

class StorePrefetchTest : public ::testing::TestWithParam<TierKind> {};

TEST_P(StorePrefetchTest, ParallelPrefetchFromTheStoreInstallsEveryPageWithItsBytes) {
  auto probe = create_userfaultfd(0);
  if (!probe) GTEST_SKIP() << "userfaultfd unavailable: " << probe.error().what();
  ::close(*probe);
  testing::TempDir dir;
  const TierKind kind = GetParam();
  auto tier = kind == TierKind::local ? make_local_tier(kPages * kPageSize + (4u << 20))
                                      : make_file_tier(dir.path() / "file-tier", kPages * kPageSize + (4u << 20));
  ASSERT_TRUE(tier.has_value()) << tier.error().what();
  std::map<TierKind, std::shared_ptr<Tier>> tiers;
  tiers.emplace(kind, std::move(*tier));
  auto store = make_snapshot_store(StoreOptions{"test", dir.path() / "state", tiers, nullptr});
  ASSERT_TRUE(store.has_value()) << store.error().what();

  std::vector<std::byte> data(kPages * kPageSize);
  std::mt19937_64 rng(11);
  for (std::size_t i = 0; i < data.size(); i += 8) {
    const std::uint64_t v = rng() | 1;
    std::memcpy(data.data() + i, &v, 8);
  }
  for (std::size_t i = 1000; i < 1100; ++i) std::memset(data.data() + i * kPageSize, 0, kPageSize);  // a zero run
  Snapshot snapshot;
  snapshot.info.id = "par";
  snapshot.pages.resize(kPages);
  for (std::size_t i = 0; i < kPages; ++i) snapshot.pages[i].vaddr = i * kPageSize;
  ASSERT_TRUE((*store)->put(snapshot, data, PlacementRequest{kind, {}}).has_value());
  auto stored = (*store)->get("par");
  ASSERT_TRUE(stored.has_value()) << stored.error().what();

  const std::size_t bytes = kPages * kPageSize;
  void* m = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(m, MAP_FAILED);
  const detail::UniqueMapping unmap(m, bytes);
  const auto base = reinterpret_cast<std::uint64_t>(m);
  auto uffd = create_userfaultfd(0);
  ASSERT_TRUE(uffd.has_value());
  ASSERT_TRUE(register_missing(*uffd, m, bytes).has_value());
  auto source = std::make_shared<StoreSource>(**store, *stored, base);
  FaultEngineOptions options;
  options.prefetch_threads = 3;
  auto engine = FaultEngine::create(source, options);
  ASSERT_TRUE(engine.has_value());
  ASSERT_TRUE((*engine)->adopt(1, *uffd).has_value());
  std::vector<std::uint64_t> pages(kPages);
  for (std::size_t i = 0; i < kPages; ++i) pages[i] = base + i * kPageSize;
  auto report = (*engine)->prefetch(1, pages);
  ASSERT_TRUE(report.has_value()) << report.error().what();
  EXPECT_EQ(report->pages_installed, kPages);
  EXPECT_EQ(source->thread_count(), 3u);
  const FaultMetrics& metrics = (*engine)->metrics();
  EXPECT_EQ(metrics.pages_prefetched, kPages);
  EXPECT_EQ(metrics.pages_copied_per_tier.at(kind) + metrics.pages_zero, kPages);
  EXPECT_EQ(metrics.bytes_copied, metrics.pages_copied_per_tier.at(kind) * kPageSize);
  EXPECT_EQ(metrics.errors, 0u);
  // Every page must be present before anything reads it: a missing one would fault on this
  // thread's own uffd with nobody polling (mincore says so without touching it).
  std::vector<unsigned char> resident(kPages);
  ASSERT_EQ(::mincore(m, bytes, resident.data()), 0);
  for (std::size_t i = 0; i < kPages; ++i) ASSERT_NE(resident[i] & 1, 0) << "page " << i << " not installed";
  for (std::size_t i = 0; i < kPages; ++i) {
    ASSERT_EQ(std::memcmp(static_cast<std::byte*>(m) + i * kPageSize, data.data() + i * kPageSize, kPageSize), 0)
        << "page " << i;
  }
  EXPECT_EQ(metrics.faults, 0u);
  engine->reset();
}

INSTANTIATE_TEST_SUITE_P(Tiers, StorePrefetchTest, ::testing::Values(TierKind::local, TierKind::file),
                         [](const auto& info) { return std::string(to_string(info.param)); });

}  // namespace
}  // namespace snaptier
