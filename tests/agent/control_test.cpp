// The control plane over real sockets: a Unix socket in a temp directory and TCP on 127.0.0.1
// with a kernel-chosen port. Handlers here are tiny; what is under test is framing, parsing,
// authentication, limits and timeouts, and that one misbehaving client never stops the others.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "control/sha256.hpp"
#include "snaptier/control.hpp"

namespace snaptier::control {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;

std::span<const std::byte> as_bytes(const std::string& s) { return std::as_bytes(std::span(s.data(), s.size())); }

std::string raw_frame_header(std::uint32_t length) {
  std::string header(4, '\0');
  header[0] = static_cast<char>(length >> 24);
  header[1] = static_cast<char>(length >> 16);
  header[2] = static_cast<char>(length >> 8);
  header[3] = static_cast<char>(length);
  return header;
}

class ControlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("snaptier-control-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  // Ping answers {"pong":true}; snapshot.info answers with the id; rdma.* answer with fixed
  // values; a handler delay can be injected to exercise timeouts.
  Result<json> handle(const Command& command) {
    calls_.fetch_add(1);
    if (int delay = handler_delay_ms_.load(); delay > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay));
    if (std::holds_alternative<Ping>(command)) return json{{"pong", true}};
    if (const auto* info = std::get_if<SnapshotInfoQuery>(&command)) {
      if (info->id == "missing") return fail(Errc::not_found, "no snapshot \"missing\"");
      return json{{"id", info->id}};
    }
    if (const auto* connect = std::get_if<RdmaConnect>(&command)) {
      RdmaPoolGrant grant{RdmaEndpoint{std::string(32, 'b'), connect->client.qpn + 1, 7, 0}, 0x7f0000000000, 0x1234,
                          1ull << 30};
      return encode_grant(grant);
    }
    if (const auto* alloc = std::get_if<RdmaAlloc>(&command)) {
      if (alloc->length > (1ull << 30)) return fail(Errc::no_space, "pool exhausted");
      return encode_extent(Extent{8192, alloc->length});
    }
    if (std::holds_alternative<RdmaFree>(command)) return json::object();
    return fail(Errc::unsupported, "not in this test");
  }

  void start_server(ServerOptions options = {}) {
    if (!options.unix_socket) options.unix_socket = dir_ / "agent.sock";
    if (!options.tcp_listen) options.tcp_listen = NetAddress{"127.0.0.1", 0};
    if (options.token.empty()) options.token = kToken;
    auto server = ControlServer::start(options, [this](const Command& c) { return handle(c); });
    ASSERT_TRUE(server.has_value()) << server.error().what();
    server_ = std::move(*server);
  }

  ClientOptions unix_options() const { return ClientOptions{UnixEndpoint{dir_ / "agent.sock"}, "", 2000ms, 2000ms}; }
  ClientOptions tcp_options(std::string token = kToken) const {
    return ClientOptions{NetAddress{"127.0.0.1", *server_->tcp_port()}, std::move(token), 2000ms, 2000ms};
  }

  ControlClient connect(const ClientOptions& options) {
    auto client = ControlClient::connect(options);
    EXPECT_TRUE(client.has_value()) << client.error().what();
    return std::move(*client);
  }

  // Sends one payload as a frame and returns the parsed response.
  Response exchange(ControlClient& client, const std::string& payload) {
    auto sent = client.send_frame(payload);
    EXPECT_TRUE(sent.has_value()) << sent.error().what();
    auto frame = client.receive_frame();
    EXPECT_TRUE(frame.has_value()) << frame.error().what();
    if (!frame) return Response{std::nullopt, tl::unexpected(frame.error())};
    auto response = parse_response(*frame);
    EXPECT_TRUE(response.has_value()) << response.error().what();
    return response ? std::move(*response) : Response{std::nullopt, tl::unexpected(response.error())};
  }

  void expect_ping_works(const ClientOptions& options) {
    auto client = connect(options);
    auto result = client.call_ok(Ping{});
    ASSERT_TRUE(result.has_value()) << result.error().what();
    EXPECT_EQ(*result, (json{{"pong", true}}));
  }

  static constexpr const char* kToken = "test-token-0123456789abcdef";
  std::filesystem::path dir_;
  std::unique_ptr<ControlServer> server_;
  std::atomic<int> calls_{0};
  std::atomic<int> handler_delay_ms_{0};  // read on the server's worker threads
};

// ---- codec (no sockets) --------------------------------------------------------------------

