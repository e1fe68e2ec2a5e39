// install_bench: the fault engine's page installation at native speed, on this host's own
// kernel and DRAM. A region of this process is registered MISSING with a real userfaultfd; a
// PageSource over a DRAM buffer (or a file mapping) answers with pointers into it, so every
// UFFDIO_COPY reads straight from the source. Measured in one run, interleaved round by round:
//   - demand faults: a toucher thread reads pages one by one, the engine's poll loop serves
//     each fault (latency per touch: p50/p99/mean);
//   - prefetch (FaultEngine::prefetch) of the working set: contiguous (one long run) and
//     scattered (every other page: 1-page runs), for each batch size and thread count;
//   - zero-page installation (the source answers zero: UFFDIO_ZEROPAGE ranges);
//   - memcpy of the same bytes into prefaulted memory (the limit), on 1 and on N threads, and
//     into fresh anonymous memory (first-touch faults included).
// With --tier (local, file, cxl, rdma: the agent's own tiers, as the policies read them) the
// working set is written into that tier and the source `tier` serves it: in place where the tier
// maps its bytes (CXL), read into the engine's buffer otherwise; its limit is the tier's own
// read bandwidth (`tier-read`: the same runs read into a buffer on as many threads), measured in
// the same round. Demand faults are then served from the tier too. `tb bench restore` runs this
// in the guests, once per tier.
// JSON and CSV to files, progress to stderr.
#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <nlohmann/json.hpp>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "bench_tier.hpp"
#include "snaptier/fault_engine.hpp"

