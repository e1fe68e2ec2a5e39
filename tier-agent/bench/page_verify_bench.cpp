// page_verify_bench: what checking every page's CRC32C costs on the prefetch path. For each
// tier it stores a snapshot of non-zero pages, then installs all of them with the fault engine's
// prefetch (UFFDIO_COPY into a userfaultfd-registered mapping of this process, runs of 64 pages,
// pages from SnapshotStore::read_pages) once through a store that verifies and once through one
// that does not, and reports both throughputs next to the CRC32C speed itself.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <ctime>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <vector>

#include "core/unique_fd.hpp"
#include "cxl/crc32c.hpp"
#include "snaptier/cxl_directory.hpp"
#include "snaptier/fault_engine.hpp"
#include "snaptier/snapshot_store.hpp"
#include "snaptier/tiers.hpp"

namespace snaptier {
namespace {

namespace fs = std::filesystem;
// CPU time of this thread (user + system, so the UFFDIO_COPY work counts): on a shared machine
// it excludes the time spent waiting for a core, which wall-clock time would add to both sides.
struct Clock {
  using time_point = double;
  static double now() {
    timespec ts{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
  }
};

double seconds_since(Clock::time_point t0) { return Clock::now() - t0; }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The engine asks for snapshot addresses; this source maps them 1:1 to page indices from `base`.
class StoreSource final : public PageSource {
 public:
  StoreSource(SnapshotStore& store, Snapshot snapshot, std::uint64_t base)
      : store_(store), snapshot_(std::move(snapshot)), base_(base) {}
  Result<PageFill> fetch(TaskId, std::uint64_t vaddr, std::size_t max_pages, std::span<std::byte> buffer) override {
    auto run = store_.read_pages(snapshot_, (vaddr - base_) / kPageSize, max_pages, buffer);
    if (!run) return tl::unexpected(run.error());
    return PageFill{run->zero ? PageAnswer::zero : PageAnswer::copy, run->tier, run->pages, run->data};
  }

