// rdma-selftest: a pool server and an rdma tier in one process, connected over loopback on one
// device (rxe loops back locally; real NICs do too). Verifies data byte-exact across several
// sizes and unaligned offsets, checks the error paths, measures read latency and throughput.
//   exit 0 ok | 1 a check failed | 2 usage | 77 no RDMA device (automake's "skipped")
// stdout: one JSON object; stderr: human-readable progress and failures.
// Two hosts, no agent needed: `rdma-selftest --serve DIR` on the memory node and
// `rdma-selftest --connect DIR` on the compute host, DIR a directory both see (e.g. /shared/x).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "snaptier/control.hpp"
#include "snaptier/rdma.hpp"

namespace {

using namespace snaptier;
using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;
constexpr int kExitSkipped = 77;

constexpr std::uint64_t KiB = 1024;
constexpr std::uint64_t MiB = 1024 * KiB;

struct Failure {
  std::string message;
};

class Selftest {
 public:
  // `server` is null when the pool lives on another host (--connect).
  explicit Selftest(Tier& tier, RdmaPoolServer* server, std::uint64_t pool_size)
      : tier_(tier), server_(server), pool_size_(pool_size) {}

  // Each check either passes (counted) or records the first failure and stops the run.
  bool ok() const { return !failure_; }
  int checks() const { return checks_; }
  const std::string& failure() const { return failure_->message; }

  bool check(bool condition, const std::string& what) {
    if (!failure_ && !condition) failure_ = Failure{what};
    if (condition) ++checks_;
    return condition;
  }
  template <class T>
  bool check_ok(const Result<T>& result, const std::string& what) {
    return check(result.has_value(), result ? what : what + ": " + result.error().what());
  }
  template <class T>
  bool check_error(const Result<T>& result, Errc expected, const std::string& what) {
    if (result) return check(false, what + ": succeeded, expected " + std::string(to_string(expected)));
    return check(result.error().code == expected,
                 what + ": got " + result.error().what() + ", expected " +
                     std::string(to_string(expected)));
  }

  std::vector<std::byte> random_bytes(std::size_t size) {
    std::vector<std::byte> bytes(size);
    std::uniform_int_distribution<int> dist(0, 255);
    for (auto& b : bytes) b = static_cast<std::byte>(dist(rng_));
    return bytes;
  }

  // Write random bytes at `offset` of a fresh extent, read them back, compare; also read a
  // window straddling the written range's end to catch off-by-one chunking.
  void round_trip(std::uint64_t extent_size, std::uint64_t offset, std::uint64_t size) {
    if (!ok()) return;
    const std::string label = "round trip " + std::to_string(size) + " bytes at offset " +
                              std::to_string(offset) + " of a " + std::to_string(extent_size) +
                              "-byte extent";
    auto extent = tier_.allocate(extent_size);
    if (!check_ok(extent, label + ": allocate")) return;
    check(extent->offset % 4096 == 0 && extent->length >= extent_size,
          label + ": extent is not page aligned or too short");
    const auto data = random_bytes(size);
    if (check_ok(tier_.write(*extent, offset, data), label + ": write")) {
      std::vector<std::byte> back(size, std::byte{0x5a});
      if (check_ok(tier_.read(*extent, offset, back), label + ": read")) {
        const auto mismatch = std::mismatch(data.begin(), data.end(), back.begin());
        check(mismatch.first == data.end(),
              label + ": data differs at byte " +
                  std::to_string(mismatch.first - data.begin()));
      }
      if (size > 2) {
        const std::uint64_t inner = size / 3;
        std::vector<std::byte> part(size - inner);
        if (check_ok(tier_.read(*extent, offset + inner, part), label + ": partial read")) {
          check(std::equal(part.begin(), part.end(), data.begin() + static_cast<std::ptrdiff_t>(inner)),
                label + ": partial read differs");
        }
      }
    }
    check_ok(tier_.release(*extent), label + ": release");
  }

  void error_paths() {
    if (!ok()) return;
    auto extent = tier_.allocate(8 * KiB);
    if (!check_ok(extent, "error paths: allocate")) return;
    std::vector<std::byte> buffer(64);
    check_error(tier_.read(*extent, extent->length - 10, buffer), Errc::invalid_argument,
                "read past the end of an extent");
    check_error(tier_.write(*extent, extent->length + 1, std::span<const std::byte>(buffer)),
                Errc::invalid_argument, "write beyond an extent");
    check_error(tier_.read(Extent{pool_size_, 4096}, 0, buffer), Errc::invalid_argument,
                "read of an extent outside the pool");
    check_error(tier_.allocate(pool_size_ * 2), Errc::no_space, "allocate beyond the pool");
    // The rejected requests never reached the wire: the QP still works.
    check_ok(tier_.write(*extent, 0, std::span<const std::byte>(buffer)),
             "write after rejected requests");
    check_ok(tier_.release(*extent), "error paths: release");
  }

