// RDMA pool server and rdma tier. JSON and argument checks run everywhere; the data path needs a
// device (rdma_rxe exists only in the testbed guests) and skips without one. Environment:
// SNAPTIER_RDMA_DEVICE (default: first device), SNAPTIER_RDMA_GID_INDEX (default 1).
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <barrier>
#include <cstring>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "helpers/temp_dir.hpp"
#include "snaptier/control.hpp"
#include "snaptier/rdma.hpp"
#include "snaptier/snapshot_store.hpp"

namespace snaptier {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

constexpr std::uint64_t KiB = 1024;
constexpr std::uint64_t MiB = 1024 * KiB;

#define SKIP_WITHOUT_RDMA()                                                                    \
  do {                                                                                         \
    if (!rdma_support_built()) GTEST_SKIP() << "this build has no RDMA (built without libibverbs)"; \
    if (!rdma_devices_present()) {                                                             \
      GTEST_SKIP() << "no RDMA device (rdma_rxe exists only in the testbed guests)";           \
    }                                                                                          \
  } while (0)

std::vector<std::byte> random_bytes(std::size_t size, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> bytes(size);
  for (auto& b : bytes) b = static_cast<std::byte>(rng() & 0xff);
  return bytes;
}

RdmaDeviceOptions test_options() {
  RdmaDeviceOptions options;
  if (const char* device = std::getenv("SNAPTIER_RDMA_DEVICE")) options.device = device;
  if (const char* gid = std::getenv("SNAPTIER_RDMA_GID_INDEX")) options.gid_index = std::atoi(gid);
  options.timeout_ms = 2000;  // short: a failing test must fail fast, not wait 5 s per op
  return options;
}

// ----- JSON (host) -----------------------------------------------------------------------------

RdmaPoolGrant sample_grant() {
  return RdmaPoolGrant{
      .endpoint = RdmaEndpoint{.gid = "fe80000000000000505400fffe123456", .qpn = 0x11, .psn = 0xabcdef, .lid = 0},
      .remote_addr = 0x7f12'3456'7000ull,
      .rkey = 0xdeadbeef,
      .pool_size = 64 * MiB};
}

TEST(RdmaJsonTest, EndpointRoundTrips) {
  const RdmaEndpoint endpoint{.gid = "00000000000000000000ffff0a000002", .qpn = 0xffffff, .psn = 7, .lid = 3};
  const json j = endpoint;
  EXPECT_EQ(j.at("gid"), endpoint.gid);
  EXPECT_EQ(j.at("qpn"), 0xffffff);
  const auto back = j.get<RdmaEndpoint>();
  EXPECT_EQ(back.gid, endpoint.gid);
  EXPECT_EQ(back.qpn, endpoint.qpn);
  EXPECT_EQ(back.psn, endpoint.psn);
  EXPECT_EQ(back.lid, endpoint.lid);
}

TEST(RdmaJsonTest, GrantRoundTripsThroughText) {
  const RdmaPoolGrant grant = sample_grant();
  const auto back = json::parse(json(grant).dump()).get<RdmaPoolGrant>();
  EXPECT_EQ(back.endpoint.gid, grant.endpoint.gid);
  EXPECT_EQ(back.endpoint.qpn, grant.endpoint.qpn);
  EXPECT_EQ(back.endpoint.psn, grant.endpoint.psn);
  EXPECT_EQ(back.remote_addr, grant.remote_addr);
  EXPECT_EQ(back.rkey, grant.rkey);
  EXPECT_EQ(back.pool_size, grant.pool_size);
}

TEST(RdmaJsonTest, LidIsOptionalAndMissingFieldsThrow) {
  const auto endpoint = json::parse(R"({"gid":"00000000000000000000ffff0a000002","qpn":5,"psn":6})")
                            .get<RdmaEndpoint>();
  EXPECT_EQ(endpoint.lid, 0);
  EXPECT_THROW((void)json::parse(R"({"qpn":5,"psn":6})").get<RdmaEndpoint>(), json::exception);
  EXPECT_THROW((void)json::parse(R"({"endpoint":{}})").get<RdmaPoolGrant>(), json::exception);
}

TEST(RdmaJsonTest, AgreesWithTheControlPlaneCodec) {
  const RdmaPoolGrant grant = sample_grant();
  auto decoded = control::decode_grant(json(grant));
  ASSERT_TRUE(decoded) << decoded.error().what();
  EXPECT_EQ(decoded->endpoint.gid, grant.endpoint.gid);
  EXPECT_EQ(decoded->rkey, grant.rkey);
  EXPECT_EQ(decoded->remote_addr, grant.remote_addr);
  const auto back = control::encode_grant(grant).get<RdmaPoolGrant>();
  EXPECT_EQ(back.endpoint.qpn, grant.endpoint.qpn);
  EXPECT_EQ(back.pool_size, grant.pool_size);
}

// ----- Argument checks and absence of a device (host) ------------------------------------------

TEST(RdmaArgsTest, RejectsBadArgumentsBeforeTouchingADevice) {
  auto no_pool = make_rdma_tier(test_options(), nullptr);
  ASSERT_FALSE(no_pool);
  EXPECT_EQ(no_pool.error().code, Errc::invalid_argument);

  auto server = make_rdma_pool_server(test_options(), RdmaPoolOptions{});
  ASSERT_FALSE(server);
  EXPECT_EQ(server.error().code, Errc::invalid_argument);

  RdmaDeviceOptions bad_port = test_options();
  bad_port.port = 0;
  auto info = query_rdma_device(bad_port);
  ASSERT_FALSE(info);
  EXPECT_EQ(info.error().code, Errc::invalid_argument);
}

class NullPool final : public RdmaPoolClient {
 public:
  Result<RdmaPoolGrant> connect(const RdmaEndpoint&) override { return fail(Errc::unavailable, "null"); }
  Result<Extent> allocate(std::uint64_t) override { return fail(Errc::unavailable, "null"); }
  Result<void> release(Extent) override { return fail(Errc::unavailable, "null"); }
};

TEST(RdmaArgsTest, WorkRequestsInFlightAreBetweenOneAndTheSendQueueDepth) {
  for (std::uint32_t depth : {0u, 17u, 1000u}) {
    RdmaDeviceOptions options = test_options();
    options.max_in_flight = depth;
    auto tier = make_rdma_tier(options, std::make_shared<NullPool>());
    ASSERT_FALSE(tier) << depth;
    EXPECT_EQ(tier.error().code, Errc::invalid_argument);
    EXPECT_NE(tier.error().message.find("max_in_flight " + std::to_string(depth)), std::string::npos)
        << tier.error().message;
  }
}

TEST(RdmaArgsTest, ABuildWithoutVerbsHasNoDeviceAndSaysWhy) {
  if (rdma_support_built()) GTEST_SKIP() << "this build has libibverbs";
  EXPECT_FALSE(rdma_devices_present());
  auto tier = make_rdma_tier(test_options(), std::make_shared<NullPool>());
  ASSERT_FALSE(tier);
  EXPECT_EQ(tier.error().code, Errc::unavailable);
  EXPECT_NE(tier.error().message.find("libibverbs"), std::string::npos) << tier.error().what();
}

TEST(RdmaArgsTest, WithoutADeviceEverythingIsUnavailable) {
  if (rdma_devices_present()) GTEST_SKIP() << "this machine has an RDMA device";
  auto server = make_rdma_pool_server(test_options(), RdmaPoolOptions{.pool_size = MiB, .path = {}});
  ASSERT_FALSE(server);
  EXPECT_EQ(server.error().code, Errc::unavailable) << server.error().what();
  auto tier = make_rdma_tier(test_options(), std::make_shared<NullPool>());
  ASSERT_FALSE(tier);
  EXPECT_EQ(tier.error().code, Errc::unavailable) << tier.error().what();
  auto info = query_rdma_device(test_options());
  ASSERT_FALSE(info);
  EXPECT_EQ(info.error().code, Errc::unavailable);
}

// ----- Data path (guests) ----------------------------------------------------------------------

class RdmaTierTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_RDMA();
    options_ = test_options();
    options_.bounce_bytes = 64 * KiB;  // small, so that modest requests exercise chunking
    auto server = make_rdma_pool_server(options_, RdmaPoolOptions{.pool_size = kPool, .path = {}});
    ASSERT_TRUE(server) << server.error().what();
    server_ = std::move(*server);
    auto tier = make_rdma_tier(options_, make_local_rdma_pool_client(server_));
    ASSERT_TRUE(tier) << tier.error().what();
    tier_ = std::move(*tier);
  }

  void expect_round_trip(std::uint64_t extent_size, std::uint64_t offset, std::uint64_t size) {
    SCOPED_TRACE("extent " + std::to_string(extent_size) + ", offset " + std::to_string(offset) +
                 ", size " + std::to_string(size));
    auto extent = tier_->allocate(extent_size);
    ASSERT_TRUE(extent) << extent.error().what();
    EXPECT_EQ(extent->offset % 4096, 0u);
    EXPECT_GE(extent->length, extent_size);
    const auto data = random_bytes(size, offset * 31 + size);
    auto written = tier_->write(*extent, offset, data);
    ASSERT_TRUE(written) << written.error().what();
    std::vector<std::byte> back(size, std::byte{0xee});
    auto read = tier_->read(*extent, offset, back);
    ASSERT_TRUE(read) << read.error().what();
    EXPECT_TRUE(back == data);
    ASSERT_TRUE(tier_->release(*extent));
  }

  static constexpr std::uint64_t kPool = 16 * MiB;
  RdmaDeviceOptions options_;
  std::shared_ptr<RdmaPoolServer> server_;
  std::unique_ptr<Tier> tier_;
};