TEST(ControlCodecTest, EveryCommandSurvivesEncodeAndParse) {
  SnapshotPut put{"fn-1.v2", "/data/pages.bin", 0x7f0000000000, TierKind::cxl,
                  {{"criu", "/data/criu.img"}, {"profile", "/data/profile.json"}}};
  std::vector<Command> commands{Ping{},
                                Status{},
                                put,
                                SnapshotList{},
                                SnapshotInfoQuery{"a"},
                                SnapshotRead{"a", "/tmp/out.bin"},
                                SnapshotDelete{"a"},
                                RdmaConnect{RdmaEndpoint{"fe800000000000000000000000000001", 0x11, 0x22, 3}},
                                RdmaAlloc{1 << 20},
                                RdmaFree{Extent{4096, 8192}},
                                FunctionSnapshot{"matmul", "mm-1", "host0"},
                                FunctionRestore{"mm-1", "tiered", "host1", true, 16},
                                FunctionServeLazy{"mm-1", "10.77.0.1", 27001},
                                FunctionInstances{},
                                FunctionKill{"mm-1.tiered.3"}};
  ASSERT_EQ(commands.size(), std::variant_size_v<Command>) << "a new op needs a case here";
  std::uint64_t id = 40;
  for (const auto& command : commands) {
    std::string payload = encode_request(Request{++id, "tok", command});
    auto parsed = parse_request(payload);
    ASSERT_TRUE(parsed.has_value()) << payload << " -> " << parsed.error().error.what();
    EXPECT_EQ(parsed->id, id);
    EXPECT_EQ(parsed->token, "tok");
    EXPECT_EQ(parsed->command.index(), command.index());
    EXPECT_EQ(op_name(parsed->command), op_name(command));
  }
  auto parsed_put = parse_request(encode_request(Request{1, "", put}));
  const auto& back = std::get<SnapshotPut>(parsed_put->command);
  EXPECT_EQ(back.id, put.id);
  EXPECT_EQ(back.data_path, put.data_path);
  EXPECT_EQ(back.base_vaddr, put.base_vaddr);
  EXPECT_EQ(back.tier, put.tier);
  EXPECT_EQ(back.metadata, put.metadata);
  auto parsed_free = parse_request(encode_request(Request{1, "", RdmaFree{Extent{4096, 8192}}}));
  EXPECT_EQ(std::get<RdmaFree>(parsed_free->command).extent, (Extent{4096, 8192}));
  auto parsed_restore = parse_request(encode_request(Request{1, "", FunctionRestore{"mm-1", "tiered", "host1", true, 16}}));
  const auto& restore = std::get<FunctionRestore>(parsed_restore->command);
  EXPECT_EQ(restore.snapshot, "mm-1");
  EXPECT_EQ(restore.policy, "tiered");
  EXPECT_EQ(restore.host, std::optional<std::string>("host1"));
  EXPECT_TRUE(restore.keep);
  EXPECT_EQ(restore.instances, std::optional<std::uint32_t>(16));
  EXPECT_FALSE(std::get<FunctionRestore>(parse_request(encode_request(Request{1, "", FunctionRestore{"m", "reap"}}))->command)
                   .instances)
      << "no instances: a single restore, not a burst of one";
  EXPECT_FALSE(restore.measure_limit) << "a restore measures its limit only when asked";
  auto limited = parse_request(encode_request(Request{1, "", FunctionRestore{"m", "reap", {}, false, {}, true}}));
  EXPECT_TRUE(std::get<FunctionRestore>(limited->command).measure_limit);
  auto parsed_kill = parse_request(encode_request(Request{1, "", FunctionKill{"mm-1.tiered.3"}}));
  EXPECT_EQ(std::get<FunctionKill>(parsed_kill->command).instance, "mm-1.tiered.3");
  EXPECT_TRUE(is_long_running(parsed_restore->command));
  EXPECT_FALSE(is_long_running(Command{Ping{}}));
}

