#include "mechanism/criu_steps.hpp"

#include <signal.h>
#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include <spdlog/spdlog.h>

#include "snaptier/criu_images.hpp"

namespace snaptier::mechanism {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

Result<pid_t> read_pid_file(const fs::path& path) {
  std::ifstream in(path);
  long pid = 0;
  if (!(in >> pid) || pid <= 0) return fail(Errc::io, "criu wrote no pid to " + path.string());
  return static_cast<pid_t>(pid);
}

namespace {
// The first number of a "Name:" line of /proc/PID/status; 0 if there is none.
std::uint64_t status_number(pid_t pid, std::string_view name) {
  std::istringstream in(proc::read_proc_file("/proc/" + std::to_string(pid) + "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(name, 0) == 0) {
      std::istringstream fields(line.substr(name.size()));
      std::uint64_t value = 0;
      fields >> value;
      return value;
    }
  }
  return 0;
}
}  // namespace

std::uint64_t rss_bytes(pid_t pid) { return status_number(pid, "VmRSS:") * 1024; }
std::uint64_t thread_count(pid_t pid) { return status_number(pid, "Threads:"); }

void kill_tree(pid_t root) noexcept {
  if (root <= 0) return;
  const proc::TreeKill killed = proc::kill_tree(root, std::chrono::seconds(10));
  if (killed.survivors != 0) {
    spdlog::warn("restored tree {}: {} of its processes survived SIGKILL for 10 s", root, killed.survivors);
  }
}

std::string tail_of(const fs::path& log) { return proc::read_tail(log, 1500); }

Result<void> run_criu(const std::vector<std::string>& argv, milliseconds timeout, const fs::path& log,
                      std::string_view what, const proc::SpawnOptions& options) {
  auto r = proc::run(argv, timeout, options);
  if (!r) return tl::unexpected(r.error());
  if (!r->status.ok()) {
    std::string how;
    if (r->status.timed_out) {
      const std::size_t n = r->status.descendants_killed;
      how = "timed out after " + std::to_string(timeout.count()) + " ms; killed with the " + std::to_string(n) +
            (n == 1 ? " process" : " processes") + " it had started";
    } else if (r->status.signal != 0) {
      how = "killed by signal " + std::to_string(r->status.signal);
    } else {
      how = "exit " + std::to_string(r->status.exit_code);
    }
    return fail(r->status.timed_out ? Errc::timeout : Errc::io,
                std::string(what) + " failed (" + how + "); end of " + log.string() + ":\n" + tail_of(log));
  }
  return {};
}

Result<void> check_images_before_restore(const fs::path& images_dir, std::string_view what) {
  if (auto checked = criu::check_pages_files(images_dir); !checked) {
    return fail(checked.error().code, std::string(what) + " not run: " + checked.error().message);
  }
  return {};
}

Result<void> run_criu_restore(const fs::path& images_dir, const std::vector<std::string>& argv, milliseconds timeout,
                              const fs::path& log, std::string_view what, const proc::SpawnOptions& options) {
  if (auto ok = check_images_before_restore(images_dir, what); !ok) return ok;
  return run_criu(argv, timeout, log, what, options);
}

Result<proc::SpawnOptions> instance_socket_mount(const fs::path& instance_dir, const fs::path& socket_dir) {
  std::error_code ec;
  for (const auto& dir : {instance_dir, socket_dir}) {
    fs::create_directories(dir, ec);
    if (ec) return fail(Errc::io, "create " + dir.string() + ": " + ec.message());
  }
  proc::SpawnOptions options;
  options.bind_mounts.emplace_back(instance_dir, socket_dir);
  return options;
}

Result<void> wait_for_socket(const fs::path& path, proc::Child& daemon, milliseconds timeout, const fs::path& log) {
  const auto deadline = Clock::now() + timeout;
  struct stat st{};
  while (::stat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) {
    if (daemon.try_wait()) return fail(Errc::io, "criu lazy-pages exited early; end of " + log.string() + ":\n" + tail_of(log));
    if (Clock::now() >= deadline) return fail(Errc::timeout, "criu lazy-pages did not create " + path.string());
    std::this_thread::sleep_for(milliseconds(10));
  }
  return {};
}

std::string to_hex(std::span<const std::byte> bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (std::byte b : bytes) {
    out.push_back(kDigits[std::to_integer<unsigned>(b) >> 4]);
    out.push_back(kDigits[std::to_integer<unsigned>(b) & 15]);
  }
  return out;
}

Result<std::vector<std::byte>> from_hex(const std::string& text) {
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  if (text.size() % 2 != 0) return fail(Errc::protocol, "odd-length hex image");
  std::vector<std::byte> out(text.size() / 2);
  for (std::size_t i = 0; i < out.size(); ++i) {
    const int hi = digit(text[2 * i]), lo = digit(text[2 * i + 1]);
    if (hi < 0 || lo < 0) return fail(Errc::protocol, "bad hex digit in an image");
    out[i] = static_cast<std::byte>(hi * 16 + lo);
  }
  return out;
}

bool tcp_listening(std::uint16_t port) {
  char hex_port[8];
  std::snprintf(hex_port, sizeof hex_port, ":%04X", static_cast<unsigned>(port));
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state;
      fields >> slot >> local >> remote >> state;
      if (state == "0A" && local.size() > 5 && local.compare(local.size() - 5, 5, hex_port) == 0) return true;
    }
  }
  return false;
}

}  // namespace snaptier::mechanism
