// A real tier agent (make_agent from a config: local, file and a file-backed CXL region) behind
// a real control server, driven through the client exactly as tierctl drives it.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <map>
#include <set>
#include <string>
#include <random>

#include "control/sha256.hpp"
#include "snaptier/agent.hpp"
#include "snaptier/config.hpp"
#include "snaptier/control.hpp"
#include "snaptier/cxl_directory.hpp"

namespace snaptier {
namespace {

using namespace std::chrono_literals;
using namespace control;
using nlohmann::json;

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string sha256_hex(const std::string& bytes) {
  detail::Sha256 digest;
  digest.update(bytes);
  return detail::Sha256::hex(digest.finish());
}

class AgentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("snaptier-agent-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    std::filesystem::resize_file(touch(dir_ / "cxl.img"), 64ull << 20);
    auto config = parse_config(R"(
[agent]
host = "compute0"
state_dir = "state"
[control]
unix_socket = "agent.sock"
tcp_listen = "127.0.0.1:0"
token = "agent-test-token-0123456789"
request_timeout_ms = 5000
[tiers.local]
capacity = "32M"
[tiers.file]
dir = "file-tier"
capacity = "32M"
[tiers.cxl]
path = "cxl.img"
host_index = 0
host_count = 2
format = true
[tiers.rdma]
memnode = "127.0.0.1:9"
token = "memnode-token-0123456789"
)",
                               "agent_test.toml", dir_);
    ASSERT_TRUE(config.has_value()) << config.error().what();
    config_ = *config;
    start_agent();

    // 12 pages: 9 random, 3 zero (one of them in the middle).
    std::mt19937_64 random(42);
    pages_.resize(12 * kPageSize);
    for (std::size_t i = 0; i < pages_.size(); ++i) pages_[i] = static_cast<char>(random());
    std::fill_n(pages_.begin() + 4 * kPageSize, kPageSize, '\0');
    std::fill_n(pages_.end() - 2 * kPageSize, 2 * kPageSize, '\0');
    std::ofstream(dir_ / "pages.bin", std::ios::binary) << pages_;
    std::ofstream(dir_ / "criu.img", std::ios::binary) << "criu image bytes";
  }

  void TearDown() override {
    client_.reset();
    stop_agent();
    std::filesystem::remove_all(dir_);
  }

  static std::filesystem::path touch(const std::filesystem::path& path) {
    std::ofstream(path).close();
    return path;
  }

  void start_agent() {
    auto agent = make_agent(config_);
    ASSERT_TRUE(agent.has_value()) << agent.error().what();
    agent_ = std::move(*agent);
    auto server = ControlServer::start(server_options(config_),
                                       [agent = agent_.get()](const Command& c) { return agent->handle(c); });
    ASSERT_TRUE(server.has_value()) << server.error().what();
    server_ = std::move(*server);
    auto client = ControlClient::connect(ClientOptions{UnixEndpoint{config_.control.unix_socket}, "", 2s, 5s});
    ASSERT_TRUE(client.has_value()) << client.error().what();
    client_.emplace(std::move(*client));
  }

  void stop_agent() {
    if (server_) {
      EXPECT_TRUE(server_->stop(2s));
    }
    server_.reset();
    agent_.reset();
  }

  json ok(const Command& command) {
    auto result = client_->call_ok(command);
    EXPECT_TRUE(result.has_value()) << op_name(command) << ": " << result.error().what();
    return result ? *result : json();
  }

  Error error(const Command& command) {
    auto result = client_->call_ok(command);
    EXPECT_FALSE(result.has_value()) << op_name(command) << " succeeded: " << result->dump();
    return result ? Error{Errc::protocol, "no error"} : result.error();
  }

  SnapshotPut put_cmd(std::string id, std::optional<TierKind> tier = std::nullopt) {
    SnapshotPut put;
    put.id = std::move(id);
    put.data_path = dir_ / "pages.bin";
    put.base_vaddr = 0x7f0000000000;
    put.tier = tier;
    return put;
  }

  std::filesystem::path dir_;
  AgentConfig config_;
  std::unique_ptr<Agent> agent_;
  std::unique_ptr<ControlServer> server_;
  std::optional<ControlClient> client_;
  std::string pages_;
};