TEST(ControlCodecTest, RejectsBadFunctionRequests) {
  const std::vector<std::pair<std::string, std::string>> cases{
      {R"({"v":1,"id":1,"op":"function.snapshot","args":{}})", "function"},
      {R"({"v":1,"id":1,"op":"function.snapshot","args":{"function":"../etc"}})", "function"},
      {R"({"v":1,"id":1,"op":"function.snapshot","args":{"function":"a/b"}})", "function"},
      {R"({"v":1,"id":1,"op":"function.snapshot","args":{"function":"m","id":"x:cxl"}})", "id"},
      {R"({"v":1,"id":1,"op":"function.snapshot","args":{"function":"m","host":"a b"}})", "host"},
      {R"({"v":1,"id":1,"op":"function.restore","args":{"id":"m"}})", "policy"},
      {R"({"v":1,"id":1,"op":"function.restore","args":{"id":"m","policy":"tiered","keep":"yes"}})", "keep"},
      {R"({"v":1,"id":1,"op":"function.restore","args":{"id":"m","policy":"tiered","extra":1}})", "extra"},
      {R"({"v":1,"id":1,"op":"function.restore","args":{"id":"m","policy":"tiered","instances":0}})", "instances"},
      {R"({"v":1,"id":1,"op":"function.restore","args":{"id":"m","policy":"tiered","instances":257}})", "instances"},
      {R"({"v":1,"id":1,"op":"function.restore","args":{"id":"m","policy":"tiered","instances":"8"}})", "instances"},
      {R"({"v":1,"id":1,"op":"function.kill","args":{}})", "instance"},
      {R"({"v":1,"id":1,"op":"function.kill","args":{"instance":"../x y"}})", "instance"},
      {R"({"v":1,"id":1,"op":"function.instances","args":{"x":1}})", "x"},
  };
  for (const auto& [payload, field] : cases) {
    auto parsed = parse_request(payload);
    ASSERT_FALSE(parsed.has_value()) << payload;
    EXPECT_EQ(parsed.error().error.code, Errc::invalid_argument) << payload;
    EXPECT_NE(parsed.error().error.message.find(field), std::string::npos) << payload << ": " << parsed.error().error.message;
  }
}

TEST(ControlCodecTest, RejectsMalformedRequestsWithTheRightCodeAndId) {
  struct Case {
    std::string payload;
    Errc code;
    std::optional<std::uint64_t> id;
    std::string says;
  };
  const std::vector<Case> cases{
      {"{not json", Errc::protocol, std::nullopt, "malformed JSON"},
      {"[1,2]", Errc::protocol, std::nullopt, "JSON object"},
      {R"({"v":1,"op":"ping"})", Errc::invalid_argument, std::nullopt, "\"id\""},
      {R"({"v":1,"id":-1,"op":"ping"})", Errc::invalid_argument, std::nullopt, "negative"},
      {R"({"v":1,"id":1.5,"op":"ping"})", Errc::invalid_argument, std::nullopt, "\"id\""},
      {R"({"v":2,"id":3,"op":"ping"})", Errc::protocol, 3, "version 2"},
      {R"({"id":3,"op":"ping"})", Errc::invalid_argument, 3, "\"v\""},
      {R"({"v":1,"id":3})", Errc::invalid_argument, 3, "\"op\""},
      {R"({"v":1,"id":3,"op":"snapshot.frobnicate"})", Errc::unsupported, 3, "unknown op"},
      {R"({"v":1,"id":3,"op":"ping","extra":1})", Errc::invalid_argument, 3, "\"extra\": unknown field"},
      {R"({"v":1,"id":3,"op":"ping","args":[]})", Errc::invalid_argument, 3, "\"args\""},
      {R"({"v":1,"id":3,"op":"ping","token":5})", Errc::invalid_argument, 3, "\"token\""},
      {R"({"v":1,"id":4,"op":"snapshot.info"})", Errc::invalid_argument, 4, "\"args.id\": required"},
      {R"({"v":1,"id":4,"op":"snapshot.info","args":{"id":""}})", Errc::invalid_argument, 4, "args.id"},
      {R"({"v":1,"id":4,"op":"snapshot.info","args":{"id":"../etc"}})", Errc::invalid_argument, 4, "args.id"},
      {R"({"v":1,"id":4,"op":"snapshot.info","args":{"id":"a","x":1}})", Errc::invalid_argument, 4, "args.x"},
      {R"({"v":1,"id":5,"op":"snapshot.put","args":{"id":"a"}})", Errc::invalid_argument, 5, "args.path"},
      {R"({"v":1,"id":5,"op":"snapshot.put","args":{"id":"a","path":"rel/p"}})", Errc::invalid_argument, 5, "absolute"},
      {R"({"v":1,"id":5,"op":"snapshot.put","args":{"id":"a","path":"/p","tier":"ssd"}})", Errc::invalid_argument, 5,
       "args.tier"},
      {R"({"v":1,"id":5,"op":"snapshot.put","args":{"id":"a","path":"/p","base_vaddr":100}})", Errc::invalid_argument,
       5, "page aligned"},
      {R"({"v":1,"id":5,"op":"snapshot.put","args":{"id":"a","path":"/p","metadata":{"x":"rel"}}})",
       Errc::invalid_argument, 5, "args.metadata.x"},
      {R"({"v":1,"id":6,"op":"snapshot.read","args":{"id":"a"}})", Errc::invalid_argument, 6, "args.path"},
      {R"({"v":1,"id":7,"op":"rdma.alloc","args":{"length":0}})", Errc::invalid_argument, 7, "positive"},
      {R"({"v":1,"id":7,"op":"rdma.alloc","args":{"length":"1G"}})", Errc::invalid_argument, 7, "args.length"},
      {R"({"v":1,"id":8,"op":"rdma.connect","args":{"endpoint":{"gid":"xyz","qpn":1,"psn":1}}})",
       Errc::invalid_argument, 8, "endpoint.gid"},
      {R"({"v":1,"id":8,"op":"rdma.connect","args":{"endpoint":{"gid":"00000000000000000000000000000000","qpn":16777216,"psn":1}}})",
       Errc::invalid_argument, 8, "endpoint.qpn"},
  };
  for (const auto& c : cases) {
    auto parsed = parse_request(c.payload);
    ASSERT_FALSE(parsed.has_value()) << "accepted: " << c.payload;
    EXPECT_EQ(parsed.error().error.code, c.code) << c.payload << " -> " << parsed.error().error.what();
    EXPECT_EQ(parsed.error().id, c.id) << c.payload;
    EXPECT_NE(parsed.error().error.message.find(c.says), std::string::npos)
        << c.payload << " -> " << parsed.error().error.message;
  }
}

