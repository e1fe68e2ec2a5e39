// tier_bench: page read latency (p50/p99) and throughput of one tier: 4 KiB and 64 KiB reads at
// random aligned offsets of a filled extent (by one thread, and by several at once), and long
// sequential reads over the whole extent, the way a prefetch reads a run. Any Tier works:
// open_tier() is the only place that knows the backends, so a new one is one more branch there.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <random>
#include <thread>
#include <vector>

#include "bench_tier.hpp"

namespace snaptier {
namespace {


struct BenchConfig {
  std::uint64_t working_set_bytes = 64ull << 20;
  std::uint64_t iterations = 20000;
  std::vector<std::uint64_t> block_sizes{4096, 65536};
  std::uint32_t threads = 1;                 // > 1: the random reads again, by this many threads at once
  std::uint64_t stream_block_bytes = 1 << 20;  // 0: no sequential pass
  std::uint32_t stream_passes = 2;
};

struct BlockResult {
  std::string pattern;  // random | sequential
  std::uint32_t threads = 1;
  std::uint64_t block_bytes = 0;
  std::uint64_t reads = 0;
  double p50_ns = 0, p99_ns = 0, mean_ns = 0, max_ns = 0;
  double throughput_mib_s = 0;
};

double percentile(std::vector<double>& sorted, double p) {
  const auto index = static_cast<std::size_t>(p * static_cast<double>(sorted.size() - 1) + 0.5);
  return sorted[std::min(index, sorted.size() - 1)];
}

Result<std::vector<BlockResult>> run_benchmark(Tier& tier, const BenchConfig& config) {
  auto extent = tier.allocate(config.working_set_bytes);
  if (!extent) return tl::unexpected(extent.error());
  // Fill with non-zero data so nothing is served from a shared zero page.
  std::vector<std::byte> chunk(1 << 20);
  for (std::size_t i = 0; i < chunk.size(); ++i) chunk[i] = static_cast<std::byte>(i * 31 + 7);
  for (std::uint64_t offset = 0; offset < extent->length; offset += chunk.size()) {
    const auto n = std::min<std::uint64_t>(chunk.size(), extent->length - offset);
    if (auto ok = tier.write(*extent, offset, std::span(chunk).first(n)); !ok) return tl::unexpected(ok.error());
  }

  std::vector<BlockResult> results;
  // `threads` readers at once, each `reads` reads of `block` bytes at offsets `next_offset` picks.
  const auto measure = [&](std::string pattern, std::uint32_t threads, std::uint64_t block, std::uint64_t reads,
                           auto next_offset) -> Result<BlockResult> {
    std::vector<std::vector<double>> per_thread(threads);
    std::vector<Result<void>> outcome(threads);
    const auto start = std::chrono::steady_clock::now();
    {
      std::vector<std::jthread> readers;
      for (std::uint32_t t = 0; t < threads; ++t) {
        readers.emplace_back([&, t] {
          std::vector<std::byte> buffer(block);
          std::mt19937_64 rng(42 + t);
          per_thread[t].reserve(reads);
          for (std::uint64_t i = 0; i < reads; ++i) {
            const std::uint64_t offset = next_offset(rng, i);
            const auto t0 = std::chrono::steady_clock::now();
            if (auto ok = tier.read(*extent, offset, buffer); !ok) {
              outcome[t] = ok;
              return;
            }
            per_thread[t].push_back(
                std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count());
          }
        });
      }
    }
    const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    for (auto& ok : outcome) {
      if (!ok) return tl::unexpected(ok.error());
    }
    std::vector<double> latencies;
    for (auto& l : per_thread) latencies.insert(latencies.end(), l.begin(), l.end());
    std::sort(latencies.begin(), latencies.end());
    BlockResult r;
    r.pattern = std::move(pattern);
    r.threads = threads;
    r.block_bytes = block;
    r.reads = latencies.size();
    r.p50_ns = percentile(latencies, 0.50);
    r.p99_ns = percentile(latencies, 0.99);
    r.max_ns = latencies.back();
    double sum = 0;
    for (double l : latencies) sum += l;
    r.mean_ns = sum / static_cast<double>(latencies.size());
    r.throughput_mib_s = static_cast<double>(block * r.reads) / total_s / (1 << 20);
    return r;
  };

  std::vector<std::uint32_t> thread_counts{1};
  if (config.threads > 1) thread_counts.push_back(config.threads);
  for (std::uint32_t threads : thread_counts) {
    for (std::uint64_t block : config.block_sizes) {
      if (block > extent->length) continue;
      std::uniform_int_distribution<std::uint64_t> pick(0, extent->length / block - 1);
      auto r = measure("random", threads, block, config.iterations,
                       [&](std::mt19937_64& rng, std::uint64_t) { return pick(rng) * block; });
      if (!r) return tl::unexpected(r.error());
      results.push_back(*r);
    }
  }
  if (const std::uint64_t block = config.stream_block_bytes; block > 0 && block <= extent->length) {
    const std::uint64_t per_pass = extent->length / block;
    auto r = measure("sequential", 1, block, per_pass * config.stream_passes,
                     [&](std::mt19937_64&, std::uint64_t i) { return (i % per_pass) * block; });
    if (!r) return tl::unexpected(r.error());
    results.push_back(*r);
  }
  (void)tier.release(*extent);
  return results;
}

}  // namespace
}  // namespace snaptier