TEST_F(AgentTest, StatusShowsEveryConfiguredTierAndWhyOneIsDown) {
  json status = ok(Status{});
  EXPECT_EQ(status["host"], "compute0");
  EXPECT_EQ(status["role"], "compute");
  EXPECT_EQ(status["snapshots"], 0);
  EXPECT_EQ(status["default_tier"], "cxl");
  std::map<std::string, json> tiers;
  for (const auto& tier : status["tiers"]) tiers[tier["kind"]] = tier;
  ASSERT_EQ(tiers.size(), 4u);
  for (const char* kind : {"local", "file", "cxl"}) {
    ASSERT_TRUE(tiers[kind]["up"].get<bool>()) << kind << ": " << tiers[kind].dump();
    EXPECT_GT(tiers[kind]["stats"]["capacity_bytes"].get<std::uint64_t>(), 0u) << kind;
  }
  EXPECT_TRUE(tiers["cxl"]["caps"]["byte_addressable"].get<bool>());
  EXPECT_TRUE(tiers["cxl"]["caps"]["shared"].get<bool>());
  // No memory node listens on port 9: the rdma tier does not serve, and says why. Without an
  // RDMA device (the host) it was never built (up = false, error); with one (the guests) a
  // memory node that does not answer is a passing fault: built, reconnecting, last_error.
  const json& rdma = tiers["rdma"];
  EXPECT_NE(rdma.value("state", "down"), "up") << rdma.dump();
  const std::string why = rdma["up"].get<bool>() ? rdma["reconnect"]["last_error"].get<std::string>()
                                                 : rdma["error"]["message"].get<std::string>();
  EXPECT_FALSE(why.empty()) << rdma.dump();
  EXPECT_EQ(ok(Ping{})["host"], "compute0");
}

TEST_F(AgentTest, PutListInfoReadDeleteOnEveryTier) {
  SnapshotPut on_cxl = put_cmd("fn-cxl");  // default placement
  on_cxl.metadata["criu"] = dir_ / "criu.img";
  json stored = ok(on_cxl);
  EXPECT_EQ(stored["pages"], 12);
  EXPECT_EQ(stored["zero_pages"], 3);
  EXPECT_EQ(stored["bytes_per_tier"]["cxl"], 9 * kPageSize);
  EXPECT_TRUE(stored["published"].get<bool>()) << "all pages on CXL: visible to other hosts";
  ok(put_cmd("fn-local", TierKind::local));
  json on_file = ok(put_cmd("fn-file", TierKind::file));
  EXPECT_EQ(on_file["bytes_per_tier"]["file"], 9 * kPageSize);
  EXPECT_FALSE(on_file["published"].get<bool>());

  json list = ok(SnapshotList{});
  std::set<std::string> ids;
  for (const auto& info : list["snapshots"]) ids.insert(info["id"]);
  EXPECT_EQ(ids, (std::set<std::string>{"fn-cxl", "fn-local", "fn-file"}));
  EXPECT_EQ(ok(Status{})["snapshots"], 3);

  json info = ok(SnapshotInfoQuery{"fn-cxl"});
  EXPECT_EQ(info["owner_host"], "compute0");
  EXPECT_EQ(info["pages"], 12);
  EXPECT_EQ(info["zero_pages"], 3);
  EXPECT_EQ(info["pages_per_tier"]["cxl"], 9);
  EXPECT_EQ(info["blobs"]["criu"], std::string("criu image bytes").size());
  EXPECT_EQ(info["vaddr_first"], 0x7f0000000000u);
  EXPECT_EQ(info["vaddr_last"], 0x7f0000000000u + 11 * kPageSize);
  {
    // The extents name where each stored page lies in the region file: a tool outside the
    // agent reads the snapshot's own bytes there.
    const std::string region = read_file(dir_ / "cxl.img");
    std::uint64_t covered = 0;
    for (const auto& e : info["extents"]) {
      EXPECT_EQ(e["tier"], "cxl");
      const auto offset = e["offset"].get<std::uint64_t>();
      const auto first = e["first_page"].get<std::uint64_t>();
      const auto pages = e["pages"].get<std::uint64_t>();
      ASSERT_EQ(e["bytes"].get<std::uint64_t>(), pages * kPageSize);
      ASSERT_LE(offset + pages * kPageSize, region.size());
      EXPECT_EQ(region.substr(offset, pages * kPageSize), pages_.substr(first * kPageSize, pages * kPageSize))
          << "extent at " << offset;
      covered += pages;
    }
    EXPECT_EQ(covered, 9u) << "every stored (non-zero) page, no zero page";
    EXPECT_GE(info["extents"].size(), 2u) << "the zero page in the middle splits the run";
  }

  const std::string expected_sha = sha256_hex(pages_);
  for (const char* id : {"fn-cxl", "fn-local", "fn-file"}) {
    auto out = dir_ / (std::string(id) + ".out");
    json read = ok(SnapshotRead{id, out});
    EXPECT_EQ(read["bytes"], pages_.size()) << id;
    EXPECT_EQ(read["sha256"], expected_sha) << id;
    EXPECT_TRUE(read_file(out) == pages_) << id << ": output differs from the input";
  }
  // CXL and local pages are written straight from their mapping; file pages are copied.
  EXPECT_EQ(ok(SnapshotRead{"fn-cxl", dir_ / "again.out"})["mapped_pages"], 9);
  EXPECT_EQ(ok(SnapshotRead{"fn-file", dir_ / "again.out"})["copied_pages"], 9);

  EXPECT_EQ(ok(SnapshotDelete{"fn-file"})["deleted"], true);
  EXPECT_EQ(ok(SnapshotList{})["snapshots"].size(), 2u);
  EXPECT_EQ(error(SnapshotInfoQuery{"fn-file"}).code, Errc::not_found);
  EXPECT_EQ(error(SnapshotRead{"fn-file", dir_ / "gone.out"}).code, Errc::not_found);
  EXPECT_FALSE(std::filesystem::exists(dir_ / "gone.out"));
  EXPECT_EQ(error(SnapshotDelete{"fn-file"}).code, Errc::not_found);
}