TEST(ControlCodecTest, ResponsesRoundTripIncludingErrorCodes) {
  auto ok = parse_response(encode_response(Response{9, json{{"x", 1}}}));
  ASSERT_TRUE(ok.has_value());
  EXPECT_EQ(ok->id, 9u);
  ASSERT_TRUE(ok->outcome.has_value());
  EXPECT_EQ((*ok->outcome)["x"], 1);
  for (Errc code : {Errc::invalid_argument, Errc::not_found, Errc::already_exists, Errc::no_space, Errc::corrupt,
                    Errc::io, Errc::unsupported, Errc::timeout, Errc::unavailable, Errc::permission_denied,
                    Errc::protocol}) {
    std::string wire = encode_response(Response{std::nullopt, tl::unexpected(Error{code, "m"})});
    EXPECT_NE(wire.find("\"code\":\"" + std::string(errc_name(code)) + "\""), std::string::npos) << wire;
    EXPECT_NE(wire.find("\"id\":null"), std::string::npos) << wire;
    auto back = parse_response(wire);
    ASSERT_TRUE(back.has_value());
    ASSERT_FALSE(back->outcome.has_value());
    EXPECT_EQ(back->outcome.error().code, code);
    EXPECT_EQ(back->outcome.error().message, "m");
  }
  EXPECT_FALSE(parse_response(R"({"v":1,"id":1,"ok":true})").has_value());
  EXPECT_FALSE(parse_response(R"({"v":1,"id":"1","ok":true,"result":{}})").has_value());
}