  // Latency of `size`-byte reads at page-aligned offsets spread over a 1 MiB extent.
  void latency(std::uint64_t size, int iterations, json& out, const std::string& key) {
    if (!ok()) return;
    auto extent = tier_.allocate(std::max<std::uint64_t>(MiB, size));
    if (!check_ok(extent, key + ": allocate")) return;
    std::vector<std::byte> buffer(size);
    const std::uint64_t slots = extent->length / size;
    std::vector<double> samples;
    samples.reserve(static_cast<std::size_t>(iterations));
    for (int i = 0; i < iterations && ok(); ++i) {
      const std::uint64_t offset = (static_cast<std::uint64_t>(i) % slots) * size;
      const auto start = Clock::now();
      auto result = tier_.read(*extent, offset, buffer);
      const auto stop = Clock::now();
      if (!check_ok(result, key + ": read " + std::to_string(i))) break;
      samples.push_back(std::chrono::duration<double, std::micro>(stop - start).count());
    }
    if (!samples.empty()) {
      std::sort(samples.begin(), samples.end());
      out[key + "_p50_us"] = round2(percentile(samples, 0.50));
      out[key + "_p99_us"] = round2(percentile(samples, 0.99));
      out[key + "_samples"] = samples.size();
    }
    check_ok(tier_.release(*extent), key + ": release");
  }

  // Throughput of whole-extent writes and reads (chunked by the tier through its bounce buffer).
  void throughput(std::uint64_t total, json& out) {
    if (!ok()) return;
    auto extent = tier_.allocate(total);
    if (!check_ok(extent, "throughput: allocate")) return;
    const auto data = random_bytes(total);
    auto start = Clock::now();
    if (check_ok(tier_.write(*extent, 0, data), "throughput: write")) {
      const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
      out["write_mib_s"] = round2(static_cast<double>(total) / MiB / seconds);
    }
    std::vector<std::byte> back(total);
    start = Clock::now();
    if (check_ok(tier_.read(*extent, 0, back), "throughput: read")) {
      const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
      out["read_mib_s"] = round2(static_cast<double>(total) / MiB / seconds);
      check(back == data, "throughput: data read back differs");
    }
    check_ok(tier_.release(*extent), "throughput: release");
  }

  // A second tier (its own QP) on the same pool sees the first tier's bytes: the pool is shared.
  void shared_pool(Tier& other) {
    if (!ok()) return;
    auto extent = tier_.allocate(64 * KiB);
    if (!check_ok(extent, "shared pool: allocate")) return;
    const auto data = random_bytes(64 * KiB - 3);
    if (check_ok(tier_.write(*extent, 3, data), "shared pool: write through the first tier")) {
      std::vector<std::byte> back(data.size());
      if (check_ok(other.read(*extent, 3, back), "shared pool: read through the second tier")) {
        check(back == data, "shared pool: the second tier reads different bytes");
      }
    }
    check_ok(tier_.release(*extent), "shared pool: release");
  }

  void final_accounting() {
    if (!ok()) return;
    if (server_ != nullptr) {
      check(server_->stats().used_bytes == 0,
            "pool still has " + std::to_string(server_->stats().used_bytes) +
                " bytes allocated after every extent was released");
    }
    check(tier_.stats().used_bytes == 0, "tier still counts used bytes after release");
  }

 private:
  static double percentile(const std::vector<double>& sorted, double p) {
    const auto rank = static_cast<std::size_t>(std::ceil(p * static_cast<double>(sorted.size())));
    return sorted[std::min(sorted.size() - 1, rank == 0 ? 0 : rank - 1)];
  }
  static double round2(double v) { return std::round(v * 100.0) / 100.0; }