 private:
  SnapshotStore& store_;
  Snapshot snapshot_;
  std::uint64_t base_;
};

// Installs every page of `snapshot` into a fresh registered mapping; returns seconds.
Result<double> prefetch_once(SnapshotStore& store, const Snapshot& snapshot, std::size_t batch) {
  const std::size_t bytes = snapshot.pages.size() * kPageSize;
  void* m = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return fail_errno(Errc::no_space, "mmap", errno);
  const detail::UniqueMapping unmap(m, bytes);
  const auto base = reinterpret_cast<std::uint64_t>(m);
  auto uffd = create_userfaultfd(0);  // no events: nothing but the copies to measure
  if (!uffd) return tl::unexpected(uffd.error());
  if (auto ok = register_missing(*uffd, m, bytes); !ok) {
    ::close(*uffd);
    return tl::unexpected(ok.error());
  }
  FaultEngineOptions options;
  options.prefetch_batch_pages = batch;
  auto engine = FaultEngine::create(std::make_shared<StoreSource>(store, snapshot, base), options);
  if (!engine) {
    ::close(*uffd);
    return tl::unexpected(engine.error());
  }
  if (auto ok = (*engine)->adopt(1, *uffd); !ok) return tl::unexpected(ok.error());
  std::vector<std::uint64_t> pages(snapshot.pages.size());
  for (std::size_t i = 0; i < pages.size(); ++i) pages[i] = base + i * kPageSize;
  const auto t0 = Clock::now();
  auto report = (*engine)->prefetch(1, pages);
  const double s = seconds_since(t0);
  if (!report) return tl::unexpected(report.error());
  if (report->pages_installed != pages.size()) return fail(Errc::io, "prefetch installed too few pages");
  return s;  // the engine (and its uffd) goes before the mapping
}

struct TierResult {
  std::string tier;
  double crc_gb_s = 0;           // CRC32C over the stored pages, page by page, as verification does
  double crc_hot_gb_s = 0;       // CRC32C of one page in the cache, again and again
  double verified_gb_s = 0;      // prefetch through a verifying store
  double unverified_gb_s = 0;    // prefetch through a store that does not verify
};

struct Opened {
  std::map<TierKind, std::shared_ptr<Tier>> tiers;
  std::shared_ptr<CxlDirectory> directory;
};

Result<Opened> open_tier(TierKind kind, const fs::path& dir, std::uint64_t bytes) {
  Opened o;
  const std::uint64_t capacity = bytes + (4ull << 20);
  Result<std::unique_ptr<Tier>> tier = fail(Errc::unsupported, "tier");
  switch (kind) {
    case TierKind::local: tier = make_local_tier(capacity); break;
    case TierKind::file: tier = make_file_tier(dir / "file-tier", capacity); break;
    case TierKind::cxl: {
      const fs::path path = dir / "region.cxl";
      std::ofstream(path).close();
      fs::resize_file(path, capacity + (8ull << 20));
      auto region = MappedRegion::open(path);
      if (!region) return tl::unexpected(region.error());
      auto access = make_direct_region_access(*region);
      if (auto layout = format_cxl_region(*access, CxlFormatOptions{.host_count = 1, .log_entries_per_host = 64}); !layout) {
        return tl::unexpected(layout.error());
      }
      auto directory = CxlDirectory::attach(access, CxlAttachOptions{.host_index = 0, .host_name = "bench"});
      if (!directory) return tl::unexpected(directory.error());
      o.directory = *directory;
      tier = make_cxl_tier(o.directory);
      break;
    }
    case TierKind::rdma: break;
  }
  if (!tier) return tl::unexpected(tier.error());
  o.tiers.emplace(kind, std::move(*tier));
  return o;
}

Result<TierResult> bench_tier(TierKind kind, const fs::path& dir, std::size_t page_count, int repeat,
                              std::size_t batch) {
  auto opened = open_tier(kind, dir, page_count * kPageSize);
  if (!opened) return tl::unexpected(opened.error());
  auto open_store = [&](bool verify) {
    return make_snapshot_store(StoreOptions{"bench", dir / "state", opened->tiers, opened->directory, verify});
  };
  auto verifying = open_store(true);
  if (!verifying) return tl::unexpected(verifying.error());
  std::vector<std::byte> data(page_count * kPageSize);
  std::mt19937_64 rng(7);
  for (std::size_t i = 0; i < data.size(); i += 8) {
    const std::uint64_t v = rng() | 1;  // never an all-zero page
    std::memcpy(data.data() + i, &v, 8);
  }
  Snapshot snapshot;
  snapshot.info.id = "bench";
  snapshot.pages.resize(page_count);
  for (std::size_t i = 0; i < page_count; ++i) snapshot.pages[i].vaddr = i * kPageSize;
  if (auto put = (*verifying)->put(snapshot, data, PlacementRequest{kind, {}}); !put) return tl::unexpected(put.error());
  auto stored = (*verifying)->get("bench");
  if (!stored) return tl::unexpected(stored.error());
  auto plain = open_store(false);
  if (!plain) return tl::unexpected(plain.error());

  TierResult r;
  r.tier = std::string(to_string(kind));
  const double gb = static_cast<double>(page_count * kPageSize) / 1e9;
  std::vector<double> crc, hot, on, off;
  std::uint32_t sink = 0;
  for (int i = 0; i < repeat; ++i) {
    auto t0 = Clock::now();
    for (std::size_t p = 0; p < page_count; ++p) sink ^= crc32c(std::span(data).subspan(p * kPageSize, kPageSize));
    crc.push_back(gb / seconds_since(t0));
    t0 = Clock::now();
    for (std::size_t p = 0; p < page_count; ++p) sink ^= crc32c(std::span(data).first(kPageSize), p);
    hot.push_back(gb / seconds_since(t0));
    // Alternate, so that neither variant always runs with warmer caches.
    auto a = prefetch_once(**verifying, *stored, batch);
    if (!a) return tl::unexpected(a.error());
    auto b = prefetch_once(**plain, *stored, batch);
    if (!b) return tl::unexpected(b.error());
    on.push_back(gb / *a);
    off.push_back(gb / *b);
  }
  if (sink == 0x12345678) std::fputs("", stderr);  // keeps the CRC loop from being optimised away
  r.crc_gb_s = median(crc);
  r.crc_hot_gb_s = median(hot);
  r.verified_gb_s = median(on);
  r.unverified_gb_s = median(off);
  return r;
}

}  // namespace
}  // namespace snaptier

int main(int argc, char** argv) {
  using namespace snaptier;
  CLI::App app{"Cost of checking page CRC32Cs on the prefetch path"};
  std::uint64_t mib = 64;
  int repeat = 5;
  std::vector<std::string> tier_names{"local", "cxl", "file"};
  bool json = false;
  std::size_t batch = FaultEngineOptions{}.prefetch_batch_pages;
  app.add_option("--batch", batch, "pages per UFFDIO_COPY (the engine's prefetch_batch_pages)")->check(CLI::Range(1, 1024));
  app.add_option("--mib", mib, "snapshot size in MiB")->check(CLI::Range(1, 4096));
  app.add_option("--repeat", repeat, "runs per variant (the median is reported)")->check(CLI::Range(1, 100));
  app.add_option("--tier", tier_names, "tiers to measure")->check(CLI::IsMember({"local", "file", "cxl"}));
  app.add_flag("--json", json, "print JSON");
  CLI11_PARSE(app, argc, argv);

  const fs::path scratch = fs::temp_directory_path() / ("page_verify_bench-" + std::to_string(::getpid()));
  std::vector<TierResult> results;
  for (const auto& name : tier_names) {
    fs::remove_all(scratch);
    fs::create_directories(scratch);
    auto r = bench_tier(*tier_kind_from_string(name), scratch, mib * 256, repeat, batch);
    if (!r) {
      fs::remove_all(scratch);
      std::cerr << "page_verify_bench: " << name << ": " << r.error().what() << "\n";
      return 1;
    }
    results.push_back(*r);
  }
  fs::remove_all(scratch);

  if (json) {
    nlohmann::json out{{"snapshot_bytes", mib << 20}, {"repeat", repeat}, {"batch_pages", batch}, {"crc32c_hardware", crc32c_uses_hardware()},
                       {"units", "GB (1e9 bytes) per CPU-second of the measuring thread"}, {"results", nlohmann::json::array()}};
    for (const auto& r : results) {
      out["results"].push_back({{"tier", r.tier}, {"crc32c_gb_s", r.crc_gb_s}, {"crc32c_hot_gb_s", r.crc_hot_gb_s},
                                {"prefetch_verified_gb_s", r.verified_gb_s},
                                {"prefetch_unverified_gb_s", r.unverified_gb_s}});
    }
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  std::printf("snapshot %llu MiB, %zu pages per copy, median of %d, CRC32C %s, GB per CPU-second of this thread\n",
              static_cast<unsigned long long>(mib), batch, repeat,
              crc32c_uses_hardware() ? "SSE4.2" : "table (no SSE4.2)");
  std::printf("%-6s %12s %12s %15s %15s %8s\n", "tier", "CRC32C GB/s", "CRC32C GB/s", "prefetch GB/s", "prefetch GB/s",
              "cost");
  std::printf("%-6s %12s %12s %15s %15s %8s\n", "", "stored", "cache-hot", "verified", "unverified", "");
  for (const auto& r : results) {
    std::printf("%-6s %12.2f %12.2f %15.2f %15.2f %7.1f%%\n", r.tier.c_str(), r.crc_gb_s, r.crc_hot_gb_s,
                r.verified_gb_s, r.unverified_gb_s,
                100.0 * (r.unverified_gb_s / r.verified_gb_s - 1.0));
  }
  return 0;
}