// rdma.hpp's to_json/from_json (used by the RDMA component) and the control plane's validating
// codec must agree on the wire format in both directions.
TEST(ControlCodecTest, RdmaJsonOfTheRdmaComponentMatchesTheWireCodec) {
  RdmaPoolGrant grant{RdmaEndpoint{"fe800000000000000000000000000001", 0x123456, 0x654321, 7}, 0x7f1234567000,
                      0xdeadbeef, 1ull << 33, 0x1f'2345'6789'abcd};
  EXPECT_EQ(json(grant), encode_grant(grant));
  EXPECT_EQ(json(grant.endpoint), encode_endpoint(grant.endpoint));
  auto decoded = decode_grant(json(grant));
  ASSERT_TRUE(decoded.has_value()) << decoded.error().what();
  EXPECT_EQ(decoded->endpoint.gid, grant.endpoint.gid);
  EXPECT_EQ(decoded->endpoint.qpn, grant.endpoint.qpn);
  EXPECT_EQ(decoded->endpoint.psn, grant.endpoint.psn);
  EXPECT_EQ(decoded->endpoint.lid, grant.endpoint.lid);
  EXPECT_EQ(decoded->remote_addr, grant.remote_addr);
  EXPECT_EQ(decoded->rkey, grant.rkey);
  EXPECT_EQ(decoded->pool_size, grant.pool_size);
  EXPECT_EQ(decoded->epoch, grant.epoch);
  auto back = encode_grant(grant).get<RdmaPoolGrant>();
  EXPECT_EQ(back.endpoint.gid, grant.endpoint.gid);
  EXPECT_EQ(back.rkey, grant.rkey);
  EXPECT_EQ(back.epoch, grant.epoch);
  // A memory node from before pool epochs sends none: 0, "not tracked", in both decoders.
  json old = encode_grant(grant);
  old.erase("epoch");
  EXPECT_EQ(decode_grant(old)->epoch, 0u);
  EXPECT_EQ(old.get<RdmaPoolGrant>().epoch, 0u);
}

// What a user reads in `tierctl status` and `tierctl list` when the RDMA tier is reconnecting
// and a snapshot's pool is gone.
TEST(ControlRenderTest, StatusShowsTheTierStateAndListShowsLostSnapshots) {
  const json status = json::parse(R"({"host": "host0", "role": "compute", "default_tier": "cxl", "snapshots": 1,
    "tiers": [{"kind": "rdma", "up": true, "source": "memnode 10.77.0.3:7400", "state": "reconnecting",
               "stats": {"capacity_bytes": 1073741824},
               "reconnect": {"since_unix_ms": 1796170867000, "attempt": 3, "next_attempt_unix_ms": 1796170868000,
                             "last_error": "rdma: RDMA READ of 4096 bytes: no completion within 5000 ms"}}]})");
  const std::string shown = render_result(Status{}, status);
  for (const char* part : {"RECONNECTING", "since 2026-12-02T", "attempt 3", "next 2026-12-02T", "no completion within 5000 ms"}) {
    EXPECT_NE(shown.find(part), std::string::npos) << part << " not in:\n" << shown;
  }
  const json up = json::parse(R"({"tiers": [{"kind": "local", "up": true, "source": "DRAM", "state": "up"}]})");
  EXPECT_EQ(render_result(Status{}, up).find("since"), std::string::npos);

  const json list = json::parse(R"({"snapshots": [
    {"id": "fn", "owner_host": "host0", "pages": 3, "zero_pages": 0, "bytes_per_tier": {"rdma": 12288},
     "published": true, "lost": "its RDMA pages were lost: pool epoch 12, now 34"},
    {"id": "ok", "owner_host": "host0", "pages": 1, "zero_pages": 0, "bytes_per_tier": {"cxl": 4096}, "published": true}]})");
  const std::string listed = render_result(SnapshotList{}, list);
  EXPECT_NE(listed.find("LOST"), std::string::npos) << listed;
  EXPECT_NE(listed.find("fn: its RDMA pages were lost: pool epoch 12, now 34"), std::string::npos) << listed;
}

TEST(ControlCodecTest, FrameHeaderIsBigEndian) {
  std::string frame = encode_frame(std::string(0x010203, 'x'));
  EXPECT_EQ(frame.substr(0, 4), std::string("\x00\x01\x02\x03", 4));
  std::array<std::byte, 4> header{std::byte{0x01}, std::byte{0x02}, std::byte{0x03}, std::byte{0x04}};
  EXPECT_EQ(decode_frame_length(header), 0x01020304u);
}

