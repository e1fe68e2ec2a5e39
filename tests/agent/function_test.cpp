// The agent's side of the function protocol, against the real Python runtime in workloads/
// (start-function --pidns, /usr/bin/python3) and against small misbehaving socket servers.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include "core/unique_fd.hpp"
#include "helpers/temp_dir.hpp"
#include "snaptier/function.hpp"
#include "snaptier/process.hpp"

namespace snaptier::function {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

std::filesystem::path workloads_dir() {
  if (const char* env = std::getenv("SNAPTIER_WORKLOADS")) return env;
  return std::filesystem::path(__FILE__).parent_path().parent_path().parent_path() / "workloads";
}

void write_file(const std::filesystem::path& path, const std::string& text) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path) << text;
}

// Stops the instance when the test ends, whatever happened.
struct InstanceGuard {
  Instance instance;
  ~InstanceGuard() {
    if (instance.pid > 0) (void)stop(instance, 5s);
  }
};

// A Unix socket server on a thread that runs `serve(connection_fd)` for one connection.
class FakeServer {
 public:
  FakeServer(std::filesystem::path path, std::function<void(int)> serve, bool accept = true)
      : path_(std::move(path)) {
    listener_ = detail::UniqueFd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path_.c_str(), sizeof(addr.sun_path) - 1);
    if (::bind(listener_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        ::listen(listener_.get(), 4) != 0) {
      ADD_FAILURE() << "cannot listen on " << path_ << ": " << std::strerror(errno);
      return;
    }
    if (!accept) return;  // connections wait in the backlog forever
    thread_ = std::thread([this, serve = std::move(serve)] {
      pollfd pfd{listener_.get(), POLLIN, 0};
      if (::poll(&pfd, 1, 5000) != 1) return;
      detail::UniqueFd connection(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (connection) serve(connection.get());
    });
  }
  ~FakeServer() {
    if (thread_.joinable()) thread_.join();
  }
  FakeServer(const FakeServer&) = delete;
  FakeServer& operator=(const FakeServer&) = delete;

 private:
  std::filesystem::path path_;
  detail::UniqueFd listener_;
  std::thread thread_;
};

// Reads one request frame (so the client's send completes), returns its JSON text.
std::string read_request(int fd) {
  unsigned char header[4];
  if (::recv(fd, header, 4, MSG_WAITALL) != 4) return {};
  const std::uint32_t size = (header[0] << 24) | (header[1] << 16) | (header[2] << 8) | header[3];
  std::string body(size, '\0');
  if (size > 0 && ::recv(fd, body.data(), size, MSG_WAITALL) != static_cast<ssize_t>(size)) return {};
  return body;
}

std::string frame_header(std::uint32_t size) {
  return {static_cast<char>(size >> 24), static_cast<char>(size >> 16), static_cast<char>(size >> 8),
          static_cast<char>(size)};
}

void send_text(int fd, const std::string& text) { (void)::send(fd, text.data(), text.size(), MSG_NOSIGNAL); }

// ---------------------------------------------------------------------------------------------
// function.toml

TEST(FunctionSpecTest, EveryWorkloadFolderLoads) {
  auto names = list_functions(workloads_dir());
  ASSERT_TRUE(names) << names.error().what();
  // Every folder with a function.toml is a function (a user adds one by adding a folder), and
  // the project's own six are among them.
  std::vector<std::string> folders;
  for (const auto& entry : std::filesystem::directory_iterator(workloads_dir())) {
    if (entry.is_directory() && std::filesystem::exists(entry.path() / "function.toml")) {
      folders.push_back(entry.path().filename().string());
    }
  }
  std::sort(folders.begin(), folders.end());
  EXPECT_EQ(*names, folders);
  for (const char* own : {"helloworld", "image_rotate", "json_serdes", "lookup_table", "matmul", "pyaes"}) {
    EXPECT_NE(std::find(names->begin(), names->end(), own), names->end()) << own;
  }
  for (const auto& name : *names) {
    auto spec = load_spec(workloads_dir() / name);
    ASSERT_TRUE(spec) << name << ": " << spec.error().what();
    EXPECT_EQ(spec->name, name);
    EXPECT_TRUE(spec->dir.is_absolute());
    EXPECT_EQ(spec->dir.filename(), name);
    EXPECT_FALSE(spec->description.empty()) << name;
    EXPECT_TRUE(spec->example_input.is_object()) << name;
    EXPECT_TRUE(spec->expect.is_object()) << name;
    EXPECT_FALSE(spec->expect.empty()) << name;
    EXPECT_TRUE(spec->config.is_object()) << name;
  }
  auto matmul = load_spec(workloads_dir() / "matmul/");
  ASSERT_TRUE(matmul) << matmul.error().what();
  EXPECT_EQ(matmul->name, "matmul");
  EXPECT_EQ(matmul->example_input, json({{"size", 256}}));
  EXPECT_TRUE(matmul->expect["checksum"].is_number_integer());
  EXPECT_EQ(matmul->expect["checksum"].get<std::int64_t>(), 38454015480);
  EXPECT_EQ(matmul->config, json({{"size", 256}, {"seed", 1}}));
  auto lookup = load_spec(workloads_dir() / "lookup_table");
  ASSERT_TRUE(lookup);
  EXPECT_EQ(lookup->expect["xor"], "c4e4a93ccca416b5");
  auto pyaes = load_spec(workloads_dir() / "pyaes");
  ASSERT_TRUE(pyaes);
  EXPECT_EQ(pyaes->expect["roundtrip_ok"], true);
}

TEST(FunctionSpecTest, BadFoldersGiveClearErrors) {
  testing::TempDir dir;
  auto missing_dir = load_spec(dir.path() / "nope");
  ASSERT_FALSE(missing_dir);
  EXPECT_EQ(missing_dir.error().code, Errc::not_found);

  std::filesystem::create_directories(dir.path() / "empty");
  auto no_toml = load_spec(dir.path() / "empty");
  ASSERT_FALSE(no_toml);
  EXPECT_EQ(no_toml.error().code, Errc::not_found);
  EXPECT_NE(no_toml.error().message.find("no function.toml"), std::string::npos) << no_toml.error().message;

  write_file(dir.path() / "syntax/function.toml", "description = \"ok\"\n[example]\ninput = { name = }\n");
  auto syntax = load_spec(dir.path() / "syntax");
  ASSERT_FALSE(syntax);
  EXPECT_EQ(syntax.error().code, Errc::invalid_argument);
  EXPECT_NE(syntax.error().message.find("function.toml:3:"), std::string::npos) << syntax.error().message;

  write_file(dir.path() / "types/function.toml", "description = \"ok\"\n[example]\ninput = 3\n");
  auto types = load_spec(dir.path() / "types");
  ASSERT_FALSE(types);
  EXPECT_EQ(types.error().code, Errc::invalid_argument);
  EXPECT_NE(types.error().message.find("example.input must be a table"), std::string::npos) << types.error().message;

  write_file(dir.path() / "minimal/function.toml", "description = \"no example\"\n");
  auto minimal = load_spec(dir.path() / "minimal");
  ASSERT_TRUE(minimal) << minimal.error().what();
  EXPECT_TRUE(minimal->example_input.is_null());
  EXPECT_TRUE(minimal->expect.empty());
  auto no_example = invoke_example(dir.path() / "unused.sock", *minimal, 1s);
  ASSERT_FALSE(no_example);
  EXPECT_EQ(no_example.error().code, Errc::invalid_argument);

  // Only folders with a function.toml are functions.
  auto names = list_functions(dir.path());
  ASSERT_TRUE(names) << names.error().what();
  EXPECT_EQ(*names, (std::vector<std::string>{"minimal", "syntax", "types"}));
  auto no_workloads = list_functions(dir.path() / "nope");
  ASSERT_FALSE(no_workloads);
  EXPECT_EQ(no_workloads.error().code, Errc::not_found);
}

// ---------------------------------------------------------------------------------------------
// check_expect: Python's == as in function_folder.check_expected

TEST(CheckExpectTest, MatchesPythonEquality) {
  const json expect = {{"count", 10000}, {"xor", "c4e4a93ccca416b5"}, {"ok", true}, {"ratio", 0.5}};
  EXPECT_TRUE(check_expect({{"count", 10000}, {"xor", "c4e4a93ccca416b5"}, {"ok", true}, {"ratio", 0.5}, {"extra", 1}},
                           expect)
                  .empty());
  // Numbers compare by value across int/float/bool, as in Python (1 == 1.0 == True).
  EXPECT_TRUE(check_expect({{"count", 10000.0}, {"xor", "c4e4a93ccca416b5"}, {"ok", 1}, {"ratio", 0.5}}, expect).empty());
  EXPECT_TRUE(python_equal(json(-3), json(-3.0)));
  EXPECT_TRUE(python_equal(json(std::uint64_t{18446744073709551615u}), json(std::uint64_t{18446744073709551615u})));
  EXPECT_TRUE(python_equal(json(5), json(std::uint64_t{5})));
  EXPECT_FALSE(python_equal(json(-1), json(std::uint64_t{18446744073709551615u})));
  // Exact int/float comparison: 2**53 + 1 != float(2**53).
  EXPECT_FALSE(python_equal(json(std::int64_t{9007199254740993}), json(9007199254740992.0)));
  EXPECT_FALSE(python_equal(json(1), json(1.5)));
  EXPECT_FALSE(python_equal(json(std::nan("")), json(std::nan(""))));

  // A hex string never equals a number.
  auto hex = check_expect({{"xor", 0xc4e4a93ccca416b5}}, {{"xor", "c4e4a93ccca416b5"}});
  ASSERT_EQ(hex.size(), 1u);
  EXPECT_EQ(hex[0], "output.xor = 14187650804720342709, expected \"c4e4a93ccca416b5\" (a number, expected a string)");

  auto wrong = check_expect({{"checksum", 5}}, {{"checksum", 7}});
  ASSERT_EQ(wrong.size(), 1u);
  EXPECT_EQ(wrong[0], "output.checksum = 5, expected 7");

  auto missing = check_expect({{"size", 256}}, {{"size", 256}, {"sha256", "ab"}});
  ASSERT_EQ(missing.size(), 1u);
  EXPECT_EQ(missing[0], "output has no field 'sha256'");

  // Nested tables and arrays compare whole: an extra nested key is a mismatch.
  const json nested_expect = {{"stats", {{"count", 3}}}, {"items", {1, 2}}};
  EXPECT_TRUE(check_expect({{"stats", {{"count", 3.0}}}, {"items", {1, 2.0}}}, nested_expect).empty());
  EXPECT_EQ(check_expect({{"stats", {{"count", 3}, {"extra", 0}}}, {"items", {1, 2}}}, nested_expect).size(), 1u);
  EXPECT_EQ(check_expect({{"stats", {{"count", 3}}}, {"items", {2, 1}}}, nested_expect).size(), 1u);
  EXPECT_EQ(check_expect({{"stats", {{"count", 3}}}, {"items", {1, 2, 3}}}, nested_expect).size(), 1u);

  EXPECT_EQ(check_expect(json::array(), {{"a", 1}}).size(), 1u);
  EXPECT_TRUE(check_expect(json::array(), json::object()).empty());
  EXPECT_FALSE(python_equal(json(nullptr), json(0)));
  EXPECT_FALSE(python_equal(json("1"), json(1)));
}

// ---------------------------------------------------------------------------------------------
// call() against servers that misbehave

class CallTest : public ::testing::Test {
 protected:
  testing::TempDir dir_;
  std::filesystem::path socket_ = dir_.path() / "s.sock";
};

TEST_F(CallTest, ServerThatNeverAcceptsTimesOutWithinTheBound) {
  FakeServer server(socket_, nullptr, /*accept=*/false);
  const auto started = Clock::now();
  auto r = call(socket_, {{"op", "ping"}}, 300ms);
  const auto took = Clock::now() - started;
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::timeout) << r.error().what();
  EXPECT_GE(took, 280ms);
  EXPECT_LT(took, 1s);
}

