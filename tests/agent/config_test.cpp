// The agent's TOML configuration: what a good file turns into, and that every kind of mistake
// is refused with a message naming the key (a user fixing a config reads only that line).
#include <gtest/gtest.h>

#include <unistd.h>

#include <fstream>

#include "snaptier/config.hpp"

namespace snaptier {
namespace {

using namespace std::chrono_literals;

constexpr std::string_view kFullCompute = R"(
[agent]
host = "compute0"
role = "compute"
state_dir = "/var/lib/snaptier"

[control]
unix_socket = "/run/snaptier/agent.sock"
tcp_listen = "10.0.0.1:7400"
token = "0123456789abcdef0123456789abcdef"
max_frame_bytes = 65536
request_timeout_ms = 5000
idle_timeout_ms = 20000

[tiers.local]
capacity = "256M"

[tiers.file]
dir = "/var/lib/snaptier/file-tier"
capacity = 1073741824

[tiers.cxl]
path = "/dev/dax0.0"
host_index = 1
format = false

[tiers.rdma]
device = "rxe0"
gid_index = 1
memnode = "10.0.0.9:7400"
token = "fedcba9876543210fedcba9876543210"
)";

std::string with_agent(std::string_view rest) {
  return "[agent]\nstate_dir = \"/tmp/st\"\n" + std::string(rest);
}

// Asserts that `text` is refused and that the message names `key` and says `why`.
void expect_rejected(std::string_view text, std::string_view key, std::string_view why) {
  auto config = parse_config(text, "test.toml");
  ASSERT_FALSE(config.has_value()) << "accepted:\n" << text;
  EXPECT_EQ(config.error().code, Errc::invalid_argument);
  EXPECT_NE(config.error().message.find(key), std::string::npos)
      << "message does not name " << key << ": " << config.error().message;
  EXPECT_NE(config.error().message.find(why), std::string::npos)
      << "message does not say " << why << ": " << config.error().message;
}

TEST(ConfigTest, FullComputeConfigParsesIntoTypedValues) {
  auto config = parse_config(kFullCompute, "agent.toml");
  ASSERT_TRUE(config.has_value()) << config.error().what();
  EXPECT_EQ(config->host, "compute0");
  EXPECT_EQ(config->role, AgentRole::compute);
  EXPECT_EQ(config->state_dir, "/var/lib/snaptier");
  EXPECT_EQ(config->control.unix_socket, "/run/snaptier/agent.sock");
  ASSERT_TRUE(config->control.tcp_listen.has_value());
  EXPECT_EQ(config->control.tcp_listen->host, "10.0.0.1");
  EXPECT_EQ(config->control.tcp_listen->port, 7400);
  EXPECT_EQ(config->control.token, "0123456789abcdef0123456789abcdef");
  EXPECT_EQ(config->control.max_frame_bytes, 65536u);
  EXPECT_EQ(config->control.request_timeout, 5000ms);
  EXPECT_EQ(config->control.idle_timeout, 20000ms);
  ASSERT_TRUE(config->local.has_value());
  EXPECT_EQ(config->local->capacity, 256ull << 20);
  ASSERT_TRUE(config->file.has_value());
  EXPECT_EQ(config->file->dir, "/var/lib/snaptier/file-tier");
  EXPECT_EQ(config->file->capacity, 1ull << 30);
  ASSERT_TRUE(config->cxl.has_value());
  EXPECT_EQ(config->cxl->path, "/dev/dax0.0");
  EXPECT_EQ(config->cxl->host_index, 1u);
  EXPECT_FALSE(config->cxl->format);
  ASSERT_TRUE(config->rdma.has_value());
  EXPECT_EQ(config->rdma->device, "rxe0");
  EXPECT_EQ(config->rdma->memnode, (NetAddress{"10.0.0.9", 7400}));
  EXPECT_EQ(config->rdma->token, "fedcba9876543210fedcba9876543210");
  EXPECT_FALSE(config->memnode.has_value());
}

TEST(ConfigTest, MinimalConfigGetsDefaults) {
  auto config = parse_config(with_agent(""), "min.toml");
  ASSERT_TRUE(config.has_value()) << config.error().what();
  EXPECT_EQ(config->role, AgentRole::compute);
  EXPECT_FALSE(config->host.empty());  // the machine's hostname
  EXPECT_EQ(config->control.unix_socket, "/tmp/st/agent.sock");
  EXPECT_FALSE(config->control.tcp_listen.has_value());
  EXPECT_EQ(config->control.max_frame_bytes, control::kDefaultMaxFrameBytes);
  EXPECT_FALSE(config->local || config->file || config->cxl || config->rdma || config->memnode);
}

// The widest shared CXL directory the agent formats: 63 hosts, the last one at index 62.
TEST(ConfigTest, CxlAcceptsTheLargestDirectory) {
  auto config = parse_config(with_agent("[tiers.cxl]\npath = \"/dev/dax0.0\"\nhost_index = 62\nhost_count = 63\n"),
                             "wide.toml");
  ASSERT_TRUE(config.has_value()) << config.error().what();
  ASSERT_TRUE(config->cxl.has_value());
  EXPECT_EQ(config->cxl->host_count, 63u);
  EXPECT_EQ(config->cxl->host_index, 62u);
  // Without host_count the index is checked only against the limit (the region decides later).
  auto unsized = parse_config(with_agent("[tiers.cxl]\npath = \"/dev/dax0.0\"\nhost_index = 62\n"), "x.toml");
  ASSERT_TRUE(unsized.has_value()) << unsized.error().what();
  EXPECT_EQ(unsized->cxl->host_index, 62u);
}

TEST(ConfigTest, CxlAnnouncesEverySecondUnlessToldOtherwise) {
  auto config = parse_config(with_agent("[tiers.cxl]\npath = \"/dev/dax0.0\"\nhost_index = 1\n"), "a.toml");
  ASSERT_TRUE(config.has_value()) << config.error().what();
  EXPECT_EQ(config->cxl->announce_interval, std::chrono::milliseconds(1000));
  auto off = parse_config(with_agent("[tiers.cxl]\npath = \"/dev/dax0.0\"\nhost_index = 1\nannounce_ms = 0\n"), "a.toml");
  ASSERT_TRUE(off.has_value()) << off.error().what();
  EXPECT_EQ(off->cxl->announce_interval.count(), 0);
  auto bad = parse_config(with_agent("[tiers.cxl]\npath = \"/dev/dax0.0\"\nhost_index = 1\nannounce_ms = -5\n"), "a.toml");
  ASSERT_FALSE(bad.has_value());
  EXPECT_NE(bad.error().message.find("announce_ms"), std::string::npos) << bad.error().what();
}

TEST(ConfigTest, MemnodeConfig) {
  auto config = parse_config(R"(
[agent]
role = "memnode"
state_dir = "/var/lib/snaptier"
[control]
tcp_listen = "[::]:7400"
token = "0123456789abcdef"
[memnode]
pool_size = "2G"
device = "rxe0"
gid_index = 1
)", "mem.toml");
  ASSERT_TRUE(config.has_value()) << config.error().what();
  EXPECT_EQ(config->role, AgentRole::memnode);
  EXPECT_EQ(config->control.tcp_listen->host, "::");
  ASSERT_TRUE(config->memnode.has_value());
  EXPECT_EQ(config->memnode->pool_size, 2ull << 30);
  EXPECT_EQ(config->memnode->device, "rxe0");
  // The pool outlives the agent by default: a file in /dev/shm named after the host.
  EXPECT_EQ(config->memnode->pool_path, "/dev/shm/snaptier-pool-" + config->host);
}

TEST(ConfigTest, PoolPathCanMoveOrBeAnonymous) {
  const std::string memnode =
      "[agent]\nrole = \"memnode\"\nhost = \"mem0\"\nstate_dir = \"/x\"\n[control]\ntcp_listen = \"0.0.0.0:7400\"\n"
      "token = \"0123456789abcdef\"\n[memnode]\npool_size = \"1G\"\n";
  auto moved = parse_config(memnode + "pool_path = \"/dev/hugepages/pool\"\n", "/etc/snaptier/mem.toml");
  ASSERT_TRUE(moved) << moved.error().what();
  EXPECT_EQ(moved->memnode->pool_path, "/dev/hugepages/pool");
  auto anonymous = parse_config(memnode + "pool_path = \"\"\n", "/etc/snaptier/mem.toml");
  ASSERT_TRUE(anonymous) << anonymous.error().what();
  EXPECT_TRUE(anonymous->memnode->pool_path.empty());
  auto defaulted = parse_config(memnode, "/etc/snaptier/mem.toml");
  ASSERT_TRUE(defaulted) << defaulted.error().what();
  EXPECT_EQ(defaulted->memnode->pool_path, "/dev/shm/snaptier-pool-mem0");
}

TEST(ConfigTest, RdmaReconnectSettings) {
  const std::string rdma = "[tiers.rdma]\nmemnode = \"10.0.0.9:7400\"\ntoken = \"0123456789abcdef\"\n";
  auto defaults = parse_config(with_agent(rdma), "c.toml");
  ASSERT_TRUE(defaults) << defaults.error().what();
  EXPECT_EQ(defaults->rdma->reconnect.initial_backoff, RdmaReconnectOptions{}.initial_backoff);
  EXPECT_EQ(defaults->rdma->reconnect.max_attempts, RdmaReconnectOptions{}.max_attempts);
  auto set = parse_config(with_agent(rdma + "reconnect_initial_ms = 50\nreconnect_max_ms = 800\nreconnect_attempts = 5\n"
                                            "reconnect_down_retry_ms = 9000\n"),
                          "c.toml");
  ASSERT_TRUE(set) << set.error().what();
  EXPECT_EQ(set->rdma->reconnect.initial_backoff, std::chrono::milliseconds(50));
  EXPECT_EQ(set->rdma->reconnect.max_backoff, std::chrono::milliseconds(800));
  EXPECT_EQ(set->rdma->reconnect.max_attempts, 5u);
  EXPECT_EQ(set->rdma->reconnect.down_retry, std::chrono::milliseconds(9000));
  expect_rejected(with_agent(rdma + "reconnect_initial_ms = 500\nreconnect_max_ms = 100\n"), "[tiers.rdma] reconnect_max_ms",
                  "at least reconnect_initial_ms");
  expect_rejected(with_agent(rdma + "reconnect_attempts = 0\n"), "[tiers.rdma] reconnect_attempts", "between");
}

TEST(ConfigTest, TokenFileIsReadRelativeToTheConfigFile) {
  auto dir = std::filesystem::temp_directory_path() / ("snaptier-config-test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  { std::ofstream(dir / "token") << "abcdefghijklmnopqrstuvwxyz\n"; }
  { std::ofstream(dir / "agent.toml") << with_agent("[control]\ntcp_listen = \"127.0.0.1:0\"\ntoken_file = \"token\"\n"); }
  auto config = load_config(dir / "agent.toml");
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(config.has_value()) << config.error().what();
  EXPECT_EQ(config->control.token, "abcdefghijklmnopqrstuvwxyz");  // trailing newline stripped
  EXPECT_EQ(config->control.tcp_listen->port, 0);
}

TEST(ConfigTest, SizesAcceptSuffixesAndRejectNonsense) {
  EXPECT_EQ(parse_size("4096").value(), 4096u);
  EXPECT_EQ(parse_size("512K").value(), 512u << 10);
  EXPECT_EQ(parse_size("512M").value(), 512ull << 20);
  EXPECT_EQ(parse_size("512MiB").value(), 512ull << 20);
  EXPECT_EQ(parse_size("2g").value(), 2ull << 30);
  EXPECT_EQ(parse_size("1T").value(), 1ull << 40);
  EXPECT_FALSE(parse_size("").has_value());
  EXPECT_FALSE(parse_size("M").has_value());
  EXPECT_FALSE(parse_size("-1G").has_value());
  EXPECT_FALSE(parse_size("1.5G").has_value());
  EXPECT_FALSE(parse_size("12X").has_value());
  EXPECT_FALSE(parse_size("99999999999999999999").has_value());
  EXPECT_FALSE(parse_size("17179869184T").has_value());  // overflows 64 bits
}

TEST(ConfigTest, RejectsSyntaxErrorsWithALineNumber) {
  expect_rejected("[agent\nstate_dir = 1", "test.toml:1", "TOML syntax error");
}

TEST(ConfigTest, RejectsUnknownKeysAndSections) {
  expect_rejected(with_agent("hots = \"x\"\n"), "[agent] hots", "unknown key");
  expect_rejected(with_agent("[tiers.local]\ncapacity = \"1G\"\ncapcity = 1\n"), "[tiers.local] capcity", "unknown key");
  expect_rejected(with_agent("[tiers.nvme]\ndir = \"/x\"\n"), "[tiers] nvme", "unknown key");
  expect_rejected(with_agent("[extras]\n"), "extras", "unknown key");
}

TEST(ConfigTest, RejectsWrongTypes) {
  expect_rejected(with_agent("host = 7\n"), "[agent] host", "expected a string, got an integer");
  expect_rejected(with_agent("[tiers.cxl]\npath = \"/dev/dax0.0\"\nhost_index = \"1\"\n"),
                  "[tiers.cxl] host_index", "expected an integer");
  expect_rejected(with_agent("[tiers.cxl]\npath = \"/dev/dax0.0\"\nhost_index = 0\nformat = \"yes\"\n"),
                  "[tiers.cxl] format", "expected true or false");
  expect_rejected(with_agent("[tiers.local]\ncapacity = 1.5\n"), "[tiers.local] capacity", "got a float");
  expect_rejected(with_agent("[tiers]\nlocal = 3\n"), "[tiers] local", "expected a table");
}

TEST(ConfigTest, RejectsImpossibleValues) {
  expect_rejected(with_agent("[tiers.local]\ncapacity = 0\n"), "[tiers.local] capacity", "positive");
  expect_rejected(with_agent("[tiers.local]\ncapacity = -4096\n"), "[tiers.local] capacity", "positive");
  expect_rejected(with_agent("[tiers.local]\ncapacity = \"0M\"\n"), "[tiers.local] capacity", "positive");
  expect_rejected(with_agent("[tiers.local]\ncapacity = 1000\n"), "[tiers.local] capacity", "multiple of 4096");
  expect_rejected(with_agent("[tiers.file]\ndir = \"/x\"\ncapacity = \"lots\"\n"), "[tiers.file] capacity", "invalid size");
  expect_rejected(with_agent("[tiers.cxl]\npath = \"/dev/dax0.0\"\nhost_index = 63\n"), "[tiers.cxl] host_index", "between 0 and 62");
  expect_rejected(with_agent("[tiers.cxl]\npath = \"/dev/dax0.0\"\nhost_index = 0\nhost_count = 64\n"),
                  "[tiers.cxl] host_count", "between 1 and 63");
  expect_rejected(with_agent("[tiers.cxl]\npath = \"/dev/dax0.0\"\nhost_index = 0\nhost_count = 0\n"),
                  "[tiers.cxl] host_count", "between 1 and 63");
  expect_rejected(with_agent("[tiers.cxl]\npath = \"/dev/dax0.0\"\nhost_index = 2\nhost_count = 2\n"),
                  "[tiers.cxl] host_index", "less than host_count");
  expect_rejected(with_agent("[control]\nmax_frame_bytes = 0\n"), "[control] max_frame_bytes", "between");
  expect_rejected(with_agent("[control]\nrequest_timeout_ms = -5\n"), "[control] request_timeout_ms", "between");
  expect_rejected("[agent]\nstate_dir = \"\"\n", "[agent] state_dir", "must not be empty");
  expect_rejected("[agent]\nstate_dir = \"/x\"\nrole = \"storage\"\n", "[agent] role", "\"compute\" or \"memnode\"");
}

TEST(ConfigTest, RejectsBadAddresses) {
  const std::string token = "token = \"0123456789abcdef\"\n";
  expect_rejected(with_agent("[control]\ntcp_listen = \"10.0.0.1\"\n" + token), "[control] tcp_listen", "missing :PORT");
  expect_rejected(with_agent("[control]\ntcp_listen = \"10.0.0.1:70000\"\n" + token), "[control] tcp_listen", "0-65535");
  expect_rejected(with_agent("[control]\ntcp_listen = \"300.1.2.3:7400\"\n" + token), "[control] tcp_listen", "not an IPv4");
  expect_rejected(with_agent("[control]\ntcp_listen = \"::1:7400\"\n" + token), "[control] tcp_listen", "brackets");
  expect_rejected(with_agent("[control]\ntcp_listen = \"bad host:7400\"\n" + token), "[control] tcp_listen", "host name");
  expect_rejected(with_agent("[tiers.rdma]\nmemnode = \"10.0.0.9:0\"\n" + token), "[tiers.rdma] memnode", "port 0");
}

TEST(ConfigTest, RejectsMissingRequiredPieces) {
  expect_rejected("[control]\nunix_socket = \"/x\"\n", "agent", "[agent] is missing");
  expect_rejected("[agent]\nhost = \"a\"\n", "[agent] state_dir", "missing");
  expect_rejected(with_agent("[control]\ntcp_listen = \"127.0.0.1:7400\"\n"), "[control] tcp_listen", "requires token");
  expect_rejected(with_agent("[control]\ntoken = \"short\"\n"), "[control] token", "at least 16");
  expect_rejected(with_agent("[control]\ntoken = \"0123456789abcdef\"\ntoken_file = \"/t\"\n"), "[control] token_file",
                  "not both");
  expect_rejected(with_agent("[control]\ntoken_file = \"/nonexistent/token\"\n"), "[control] token_file", "cannot read");
  expect_rejected(with_agent("[tiers.file]\ncapacity = \"1G\"\n"), "[tiers.file] dir", "missing");
  expect_rejected(with_agent("[tiers.cxl]\npath = \"/dev/dax0.0\"\n"), "[tiers.cxl] host_index", "missing");
  expect_rejected(with_agent("[tiers.rdma]\ndevice = \"rxe0\"\ntoken = \"0123456789abcdef\"\n"), "[tiers.rdma] memnode",
                  "missing");
  expect_rejected(with_agent("[tiers.rdma]\nmemnode = \"10.0.0.9:7400\"\n"), "[tiers.rdma] token", "required");
}

TEST(ConfigTest, RoleAndMemnodeSectionMustAgree) {
  expect_rejected(
      "[agent]\nrole = \"memnode\"\nstate_dir = \"/x\"\n[control]\ntcp_listen = \"0.0.0.0:7400\"\ntoken = \"0123456789abcdef\"\n",
      "memnode", "requires a [memnode] section");
  expect_rejected(with_agent("[memnode]\npool_size = \"1G\"\n"), "memnode", "requires [agent] role = \"memnode\"");
  expect_rejected("[agent]\nrole = \"memnode\"\nstate_dir = \"/x\"\n[memnode]\npool_size = \"1G\"\n",
                  "[control] tcp_listen", "must listen on TCP");
  expect_rejected(
      "[agent]\nrole = \"memnode\"\nstate_dir = \"/x\"\n[control]\ntcp_listen = \"0.0.0.0:7400\"\ntoken = "
      "\"0123456789abcdef\"\n[memnode]\npool_size = 0\n",
      "[memnode] pool_size", "positive");
}

TEST(ConfigTest, UnixSocketPathLongerThanSunPathIsRejected) {
  expect_rejected(with_agent("[control]\nunix_socket = \"/" + std::string(120, 'a') + "\"\n"), "[control] unix_socket",
                  "longer than");
}

TEST(ConfigTest, ErrorsCarryTheLineOfTheOffendingKey) {
  auto config = parse_config("[agent]\nstate_dir = \"/x\"\n\n[tiers.local]\ncapacity = 12\n", "agent.toml");
  ASSERT_FALSE(config.has_value());
  EXPECT_NE(config.error().message.find("agent.toml:5:"), std::string::npos) << config.error().message;
}

TEST(ConfigTest, FunctionsSectionParsesWithDefaults) {
  auto config = parse_config(with_agent("[functions]\nworkloads_dir = \"/opt/workloads\"\nwork_dir = \"/run/fn\"\n"),
                             "fn.toml");
  ASSERT_TRUE(config.has_value()) << config.error().what();
  ASSERT_TRUE(config->functions.has_value());
  EXPECT_EQ(config->functions->workloads_dir, "/opt/workloads");
  EXPECT_EQ(config->functions->work_dir, "/run/fn");
  EXPECT_EQ(config->functions->criu, "criu");
  EXPECT_EQ(config->functions->operation_timeout, 900s);
  EXPECT_TRUE(config->functions->burst_one_serving_thread);
  EXPECT_EQ(config->functions->fault_spin, FaultEngineOptions{}.spin_after_fault);
  EXPECT_TRUE(config->functions->prestart_criu);

  auto full = parse_config(with_agent("[functions]\nworkloads_dir = \"/w\"\nwork_dir = \"/x\"\ncriu = \"/usr/sbin/criu\"\n"
                                      "operation_timeout_s = 120\nburst_serving = \"thread-per-instance\"\n"
                                      "fault_spin_us = 0\nprestart_criu = false\n"),
                           "fn.toml");
  ASSERT_TRUE(full.has_value()) << full.error().what();
  EXPECT_EQ(full->functions->criu, "/usr/sbin/criu");
  EXPECT_EQ(full->functions->operation_timeout, 120s);
  EXPECT_FALSE(full->functions->burst_one_serving_thread);
  EXPECT_EQ(full->functions->fault_spin, 0us);
  EXPECT_FALSE(full->functions->prestart_criu);

  auto none = parse_config(with_agent(""), "min.toml");
  ASSERT_TRUE(none.has_value());
  EXPECT_FALSE(none->functions.has_value());
  EXPECT_TRUE(none->peers.empty());
}

TEST(ConfigTest, FunctionsDirectoriesResolveAgainstTheConfigFile) {
  auto dir = std::filesystem::temp_directory_path() / ("snaptier-config-fn-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  { std::ofstream(dir / "agent.toml") << with_agent("[functions]\nworkloads_dir = \"workloads\"\nwork_dir = \"run/fn\"\n"); }
  auto config = load_config(dir / "agent.toml");
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(config.has_value()) << config.error().what();
  EXPECT_EQ(config->functions->workloads_dir, dir / "workloads");
  EXPECT_EQ(config->functions->work_dir, dir / "run/fn");
}

TEST(ConfigTest, FunctionsSectionMistakesAreRejected) {
  expect_rejected(with_agent("[functions]\nwork_dir = \"/x\"\n"), "[functions] workloads_dir", "required key is missing");
  expect_rejected(with_agent("[functions]\nworkloads_dir = \"\"\nwork_dir = \"/x\"\n"), "[functions] workloads_dir",
                  "required key is missing");
  expect_rejected(with_agent("[functions]\nworkloads_dir = \"/w\"\n"), "[functions] work_dir", "required key is missing");
  expect_rejected(with_agent("[functions]\nworkloads_dir = \"/w\"\nwork_dir = \"/x\"\ncriu = \"\"\n"), "[functions] criu",
                  "must not be empty");
  expect_rejected(with_agent("[functions]\nworkloads_dir = \"/w\"\nwork_dir = \"/x\"\ncriu_path = \"/bin/criu\"\n"),
                  "[functions] criu_path", "unknown key");
  expect_rejected(with_agent("[functions]\nworkloads_dir = \"/w\"\nwork_dir = \"/x\"\nburst_serving = \"threads\"\n"),
                  "[functions] burst_serving", "must be \"one-thread\" or \"thread-per-instance\"");
  expect_rejected(with_agent("[functions]\nworkloads_dir = \"/w\"\nwork_dir = \"/x\"\nfault_spin_us = 100001\n"),
                  "[functions] fault_spin_us", "between 0 and 100000");
  expect_rejected(with_agent("[functions]\nworkloads_dir = \"/w\"\nwork_dir = \"/x\"\nfault_spin_us = -1\n"),
                  "[functions] fault_spin_us", "between 0 and 100000");
  expect_rejected(with_agent("[functions]\nworkloads_dir = \"/w\"\nwork_dir = \"/x\"\nprestart_criu = \"yes\"\n"),
                  "[functions] prestart_criu", "expected true or false");
  expect_rejected(with_agent("[functions]\nworkloads_dir = \"/w\"\nwork_dir = \"/x\"\noperation_timeout_s = 0\n"),
                  "[functions] operation_timeout_s", "between 1 and 86400");
  expect_rejected(with_agent("[functions]\nworkloads_dir = \"/w\"\nwork_dir = \"/x\"\noperation_timeout_s = 86401\n"),
                  "[functions] operation_timeout_s", "between 1 and 86400");
  expect_rejected(with_agent("[functions]\nworkloads_dir = \"/w\"\nwork_dir = \"/x\"\noperation_timeout_s = \"60\"\n"),
                  "[functions] operation_timeout_s", "expected an integer");
  expect_rejected(with_agent("[functions]\nworkloads_dir = 3\nwork_dir = \"/x\"\n"), "[functions] workloads_dir",
                  "expected a string");
  expect_rejected(with_agent("functions = \"/w\"\n"), "[agent] functions", "unknown key");
}

TEST(ConfigTest, PeersSectionMapsHostsToAddresses) {
  auto config = parse_config(
      "[agent]\nhost = \"host0\"\nstate_dir = \"/tmp/st\"\n[peers]\nhost1 = \"10.0.0.2:7400\"\nmem0 = \"[fd00::9]:7401\"\n"
      "host2 = \"host2.cluster:7400\"\n",
      "peers.toml");
  ASSERT_TRUE(config.has_value()) << config.error().what();
  ASSERT_EQ(config->peers.size(), 3u);
  EXPECT_EQ(config->peers.at("host1"), (NetAddress{"10.0.0.2", 7400}));
  EXPECT_EQ(config->peers.at("mem0"), (NetAddress{"fd00::9", 7401}));
  EXPECT_EQ(config->peers.at("host2"), (NetAddress{"host2.cluster", 7400}));
  auto empty = parse_config(with_agent("[peers]\n"), "peers.toml");
  ASSERT_TRUE(empty.has_value()) << empty.error().what();
  EXPECT_TRUE(empty->peers.empty());
}

TEST(ConfigTest, PeersSectionMistakesAreRejected) {
  const std::string agent = "[agent]\nhost = \"host0\"\nstate_dir = \"/tmp/st\"\n";
  expect_rejected(agent + "[peers]\nhost1 = \"10.0.0.2\"\n", "[peers] host1", "missing :PORT");
  expect_rejected(agent + "[peers]\nhost1 = \"10.0.0.2:0\"\n", "[peers] host1", "port 0");
  expect_rejected(agent + "[peers]\nhost1 = \"300.0.0.2:7400\"\n", "[peers] host1", "not an IPv4");
  expect_rejected(agent + "[peers]\nhost1 = 7400\n", "[peers] host1", "expected a string");
  expect_rejected(agent + "[peers]\nhost0 = \"10.0.0.1:7400\"\n", "[peers] host0", "own host name");
  expect_rejected("[peers]\nhost0 = \"10.0.0.1:7400\"\n" + agent, "[peers] host0", "own host name");  // order-free
}

TEST(ConfigTest, StorePageCacheIsSizedOrTurnedOff) {
  auto defaults = parse_config(with_agent(""), "min.toml");
  ASSERT_TRUE(defaults.has_value()) << defaults.error().what();
  EXPECT_EQ(defaults->store.page_cache_bytes, 64ull << 20);
  for (const auto& [text, bytes] : std::vector<std::pair<std::string, std::uint64_t>>{
           {"page_cache = \"256M\"", 256ull << 20}, {"page_cache = 0", 0}, {"page_cache = \"0\"", 0},
           {"page_cache = 8192", 8192}}) {
    auto config = parse_config(with_agent("[store]\n" + text + "\n"), "store.toml");
    ASSERT_TRUE(config.has_value()) << text << ": " << config.error().what();
    EXPECT_EQ(config->store.page_cache_bytes, bytes) << text;
  }
  expect_rejected(with_agent("[store]\npage_cache = 1000\n"), "page_cache", "multiple of 4096");
  expect_rejected(with_agent("[store]\npage_cache = -1\n"), "page_cache", "positive");
  expect_rejected(with_agent("[store]\npage_cahce = \"1M\"\n"), "page_cahce", "unknown key");
}

TEST(ConfigTest, ExampleConfigInTheRepositoryIsValid) {
  auto config = load_config(std::filesystem::path(__FILE__).parent_path() / "../../tier-agent/examples/agent.toml");
  ASSERT_TRUE(config.has_value()) << config.error().what();
  EXPECT_TRUE(config->local && config->file && config->cxl);
}

}  // namespace
}  // namespace snaptier