int main(int argc, char** argv) {
  using namespace snaptier;
  CLI::App app{"Page read latency and throughput of one snaptier tier"};
  bench::TierTarget target;
  std::uint64_t size = 64ull << 20;
  std::uint64_t iterations = 20000;
  std::uint32_t threads = 1;
  std::uint64_t stream_block = 1 << 20;
  std::uint32_t stream_passes = 2;
  bool json = false;
  bench::add_tier_options(app, target);
  app.add_option("--size", size, "working set in bytes")->check(CLI::Range(std::uint64_t{65536}, std::uint64_t{1} << 40));
  app.add_option("--iterations", iterations, "reads per block size")->check(CLI::PositiveNumber);
  app.add_option("--threads", threads, "also run the random reads with this many threads at once")
      ->check(CLI::Range(1, 64));
  app.add_option("--stream-block", stream_block, "sequential pass: bytes per read (0: no sequential pass)");
  app.add_option("--stream-passes", stream_passes, "sequential pass: times over the whole working set")
      ->check(CLI::Range(1, 1000));
  app.add_flag("--json", json, "print JSON");
  CLI11_PARSE(app, argc, argv);

  auto opened = bench::open_tier(target, size, "tier_bench");
  if (!opened) {
    std::cerr << "tier_bench: " << opened.error().what() << "\n";
    return opened.error().code == Errc::invalid_argument ? 2 : 1;
  }
  BenchConfig config;
  config.working_set_bytes = size;
  config.iterations = iterations;
  config.threads = threads;
  config.stream_block_bytes = stream_block;
  config.stream_passes = stream_passes;
  auto results = run_benchmark(*(*opened)->tier, config);
  if (!results) {
    std::cerr << "tier_bench: " << results.error().what() << "\n";
    return 1;
  }

  if (json) {
    nlohmann::json out;
    out["tier"] = target.tier;
    out["backing"] = (*opened)->note;
    out["working_set_bytes"] = size;
    out["iterations"] = iterations;
    out["units"] = {{"latency", "ns"}, {"throughput", "MiB/s"}, {"block", "bytes"}};
    out["results"] = nlohmann::json::array();
    for (const auto& r : *results) {
      out["results"].push_back({{"pattern", r.pattern}, {"threads", r.threads}, {"block_bytes", r.block_bytes}, {"reads", r.reads}, {"p50_ns", r.p50_ns},
                                {"p99_ns", r.p99_ns}, {"mean_ns", r.mean_ns}, {"max_ns", r.max_ns},
                                {"throughput_mib_s", r.throughput_mib_s}});
    }
    std::cout << out.dump(2) << "\n";
  } else {
    std::printf("tier %s (%s), working set %llu bytes, %llu reads per size and thread\n", target.tier.c_str(),
                (*opened)->note.c_str(), static_cast<unsigned long long>(size), static_cast<unsigned long long>(iterations));
    std::printf("%-11s %7s %10s %12s %12s %12s %14s\n", "pattern", "threads", "block", "p50 [ns]", "p99 [ns]",
                "mean [ns]", "MiB/s");
    for (const auto& r : *results) {
      std::printf("%-11s %7u %10llu %12.0f %12.0f %12.0f %14.1f\n", r.pattern.c_str(), r.threads,
                  static_cast<unsigned long long>(r.block_bytes), r.p50_ns, r.p99_ns, r.mean_ns, r.throughput_mib_s);
    }
  }
  return 0;
}