TEST_F(CallTest, ServerThatReadsButNeverAnswersTimesOut) {
  std::atomic<bool> done{false};
  FakeServer server(socket_, [&](int fd) {
    (void)read_request(fd);
    while (!done.load()) std::this_thread::sleep_for(5ms);
  });
  const auto started = Clock::now();
  auto r = call(socket_, {{"op", "ping"}}, 200ms);
  const auto took = Clock::now() - started;
  done = true;
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::timeout);
  EXPECT_LT(took, 1s);
}

TEST_F(CallTest, GarbageOversizedFrameIsAProtocolError) {
  FakeServer server(socket_, [](int fd) {
    (void)read_request(fd);
    send_text(fd, "HTTP/1.1 400 Bad Request\r\n\r\n");  // header "HTTP" = 1.2 GB
  });
  auto r = call(socket_, {{"op", "ping"}}, 2s);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::protocol);
  EXPECT_NE(r.error().message.find("exceeds the limit of 16777216 bytes"), std::string::npos) << r.error().message;
}

TEST_F(CallTest, FrameJustOverTheLimitIsAProtocolError) {
  FakeServer server(socket_, [](int fd) {
    (void)read_request(fd);
    send_text(fd, frame_header(16 * 1024 * 1024 + 1));
  });
  auto r = call(socket_, {{"op", "ping"}}, 2s);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::protocol);
}