  Tier& tier_;
  RdmaPoolServer* server_;
  std::uint64_t pool_size_;
  int checks_ = 0;
  std::optional<Failure> failure_;
  std::mt19937_64 rng_{std::random_device{}()};
};

// ---- Two hosts without the agent: a file rendezvous in a directory both can see (the
// testbed's /shared). The client writes endpoint.json, the server answers with grant.json, the
// client writes done when finished. Files appear by rename, so a reader never sees half a file.

bool write_file_atomically(const std::filesystem::path& path, const std::string& text) {
  const auto tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    if (!out.flush()) return false;
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  return !ec;
}

Result<json> wait_for_json(const std::filesystem::path& path, std::chrono::seconds limit) {
  const auto deadline = Clock::now() + limit;
  while (Clock::now() < deadline) {
    std::ifstream in(path);
    if (in) {
      std::stringstream text;
      text << in.rdbuf();
      json j = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded()) return fail(Errc::protocol, path.string() + ": not JSON");
      return j;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return fail(Errc::timeout, "no " + path.string() + " within " + std::to_string(limit.count()) + " s");
}

// The compute side's pool client over the rendezvous. Allocation is a bump pointer over the
// granted pool: the remote server's allocator is out of reach without the control plane, and
// this client is the pool's only user.
class RendezvousPoolClient final : public RdmaPoolClient {
 public:
  explicit RendezvousPoolClient(std::filesystem::path dir) : dir_(std::move(dir)) {}
  Result<RdmaPoolGrant> connect(const RdmaEndpoint& local) override {
    if (!write_file_atomically(dir_ / "endpoint.json", control::encode_endpoint(local).dump())) {
      return fail(Errc::io, "cannot write " + (dir_ / "endpoint.json").string());
    }
    auto j = wait_for_json(dir_ / "grant.json", std::chrono::seconds(60));
    if (!j) return tl::unexpected(j.error());
    auto grant = control::decode_grant(*j);
    if (grant) pool_size_ = grant->pool_size;
    return grant;
  }
  Result<Extent> allocate(std::uint64_t length) override {
    const std::uint64_t rounded = (length + 4095) / 4096 * 4096;
    if (length == 0 || rounded > pool_size_ - next_) {
      return fail(Errc::no_space, "rendezvous pool: " + std::to_string(pool_size_ - next_) + " bytes left");
    }
    const Extent extent{next_, rounded};
    next_ += rounded;
    return extent;
  }
  Result<void> release(Extent) override { return {}; }

 private:
  std::filesystem::path dir_;
  std::uint64_t pool_size_ = 0;
  std::uint64_t next_ = 0;
};

int serve(const RdmaDeviceOptions& options, std::uint64_t pool_size, const std::filesystem::path& dir) {
  auto server = make_rdma_pool_server(options, RdmaPoolOptions{.pool_size = pool_size, .path = {}});
  if (!server) {
    std::cerr << "rdma-selftest: pool server: " << server.error().what() << "\n";
    return kExitFailed;
  }
  std::cerr << "rdma-selftest: serving " << pool_size << " bytes; waiting for " << (dir / "endpoint.json") << "\n";
  auto endpoint_json = wait_for_json(dir / "endpoint.json", std::chrono::seconds(120));
  if (!endpoint_json) {
    std::cerr << "rdma-selftest: " << endpoint_json.error().what() << "\n";
    return kExitFailed;
  }
  auto endpoint = control::decode_endpoint(*endpoint_json);
  if (!endpoint) {
    std::cerr << "rdma-selftest: endpoint: " << endpoint.error().what() << "\n";
    return kExitFailed;
  }
  auto grant = (*server)->accept(*endpoint);
  if (!grant) {
    std::cerr << "rdma-selftest: accept: " << grant.error().what() << "\n";
    return kExitFailed;
  }
  if (!write_file_atomically(dir / "grant.json", control::encode_grant(*grant).dump())) {
    std::cerr << "rdma-selftest: cannot write " << (dir / "grant.json") << "\n";
    return kExitFailed;
  }
  // The pool must stay registered until the client is done with it.
  auto done = wait_for_json(dir / "done", std::chrono::seconds(600));
  std::cout << json{{"ok", done.has_value()}, {"served_bytes", pool_size}}.dump() << std::endl;
  return done ? kExitOk : kExitFailed;
}

int report_failure(json out, int checks, const std::string& message) {
  out["ok"] = false;
  out["checks"] = checks;
  out["error"] = message;
  std::cout << out.dump() << std::endl;
  std::cerr << "rdma-selftest: FAILED: " << message << "\n";
  return kExitFailed;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"rdma-selftest: RDMA pool server + rdma tier over loopback on one device"};
  RdmaDeviceOptions options;
  std::uint64_t pool_mib = 64;
  int iterations = 200;
  std::uint64_t throughput_mib = 16;
  app.add_option("--device", options.device, "RDMA device (empty = first), e.g. rxe0, mlx5_0");
  app.add_option("--port", options.port, "device port")->capture_default_str();
  app.add_option("--gid-index", options.gid_index, "GID index (RoCEv2 over IPv4 on rxe: 1)")
      ->capture_default_str();
  app.add_option("--timeout-ms", options.timeout_ms, "deadline of every completion")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--bounce-bytes", options.bounce_bytes, "registered bounce buffer (larger requests are chunked)")
      ->capture_default_str();
  app.add_option("--pool-mib", pool_mib, "registered pool size")->capture_default_str()
      ->check(CLI::Range(std::uint64_t{8}, std::uint64_t{1} << 20));
  app.add_option("--iterations", iterations, "4 KiB reads for the latency figures (64 KiB: a quarter)")
      ->capture_default_str()->check(CLI::Range(1, 1'000'000));
  app.add_option("--throughput-mib", throughput_mib, "bytes moved for the throughput figures")
      ->capture_default_str()->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1} << 20));
  std::string serve_dir;
  std::string connect_dir;
  auto* serve_option = app.add_option(
      "--serve", serve_dir,
      "two hosts: be the memory node; rendezvous through files in this shared directory");
  app.add_option("--connect", connect_dir,
                 "two hosts: be the compute host of a --serve peer using this shared directory")
      ->excludes(serve_option);
  CLI11_PARSE(app, argc, argv);

  json out;
  if (!rdma_devices_present()) {
    const std::string reason =
        "no RDMA device (load rdma_rxe and run `rdma link add rxe0 type rxe netdev eth0`)";
    std::cerr << "rdma-selftest: SKIPPED: " << reason << "\n";
    out["ok"] = false;
    out["skipped"] = true;
    out["reason"] = reason;
    std::cout << out.dump() << std::endl;
    return kExitSkipped;
  }
  const auto started = Clock::now();

  auto info = query_rdma_device(options);
  if (!info) return report_failure(out, 0, info.error().what());
  out["device"] = info->name;
  out["port"] = info->port;
  out["gid_index"] = info->gid_index;
  out["gid"] = info->gid;
  out["gid_type"] = info->gid_type;
  out["link_layer"] = info->link_layer;
  out["mtu"] = info->active_mtu_bytes;
  std::cerr << "rdma-selftest: " << info->name << " port " << info->port << " gid[" << info->gid_index
            << "] " << info->gid << " (" << info->gid_type << ", " << info->link_layer << ", mtu "
            << info->active_mtu_bytes << ")\n";

  std::uint64_t pool_size = pool_mib * MiB;
  if (!serve_dir.empty()) return serve(options, pool_size, serve_dir);
  std::shared_ptr<RdmaPoolServer> shared_server;
  std::shared_ptr<RdmaPoolClient> pool_client;
  if (connect_dir.empty()) {
    auto server = make_rdma_pool_server(options, RdmaPoolOptions{.pool_size = pool_size, .path = {}});
    if (!server) return report_failure(out, 0, "pool server: " + server.error().what());
    shared_server = std::move(*server);
    pool_client = make_local_rdma_pool_client(shared_server);
  } else {
    pool_client = std::make_shared<RendezvousPoolClient>(connect_dir);
  }
  auto tier = make_rdma_tier(options, pool_client);
  if (!tier) return report_failure(out, 0, "rdma tier: " + tier.error().what());
  pool_size = (*tier)->stats().capacity_bytes;  // the granted pool, for a remote server
  out["mode"] = connect_dir.empty() ? "loopback" : "remote";

  Selftest test(**tier, shared_server.get(), pool_size);
  test.check((*tier)->kind() == TierKind::rdma && (*tier)->caps().remote && (*tier)->caps().shared &&
                 !(*tier)->caps().byte_addressable,
             "tier kind/caps");
  // Sizes around the page, the bounce buffer (chunking) and unaligned offsets.
  const std::uint64_t bounce = options.bounce_bytes;
  test.round_trip(4 * KiB, 0, 4 * KiB);
  test.round_trip(64 * KiB, 0, 64 * KiB);
  test.round_trip(MiB, 0, MiB);
  test.round_trip(8 * KiB, 1, 4095);
  test.round_trip(64 * KiB, 4093, 10'000);
  test.round_trip(4 * MiB, 123'457, MiB + 13);
  test.round_trip(3 * bounce + 8 * KiB, 777, 3 * bounce + 5);
  test.error_paths();
  if (shared_server) {
    auto second = make_rdma_tier(options, make_local_rdma_pool_client(shared_server));
    if (test.check_ok(second, "second rdma tier on the same pool")) test.shared_pool(**second);
  }
  test.latency(4 * KiB, iterations, out, "read_4k");
  test.latency(64 * KiB, std::max(1, iterations / 4), out, "read_64k");
  test.throughput(std::min(throughput_mib * MiB, pool_size / 2), out);
  test.final_accounting();

  const auto stats = (*tier)->stats();
  out["bytes_read"] = stats.bytes_read;
  out["bytes_written"] = stats.bytes_written;
  out["elapsed_ms"] =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started).count();
  if (!connect_dir.empty()) {
    (void)write_file_atomically(std::filesystem::path(connect_dir) / "done", test.ok() ? "true" : "false");
  }
  if (!test.ok()) return report_failure(out, test.checks(), test.failure());
  out["ok"] = true;
  out["checks"] = test.checks();
  std::cout << out.dump() << std::endl;
  return kExitOk;
}
