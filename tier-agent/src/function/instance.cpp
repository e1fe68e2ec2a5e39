// Starting a function instance through workloads/bin/start-function (which owns the details:
// pid namespace, sessions, the runtime or a native `run`) and stopping it.
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <fstream>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>

#include "core/try.hpp"
#include "core/unique_fd.hpp"
#include "snaptier/function.hpp"
#include "snaptier/process.hpp"

namespace snaptier::function {
namespace {

using Clock = std::chrono::steady_clock;
using detail::UniqueFd;
using nlohmann::json;

// start-function polls its ready file on whole seconds (bash $SECONDS) and then kills what it
// started; our own hard bound on it leaves it that long to do so.
constexpr auto kStartMargin = std::chrono::seconds(5);

Result<json> read_ready_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) return fail(Errc::not_found, "no ready file " + path.string());
  std::stringstream text;
  text << in.rdbuf();
  json ready = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (ready.is_discarded() || !ready.is_object()) {
    return fail(Errc::protocol, "ready file " + path.string() + " is not a JSON object: " + text.str());
  }
  return ready;
}

double number_or_zero(const json& object, const char* key) {
  const auto it = object.find(key);
  return it != object.end() && it->is_number() ? it->get<double>() : 0.0;
}

}  // namespace

Result<Instance> start(const std::filesystem::path& workloads_dir, const FunctionSpec& spec,
                       const std::filesystem::path& work_dir, std::chrono::milliseconds timeout) {
  const std::filesystem::path starter = workloads_dir / "bin" / "start-function";
  std::error_code ec;
  if (!std::filesystem::is_regular_file(starter, ec)) {
    return fail(Errc::not_found, "no " + starter.string() + " (is " + workloads_dir.string() + " the workloads folder?)");
  }
  if (spec.dir.empty()) return fail(Errc::invalid_argument, "start: the function spec has no folder");
  std::filesystem::create_directories(work_dir, ec);
  if (ec) return fail(Errc::io, "create " + work_dir.string() + ": " + ec.message());
  const std::filesystem::path base = std::filesystem::absolute(work_dir, ec);
  Instance instance;
  instance.socket = base / "instance.sock";
  instance.ready_file = base / "ready";
  if (instance.socket.native().size() >= sizeof(sockaddr_un{}.sun_path)) {
    return fail(Errc::invalid_argument, "socket path " + instance.socket.string() + " is longer than " +
                                            std::to_string(sizeof(sockaddr_un{}.sun_path) - 1) + " bytes");
  }
  const std::filesystem::path starter_log = base / "start-function.log";
  std::filesystem::remove(starter_log, ec);

  const auto seconds = std::clamp<long long>(std::chrono::ceil<std::chrono::seconds>(timeout).count(), 1, 365LL * 24 * 3600);
  const std::vector<std::string> argv = {starter.string(), spec.dir.string(), "--pidns",
                                         "--socket", instance.socket.string(),
                                         "--ready", instance.ready_file.string(),
                                         "--log", (base / "start.log").string(),
                                         "--timeout", std::to_string(seconds)};
  proc::SpawnOptions options;
  options.log_file = starter_log;  // its stdout (the pid) and stderr (why it failed, with the log's tail)
  SNAPTIER_TRY(run, proc::run(argv, std::chrono::seconds(seconds) + kStartMargin, options));
  if (!run.status.ok()) {
    if (run.status.timed_out) {
      // start-function itself hung: kill the instance if it got as far as the ready file.
      if (auto ready = read_ready_file(instance.ready_file); ready && ready->contains("pid") && (*ready)["pid"].is_number_integer()) {
        ::kill((*ready)["pid"].get<pid_t>(), SIGKILL);
      }
    }
    proc::RunResult status_only{run.status, {}};
    const std::string message = "start " + spec.name + ": " + proc::describe(argv, status_only) +
                                (run.log_tail.empty() ? std::string() : ":\n" + run.log_tail);
    const bool not_ready = run.status.timed_out || run.log_tail.find("not ready after") != std::string::npos;
    return fail(not_ready ? Errc::timeout : run.status.exit_code == 2 ? Errc::invalid_argument : Errc::unavailable,
                message);
  }

  auto ready = read_ready_file(instance.ready_file);
  long long pid = 0;
  if (ready) {
    const auto it = ready->find("pid");
    if (it != ready->end() && it->is_number_integer()) pid = it->get<long long>();
  }
  if (pid <= 0 || pid > INT_MAX) {
    // start-function printed the pid it checked; do not leave the instance behind.
    long long printed = 0;
    std::istringstream(run.log_tail) >> printed;
    if (printed > 0 && printed <= INT_MAX) ::kill(static_cast<pid_t>(printed), SIGKILL);
    return fail(Errc::protocol, "start " + spec.name + ": " +
                                    (ready ? "ready file " + instance.ready_file.string() + " names no pid: " + ready->dump()
                                           : ready.error().message));
  }
  instance.pid = static_cast<pid_t>(pid);
  instance.init_ms = number_or_zero(*ready, "init_ms");
  instance.startup_ms = number_or_zero(*ready, "startup_ms");
  return instance;
}

Result<void> stop(const Instance& instance, std::chrono::milliseconds timeout) {
  if (instance.pid <= 0) return fail(Errc::invalid_argument, "stop: the instance has no pid");
  timeout = std::clamp<std::chrono::milliseconds>(timeout, std::chrono::milliseconds(0), std::chrono::hours(24 * 365));
  const auto deadline = Clock::now() + timeout;
  // A pidfd pins the process we signal and becomes readable when it exits (not our child: its
  // parent is start-function's unshare wrapper, which reaps it).
  UniqueFd pidfd(proc::open_pidfd(instance.pid));
  if (!pidfd && errno == ESRCH) {
    // already gone
  } else {
    if (::kill(instance.pid, SIGKILL) != 0 && errno != ESRCH) {
      return fail_errno(Errc::io, "kill " + std::to_string(instance.pid), errno);
    }
    while (proc::is_running(instance.pid)) {
      const auto now = Clock::now();
      if (now >= deadline) {
        return fail(Errc::timeout, "instance pid " + std::to_string(instance.pid) + " still alive " +
                                       std::to_string(timeout.count()) + " ms after SIGKILL");
      }
      if (pidfd) {
        const auto ms = std::chrono::ceil<std::chrono::milliseconds>(deadline - now).count();
        pollfd pfd{pidfd.get(), POLLIN, 0};
        // Readable once it has exited (then /proc shows a zombie or nothing).
        const int r = ::poll(&pfd, 1, static_cast<int>(std::min<long long>(ms, 5)));
        if (r > 0) break;
        if (r < 0 && errno != EINTR) pidfd.reset();
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    }
  }
  std::error_code ec;
  if (!instance.socket.empty()) std::filesystem::remove(instance.socket, ec);
  return {};
}

}  // namespace snaptier::function