TEST_F(CallTest, NonJsonNonObjectAndCutFramesAreProtocolErrors) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {frame_header(5) + "hello", "not JSON"},
      {frame_header(3) + "[1]", "must be a JSON object"},
      {frame_header(2) + "\"\xff\"", "not JSON"},
      {frame_header(100) + "{\"id\":", "inside a frame (6 of 100 bytes)"},
      {std::string("\0\0", 2), "inside a frame header"},
      {"", "without a response"},
  };
  for (const auto& [reply, message] : cases) {
    std::filesystem::remove(socket_);
    FakeServer server(socket_, [&reply = reply](int fd) {
      (void)read_request(fd);
      send_text(fd, reply);
    });
    auto r = call(socket_, {{"op", "ping"}}, 2s);
    ASSERT_FALSE(r) << message;
    EXPECT_EQ(r.error().code, Errc::protocol) << r.error().what();
    EXPECT_NE(r.error().message.find(message), std::string::npos) << r.error().message;
  }
}

TEST_F(CallTest, GoodFrameIsParsedAndTheRequestIsFramedCorrectly) {
  std::string received;
  {
    FakeServer server(socket_, [&](int fd) {
      received = read_request(fd);
      const std::string body = R"({"id":7,"ok":true,"output":{"function":"fake"}})";
      send_text(fd, frame_header(static_cast<std::uint32_t>(body.size())) + body);
    });
    auto r = call(socket_, {{"id", 7}, {"op", "ping"}}, 2s);
    ASSERT_TRUE(r) << r.error().what();
    EXPECT_EQ((*r)["output"]["function"], "fake");
  }
  EXPECT_EQ(json::parse(received), json({{"id", 7}, {"op", "ping"}}));
}