TEST_F(AgentTest, ReadOfACorruptCxlPageFailsAndWritesNoOutput) {
  ok(put_cmd("fn-cxl"));
  // Flip a byte of page 1 where it lies in the CXL region file, behind the agent's back.
  {
    std::fstream region(dir_ / "cxl.img", std::ios::in | std::ios::out | std::ios::binary);
    const std::string all((std::istreambuf_iterator<char>(region)), {});
    const auto at = all.find(pages_.substr(kPageSize, kPageSize));
    ASSERT_NE(at, std::string::npos) << "page 1 is not in the region";
    region.seekp(static_cast<std::streamoff>(at + 100));
    region.put(static_cast<char>(all[at + 100] ^ 0x20));
  }
  const auto out = dir_ / "damaged.out";
  const Error e = error(SnapshotRead{"fn-cxl", out});
  EXPECT_EQ(e.code, Errc::corrupt) << e.what();
  for (const char* part : {"snapshot 'fn-cxl'", "page 1 ", "vaddr 0x7f0000001000", "tier cxl", "checksum"}) {
    EXPECT_NE(e.message.find(part), std::string::npos) << "'" << part << "' not in: " << e.message;
  }
  EXPECT_FALSE(std::filesystem::exists(out));
  for (const auto& entry : std::filesystem::directory_iterator(dir_)) {
    EXPECT_EQ(entry.path().string().find("damaged.out"), std::string::npos) << "left behind: " << entry.path();
  }
}

TEST_F(AgentTest, PutRefusesBadInputsWithTheRightCode) {
  std::ofstream(dir_ / "ragged.bin", std::ios::binary) << std::string(5000, 'x');
  SnapshotPut ragged = put_cmd("ragged");
  ragged.data_path = dir_ / "ragged.bin";
  Error e = error(ragged);
  EXPECT_EQ(e.code, Errc::invalid_argument);
  EXPECT_NE(e.message.find("multiple of the page size"), std::string::npos) << e.message;

  SnapshotPut missing = put_cmd("missing");
  missing.data_path = dir_ / "no-such-file.bin";
  EXPECT_EQ(error(missing).code, Errc::not_found);

  SnapshotPut bad_blob = put_cmd("bad-blob");
  bad_blob.metadata["criu"] = dir_ / "no-such-blob";
  e = error(bad_blob);
  EXPECT_EQ(e.code, Errc::not_found);
  EXPECT_NE(e.message.find("criu"), std::string::npos) << e.message;

  e = error(put_cmd("to-rdma", TierKind::rdma));
  EXPECT_EQ(e.code, Errc::unavailable);
  EXPECT_NE(e.message.find("rdma"), std::string::npos) << e.message;
  EXPECT_TRUE(e.message.find("down") != std::string::npos || e.message.find("reconnecting") != std::string::npos)
      << "says the tier is not serving: " << e.message;

  ok(put_cmd("twice"));
  EXPECT_EQ(error(put_cmd("twice", TierKind::local)).code, Errc::already_exists);
  EXPECT_EQ(ok(SnapshotList{})["snapshots"].size(), 1u) << "failed puts must leave nothing behind";
}