TEST(ControlCodecTest, Sha256KnownAnswers) {
  detail::Sha256 empty;
  EXPECT_EQ(detail::Sha256::hex(empty.finish()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  detail::Sha256 abc;
  abc.update("abc");
  EXPECT_EQ(detail::Sha256::hex(abc.finish()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  // Fed in odd-sized pieces across block boundaries: the 1,000,000 x 'a' vector.
  detail::Sha256 million;
  std::string chunk(997, 'a');
  std::size_t fed = 0;
  while (fed + chunk.size() <= 1'000'000) {
    million.update(chunk);
    fed += chunk.size();
  }
  million.update(std::string(1'000'000 - fed, 'a'));
  EXPECT_EQ(detail::Sha256::hex(million.finish()), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  EXPECT_TRUE(detail::constant_time_equal("secret-token", "secret-token"));
  EXPECT_FALSE(detail::constant_time_equal("secret-token", "secret-tokex"));
  EXPECT_FALSE(detail::constant_time_equal("secret-token", "secret-token2"));
  EXPECT_FALSE(detail::constant_time_equal("", "x"));
}

// ---- over real sockets ---------------------------------------------------------------------

TEST_F(ControlTest, RoundTripOverUnixSocketAndTcp) {
  start_server();
  expect_ping_works(unix_options());
  expect_ping_works(tcp_options());
  auto client = connect(unix_options());
  auto response = client.call(SnapshotInfoQuery{"missing"});
  ASSERT_TRUE(response.has_value()) << response.error().what();
  ASSERT_FALSE(response->outcome.has_value());
  EXPECT_EQ(response->outcome.error().code, Errc::not_found);
  EXPECT_EQ(response->outcome.error().message, "no snapshot \"missing\"");
}

TEST_F(ControlTest, UnixSocketIsOwnerOnly) {
  start_server();
  struct stat st {};
  ASSERT_EQ(::stat((dir_ / "agent.sock").c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(ControlTest, MalformedJsonGetsAnErrorAndTheConnectionKeepsWorking) {
  start_server();
  auto client = connect(unix_options());
  Response bad = exchange(client, "{\"v\":1,\"id\":");
  EXPECT_FALSE(bad.id.has_value());
  ASSERT_FALSE(bad.outcome.has_value());
  EXPECT_EQ(bad.outcome.error().code, Errc::protocol);
  Response invalid_utf8 = exchange(client, "{\"v\":1,\"id\":2,\"op\":\"\xff\"}");
  ASSERT_FALSE(invalid_utf8.outcome.has_value());
  EXPECT_EQ(invalid_utf8.outcome.error().code, Errc::protocol);
  Response empty = exchange(client, "");
  ASSERT_FALSE(empty.outcome.has_value());
  auto after = client.call_ok(Ping{});
  ASSERT_TRUE(after.has_value()) << after.error().what();
  EXPECT_EQ(calls_.load(), 1) << "malformed requests must not reach the handler";
}

TEST_F(ControlTest, UnknownOpAndMissingFieldsAreErrorsWithTheRequestId) {
  start_server();
  auto client = connect(unix_options());
  Response unknown = exchange(client, R"({"v":1,"id":77,"op":"snapshot.frobnicate"})");
  EXPECT_EQ(unknown.id, 77u);
  ASSERT_FALSE(unknown.outcome.has_value());
  EXPECT_EQ(unknown.outcome.error().code, Errc::unsupported);
  Response missing = exchange(client, R"({"v":1,"id":78,"op":"snapshot.read","args":{"id":"a"}})");
  EXPECT_EQ(missing.id, 78u);
  ASSERT_FALSE(missing.outcome.has_value());
  EXPECT_EQ(missing.outcome.error().code, Errc::invalid_argument);
  EXPECT_NE(missing.outcome.error().message.find("args.path"), std::string::npos);
  EXPECT_EQ(calls_.load(), 0);
}

TEST_F(ControlTest, OversizeFrameIsRefusedAndTheConnectionClosed) {
  ServerOptions options;
  options.max_frame_bytes = 1024;
  start_server(options);
  auto client = connect(unix_options());
  ASSERT_TRUE(client.send_bytes(as_bytes(raw_frame_header(1025))).has_value());
  auto frame = client.receive_frame();
  ASSERT_TRUE(frame.has_value()) << frame.error().what();
  auto response = parse_response(*frame);
  ASSERT_TRUE(response.has_value());
  ASSERT_FALSE(response->outcome.has_value());
  EXPECT_EQ(response->outcome.error().code, Errc::invalid_argument);
  EXPECT_NE(response->outcome.error().message.find("exceeds the limit"), std::string::npos);
  auto next = client.receive_frame();
  ASSERT_FALSE(next.has_value());
  EXPECT_EQ(next.error().code, Errc::unavailable);  // closed by the server, not a timeout
  // A frame exactly at the limit is still parsed (and here rejected only as bad JSON).
  auto other = connect(unix_options());
  Response at_limit = exchange(other, std::string(1024, ' '));
  ASSERT_FALSE(at_limit.outcome.has_value());
  EXPECT_EQ(at_limit.outcome.error().code, Errc::protocol);
}

TEST_F(ControlTest, TruncatedFrameFromAVanishingClientDoesNotDisturbOthers) {
  start_server();
  {
    auto client = connect(unix_options());
    std::string partial = raw_frame_header(100) + R"({"v":1,"id")";
    ASSERT_TRUE(client.send_bytes(as_bytes(partial)).has_value());
  }  // closed mid-frame
  {
    auto client = connect(tcp_options());
    ASSERT_TRUE(client.send_bytes(as_bytes(raw_frame_header(100).substr(0, 2))).has_value());
  }
  expect_ping_works(unix_options());
  expect_ping_works(tcp_options());
  EXPECT_EQ(calls_.load(), 2);
}

TEST_F(ControlTest, StalledHalfFrameIsTimedOutWhileOthersAreServed) {
  ServerOptions options;
  options.idle_timeout = 300ms;
  start_server(options);
  auto stalled = connect(unix_options());
  ASSERT_TRUE(stalled.send_bytes(as_bytes(raw_frame_header(64) + "{\"v\":1")).has_value());
  // While it stalls, other clients on both listeners are served.
  const auto begin = std::chrono::steady_clock::now();
  for (int i = 0; i < 5; ++i) {
    expect_ping_works(unix_options());
    expect_ping_works(tcp_options());
  }
  EXPECT_EQ(calls_.load(), 10);
  // The server closes the stalled connection after the idle timeout: the client sees the close
  // (unavailable), well before its own 2 s receive timeout.
  auto frame = stalled.receive_frame();
  ASSERT_FALSE(frame.has_value());
  EXPECT_EQ(frame.error().code, Errc::unavailable) << frame.error().what();
  EXPECT_LT(std::chrono::steady_clock::now() - begin, 1500ms);
}

TEST_F(ControlTest, IdleConnectionIsClosedAfterTheIdleTimeout) {
  ServerOptions options;
  options.idle_timeout = 200ms;
  start_server(options);
  auto client = connect(unix_options());
  ASSERT_TRUE(client.call_ok(Ping{}).has_value());
  std::this_thread::sleep_for(400ms);
  auto late = client.call(Ping{});
  ASSERT_FALSE(late.has_value());
  EXPECT_EQ(late.error().code, Errc::unavailable);
}

TEST_F(ControlTest, TcpRequiresTheRightToken) {
  start_server();
  for (const std::string& token : {std::string(""), std::string("wrong-token-0123456789abcdef"),
                                   std::string(kToken) + "x"}) {
    auto client = connect(tcp_options(token));
    auto response = client.call(Ping{});
    ASSERT_TRUE(response.has_value()) << response.error().what();
    ASSERT_FALSE(response->outcome.has_value()) << "accepted token \"" << token << "\"";
    EXPECT_EQ(response->outcome.error().code, Errc::permission_denied);
    auto after = client.call(Ping{});  // the server hung up after refusing
    ASSERT_FALSE(after.has_value());
    EXPECT_EQ(after.error().code, Errc::unavailable);
  }
  EXPECT_EQ(calls_.load(), 0);
  expect_ping_works(tcp_options());
  expect_ping_works(unix_options());  // the Unix socket needs no token
}

TEST_F(ControlTest, TcpListenerWithoutTokenIsRefusedAtStart) {
  ServerOptions options;
  options.tcp_listen = NetAddress{"127.0.0.1", 0};
  auto server = ControlServer::start(options, [](const Command&) -> Result<json> { return json::object(); });
  ASSERT_FALSE(server.has_value());
  EXPECT_EQ(server.error().code, Errc::invalid_argument);
}

TEST_F(ControlTest, ManySequentialRequestsAndConnections) {
  start_server();
  auto client = connect(tcp_options());
  for (int i = 0; i < 500; ++i) {
    auto result = client.call_ok(SnapshotInfoQuery{"snap-" + std::to_string(i)});
    ASSERT_TRUE(result.has_value()) << i << ": " << result.error().what();
    ASSERT_EQ((*result)["id"], "snap-" + std::to_string(i));
  }
  for (int i = 0; i < 100; ++i) expect_ping_works(i % 2 ? unix_options() : tcp_options());
  EXPECT_EQ(calls_.load(), 600);
}

TEST_F(ControlTest, SlowHandlerGetsATimeoutReplyAndTheConnectionContinues) {
  ServerOptions options;
  options.request_timeout = 100ms;
  start_server(options);
  handler_delay_ms_ = 1000;
  auto client = connect(unix_options());
  const auto begin = std::chrono::steady_clock::now();
  auto response = client.call(Ping{});
  ASSERT_TRUE(response.has_value()) << response.error().what();
  ASSERT_FALSE(response->outcome.has_value());
  EXPECT_EQ(response->outcome.error().code, Errc::timeout);
  EXPECT_LT(std::chrono::steady_clock::now() - begin, 800ms) << "the reply must not wait for the handler";
  handler_delay_ms_ = 0;
  // The late result of the first handler is dropped; the next reply matches the next request.
  auto next = client.call(SnapshotInfoQuery{"after"});
  ASSERT_TRUE(next.has_value()) << next.error().what();
  ASSERT_TRUE(next->outcome.has_value()) << next->outcome.error().what();
  EXPECT_EQ((*next->outcome)["id"], "after");
}

TEST_F(ControlTest, ClientTimesOutOnASilentServer) {
  start_server();
  handler_delay_ms_ = 1000;
  ClientOptions options = unix_options();
  options.io_timeout = 100ms;
  auto client = connect(options);
  const auto begin = std::chrono::steady_clock::now();
  auto response = client.call(Ping{});
  ASSERT_FALSE(response.has_value());
  EXPECT_EQ(response.error().code, Errc::timeout);
  EXPECT_LT(std::chrono::steady_clock::now() - begin, 800ms) << "the client must not wait for the server";
}

TEST_F(ControlTest, ClientCannotConnectIsUnavailable) {
  auto missing = ControlClient::connect(ClientOptions{UnixEndpoint{dir_ / "nothing.sock"}, "", 500ms, 500ms});
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.error().code, Errc::unavailable);
  // A port that was just free: nothing listens there.
  start_server();
  std::uint16_t port = *server_->tcp_port();
  server_.reset();
  auto refused = ControlClient::connect(ClientOptions{NetAddress{"127.0.0.1", port}, kToken, 500ms, 500ms});
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code, Errc::unavailable);
}

TEST_F(ControlTest, StaleSocketFileIsReplacedButALiveAgentIsNot) {
  start_server();
  ServerOptions second;
  second.unix_socket = dir_ / "agent.sock";
  auto clash = ControlServer::start(second, [](const Command&) -> Result<json> { return json::object(); });
  ASSERT_FALSE(clash.has_value());
  EXPECT_EQ(clash.error().code, Errc::already_exists);
  expect_ping_works(unix_options());  // the running server was not disturbed

  // A socket file left by a dead process is taken over.
  server_.reset();
  {
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, (dir_ / "agent.sock").c_str(), sizeof(address.sun_path) - 1);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
    ::close(fd);  // the file stays behind, nobody listens
  }
  ASSERT_TRUE(std::filesystem::is_socket(dir_ / "agent.sock"));
  start_server();
  expect_ping_works(unix_options());

  // A regular file at the socket path is never deleted.
  ::close(::open((dir_ / "plain").c_str(), O_CREAT | O_WRONLY, 0600));
  ServerOptions on_plain;
  on_plain.unix_socket = dir_ / "plain";
  auto refused = ControlServer::start(on_plain, [](const Command&) -> Result<json> { return json::object(); });
  ASSERT_FALSE(refused.has_value()) << "must not delete a regular file";
  EXPECT_TRUE(std::filesystem::exists(dir_ / "plain"));
}

TEST_F(ControlTest, GracefulStopFinishesTheRequestInFlight) {
  start_server();
  handler_delay_ms_ = 200;
  std::optional<Result<Response>> answer;
  std::thread caller([&] {
    auto client = ControlClient::connect(unix_options());
    if (client) answer = client->call(Ping{});
  });
  while (calls_.load() == 0) std::this_thread::sleep_for(1ms);
  EXPECT_TRUE(server_->stop(2000ms));
  caller.join();
  ASSERT_TRUE(answer.has_value());
  ASSERT_TRUE(answer->has_value()) << answer->error().what();
  EXPECT_TRUE((*answer)->outcome.has_value());
  EXPECT_FALSE(std::filesystem::exists(dir_ / "agent.sock")) << "socket file removed on stop";
  auto late = ControlClient::connect(unix_options());
  EXPECT_FALSE(late.has_value());
}

TEST_F(ControlTest, RdmaPoolClientSpeaksTheControlPlane) {
  start_server();
  auto pool = make_control_rdma_pool_client(tcp_options());
  auto grant = pool->connect(RdmaEndpoint{std::string(32, 'a'), 41, 9, 0});
  ASSERT_TRUE(grant.has_value()) << grant.error().what();
  EXPECT_EQ(grant->endpoint.qpn, 42u);
  EXPECT_EQ(grant->endpoint.gid, std::string(32, 'b'));
  EXPECT_EQ(grant->remote_addr, 0x7f0000000000u);
  EXPECT_EQ(grant->rkey, 0x1234u);
  EXPECT_EQ(grant->pool_size, 1ull << 30);
  auto extent = pool->allocate(1 << 20);
  ASSERT_TRUE(extent.has_value()) << extent.error().what();
  EXPECT_EQ(*extent, (Extent{8192, 1 << 20}));
  EXPECT_TRUE(pool->release(*extent).has_value());
  auto too_big = pool->allocate(2ull << 30);
  ASSERT_FALSE(too_big.has_value());
  EXPECT_EQ(too_big.error().code, Errc::no_space);  // the memory node's code, not a transport one
  auto wrong_token = make_control_rdma_pool_client(tcp_options("not-the-token-0123456789"));
  auto denied = wrong_token->allocate(4096);
  ASSERT_FALSE(denied.has_value());
  EXPECT_EQ(denied.error().code, Errc::permission_denied);
}

// A compute agent's pool client sits idle between snapshots for longer than the memory node's
// idle timeout; its next call must still work (seen in the testbed: "connection closed by peer").
TEST_F(ControlTest, RdmaPoolClientWorksAfterTheMemoryNodeClosedAnIdleConnection) {
  ServerOptions options;
  options.idle_timeout = 200ms;
  start_server(options);
  auto pool = make_control_rdma_pool_client(tcp_options());
  auto first = pool->allocate(4096);
  ASSERT_TRUE(first.has_value()) << first.error().what();
  std::this_thread::sleep_for(400ms);
  auto second = pool->allocate(4096);
  ASSERT_TRUE(second.has_value()) << second.error().what();
  EXPECT_TRUE(pool->release(*second).has_value());
}

}  // namespace
}  // namespace snaptier::control