TEST_F(CallTest, NoSocketIsAnIoError) {
  auto r = call(socket_, {{"op", "ping"}}, 1s);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::io);
  auto bad = call(socket_, json::array(), 1s);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Real instances: start-function --pidns + the Python runtime

class InstanceTest : public ::testing::TestWithParam<std::string> {};

TEST_P(InstanceTest, StartInvokeDigestStop) {
  testing::TempDir dir;
  auto spec = load_spec(workloads_dir() / GetParam());
  ASSERT_TRUE(spec) << spec.error().what();
  InstanceGuard guard;
  auto started = start(workloads_dir(), *spec, dir.path() / "work", 60s);
  if (!started && started.error().message.find("unshare") != std::string::npos) {
    GTEST_SKIP() << "pid namespaces refused here: " << started.error().message;
  }
  ASSERT_TRUE(started) << started.error().what();
  guard.instance = *started;
  const Instance& instance = *started;
  EXPECT_GT(instance.pid, 0);
  EXPECT_TRUE(snaptier::proc::is_running(instance.pid));
  EXPECT_EQ(instance.socket, dir.path() / "work" / "instance.sock");
  EXPECT_TRUE(std::filesystem::exists(instance.ready_file));
  EXPECT_GE(instance.startup_ms, instance.init_ms);
  EXPECT_GT(instance.startup_ms, 0.0);

  auto invoked = invoke_example(instance.socket, *spec, 20s);
  ASSERT_TRUE(invoked) << invoked.error().what();
  EXPECT_TRUE(invoked->problems.empty()) << invoked->problems.front() << "\n" << invoked->response.dump();
  EXPECT_EQ(invoked->response["ok"], true);
  EXPECT_GT(invoked->round_trip_ms, 0.0);

  auto first = digest(instance.socket, 10s);
  ASSERT_TRUE(first) << first.error().what();
  EXPECT_EQ(first->size(), 64u);
  auto second = digest(instance.socket, 10s);
  ASSERT_TRUE(second) << second.error().what();
  EXPECT_EQ(*first, *second);

  // A wrong expectation is reported as a problem, not an error.
  FunctionSpec wrong = *spec;
  const std::string key = wrong.expect.begin().key();
  wrong.expect[key] = "surely not this";
  auto checked = invoke_example(instance.socket, wrong, 20s);
  ASSERT_TRUE(checked) << checked.error().what();
  ASSERT_EQ(checked->problems.size(), 1u);
  EXPECT_EQ(checked->problems[0].rfind("output." + key + " = ", 0), 0u) << checked->problems[0];

  // Reserved ops and instance-side errors over call().
  auto ping = call(instance.socket, {{"id", "p"}, {"op", "ping"}}, 10s);
  ASSERT_TRUE(ping) << ping.error().what();
  EXPECT_EQ((*ping)["output"]["function"], GetParam());
  EXPECT_EQ((*ping)["id"], "p");
  auto stats = call(instance.socket, {{"op", "stats"}}, 10s);
  ASSERT_TRUE(stats) << stats.error().what();
  EXPECT_EQ((*stats)["output"]["pid"], instance.pid);
  EXPECT_EQ((*stats)["output"]["ns_pid"], 1);
  auto unknown = call(instance.socket, {{"op", "nope"}}, 10s);
  ASSERT_TRUE(unknown) << unknown.error().what();
  EXPECT_EQ((*unknown)["ok"], false);
  FunctionSpec bad_input = *spec;
  bad_input.example_input = {{"name", 5}, {"records", "x"}};
  auto failed = invoke_example(instance.socket, bad_input, 20s);
  ASSERT_TRUE(failed) << failed.error().what();
  ASSERT_EQ(failed->problems.size(), 1u);
  EXPECT_EQ(failed->problems[0].rfind("ok is false: ", 0), 0u) << failed->problems[0];

  auto stopped = stop(instance, 5s);
  ASSERT_TRUE(stopped) << stopped.error().what();
  guard.instance = {};
  EXPECT_FALSE(snaptier::proc::is_running(instance.pid));
  EXPECT_FALSE(std::filesystem::exists(instance.socket));
  auto after = call(instance.socket, {{"op", "ping"}}, 1s);
  ASSERT_FALSE(after);
  EXPECT_EQ(after.error().code, Errc::io);
}