TEST_F(AgentTest, ReadIntoAnUnwritableLocationFailsCleanly) {
  ok(put_cmd("s"));
  Error e = error(SnapshotRead{"s", dir_ / "no-such-dir" / "out.bin"});
  EXPECT_EQ(e.code, Errc::io);
  EXPECT_FALSE(std::filesystem::exists(dir_ / "no-such-dir"));
}

TEST_F(AgentTest, RdmaOpsOnAComputeAgentAreUnsupported) {
  EXPECT_EQ(error(RdmaAlloc{4096}).code, Errc::unsupported);
  EXPECT_EQ(error(RdmaFree{Extent{0, 4096}}).code, Errc::unsupported);
}

TEST_F(AgentTest, PersistentTiersSurviveAnAgentRestart) {
  ok(put_cmd("on-cxl", TierKind::cxl));
  ok(put_cmd("on-file", TierKind::file));
  client_.reset();
  stop_agent();
  start_agent();
  const std::string expected_sha = sha256_hex(pages_);
  for (const char* id : {"on-cxl", "on-file"}) {
    json read = ok(SnapshotRead{id, dir_ / "after-restart.out"});
    EXPECT_EQ(read["sha256"], expected_sha) << id;
  }
}

TEST_F(AgentTest, CleanStopDetachesTheCxlSlot) {
  auto take_slot = [&] {
    auto region = MappedRegion::open(dir_ / "cxl.img");
    EXPECT_TRUE(region) << region.error().what();
    return CxlDirectory::attach(make_direct_region_access(*region), CxlAttachOptions{.host_index = 0, .host_name = "compute9"});
  };
  auto held = take_slot();
  ASSERT_FALSE(held) << "a running agent's slot was taken";
  EXPECT_EQ(held.error().code, Errc::already_exists);
  ASSERT_TRUE(agent_->detach());
  EXPECT_TRUE(take_slot()) << "the slot stayed attached after a clean stop";
}

TEST_F(AgentTest, TcpClientsNeedTheConfiguredToken) {
  NetAddress address{"127.0.0.1", *server_->tcp_port()};
  auto good = ControlClient::connect(ClientOptions{address, config_.control.token, 2s, 2s});
  ASSERT_TRUE(good.has_value());
  EXPECT_TRUE(good->call_ok(Status{}).has_value());
  auto bad = ControlClient::connect(ClientOptions{address, "guessed-token-0123456789", 2s, 2s});
  ASSERT_TRUE(bad.has_value());
  auto refused = bad->call_ok(Status{});
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code, Errc::permission_denied);
}