TEST_F(RdmaTierTest, KindAndCaps) {
  EXPECT_EQ(tier_->kind(), TierKind::rdma);
  const TierCaps caps = tier_->caps();
  EXPECT_TRUE(caps.remote);
  EXPECT_TRUE(caps.shared);
  EXPECT_FALSE(caps.byte_addressable);
  EXPECT_FALSE(caps.persistent);
  EXPECT_EQ(tier_->stats().capacity_bytes, kPool);
}

TEST_F(RdmaTierTest, RoundTripsSizesAndUnalignedOffsets) {
  expect_round_trip(4 * KiB, 0, 4 * KiB);
  expect_round_trip(64 * KiB, 0, 64 * KiB);
  expect_round_trip(MiB, 0, MiB);           // 16 bounce-buffer chunks
  expect_round_trip(8 * KiB, 1, 4095);
  expect_round_trip(64 * KiB, 4093, 10'000);
  expect_round_trip(2 * MiB, 123'457, MiB + 13);
  expect_round_trip(4 * KiB, 4095, 1);
}

TEST_F(RdmaTierTest, OutOfBoundsIsInvalidArgumentAndLeavesTheQpUsable) {
  auto extent = tier_->allocate(8 * KiB);
  ASSERT_TRUE(extent);
  std::vector<std::byte> buffer(64);
  auto past_end = tier_->read(*extent, extent->length - 10, buffer);
  ASSERT_FALSE(past_end);
  EXPECT_EQ(past_end.error().code, Errc::invalid_argument);
  auto beyond = tier_->write(*extent, extent->length + 1, std::span<const std::byte>(buffer));
  ASSERT_FALSE(beyond);
  EXPECT_EQ(beyond.error().code, Errc::invalid_argument);
  auto outside_pool = tier_->read(Extent{kPool, 4096}, 0, buffer);
  ASSERT_FALSE(outside_pool);
  EXPECT_EQ(outside_pool.error().code, Errc::invalid_argument);
  auto huge = tier_->read(Extent{4096, ~0ull - 100}, 0, buffer);
  ASSERT_FALSE(huge);
  EXPECT_EQ(huge.error().code, Errc::invalid_argument);
  // Nothing reached the wire: the queue pair still works.
  EXPECT_TRUE(tier_->write(*extent, 0, std::span<const std::byte>(buffer)));
  EXPECT_TRUE(tier_->read(*extent, 0, buffer));
  ASSERT_TRUE(tier_->release(*extent));
}

TEST_F(RdmaTierTest, AllocateBeyondThePoolIsNoSpaceAndReleaseCoalesces) {
  auto too_big = tier_->allocate(kPool + 4096);
  ASSERT_FALSE(too_big);
  EXPECT_EQ(too_big.error().code, Errc::no_space);

  std::vector<Extent> extents;
  for (;;) {
    auto extent = tier_->allocate(MiB);
    if (!extent) {
      EXPECT_EQ(extent.error().code, Errc::no_space) << extent.error().what();
      break;
    }
    extents.push_back(*extent);
    ASSERT_LE(extents.size(), kPool / MiB);
  }
  EXPECT_EQ(extents.size(), kPool / MiB);
  EXPECT_EQ(server_->stats().used_bytes, kPool);
  EXPECT_EQ(tier_->stats().used_bytes, kPool);
  for (const Extent& e : extents) ASSERT_TRUE(tier_->release(e));
  EXPECT_EQ(server_->stats().used_bytes, 0u);
  EXPECT_EQ(tier_->stats().used_bytes, 0u);
  auto whole = tier_->allocate(kPool);  // coalesced back into one free range
  ASSERT_TRUE(whole) << whole.error().what();
  ASSERT_TRUE(tier_->release(*whole));
}

TEST_F(RdmaTierTest, TwoTiersShareThePool) {
  auto other = make_rdma_tier(options_, make_local_rdma_pool_client(server_));
  ASSERT_TRUE(other) << other.error().what();
  auto extent = tier_->allocate(64 * KiB);
  ASSERT_TRUE(extent);
  const auto data = random_bytes(64 * KiB, 42);
  ASSERT_TRUE(tier_->write(*extent, 0, data));
  std::vector<std::byte> back(data.size());
  auto read = (*other)->read(*extent, 0, back);
  ASSERT_TRUE(read) << read.error().what();
  EXPECT_TRUE(back == data);
  ASSERT_TRUE(tier_->release(*extent));
}

TEST_F(RdmaTierTest, ConcurrentWritersAndReadersRoundTripTheirOwnBytes) {
  constexpr int kThreads = 4;
  std::vector<Extent> extents;
  for (int i = 0; i < kThreads; ++i) {
    auto extent = tier_->allocate(128 * KiB);
    ASSERT_TRUE(extent);
    extents.push_back(*extent);
  }
  std::vector<int> failures(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 5; ++round) {
        const auto data = random_bytes(100 * KiB + 7, static_cast<std::uint64_t>(t * 100 + round));
        std::vector<std::byte> back(data.size());
        if (!tier_->write(extents[t], 11, data) || !tier_->read(extents[t], 11, back) || back != data) {
          ++failures[t];
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(failures[t], 0) << "thread " << t;
  for (const Extent& e : extents) ASSERT_TRUE(tier_->release(e));
}

// A burst of readers on one QP: each gets the bytes of its own request (completions and the
// bounce buffer are never mixed up between callers), sharing extents or not, in any sizes.
TEST_F(RdmaTierTest, ConcurrentReadersEachGetTheirOwnBytes) {
  constexpr int kThreads = 8;
  auto shared = tier_->allocate(256 * KiB);
  ASSERT_TRUE(shared);
  const auto shared_data = random_bytes(256 * KiB, 1234);
  ASSERT_TRUE(tier_->write(*shared, 0, shared_data));
  std::vector<Extent> own;
  std::vector<std::vector<std::byte>> own_data;
  for (int t = 0; t < kThreads; ++t) {
    auto extent = tier_->allocate(96 * KiB);
    ASSERT_TRUE(extent);
    own.push_back(*extent);
    own_data.push_back(random_bytes(96 * KiB, 500 + t));
    ASSERT_TRUE(tier_->write(*extent, 0, own_data.back()));
  }
  const auto reads_before = tier_->stats().reads;
  std::atomic<int> wrong{0}, failed{0};
  std::barrier start(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      start.arrive_and_wait();
      for (int round = 0; round < 40; ++round) {
        const bool mine = round % 2 == 0;
        const auto& data = mine ? own_data[t] : shared_data;
        const Extent extent = mine ? own[t] : *shared;
        const std::uint64_t offset = rng() % (data.size() - 1);
        const std::uint64_t size = 1 + rng() % std::min<std::uint64_t>(data.size() - offset, 80 * KiB);
        std::vector<std::byte> back(size);
        if (auto ok = tier_->read(extent, offset, back); !ok) {
          ++failed;
        } else if (std::memcmp(back.data(), data.data() + offset, size) != 0) {
          ++wrong;
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(tier_->stats().reads - reads_before, static_cast<std::uint64_t>(kThreads * 40));
  for (const Extent& e : own) ASSERT_TRUE(tier_->release(e));
  ASSERT_TRUE(tier_->release(*shared));
}

// One work request at a time (the whole bounce buffer per chunk) moves the same bytes as many.
TEST_F(RdmaTierTest, OneWorkRequestInFlightRoundTripsLikeMany) {
  RdmaDeviceOptions serial = options_;
  serial.max_in_flight = 1;
  auto tier = make_rdma_tier(serial, make_local_rdma_pool_client(server_));
  ASSERT_TRUE(tier) << tier.error().what();
  auto extent = (*tier)->allocate(MiB);
  ASSERT_TRUE(extent);
  const auto data = random_bytes(MiB - 5, 77);
  ASSERT_TRUE((*tier)->write(*extent, 3, data));
  std::vector<std::byte> back(data.size());
  ASSERT_TRUE(tier_->read(*extent, 3, back));  // written one chunk at a time, read back 16 at a time
  EXPECT_TRUE(back == data);
  std::vector<std::byte> again(data.size());
  ASSERT_TRUE((*tier)->read(*extent, 3, again));
  EXPECT_TRUE(again == data);
  ASSERT_TRUE((*tier)->release(*extent));
}

// A demand read that arrives while a long read is on the wire gets a slot as the long read's
// chunks complete: it is answered before the long read ends, not queued behind all of it.
TEST_F(RdmaTierTest, AShortReadIsNotQueuedBehindALongOne) {
  auto extent = tier_->allocate(kPool);
  ASSERT_TRUE(extent);
  const auto data = random_bytes(kPool, 5);
  ASSERT_TRUE(tier_->write(*extent, 0, data));
  std::vector<std::byte> long_read(kPool);
  std::atomic<bool> long_started{false}, long_done{false}, short_before_long{false}, short_ok{false};
  std::thread short_reader([&] {
    while (!long_started.load()) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    std::vector<std::byte> page(4096);
    const bool ok = static_cast<bool>(tier_->read(*extent, kPool - 8192, page)) &&
                    std::memcmp(page.data(), data.data() + kPool - 8192, 4096) == 0;
    short_before_long = !long_done.load();
    short_ok = ok;
  });
  long_started = true;
  const auto t0 = Clock::now();
  auto read = tier_->read(*extent, 0, long_read);
  long_done = true;
  const auto long_ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count();
  short_reader.join();
  ASSERT_TRUE(read) << read.error().what();
  EXPECT_TRUE(long_read == data);
  EXPECT_TRUE(short_ok.load());
  if (long_ms < 50) GTEST_SKIP() << "the 16 MiB read took " << long_ms << " ms: too fast to tell the order";
  EXPECT_TRUE(short_before_long.load()) << "the 4 KiB read waited for the whole 16 MiB read (" << long_ms << " ms)";
  ASSERT_TRUE(tier_->release(*extent));
}

// N restores of one snapshot copy whose pages are in the pool: the store's page cache has each
// page read over RDMA once, and every reader gets every byte.
TEST_F(RdmaTierTest, ABurstOfStoreReadersReadsEachRdmaPageOnce) {
  testing::TempDir dir;
  std::shared_ptr<Tier> rdma = std::move(tier_);
  auto made = make_snapshot_store(StoreOptions{"hostA", dir.path() / "state", {{TierKind::rdma, rdma}}, nullptr});
  ASSERT_TRUE(made) << made.error().what();
  auto& store = **made;
  constexpr std::size_t kPages = 48;
  auto data = random_bytes(kPages * kPageSize, 77);
  for (std::size_t p = 0; p < kPages; ++p) data[p * kPageSize] = std::byte{0xA5};  // no zero pages
  Snapshot snapshot;
  snapshot.info.id = "burst";
  for (std::size_t p = 0; p < kPages; ++p) snapshot.pages.push_back(PageEntry{.vaddr = 0x10000 + p * kPageSize});
  ASSERT_TRUE(store.put(snapshot, data, PlacementRequest{TierKind::rdma, {}}));
  auto stored = store.get("burst");
  ASSERT_TRUE(stored) << stored.error().what();
  const auto reads_before = rdma->stats().bytes_read;

  constexpr int kReaders = 16;
  std::atomic<int> bad{0};
  std::barrier start(kReaders);
  std::vector<std::thread> threads;
  for (int t = 0; t < kReaders; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::byte> scratch(kPageSize);
      start.arrive_and_wait();
      for (std::size_t k = 0; k < kPages; ++k) {
        const std::size_t i = (k + static_cast<std::size_t>(t) * 5) % kPages;
        auto run = store.read_pages(*stored, i, 1, scratch);
        if (!run || std::memcmp(run->data, data.data() + i * kPageSize, kPageSize) != 0) ++bad;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(rdma->stats().bytes_read - reads_before, kPages * kPageSize) << "each page over the wire once";
  const StoreStats stats = store.stats();
  EXPECT_EQ(stats.served.at(TierKind::rdma).tier_bytes, kPages * kPageSize);
  EXPECT_EQ(stats.served.at(TierKind::rdma).cached_pages, (kReaders - 1) * kPages);
  ASSERT_TRUE(store.remove("burst"));
  tier_ = nullptr;
}

// A pool client whose grants are rewritten: a wrong QP number or rkey, as a buggy or restarted
// memory node would hand out. Allocation is served locally (the pool is never reached).
class RewritingPool final : public RdmaPoolClient {
 public:
  RewritingPool(std::shared_ptr<RdmaPoolServer> server, std::function<void(RdmaPoolGrant&)> rewrite)
      : server_(std::move(server)), rewrite_(std::move(rewrite)) {}
  Result<RdmaPoolGrant> connect(const RdmaEndpoint& local) override {
    auto grant = server_->accept(local);
    if (grant) rewrite_(*grant);
    return grant;
  }
  Result<Extent> allocate(std::uint64_t length) override { return server_->allocate(length); }
  Result<void> release(Extent extent) override { return server_->release(extent); }

 private:
  std::shared_ptr<RdmaPoolServer> server_;
  std::function<void(RdmaPoolGrant&)> rewrite_;
};

// Reconnection that never comes within a test: the state right after a failure is what is
// checked (the reconnect tests below let it happen).
constexpr RdmaReconnectOptions kNoReconnectSoon{.initial_backoff = std::chrono::seconds(60),
                                                .max_backoff = std::chrono::seconds(60)};

void expect_fails_fast_then_reconnecting(Tier& tier, int timeout_ms, const char* what) {
  SCOPED_TRACE(what);
  auto extent = tier.allocate(4096);
  ASSERT_TRUE(extent) << extent.error().what();
  std::vector<std::byte> buffer(4096);
  auto start = Clock::now();
  auto first = tier.read(*extent, 0, buffer);
  const auto first_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
  ASSERT_FALSE(first);
  std::cerr << "  " << what << ": first read failed after " << first_ms
            << " ms: " << first.error().what() << "\n";
  EXPECT_TRUE(first.error().code == Errc::timeout || first.error().code == Errc::unavailable)
      << first.error().what();
  EXPECT_LE(first_ms, timeout_ms + 1000) << first.error().what();

  start = Clock::now();
  auto second = tier.write(*extent, 0, std::span<const std::byte>(buffer));
  const auto second_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().code, Errc::unavailable) << second.error().what();
  EXPECT_NE(second.error().message.find("reconnecting since"), std::string::npos) << second.error().what();
  EXPECT_LT(second_ms, 100);
  EXPECT_EQ(tier.health().state, TierState::reconnecting);
  EXPECT_FALSE(tier.health().last_error.empty());
  auto allocate = tier.allocate(4096);
  ASSERT_FALSE(allocate);
  EXPECT_EQ(allocate.error().code, Errc::unavailable);
  EXPECT_TRUE(tier.release(*extent));  // the control plane still works
}

TEST_F(RdmaTierTest, BogusEndpointFailsWithinTheTimeoutAndNeverHangs) {
  RdmaDeviceOptions options = options_;
  options.timeout_ms = 1500;
  auto pool = std::make_shared<RewritingPool>(server_, [](RdmaPoolGrant& grant) {
    grant.endpoint.qpn = (grant.endpoint.qpn + 0x5a5a5) & 0xffffff;  // nobody listens there
  });
  auto tier = make_rdma_tier(options, pool, kNoReconnectSoon);
  ASSERT_TRUE(tier) << tier.error().what();
  expect_fails_fast_then_reconnecting(**tier, options.timeout_ms, "bogus qpn");
}

TEST_F(RdmaTierTest, WrongRkeyIsUnavailable) {
  auto pool = std::make_shared<RewritingPool>(server_, [](RdmaPoolGrant& grant) {
    grant.rkey ^= 0x00ffff00u;
  });
  auto tier = make_rdma_tier(options_, pool, kNoReconnectSoon);
  ASSERT_TRUE(tier) << tier.error().what();
  expect_fails_fast_then_reconnecting(**tier, options_.timeout_ms, "wrong rkey");
}

TEST_F(RdmaTierTest, UnreachableGidFailsAtConnectOrFirstOperation) {
  RdmaDeviceOptions options = options_;
  options.timeout_ms = 1500;
  auto pool = std::make_shared<RewritingPool>(server_, [](RdmaPoolGrant& grant) {
    grant.endpoint.gid = "00000000000000000000ffffc0000201";  // 192.0.2.1 (TEST-NET-1)
  });
  const auto start = Clock::now();
  auto tier = make_rdma_tier(options, pool, kNoReconnectSoon);
  if (!tier) {
    std::cerr << "  unreachable gid: connect failed: " << tier.error().what() << "\n";
    // RTR resolves the peer's MAC (ARP) on RoCE: rxe fails it after the neighbour timeout.
    EXPECT_EQ(tier.error().code, Errc::unavailable) << tier.error().what();
    EXPECT_LE(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count(),
              options.timeout_ms + 1000);
    return;
  }
  expect_fails_fast_then_reconnecting(**tier, options.timeout_ms, "unreachable gid");
}

TEST_F(RdmaTierTest, DestroyingATierLeavesThePoolUsable) {
  for (int i = 0; i < 3; ++i) {
    auto tier = make_rdma_tier(options_, make_local_rdma_pool_client(server_));
    ASSERT_TRUE(tier) << tier.error().what();
    auto extent = (*tier)->allocate(4096);
    ASSERT_TRUE(extent);
    std::vector<std::byte> buffer(4096, std::byte{0x42});
    ASSERT_TRUE((*tier)->write(*extent, 0, std::span<const std::byte>(buffer)));
    ASSERT_TRUE((*tier)->release(*extent));
  }
  expect_round_trip(4 * KiB, 0, 4 * KiB);
}

bool wait_until_up(const Tier& tier, std::chrono::milliseconds limit) {
  const auto deadline = Clock::now() + limit;
  while (Clock::now() < deadline) {
    if (tier.health().state == TierState::up) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return tier.health().state == TierState::up;
}

constexpr RdmaReconnectOptions kFastReconnect{.initial_backoff = std::chrono::milliseconds(20),
                                              .max_backoff = std::chrono::milliseconds(200)};

TEST_F(RdmaTierTest, QueuePairErrorReconnectsAndServesAgain) {
  // The first grant has a wrong rkey (the QP errors on first use); later grants are right, as
  // after a memory node that came back.
  auto grants = std::make_shared<std::atomic<int>>(0);
  auto pool = std::make_shared<RewritingPool>(server_, [grants](RdmaPoolGrant& grant) {
    if (grants->fetch_add(1) == 0) grant.rkey ^= 0x00ffff00u;
  });
  auto tier = make_rdma_tier(options_, pool, kFastReconnect);
  ASSERT_TRUE(tier) << tier.error().what();
  const std::uint64_t epoch = (*tier)->epoch();
  EXPECT_NE(epoch, 0u);
  auto extent = (*tier)->allocate(64 * KiB);
  ASSERT_TRUE(extent) << extent.error().what();
  const auto data = random_bytes(64 * KiB, 7);
  // The write that meets the error waits for the reconnect and is served on the new QP.
  auto written = (*tier)->write(*extent, 0, data);
  ASSERT_TRUE(written) << written.error().what();
  EXPECT_EQ(grants->load(), 2);
  EXPECT_EQ((*tier)->health().state, TierState::up);
  EXPECT_EQ((*tier)->epoch(), epoch) << "the same pool";
  std::vector<std::byte> back(data.size());
  ASSERT_TRUE((*tier)->read(*extent, 0, back));
  EXPECT_TRUE(back == data);
  ASSERT_TRUE((*tier)->release(*extent));
}

// Callers of a burst that were admitted while the tier was up and queued behind the request
// that meets a broken QP wait for the reconnect with it and are served, instead of all failing.
TEST_F(RdmaTierTest, CallersQueuedBehindABrokenRequestAreServedAfterTheReconnect) {
  auto grants = std::make_shared<std::atomic<int>>(0);
  auto pool = std::make_shared<RewritingPool>(server_, [grants](RdmaPoolGrant& grant) {
    if (grants->fetch_add(1) == 0) grant.rkey ^= 0x00ffff00u;  // the first QP errors on first use
  });
  auto tier = make_rdma_tier(options_, pool, kFastReconnect);
  ASSERT_TRUE(tier) << tier.error().what();
  constexpr int kThreads = 6;
  std::vector<Extent> extents;
  for (int t = 0; t < kThreads; ++t) {
    auto extent = (*tier)->allocate(64 * KiB);
    ASSERT_TRUE(extent);
    extents.push_back(*extent);
  }
  std::atomic<int> served{0}, refused{0}, wrong{0};
  std::barrier start(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const auto data = random_bytes(64 * KiB, 900 + t);
      start.arrive_and_wait();
      auto written = (*tier)->write(extents[t], 0, data);
      if (!written) {
        // Only a caller that arrived after the failure was reported is refused, and at once.
        if (written.error().code == Errc::unavailable) ++refused; else ++wrong;
        ASSERT_TRUE(wait_until_up(**tier, std::chrono::seconds(10)));
        written = (*tier)->write(extents[t], 0, data);
        if (!written) return (void)++wrong;
      }
      std::vector<std::byte> back(data.size());
      if (!(*tier)->read(extents[t], 0, back) || back != data) return (void)++wrong;
      ++served;
    });
  }
  for (auto& thread : threads) thread.join();
  std::cerr << "  " << kThreads - refused.load() << " of " << kThreads << " first writes rode out the reconnect\n";
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(served.load(), kThreads);
  EXPECT_LT(refused.load(), kThreads) << "at least the request that met the failure was retried";
  EXPECT_EQ(grants->load(), 2);
  for (const Extent& e : extents) ASSERT_TRUE((*tier)->release(e));
}

// A pool client whose server can be replaced, as a restarted memory node agent is (the control
// plane reaches whichever agent listens now).
class RestartablePool final : public RdmaPoolClient {
 public:
  explicit RestartablePool(std::shared_ptr<RdmaPoolServer> server) : server_(std::move(server)) {}
  void replace(std::shared_ptr<RdmaPoolServer> server) {
    std::lock_guard lock(mutex_);
    server_ = std::move(server);
  }
  Result<RdmaPoolGrant> connect(const RdmaEndpoint& local) override {
    auto server = current();
    if (!server) return fail(Errc::unavailable, "the memory node's agent is restarting");
    return server->accept(local);
  }
  Result<Extent> allocate(std::uint64_t length) override {
    auto server = current();
    if (!server) return fail(Errc::unavailable, "the memory node's agent is restarting");
    return server->allocate(length);
  }
  Result<void> release(Extent extent) override {
    auto server = current();
    if (!server) return fail(Errc::unavailable, "the memory node's agent is restarting");
    return server->release(extent);
  }

 private:
  std::shared_ptr<RdmaPoolServer> current() {
    std::lock_guard lock(mutex_);
    return server_;
  }
  std::mutex mutex_;
  std::shared_ptr<RdmaPoolServer> server_;
};

// Waits (bounded) until a read succeeds: the first ones after a restart fail while the tier
// notices the old QP is dead and reconnects.
Result<void> read_when_back(Tier& tier, Extent extent, std::span<std::byte> out, std::chrono::seconds limit) {
  const auto deadline = Clock::now() + limit;
  Result<void> last = fail(Errc::timeout, "no read tried");
  while (Clock::now() < deadline) {
    last = tier.read(extent, 0, out);
    if (last) return last;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return last;
}

// A compute host that comes up before its memory node: the tier is built down, says why, and
// serves once the memory node answers, without a restart.
TEST(RdmaPoolRestartTest, ATierBuiltBeforeItsMemoryNodeIsUpConnectsWhenItComes) {
  SKIP_WITHOUT_RDMA();
  RdmaDeviceOptions options = test_options();
  options.timeout_ms = 1000;
  auto client = std::make_shared<RestartablePool>(nullptr);
  auto tier = make_rdma_tier(options, client, kFastReconnect);
  ASSERT_TRUE(tier) << "a memory node that is not up yet is a passing fault: " << tier.error().what();
  EXPECT_NE((*tier)->health().state, TierState::up);
  auto refused = (*tier)->allocate(64 * KiB);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::unavailable) << refused.error().what();

  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("snaptier-rdma-late-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto server = make_rdma_pool_server(options, RdmaPoolOptions{.pool_size = 8 * MiB, .path = dir / "pool"});
  ASSERT_TRUE(server) << server.error().what();
  const std::uint64_t epoch = (*server)->state().epoch;
  client->replace(std::shared_ptr<RdmaPoolServer>(std::move(*server)));
  ASSERT_TRUE(wait_until_up(**tier, std::chrono::seconds(10))) << "the tier never reached the memory node";
  EXPECT_EQ((*tier)->epoch(), epoch);
  EXPECT_EQ((*tier)->stats().capacity_bytes, 8 * MiB);
  auto extent = (*tier)->allocate(64 * KiB);
  ASSERT_TRUE(extent) << extent.error().what();
  const auto data = random_bytes(64 * KiB, 7);
  ASSERT_TRUE((*tier)->write(*extent, 0, data));
  std::vector<std::byte> back(data.size());
  ASSERT_TRUE((*tier)->read(*extent, 0, back));
  EXPECT_TRUE(back == data);
  ASSERT_TRUE((*tier)->release(*extent));
  tier->reset();
  client.reset();
  std::filesystem::remove_all(dir);
}

TEST(RdmaPoolRestartTest, ThePoolKeepsItsPagesAcrossAServerRestartAndTheTierReconnects) {
  SKIP_WITHOUT_RDMA();
  RdmaDeviceOptions options = test_options();
  options.timeout_ms = 1000;
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("snaptier-rdma-pool-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const RdmaPoolOptions pool_options{.pool_size = 8 * MiB, .path = dir / "pool"};
  auto first = make_rdma_pool_server(options, pool_options);
  ASSERT_TRUE(first) << first.error().what();
  const std::uint64_t epoch = (*first)->state().epoch;
  auto client = std::make_shared<RestartablePool>(std::shared_ptr<RdmaPoolServer>(std::move(*first)));
  auto tier = make_rdma_tier(options, client, kFastReconnect);
  ASSERT_TRUE(tier) << tier.error().what();
  EXPECT_EQ((*tier)->epoch(), epoch);
  auto extent = (*tier)->allocate(256 * KiB);
  ASSERT_TRUE(extent);
  const auto data = random_bytes(256 * KiB, 99);
  ASSERT_TRUE((*tier)->write(*extent, 0, data));

  // The agent restarts: the old server (and its QPs, MR, mapping) goes, a new one maps the file.
  client->replace(nullptr);
  auto second = make_rdma_pool_server(options, pool_options);
  ASSERT_TRUE(second) << second.error().what();
  EXPECT_EQ((*second)->state().epoch, epoch);
  EXPECT_NE((*second)->state().origin.find("kept 1 extents"), std::string::npos) << (*second)->state().origin;
  EXPECT_EQ((*second)->stats().used_bytes, extent->length);
  client->replace(std::shared_ptr<RdmaPoolServer>(std::move(*second)));
  std::vector<std::byte> back(data.size());
  auto read = read_when_back(**tier, *extent, back, std::chrono::seconds(10));
  ASSERT_TRUE(read) << read.error().what();
  EXPECT_TRUE(back == data) << "byte-exact after the restart";
  EXPECT_TRUE(wait_until_up(**tier, std::chrono::seconds(1)));
  EXPECT_EQ((*tier)->epoch(), epoch);

  // The memory node "reboots": the pool file is gone, the next pool has a new epoch.
  client->replace(nullptr);
  std::filesystem::remove(pool_options.path);
  auto third = make_rdma_pool_server(options, pool_options);
  ASSERT_TRUE(third) << third.error().what();
  EXPECT_NE((*third)->state().epoch, epoch);
  std::shared_ptr<RdmaPoolServer> rebooted(std::move(*third));
  client->replace(rebooted);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while ((*tier)->epoch() == epoch && Clock::now() < deadline) {
    (void)(*tier)->read(*extent, 0, back);  // meets the dead QP, reconnects, finds the new pool
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_NE((*tier)->epoch(), epoch) << "the tier reports the new pool's epoch";
  ASSERT_TRUE(wait_until_up(**tier, std::chrono::seconds(5)));

  // The new pool may hand part of the old extent's range to somebody else: the old extent is
  // neither read nor written there, and releasing it frees nothing of theirs. (An extent is an
  // offset and a length: one the new pool handed out again exactly is indistinguishable here;
  // the store refuses every snapshot of a lost pool before it gets that far, docs/rdma.md.)
  auto fresh = (*tier)->allocate(64 * KiB);
  ASSERT_TRUE(fresh) << fresh.error().what();
  const auto fresh_data = random_bytes(64 * KiB, 100);
  ASSERT_TRUE((*tier)->write(*fresh, 0, fresh_data));
  auto stale = (*tier)->read(*extent, 0, back);
  ASSERT_FALSE(stale);
  EXPECT_EQ(stale.error().code, Errc::unavailable);
  EXPECT_NE(stale.error().message.find("earlier pool"), std::string::npos) << stale.error().what();
  EXPECT_FALSE((*tier)->write(*extent, 0, data));
  const std::uint64_t used = rebooted->stats().used_bytes;
  EXPECT_TRUE((*tier)->release(*extent));
  EXPECT_EQ(rebooted->stats().used_bytes, used) << "nothing of the new pool was freed";
  std::vector<std::byte> fresh_back(fresh_data.size());
  ASSERT_TRUE((*tier)->read(*fresh, 0, fresh_back));
  EXPECT_TRUE(fresh_back == fresh_data);
  ASSERT_TRUE((*tier)->release(*fresh));
  EXPECT_EQ(rebooted->stats().used_bytes, used - fresh->length);
  rebooted.reset();
  tier->reset();
  client.reset();
  std::filesystem::remove_all(dir);
}

TEST(RdmaDeviceTest, QueryDescribesAnActivePort) {
  SKIP_WITHOUT_RDMA();
  auto info = query_rdma_device(test_options());
  ASSERT_TRUE(info) << info.error().what();
  EXPECT_FALSE(info->name.empty());
  EXPECT_EQ(info->gid.size(), 32u);
  EXPECT_EQ(info->port_state, "ACTIVE");
  EXPECT_GE(info->active_mtu_bytes, 256);

  RdmaDeviceOptions missing = test_options();
  missing.device = "no_such_device0";
  auto none = query_rdma_device(missing);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, Errc::not_found);
}

}  // namespace
}  // namespace snaptier