INSTANTIATE_TEST_SUITE_P(Workloads, InstanceTest, ::testing::Values("helloworld", "json_serdes"));

TEST(InstanceStartTest, InitFailureCarriesTheLogTail) {
  testing::TempDir dir;
  write_file(dir.path() / "broken/function.toml", "description = \"fails at init\"\n");
  write_file(dir.path() / "broken/function.py",
             "def init():\n    raise RuntimeError('broken on purpose at init')\n\ndef handle(input):\n    return {}\n");
  auto spec = load_spec(dir.path() / "broken");
  ASSERT_TRUE(spec) << spec.error().what();
  InstanceGuard guard;
  auto started = start(workloads_dir(), *spec, dir.path() / "work", 30s);
  if (started) guard.instance = *started;
  ASSERT_FALSE(started);
  if (started.error().message.find("unshare") != std::string::npos) {
    GTEST_SKIP() << "pid namespaces refused here: " << started.error().message;
  }
  EXPECT_EQ(started.error().code, Errc::unavailable) << started.error().what();
  EXPECT_NE(started.error().message.find("broken on purpose at init"), std::string::npos) << started.error().message;
  EXPECT_NE(started.error().message.find("start-function exited with 1"), std::string::npos) << started.error().message;

  auto no_workloads = start(dir.path(), *spec, dir.path() / "work", 1s);
  ASSERT_FALSE(no_workloads);
  EXPECT_EQ(no_workloads.error().code, Errc::not_found);
}

}  // namespace
}  // namespace snaptier::function