namespace snaptier {
namespace {

namespace fs = std::filesystem;

double wall_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
double cpu_now() {  // CPU time of the whole process: every installer thread counts
  timespec ts{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const auto i = static_cast<std::size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

struct Mapping {
  std::byte* p = nullptr;
  std::size_t n = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (p != nullptr) ::munmap(p, n);
  }
};

Result<void> map_anon(Mapping& m, std::size_t bytes) {
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return fail_errno(Errc::no_space, "mmap", errno);
  m.p = static_cast<std::byte*>(p);
  m.n = bytes;
  return {};
}

// Page k of the target region (k counted from `base`) is source page k / stride; the source's
// bytes start at `data`. Zero: every page is answered zero. copy_into_buffer: the source fills
// the engine's buffer (a tier read with pread) instead of answering in place.
class BufferSource final : public PageSource {
 public:
  BufferSource(const std::byte* data, std::size_t pages, std::uint64_t base, std::size_t stride, bool zero,
               bool copy_into_buffer)
      : data_(data), pages_(pages), base_(base), stride_(stride), zero_(zero), copy_(copy_into_buffer) {}
  Result<PageFill> fetch(TaskId, std::uint64_t vaddr, std::size_t max_pages, std::span<std::byte> buffer) override {
    const std::size_t k = (vaddr - base_) / kPageSize;
    if (zero_) return PageFill{PageAnswer::zero, TierKind::local, max_pages, nullptr};
    if (k % stride_ != 0) return fail(Errc::invalid_argument, "install_bench: page outside the working set");
    const std::size_t idx = k / stride_;
    if (idx >= pages_) return fail(Errc::invalid_argument, "install_bench: page past the source");
    // Contiguous in the region only with stride 1.
    const std::size_t n = stride_ == 1 ? std::min(max_pages, pages_ - idx) : 1;
    const std::byte* src = data_ + idx * kPageSize;
    if (copy_) {
      std::memcpy(buffer.data(), src, n * kPageSize);
      return PageFill{PageAnswer::copy, TierKind::local, n, nullptr};
    }
    return PageFill{PageAnswer::copy, TierKind::local, n, src};
  }
  bool concurrent_fetch() const noexcept override { return true; }

 private:
  const std::byte* data_;
  std::size_t pages_;
  std::uint64_t base_;
  std::size_t stride_;
  bool zero_;
  bool copy_;
};

// The working set in a tier: target page k (from `base`) is the extent's page k. A tier that maps
// its bytes answers in place (UFFDIO_COPY reads the device); any other is read into the engine's
// buffer, one run per call, as the agent's store does.
class TierSource final : public PageSource {
 public:
  TierSource(Tier& tier, Extent extent, std::size_t pages, std::uint64_t base)
      : tier_(tier), extent_(extent), pages_(pages), base_(base), mapped_(tier.map(extent)) {}
  Result<PageFill> fetch(TaskId, std::uint64_t vaddr, std::size_t max_pages, std::span<std::byte> buffer) override {
    const std::size_t idx = (vaddr - base_) / kPageSize;
    if (idx >= pages_) return fail(Errc::invalid_argument, "install_bench: page past the source");
    const std::size_t n = std::min({max_pages, pages_ - idx, buffer.size() / kPageSize});
    if (mapped_ != nullptr) return PageFill{PageAnswer::copy, tier_.kind(), n, mapped_ + idx * kPageSize};
    if (auto ok = tier_.read(extent_, idx * kPageSize, buffer.first(n * kPageSize)); !ok) {
      return tl::unexpected(ok.error());
    }
    return PageFill{PageAnswer::copy, tier_.kind(), n, nullptr};
  }
  bool concurrent_fetch() const noexcept override { return true; }

 private:
  Tier& tier_;
  Extent extent_;
  std::size_t pages_;
  std::uint64_t base_;
  const std::byte* mapped_;
};

// The source a measurement installs from, built once its target region's base is known.
using SourceFactory = std::function<std::shared_ptr<PageSource>(std::uint64_t base)>;

struct Config {
  std::size_t pages = 0;         // working set
  std::size_t fault_pages = 0;   // demand faults per round
  std::vector<std::size_t> threads;
  std::vector<std::size_t> batches;  // 0 = whole runs
  std::vector<std::string> sources;  // dram, dram-copy, file
  int rounds = 5;
  bool verify = true;
};

struct Sample {
  double wall_s = 0;
  double cpu_s = 0;
  std::uint64_t copy_ioctls = 0;
  std::uint64_t zeropage_ioctls = 0;
  std::uint64_t pages_prefetched = 0;
};

// One prefetch of the working set into a fresh registered region.
// `expected`: the bytes the source holds (null: zero pages).
Result<Sample> prefetch_once(const SourceFactory& make_source, const std::byte* expected, std::size_t pages,
                             std::size_t stride, std::size_t threads, std::size_t batch, bool verify) {
  const bool zero = expected == nullptr;
  const std::size_t region_pages = pages * stride;
  Mapping region;
  if (auto ok = map_anon(region, region_pages * kPageSize); !ok) return tl::unexpected(ok.error());
  const auto base = reinterpret_cast<std::uint64_t>(region.p);
  auto uffd = create_userfaultfd(0);  // no events: nothing but the installation to measure
  if (!uffd) return tl::unexpected(uffd.error());
  if (auto ok = register_missing(*uffd, region.p, region.n); !ok) {
    ::close(*uffd);
    return tl::unexpected(ok.error());
  }
  FaultEngineOptions options;
  options.prefetch_batch_pages = batch == 0 ? pages : batch;
  options.prefetch_threads = threads;
  options.prefetch_parallel_min_pages = 2;
  auto engine = FaultEngine::create(make_source(base), options);
  if (!engine) {
    ::close(*uffd);
    return tl::unexpected(engine.error());
  }
  if (auto ok = (*engine)->adopt(1, *uffd); !ok) return tl::unexpected(ok.error());
  std::vector<std::uint64_t> list(pages);
  for (std::size_t i = 0; i < pages; ++i) list[i] = base + i * stride * kPageSize;
  const double w0 = wall_now(), c0 = cpu_now();
  auto report = (*engine)->prefetch(1, list);
  Sample s;
  s.cpu_s = cpu_now() - c0;
  s.wall_s = wall_now() - w0;
  if (!report) return tl::unexpected(report.error());
  if (report->pages_installed != pages) return fail(Errc::io, "prefetch installed " + std::to_string(report->pages_installed) + " pages");
  const FaultMetrics& m = (*engine)->metrics();
  s.copy_ioctls = m.copy_ioctls;
  s.zeropage_ioctls = m.zeropage_ioctls;
  s.pages_prefetched = m.pages_prefetched;
  if (verify) {  // installed pages are present now: reading them cannot fault
    for (std::size_t i = 0; i < pages; i += 61) {
      const std::byte* got = region.p + i * stride * kPageSize;
      const bool ok = zero ? got[kPageSize / 2] == std::byte{0} : std::memcmp(got, expected + i * kPageSize, kPageSize) == 0;
      if (!ok) return fail(Errc::corrupt, "page " + std::to_string(i) + " has the wrong bytes");
    }
  }
  engine->reset();  // closes the uffd before the region goes
  return s;
}

// memcpy of `bytes` from src to dst on `threads` threads (contiguous slices); seconds.
double parallel_memcpy(std::byte* dst, const std::byte* src, std::size_t bytes, std::size_t threads) {
  const std::size_t per = (bytes / kPageSize + threads - 1) / threads * kPageSize;
  std::vector<std::thread> ts;
  const double w0 = wall_now();
  for (std::size_t i = 1; i < threads; ++i) {
    const std::size_t off = std::min(bytes, i * per), n = std::min(per, bytes - off);
    ts.emplace_back([=] { std::memcpy(dst + off, src + off, n); });
  }
  std::memcpy(dst, src, std::min(per, bytes));
  for (auto& t : ts) t.join();
  return wall_now() - w0;
}

// Demand faults: a toucher thread reads `pages` pages one by one; the engine's poll loop on this
// thread serves them. Returns per-touch latencies in ns, and the engine's mean service time.
// `spin`: FaultEngineOptions::spin_after_fault (0 = the engine sleeps in epoll_wait between faults).
Result<std::pair<std::vector<double>, double>> demand_once(const SourceFactory& make_source, std::size_t pages,
                                                           std::chrono::microseconds spin) {
  Mapping region;
  if (auto ok = map_anon(region, pages * kPageSize); !ok) return tl::unexpected(ok.error());
  const auto base = reinterpret_cast<std::uint64_t>(region.p);
  auto uffd = create_userfaultfd(0);
  if (!uffd) return tl::unexpected(uffd.error());
  if (auto ok = register_missing(*uffd, region.p, region.n); !ok) {
    ::close(*uffd);
    return tl::unexpected(ok.error());
  }
  FaultEngineOptions options;
  options.spin_after_fault = spin;
  auto engine = FaultEngine::create(make_source(base), options);
  if (!engine) {
    ::close(*uffd);
    return tl::unexpected(engine.error());
  }
  if (auto ok = (*engine)->adopt(1, *uffd); !ok) return tl::unexpected(ok.error());
  std::vector<double> lat(pages);
  std::atomic<bool> done{false};
  std::atomic<std::uint64_t> sink{0};
  std::thread toucher([&] {
    std::uint64_t acc = 0;
    for (std::size_t i = 0; i < pages; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      acc += static_cast<std::uint8_t>(*reinterpret_cast<volatile const std::byte*>(region.p + i * kPageSize + 8));
      lat[i] = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
    }
    sink = acc;
    done = true;
  });
  auto r = (*engine)->run_until([&] { return done.load(); },
                                std::chrono::steady_clock::now() + std::chrono::seconds(60));
  const FaultMetrics m = (*engine)->metrics();
  engine->reset();  // on failure: closing the uffd lets the toucher finish (zero pages): bounded join
  toucher.join();
  if (!r) return tl::unexpected(r.error());
  if (m.faults != pages) return fail(Errc::io, "demand: " + std::to_string(m.faults) + " faults");
  return std::make_pair(std::move(lat), static_cast<double>(m.fault_service_ns) / static_cast<double>(m.faults));
}

// The tier's own read bandwidth over the working set: runs of `batch` pages (0: 256) read into a
// buffer, the range split over `threads` threads; seconds.
Result<double> tier_read_once(Tier& tier, Extent extent, std::size_t pages, std::size_t batch, std::size_t threads) {
  const std::size_t run = batch == 0 ? 256 : batch;
  const std::size_t per = (pages + threads - 1) / threads;
  std::vector<Result<void>> outcome(threads);
  const double w0 = wall_now();
  {
    std::vector<std::jthread> readers;
    for (std::size_t t = 0; t < threads; ++t) {
      readers.emplace_back([&, t] {
        std::vector<std::byte> buffer(run * kPageSize);
        for (std::size_t p = t * per; p < std::min(pages, (t + 1) * per); p += run) {
          const std::size_t n = std::min({run, pages - p, (t + 1) * per - p});
          if (auto ok = tier.read(extent, p * kPageSize, std::span(buffer).first(n * kPageSize)); !ok) {
            outcome[t] = ok;
            return;
          }
        }
      });
    }
  }
  const double seconds = wall_now() - w0;
  for (auto& ok : outcome) {
    if (!ok) return tl::unexpected(ok.error());
  }
  return seconds;
}

struct Key {
  std::string kind;     // prefetch, zero, tier-read
  std::string source;   // dram, dram-copy, file, zero, tier
  std::string pattern;  // contiguous, scattered
  std::size_t batch = 0;
  std::size_t threads = 0;
  auto operator<=>(const Key&) const = default;
};

}  // namespace
}  // namespace snaptier

int main(int argc, char** argv) {
  using namespace snaptier;
  CLI::App app{"Native benchmark of the fault engine's page installation (real userfaultfd, real DRAM)"};
  std::uint64_t mib = 256;
  Config cfg;
  cfg.threads = {1, 2, 3, 4};
  cfg.batches = {64, 512, 0};
  cfg.sources = {"dram"};
  cfg.fault_pages = 4096;
  std::string json_path = "install-bench.json", csv_path = "install-bench.csv";
  std::string file_dir = "/var/tmp";
  bool no_verify = false;
  app.add_option("--size", mib, "working set in MiB")->check(CLI::Range(1, 8192));
  app.add_option("--threads", cfg.threads, "installer thread counts")->check(CLI::Range(1, 64));
  app.add_option("--batch", cfg.batches, "pages per UFFDIO_COPY (prefetch_batch_pages); 0 = whole runs");
  app.add_option("--source", cfg.sources, "page sources: dram (in place), dram-copy (into the engine's buffer), file (mmap of a file, in place)")
      ->check(CLI::IsMember({"dram", "dram-copy", "file"}));
  app.add_option("--fault-pages", cfg.fault_pages, "demand faults per round")->check(CLI::Range(1, 1 << 22));
  app.add_option("--rounds", cfg.rounds, "rounds (each measures everything once; medians reported)")->check(CLI::Range(1, 100));
  app.add_option("--json", json_path, "JSON output path");
  app.add_option("--csv", csv_path, "CSV output path");
  app.add_option("--file-dir", file_dir, "directory for the file source");
  app.add_flag("--no-verify", no_verify, "do not check installed bytes");
  bench::TierTarget target;
  bench::add_tier_options(app, target);
  CLI11_PARSE(app, argc, argv);
  const bool from_tier = app.get_option("--tier")->count() > 0;
  if (from_tier) cfg.sources = {"tier"};
  cfg.pages = static_cast<std::size_t>(mib) * (1 << 20) / kPageSize;
  cfg.verify = !no_verify;
  const std::size_t bytes = cfg.pages * kPageSize;

  // The source: non-zero bytes, faulted in.
  Mapping src;
  if (auto ok = map_anon(src, bytes); !ok) {
    std::cerr << "install_bench: " << ok.error().what() << "\n";
    return 1;
  }
  for (std::size_t i = 0; i < bytes; i += 8) {
    const std::uint64_t v = (i * 0x9E3779B97F4A7C15ull) | 1;
    std::memcpy(src.p + i, &v, 8);
  }
  // The working set written into the tier under test, read back by the `tier` source.
  std::unique_ptr<bench::OpenedTier> tier;
  Extent extent{};
  // Given back on every way out: a memory node's pool outlives this process.
  struct ExtentLease {
    std::unique_ptr<bench::OpenedTier>& tier;
    Extent& extent;
    ~ExtentLease() {
      if (tier && extent.length > 0) (void)tier->tier->release(extent);
    }
  } lease{tier, extent};
  if (from_tier) {
    auto opened = bench::open_tier(target, bytes, "install_bench");
    if (!opened) {
      std::cerr << "install_bench: " << opened.error().what() << "\n";
      return opened.error().code == Errc::invalid_argument ? 2 : 1;
    }
    tier = std::move(*opened);
    auto got = tier->tier->allocate(bytes);
    if (!got) {
      std::cerr << "install_bench: allocate " << bytes << " bytes in the tier: " << got.error().what() << "\n";
      return 1;
    }
    extent = *got;
    for (std::size_t off = 0; off < bytes; off += 1 << 20) {
      const std::size_t n = std::min<std::size_t>(1 << 20, bytes - off);
      if (auto ok = tier->tier->write(extent, off, std::span<const std::byte>(src.p + off, n)); !ok) {
        std::cerr << "install_bench: fill the tier: " << ok.error().what() << "\n";
        return 1;
      }
    }
    std::fprintf(stderr, "working set in tier %s (%s)%s\n", target.tier.c_str(), tier->note.c_str(),
                 tier->tier->map(extent) != nullptr ? ", installed in place from its mapping" : ", read per run");
  }
  const SourceFactory dram_source = [&](std::uint64_t base) -> std::shared_ptr<PageSource> {
    return std::make_shared<BufferSource>(src.p, cfg.pages, base, 1, false, false);
  };
  const SourceFactory tier_source = [&](std::uint64_t base) -> std::shared_ptr<PageSource> {
    return std::make_shared<TierSource>(*tier->tier, extent, cfg.pages, base);
  };
  const SourceFactory& demand_source = from_tier ? tier_source : dram_source;
  Mapping file_map;
  fs::path file_path;
  if (std::find(cfg.sources.begin(), cfg.sources.end(), "file") != cfg.sources.end()) {
    file_path = fs::path(file_dir) / ("install-bench-" + std::to_string(::getpid()));
    {
      std::ofstream f(file_path, std::ios::binary);
      f.write(reinterpret_cast<const char*>(src.p), static_cast<std::streamsize>(bytes));
    }
    int fd = ::open(file_path.c_str(), O_RDONLY | O_CLOEXEC);
    void* p = fd < 0 ? MAP_FAILED : ::mmap(nullptr, bytes, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (fd >= 0) ::close(fd);
    fs::remove(file_path);
    if (p == MAP_FAILED) {
      std::cerr << "install_bench: cannot map " << file_path << "\n";
      return 1;
    }
    file_map.p = static_cast<std::byte*>(p);
    file_map.n = bytes;
  }
  Mapping dst;  // memcpy target, prefaulted
  if (auto ok = map_anon(dst, bytes); !ok) return 1;
  std::memset(dst.p, 0x5A, bytes);

  std::map<Key, std::vector<Sample>> samples;
  std::map<std::size_t, std::vector<double>> memcpy_s;  // threads -> seconds
  std::vector<double> memcpy_fresh_s, fault_ns, fault_ns_sleeping, service_ns;
  std::vector<double> fault_p50_per_round;
  const double gb = static_cast<double>(bytes) / 1e9;

  for (int round = 0; round < cfg.rounds; ++round) {
    std::fprintf(stderr, "round %d/%d\n", round + 1, cfg.rounds);
    for (std::size_t t : cfg.threads) {
      const double s = parallel_memcpy(dst.p, src.p, bytes, t);
      memcpy_s[t].push_back(s);
      std::fprintf(stderr, "  memcpy %zu thread(s): %.2f GB/s\n", t, gb / s);
    }
    {
      Mapping fresh;
      if (auto ok = map_anon(fresh, bytes); !ok) return 1;
      const double s = parallel_memcpy(fresh.p, src.p, bytes, 1);
      memcpy_fresh_s.push_back(s);
      std::fprintf(stderr, "  memcpy into fresh memory: %.2f GB/s\n", gb / s);
    }
    auto d = demand_once(demand_source, std::min(cfg.fault_pages, cfg.pages), FaultEngineOptions{}.spin_after_fault);
    auto d_sleep = demand_once(demand_source, std::min(cfg.fault_pages, cfg.pages), std::chrono::microseconds(0));
    if (!d || !d_sleep) {
      std::cerr << "install_bench: demand: " << (d ? d_sleep : d).error().what() << "\n";
      return 1;
    }
    fault_ns_sleeping.insert(fault_ns_sleeping.end(), d_sleep->first.begin(), d_sleep->first.end());
    std::fprintf(stderr, "  demand faults without the spin: p50 %.1f us, p99 %.1f us\n",
                 percentile(d_sleep->first, 0.5) / 1e3, percentile(d_sleep->first, 0.99) / 1e3);
    fault_p50_per_round.push_back(percentile(d->first, 0.5));
    fault_ns.insert(fault_ns.end(), d->first.begin(), d->first.end());
    service_ns.push_back(d->second);
    std::fprintf(stderr, "  demand faults: p50 %.1f us, p99 %.1f us\n", percentile(d->first, 0.5) / 1e3,
                 percentile(d->first, 0.99) / 1e3);
    std::vector<Key> keys;
    for (const auto& source : cfg.sources) {
      for (std::size_t b : cfg.batches) {
        for (std::size_t t : cfg.threads) {
          keys.push_back(Key{"prefetch", source, "contiguous", b, t});
          if (source == "tier") keys.push_back(Key{"tier-read", source, "contiguous", b, t});
        }
      }
      if (source == "tier") continue;  // the tier holds one contiguous working set
      for (std::size_t t : cfg.threads) keys.push_back(Key{"prefetch", source, "scattered", 1, t});
    }
    for (std::size_t t : cfg.threads) keys.push_back(Key{"zero", "zero", "contiguous", 0, t});
    if (round % 2 == 1) std::reverse(keys.begin(), keys.end());  // neither end always runs first
    for (const Key& k : keys) {
      if (k.kind == "tier-read") {
        auto seconds = tier_read_once(*tier->tier, extent, cfg.pages, k.batch, k.threads);
        if (!seconds) {
          std::cerr << "install_bench: tier-read: " << seconds.error().what() << "\n";
          return 1;
        }
        samples[k].push_back(Sample{.wall_s = *seconds});
        std::fprintf(stderr, "  tier-read batch %zu threads %zu: %.3f GB/s\n", k.batch, k.threads, gb / *seconds);
        continue;
      }
      const std::size_t stride = k.pattern == "scattered" ? 2 : 1;
      const std::byte* data = k.source == "file" ? file_map.p : src.p;
      const SourceFactory source = k.source == "tier" ? tier_source : [&](std::uint64_t base) -> std::shared_ptr<PageSource> {
        return std::make_shared<BufferSource>(data, cfg.pages, base, stride, k.kind == "zero", k.source == "dram-copy");
      };
      auto s = prefetch_once(source, k.kind == "zero" ? nullptr : src.p, cfg.pages, stride, k.threads, k.batch,
                             cfg.verify);
      if (!s) {
        std::cerr << "install_bench: " << k.kind << " " << k.source << " " << k.pattern << ": " << s.error().what() << "\n";
        return 1;
      }
      samples[k].push_back(*s);
      std::fprintf(stderr, "  %s %s %s batch %zu threads %zu: %.2f GB/s (%llu copy ioctls)\n", k.kind.c_str(),
                   k.source.c_str(), k.pattern.c_str(), k.batch, k.threads, gb / s->wall_s,
                   static_cast<unsigned long long>(s->copy_ioctls));
    }
  }

  // Per round ratios (same round = same machine state), then medians of them.
  auto gbs = [&](const std::vector<double>& secs) {
    std::vector<double> v;
    for (double s : secs) v.push_back(gb / s);
    return v;
  };
  const double memcpy1 = median(gbs(memcpy_s[cfg.threads.front()]));
  nlohmann::json out;
  utsname u{};
  ::uname(&u);
  out["host"] = {{"kernel", u.release}, {"cpus_online", std::thread::hardware_concurrency()}};
  out["config"] = {{"size_bytes", bytes}, {"pages", cfg.pages}, {"rounds", cfg.rounds}, {"fault_pages", cfg.fault_pages},
                   {"units", "GB = 1e9 bytes; wall-clock unless cpu_; ratio_* are medians of per-round ratios"}};
  if (from_tier) {
    out["tier"] = {{"name", target.tier}, {"backing", tier->note}, {"in_place", tier->tier->map(extent) != nullptr}};
  }
  out["memcpy"] = nlohmann::json::array();
  for (const auto& [t, secs] : memcpy_s) {
    out["memcpy"].push_back({{"threads", t}, {"gb_per_s", median(gbs(secs))}, {"gb_per_s_all", gbs(secs)}});
  }
  out["memcpy_fresh_1_thread_gb_per_s"] = median(gbs(memcpy_fresh_s));
  out["demand_faults"] = {{"pages_per_round", std::min(cfg.fault_pages, cfg.pages)},
                          {"p50_us", percentile(fault_ns, 0.5) / 1e3},
                          {"p99_us", percentile(fault_ns, 0.99) / 1e3},
                          {"mean_us", std::accumulate(fault_ns.begin(), fault_ns.end(), 0.0) / static_cast<double>(fault_ns.size()) / 1e3},
                          {"p50_us_per_round", [&] { std::vector<double> v; for (double x : fault_p50_per_round) v.push_back(x / 1e3); return v; }()},
                          {"engine_service_mean_us", median(service_ns) / 1e3},
                          {"spin_after_fault_us", FaultEngineOptions{}.spin_after_fault.count()}};
  out["demand_faults_without_spin"] = {{"p50_us", percentile(fault_ns_sleeping, 0.5) / 1e3},
                                       {"p99_us", percentile(fault_ns_sleeping, 0.99) / 1e3}};
  out["results"] = nlohmann::json::array();
  std::ofstream csv(csv_path);
  csv << "kind,source,pattern,batch_pages,threads,gb_per_s,gb_per_s_min,gb_per_s_max,cpu_gb_per_cpu_s,"
         "ratio_memcpy_1_thread,ratio_memcpy_same_threads,ratio_single_thread,ratio_tier_read,copy_ioctls,"
         "zeropage_ioctls,pages\n";
  for (const auto& [k, v] : samples) {
    std::vector<double> rate, cpu_rate, r_mem1, r_memt, r_single, r_tier;
    const Key single{k.kind, k.source, k.pattern, k.batch, cfg.threads.front()};
    // A prefetch from a tier against that tier's own reads of the same runs on as many threads.
    const auto limit = k.kind == "prefetch" && k.source == "tier"
                           ? samples.find(Key{"tier-read", k.source, k.pattern, k.batch, k.threads})
                           : samples.end();
    for (std::size_t i = 0; i < v.size(); ++i) {
      const double g = gb / v[i].wall_s;
      rate.push_back(g);
      cpu_rate.push_back(gb / v[i].cpu_s);
      r_mem1.push_back(g / (gb / memcpy_s[cfg.threads.front()][i]));
      r_memt.push_back(g / (gb / memcpy_s[k.threads][i]));
      r_single.push_back(g / (gb / samples[single][i].wall_s));
      if (limit != samples.end()) r_tier.push_back(g / (gb / limit->second[i].wall_s));
    }
    const auto& last = v.back();
    nlohmann::json j{{"kind", k.kind}, {"source", k.source}, {"pattern", k.pattern},
                     {"batch_pages", k.batch == 0 ? cfg.pages : k.batch}, {"whole_runs", k.batch == 0},
                     {"threads", k.threads}, {"gb_per_s", median(rate)},
                     {"gb_per_s_min", *std::min_element(rate.begin(), rate.end())},
                     {"gb_per_s_max", *std::max_element(rate.begin(), rate.end())},
                     {"cpu_gb_per_cpu_s", median(cpu_rate)}, {"ratio_memcpy_1_thread", median(r_mem1)},
                     {"ratio_memcpy_same_threads", median(r_memt)}, {"ratio_single_thread", median(r_single)},
                     {"ratio_tier_read", r_tier.empty() ? nlohmann::json() : nlohmann::json(median(r_tier))},
                     {"copy_ioctls", last.copy_ioctls}, {"zeropage_ioctls", last.zeropage_ioctls},
                     {"pages", last.pages_prefetched}, {"gb_per_s_per_round", rate},
                     {"ratio_memcpy_1_thread_per_round", r_mem1}, {"ratio_single_thread_per_round", r_single}};
    out["results"].push_back(j);
    csv << k.kind << "," << k.source << "," << k.pattern << "," << j["batch_pages"] << "," << k.threads << ","
        << median(rate) << "," << j["gb_per_s_min"] << "," << j["gb_per_s_max"] << "," << median(cpu_rate) << ","
        << median(r_mem1) << "," << median(r_memt) << "," << median(r_single) << ","
        << (r_tier.empty() ? std::string() : std::to_string(median(r_tier))) << "," << last.copy_ioctls << ","
        << last.zeropage_ioctls << "," << last.pages_prefetched << "\n";
  }
  std::ofstream(json_path) << out.dump(2) << "\n";
  std::fprintf(stderr, "memcpy 1 thread %.2f GB/s; demand fault p50 %.1f us p99 %.1f us; wrote %s and %s\n", memcpy1,
               percentile(fault_ns, 0.5) / 1e3, percentile(fault_ns, 0.99) / 1e3, json_path.c_str(), csv_path.c_str());
  return 0;
}