// tierctl's exit codes are its contract with scripts (the testbed polls `tierctl ping`).
TEST_F(AgentTest, TierctlExitCodes) {
  auto tierctl = std::filesystem::canonical("/proc/self/exe").parent_path() / "../../tier-agent/tierctl";
  if (!std::filesystem::exists(tierctl)) GTEST_SKIP() << "tierctl is not built next to this test";
  auto run = [&](const std::string& args) {
    std::string command = tierctl.string() + " " + args + " > " + (dir_ / "stdout").string() + " 2> " +
                          (dir_ / "stderr").string();
    int status = std::system(command.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  };
  const std::string socket = "--socket " + config_.control.unix_socket.string();
  EXPECT_EQ(run(socket + " ping"), 0);
  EXPECT_EQ(run(socket + " --json put cli-snap " + (dir_ / "pages.bin").string() + " --tier local"), 0);
  json stored = json::parse(read_file(dir_ / "stdout"));
  EXPECT_EQ(stored["pages"], 12);
  EXPECT_EQ(run(socket + " info nope"), 1);
  EXPECT_NE(read_file(dir_ / "stderr").find("not_found"), std::string::npos);
  EXPECT_EQ(run(socket + " frobnicate"), 2);
  EXPECT_EQ(run(socket + " put only-an-id"), 2);
  EXPECT_EQ(run("--socket " + (dir_ / "nothing.sock").string() + " ping"), 3);
  EXPECT_EQ(run("--connect 127.0.0.1:" + std::to_string(*server_->tcp_port()) + " --token wrong-token-0123456789 ping"), 1);
  EXPECT_EQ(run("--connect 127.0.0.1:" + std::to_string(*server_->tcp_port()) + " --token " + config_.control.token +
                " --json list"),
            0);
  EXPECT_EQ(json::parse(read_file(dir_ / "stdout"))["snapshots"].size(), 1u);
}

// A memory node: without an RDMA device its pool is reported down and rdma.* say so; with one
// (the testbed guests), a compute agent's rdma tier stores and reads a snapshot through it.
TEST(MemnodeAgentTest, PoolIsServedOrReportedDown) {
  auto dir = std::filesystem::temp_directory_path() / ("snaptier-memnode-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string token = "memnode-test-token-0123456789";
  auto config = parse_config(R"(
[agent]
host = "mem0"
role = "memnode"
state_dir = "state"
[control]
unix_socket = "mem.sock"
tcp_listen = "127.0.0.1:0"
token = ")" + token + R"("
[memnode]
pool_size = "16M"
)",
                             "memnode.toml", dir);
  ASSERT_TRUE(config.has_value()) << config.error().what();
  auto agent = make_agent(*config);
  ASSERT_TRUE(agent.has_value()) << agent.error().what();
  auto server = ControlServer::start(server_options(*config),
                                     [a = agent->get()](const Command& c) { return a->handle(c); });
  ASSERT_TRUE(server.has_value()) << server.error().what();
  const NetAddress memnode{"127.0.0.1", *(*server)->tcp_port()};
  auto client = ControlClient::connect(ClientOptions{memnode, token, 2s, 5s});
  ASSERT_TRUE(client.has_value());
  auto status = client->call_ok(Status{});
  ASSERT_TRUE(status.has_value()) << status.error().what();
  EXPECT_EQ((*status)["role"], "memnode");

  if (!rdma_devices_present()) {
    EXPECT_FALSE((*status)["rdma_pool"]["up"].get<bool>());
    auto alloc = client->call_ok(RdmaAlloc{4096});
    ASSERT_FALSE(alloc.has_value());
    EXPECT_EQ(alloc.error().code, Errc::unavailable) << alloc.error().what();
  } else {
    ASSERT_TRUE((*status)["rdma_pool"]["up"].get<bool>()) << status->dump();
    auto alloc = client->call_ok(RdmaAlloc{8192});
    ASSERT_TRUE(alloc.has_value()) << alloc.error().what();
    auto extent = decode_extent(*alloc);
    ASSERT_TRUE(extent.has_value());
    EXPECT_EQ(extent->length, 8192u);
    EXPECT_TRUE(client->call_ok(RdmaFree{*extent}).has_value());

    // A compute agent whose rdma tier lives in this memory node's pool.
    std::vector<char> pages(8 * kPageSize);
    for (std::size_t i = 0; i < pages.size(); ++i) pages[i] = static_cast<char>(i * 7 + 1);
    std::ofstream(dir / "pages.bin", std::ios::binary).write(pages.data(), static_cast<std::streamsize>(pages.size()));
    auto compute_config = parse_config(R"(
[agent]
host = "compute0"
state_dir = "compute-state"
[control]
unix_socket = "compute.sock"
[tiers.rdma]
memnode = ")" + memnode.to_string() + R"("
token = ")" + token + R"("
)",
                                       "compute.toml", dir);
    ASSERT_TRUE(compute_config.has_value()) << compute_config.error().what();
    auto compute = make_agent(*compute_config);
    ASSERT_TRUE(compute.has_value()) << compute.error().what();
    ASSERT_TRUE((*compute)->parts().tiers.at(0).tier)
        << "rdma tier down: " << (*compute)->parts().tiers.at(0).problem->what();
    SnapshotPut put;
    put.id = "over-rdma";
    put.data_path = dir / "pages.bin";
    put.tier = TierKind::rdma;
    auto stored = (*compute)->handle(put);
    ASSERT_TRUE(stored.has_value()) << stored.error().what();
    auto read = (*compute)->handle(SnapshotRead{"over-rdma", dir / "out.bin"});
    ASSERT_TRUE(read.has_value()) << read.error().what();
    EXPECT_EQ(read_file(dir / "out.bin"), std::string(pages.begin(), pages.end()));
  }
  client->close();
  EXPECT_TRUE((*server)->stop(2s));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace snaptier
