#include "snaptier/process.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string_view>
#include <set>
#include <unordered_map>
#include <unordered_set>
#include <system_error>
#include <thread>

#include "core/try.hpp"
#include "core/unique_fd.hpp"

extern char** environ;

namespace snaptier::proc {
namespace {

using Clock = std::chrono::steady_clock;
using detail::UniqueFd;

// How long a SIGKILLed child may take to be reaped before we stop waiting (it is then in
// uninterruptible sleep, e.g. stuck on a dead NFS/9p server).
constexpr auto kKillGrace = std::chrono::seconds(5);
// Longer waits are clamped to this, so that now() + timeout cannot overflow.
constexpr auto kLongestWait = std::chrono::hours(24 * 365);
// Poll interval when the kernel has no pidfd_open (Linux < 5.3).
constexpr auto kPollInterval = std::chrono::milliseconds(5);

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

bool is_executable_file(const std::filesystem::path& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}

// RAII for the posix_spawn attribute objects.
struct SpawnActions {
  posix_spawn_file_actions_t actions;
  SpawnActions() { posix_spawn_file_actions_init(&actions); }
  ~SpawnActions() { posix_spawn_file_actions_destroy(&actions); }
  SpawnActions(const SpawnActions&) = delete;
  SpawnActions& operator=(const SpawnActions&) = delete;
};
struct SpawnAttr {
  posix_spawnattr_t attr;
  SpawnAttr() { posix_spawnattr_init(&attr); }
  ~SpawnAttr() { posix_spawnattr_destroy(&attr); }
  SpawnAttr(const SpawnAttr&) = delete;
  SpawnAttr& operator=(const SpawnAttr&) = delete;
};

std::string signal_name(int sig) {
  if (const char* abbrev = ::sigabbrev_np(sig)) return std::string("SIG") + abbrev;
  return "signal " + std::to_string(sig);
}

}  // namespace

Result<std::filesystem::path> find_executable(const std::string& name, const std::string& path_env) {
  if (name.empty()) return fail(Errc::invalid_argument, "empty executable name");
  if (name.find('/') != std::string::npos) {
    if (is_executable_file(name)) return std::filesystem::path(name);
    return fail(Errc::not_found, "no executable " + name);
  }
  std::string search = path_env;
  if (search.empty()) {
    const char* env = std::getenv("PATH");
    search = (env != nullptr && *env != '\0') ? env : "/usr/local/bin:/usr/bin:/bin";
  }
  std::size_t begin = 0;
  while (begin <= search.size()) {
    std::size_t end = search.find(':', begin);
    if (end == std::string::npos) end = search.size();
    const std::string dir = search.substr(begin, end - begin);
    const std::filesystem::path candidate = std::filesystem::path(dir.empty() ? "." : dir) / name;
    if (is_executable_file(candidate)) return candidate;
    begin = end + 1;
  }
  return fail(Errc::not_found, "no executable '" + name + "' in PATH (" + search + ")");
}

std::string read_tail(const std::filesystem::path& file, std::size_t max_bytes, std::uintmax_t from) {
  std::error_code ec;
  const std::uintmax_t size = std::filesystem::file_size(file, ec);
  if (ec || size <= from) return {};
  const std::uintmax_t start = std::max<std::uintmax_t>(from, size > max_bytes ? size - max_bytes : 0);
  std::ifstream in(file, std::ios::binary);
  if (!in) return {};
  in.seekg(static_cast<std::streamoff>(start));
  std::string text(static_cast<std::size_t>(size - start), '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<std::size_t>(in.gcount()));
  if (start > from) {  // cut in the middle of a line: start at the next one, if there is one
    const auto newline = text.find('\n');
    if (newline != std::string::npos && newline + 1 < text.size()) text.erase(0, newline + 1);
  }
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back())) != 0) text.pop_back();
  return text;
}

// ---------------------------------------------------------------------------------------------
// Child

Child::Child(Child&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)),
      pidfd_(std::exchange(other.pidfd_, -1)),
      group_(other.group_),
      started_(other.started_),
      reaped_(std::exchange(other.reaped_, std::nullopt)) {}

Child& Child::operator=(Child&& other) noexcept {
  if (this != &other) {
    terminate();
    pid_ = std::exchange(other.pid_, -1);
    pidfd_ = std::exchange(other.pidfd_, -1);
    group_ = other.group_;
    started_ = other.started_;
    reaped_ = std::exchange(other.reaped_, std::nullopt);
  }
  return *this;
}

Child::~Child() { terminate(); }

void Child::terminate() noexcept {
  if (pid_ > 0 && !reaped_) {
    (void)kill_tree(pid_, kKillGrace);
    kill(SIGKILL);
    (void)reap_until(Clock::now() + kKillGrace);  // if it will not die, leave a zombie rather than hang
  }
  close_pidfd();
  pid_ = -1;
}

void Child::close_pidfd() noexcept {
  if (pidfd_ >= 0) ::close(pidfd_);
  pidfd_ = -1;
}

int Child::reap(int flags) noexcept {
  int status = 0;
  pid_t r;
  do {
    r = ::waitpid(pid_, &status, flags);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return -errno;
  if (r == 0) return 0;
  ExitStatus exit;
  if (WIFEXITED(status)) exit.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) exit.signal = WTERMSIG(status);
  exit.elapsed_ms = ms_since(started_);
  reaped_ = exit;
  close_pidfd();
  return 1;
}

// Reaps the child before `deadline`: 1 reaped, 0 still running at the deadline, -errno.
int Child::reap_until(Clock::time_point deadline) noexcept {
  for (;;) {
    const int r = reap(WNOHANG);
    if (r != 0) return r;
    const auto now = Clock::now();
    if (now >= deadline) return 0;
    const auto remaining = deadline - now;
    if (pidfd_ >= 0) {
      // Readable once the child has exited; round up so we never spin on a sub-ms remainder.
      const auto ms = std::chrono::ceil<std::chrono::milliseconds>(remaining).count();
      pollfd pfd{pidfd_, POLLIN, 0};
      const int p = ::poll(&pfd, 1, static_cast<int>(std::min<long long>(ms, INT_MAX)));
      if (p < 0 && errno != EINTR) {
        close_pidfd();  // fall back to polling waitpid
      }
    } else {
      std::this_thread::sleep_for(std::min<Clock::duration>(kPollInterval, remaining));
    }
  }
}

Result<ExitStatus> Child::wait(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return fail(Errc::invalid_argument, "wait on a Child that owns no process");
  if (reaped_) return *reaped_;
  const auto bounded = std::clamp<std::chrono::milliseconds>(timeout, std::chrono::milliseconds(0), kLongestWait);
  const int r = reap_until(Clock::now() + bounded);
  if (r == 1) return *reaped_;
  if (r < 0) return fail_errno(Errc::io, "waitpid " + std::to_string(pid_), -r);
  // The tree before the group: killing a process of the tree before its children are known
  // would hand them to init, out of reach.
  const TreeKill tree = kill_tree(pid_, kKillGrace);
  kill(SIGKILL);
  const int killed = reap_until(Clock::now() + kKillGrace);
  if (killed == 1) {
    reaped_->timed_out = true;
    reaped_->descendants_killed = tree.killed;
    return *reaped_;
  }
  if (killed < 0) return fail_errno(Errc::io, "waitpid " + std::to_string(pid_), -killed);
  return fail(Errc::timeout, "pid " + std::to_string(pid_) + " did not exit within " +
                                 std::to_string(timeout.count()) + " ms and survived SIGKILL for " +
                                 std::to_string(kKillGrace.count()) + " s");
}

std::optional<ExitStatus> Child::try_wait() {
  if (pid_ <= 0) return std::nullopt;
  if (!reaped_) (void)reap(WNOHANG);
  return reaped_;
}

void Child::kill(int sig) noexcept {
  if (pid_ <= 0 || reaped_) return;  // unreaped: the pid (and the group id it leads) is still ours
  bool sent = false;
  if (group_) sent = ::kill(-pid_, sig) == 0;
  // SIGKILL also goes to the pid itself, in case the child moved to another process group.
  if (!sent || sig == SIGKILL) (void)::kill(pid_, sig);
}

pid_t Child::release() noexcept {
  close_pidfd();
  reaped_.reset();
  return std::exchange(pid_, -1);
}

// ---------------------------------------------------------------------------------------------
// spawn, run

Result<Child> spawn(const std::vector<std::string>& argv, const SpawnOptions& options) {
  if (argv.empty() || argv[0].empty()) return fail(Errc::invalid_argument, "spawn: empty argv");

  // The child's environment: ours, with env_extra replacing or adding names.
  std::set<std::string> replaced;
  std::string path_env;
  for (const auto& [name, value] : options.env_extra) {
    if (name.empty() || name.find('=') != std::string::npos) {
      return fail(Errc::invalid_argument, "spawn " + argv[0] + ": bad environment variable name '" + name + "'");
    }
    replaced.insert(name);
    if (name == "PATH") path_env = value;
  }
  std::vector<std::string> env_strings;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string_view entry(*e);
    const auto eq = entry.find('=');
    if (eq != std::string_view::npos && replaced.count(std::string(entry.substr(0, eq))) != 0) continue;
    env_strings.emplace_back(entry);
  }
  for (const auto& [name, value] : options.env_extra) env_strings.push_back(name + "=" + value);

  // A missing executable is the caller's error, reported by name; not a child exiting 127.
  SNAPTIER_TRY(executable, find_executable(argv[0], path_env));
  if (!options.cwd.empty() && !std::filesystem::is_directory(options.cwd)) {
    return fail(Errc::not_found, "spawn " + argv[0] + ": working directory " + options.cwd.string() + " does not exist");
  }

  // Descriptors are opened here (O_CLOEXEC), so errors name the file; the child dup2()s them.
  UniqueFd stdin_fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!stdin_fd) return fail_errno(Errc::io, "open /dev/null", errno);
  const std::filesystem::path log = options.log_file.empty() ? std::filesystem::path("/dev/null") : options.log_file;
  UniqueFd log_fd(::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
  if (!log_fd) return fail_errno(Errc::io, "open log file " + log.string(), errno);

  SpawnActions actions;
  SpawnAttr attr;
  int err = posix_spawn_file_actions_adddup2(&actions.actions, stdin_fd.get(), 0);
  if (err == 0) err = posix_spawn_file_actions_adddup2(&actions.actions, log_fd.get(), 1);
  if (err == 0) err = posix_spawn_file_actions_adddup2(&actions.actions, log_fd.get(), 2);
  if (err == 0 && !options.cwd.empty()) err = posix_spawn_file_actions_addchdir_np(&actions.actions, options.cwd.c_str());
  // Each passed descriptor is first copied above the numbers it goes to, so that no dup2 onto
  // 3 + i overwrites a descriptor a later one still has to copy from.
  const int first_closed = 3 + static_cast<int>(options.pass_fds.size());
  std::vector<UniqueFd> passed;
  for (std::size_t i = 0; err == 0 && i < options.pass_fds.size(); ++i) {
    UniqueFd high(::fcntl(options.pass_fds[i], F_DUPFD_CLOEXEC, first_closed));
    if (!high) return fail_errno(Errc::invalid_argument, "spawn " + argv[0] + ": descriptor " + std::to_string(options.pass_fds[i]) + " to pass", errno);
    err = posix_spawn_file_actions_adddup2(&actions.actions, high.get(), 3 + static_cast<int>(i));
    passed.push_back(std::move(high));
  }
  // Nothing of ours leaks into the child, whether or not someone forgot O_CLOEXEC.
  if (err == 0) err = posix_spawn_file_actions_addclosefrom_np(&actions.actions, first_closed);

  sigset_t empty_mask;
  sigemptyset(&empty_mask);
  sigset_t defaults;
  sigfillset(&defaults);
  sigdelset(&defaults, SIGKILL);
  sigdelset(&defaults, SIGSTOP);
  short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
  if (options.new_session) flags |= POSIX_SPAWN_SETSID;
  if (err == 0) err = posix_spawnattr_setsigmask(&attr.attr, &empty_mask);
  if (err == 0) err = posix_spawnattr_setsigdefault(&attr.attr, &defaults);
  if (err == 0) err = posix_spawnattr_setflags(&attr.attr, flags);
  if (err != 0) return fail_errno(Errc::io, "spawn " + argv[0] + ": preparing posix_spawn", err);

  std::vector<char*> c_argv;
  c_argv.reserve(argv.size() + 1);
  for (const auto& arg : argv) c_argv.push_back(const_cast<char*>(arg.c_str()));
  c_argv.push_back(nullptr);
  std::vector<char*> c_env;
  c_env.reserve(env_strings.size() + 1);
  for (auto& entry : env_strings) c_env.push_back(entry.data());
  c_env.push_back(nullptr);

  const auto started = Clock::now();
  pid_t pid = -1;
  // glibc's posix_spawn (clone(CLONE_VFORK)) returns only after the exec, with its error.
  auto do_spawn = [&]() -> Result<void> {
    err = ::posix_spawn(&pid, executable.c_str(), &actions.actions, &attr.attr, c_argv.data(), c_env.data());
    if (err != 0) return fail_errno(err == ENOENT ? Errc::not_found : Errc::io, "spawn " + executable.string(), err);
    return {};
  };
  if (options.bind_mounts.empty()) {
    if (auto spawned = do_spawn(); !spawned) return tl::unexpected(spawned.error());
  } else {
    // Namespaces belong to the thread: a thread of our own unshares its mount namespace (its
    // fs struct with it), mounts, spawns (the child inherits the thread's namespaces) and ends,
    // which leaves the agent's other threads where they were.
    Result<void> spawned;
    std::thread spawner([&] {
      spawned = [&]() -> Result<void> {
        if (::unshare(CLONE_NEWNS) != 0) return fail_errno(Errc::io, "spawn " + argv[0] + ": unshare(CLONE_NEWNS)", errno);
        if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
          return fail_errno(Errc::io, "spawn " + argv[0] + ": make / private in its mount namespace", errno);
        }
        for (const auto& [source, target] : options.bind_mounts) {
          if (::mount(source.c_str(), target.c_str(), nullptr, MS_BIND, nullptr) != 0) {
            return fail_errno(Errc::io, "spawn " + argv[0] + ": bind " + source.string() + " on " + target.string(), errno);
          }
        }
        return do_spawn();
      }();
    });
    spawner.join();
    if (!spawned) return tl::unexpected(spawned.error());
  }
  return Child(pid, open_pidfd(pid), options.new_session, started);
}

Result<RunResult> run(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                      const SpawnOptions& options) {
  SpawnOptions opts = options;
  std::filesystem::path temporary;
  std::uintmax_t log_start = 0;
  if (opts.log_file.empty()) {
    std::string pattern = (std::filesystem::temp_directory_path() / "snaptier-run-XXXXXX").string();
    UniqueFd fd(::mkstemp(pattern.data()));
    if (!fd) return fail_errno(Errc::io, "create a temporary log file", errno);
    temporary = pattern;
    opts.log_file = temporary;
  } else {
    std::error_code ec;
    const auto size = std::filesystem::file_size(opts.log_file, ec);
    if (!ec) log_start = size;  // the tail is this run's output only
  }
  struct RemoveTemporary {
    const std::filesystem::path& path;
    ~RemoveTemporary() {
      std::error_code ec;
      if (!path.empty()) std::filesystem::remove(path, ec);
    }
  } remove_temporary{temporary};

  SNAPTIER_TRY(child, spawn(argv, opts));
  SNAPTIER_TRY(status, child.wait(timeout));
  return RunResult{status, read_tail(opts.log_file, 2048, log_start)};
}

std::string describe(const std::vector<std::string>& argv, const RunResult& r) {
  std::string name = argv.empty() ? std::string("(nothing)") : std::filesystem::path(argv[0]).filename().string();
  if (argv.size() > 1 && !argv[1].empty() && argv[1][0] != '-' && argv[1].find('/') == std::string::npos &&
      argv[1].size() <= 32) {
    name += " " + argv[1];  // "criu restore", "tierctl put"
  }
  std::string text = name;
  if (r.status.timed_out) {
    text += " timed out after " + std::to_string(static_cast<long long>(r.status.elapsed_ms)) + " ms (killed)";
  } else if (r.status.signal != 0) {
    text += " was killed by " + signal_name(r.status.signal);
  } else {
    text += " exited with " + std::to_string(r.status.exit_code);
  }
  if (!r.log_tail.empty()) {
    // The last lines only: enough to see the error, short enough for a message.
    constexpr int kMaxLines = 10;
    std::size_t start = r.log_tail.size();
    for (int lines = 0; lines < kMaxLines; ++lines) {
      const auto newline = start == 0 ? std::string::npos : r.log_tail.rfind('\n', start - 1);
      if (newline == std::string::npos) {
        start = 0;
        break;
      }
      start = newline;
    }
    std::string_view tail(r.log_tail);
    tail.remove_prefix(start);
    while (!tail.empty() && tail.front() == '\n') tail.remove_prefix(1);
    text += ": ";
    text += tail;
  }
  return text;
}

int open_pidfd(pid_t pid) noexcept {
#ifdef SYS_pidfd_open
  const long fd = ::syscall(SYS_pidfd_open, pid, 0);
  return fd < 0 ? -1 : static_cast<int>(fd);
#else
  (void)pid;
  errno = ENOSYS;
  return -1;
#endif
}

namespace {

struct StatFields {
  char state = 0;
  pid_t ppid = 0;
};

// State and parent from /proc/PID/stat; state 0 if there is no such task.
StatFields read_stat(pid_t pid) noexcept {
  StatFields out;
  if (pid <= 0) return out;
  const std::string stat = read_proc_file("/proc/" + std::to_string(pid) + "/stat");
  // "pid (comm) S ppid ...": comm may hold spaces and ')', so the state follows the last ')'.
  const auto close_paren = stat.rfind(')');
  if (close_paren == std::string::npos || close_paren + 2 >= stat.size() || stat[close_paren + 1] != ' ') return out;
  out.state = stat[close_paren + 2];
  out.ppid = static_cast<pid_t>(std::strtol(stat.c_str() + close_paren + 3, nullptr, 10));
  return out;
}

int send_signal(int pidfd, pid_t pid, int sig) noexcept {
#ifdef SYS_pidfd_send_signal
  if (pidfd >= 0) return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0));
#endif
  (void)pidfd;
  return ::kill(pid, sig);
}

// Every process's parent, as /proc lists them now.
// Calls `visit(pid)` for each process (numeric entry of /proc). opendir/readdir: a process that
// exits while it is looked at (or one we may not look into) is the visitor's to skip, never an
// error.
template <typename Visit>
void each_process(Visit visit) {
  std::unique_ptr<DIR, int (*)(DIR*)> procs(::opendir("/proc"), ::closedir);
  if (!procs) return;
  while (const dirent* entry = ::readdir(procs.get())) {
    char* end = nullptr;
    const long pid = std::strtol(entry->d_name, &end, 10);
    if (end == entry->d_name || *end != 0 || pid <= 0) continue;
    visit(static_cast<pid_t>(pid));
  }
}

std::unordered_map<pid_t, std::vector<pid_t>> children_by_parent() {
  std::unordered_map<pid_t, std::vector<pid_t>> children;
  each_process([&](pid_t pid) {
    const StatFields stat = read_stat(pid);
    if (stat.state != 0) children[stat.ppid].push_back(pid);
  });
  return children;
}

// A tree has settled after this many looks at most (each one stops what it found); beyond it
// something forks faster than SIGSTOP lands, and what was found is killed anyway.
constexpr int kMaxTreeRounds = 64;

}  // namespace

char task_state(pid_t pid) noexcept { return read_stat(pid).state; }

std::vector<pid_t> descendants(pid_t root) {
  std::vector<pid_t> out;
  if (root <= 0) return out;
  const auto children = children_by_parent();
  std::vector<pid_t> pending{root};
  std::unordered_set<pid_t> seen{root};
  while (!pending.empty()) {
    const pid_t parent = pending.back();
    pending.pop_back();
    const auto it = children.find(parent);
    if (it == children.end()) continue;
    for (pid_t child : it->second) {
      if (!seen.insert(child).second) continue;
      out.push_back(child);
      pending.push_back(child);
    }
  }
  return out;
}

std::string read_proc_file(const std::filesystem::path& file) noexcept {
  std::string out;
  try {
    UniqueFd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) return out;
    char buf[16384];
    for (;;) {
      const ssize_t n = ::read(fd.get(), buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      out.append(buf, static_cast<std::size_t>(n));
    }
  } catch (const std::bad_alloc&) {
    out.clear();
  }
  return out;
}

std::vector<pid_t> holders_of_socket(ino_t inode) {
  std::vector<pid_t> out;
  const std::string wanted = "socket:[" + std::to_string(inode) + "]";
  const pid_t self = ::getpid();
  each_process([&](pid_t pid) {
    if (pid == self) return;
    const std::string fd_dir = "/proc/" + std::to_string(pid) + "/fd";
    std::unique_ptr<DIR, int (*)(DIR*)> fds(::opendir(fd_dir.c_str()), ::closedir);
    if (!fds) return;
    char target[64];
    while (const dirent* fd = ::readdir(fds.get())) {
      if (fd->d_name[0] == '.') continue;
      const std::string link = fd_dir + "/" + fd->d_name;
      const ssize_t n = ::readlink(link.c_str(), target, sizeof(target));
      if (n > 0 && std::string_view(target, static_cast<std::size_t>(n)) == wanted) {
        out.push_back(pid);
        return;
      }
    }
  });
  return out;
}

ino_t mount_namespace_of(pid_t pid) noexcept {
  struct stat ns{};
  const std::string path = "/proc/" + std::to_string(pid) + "/ns/mnt";
  return ::stat(path.c_str(), &ns) == 0 ? ns.st_ino : 0;
}

std::vector<pid_t> processes_in_mount_namespace(ino_t ns) {
  std::vector<pid_t> out;
  if (ns == 0) return out;
  const pid_t self = ::getpid();
  each_process([&](pid_t pid) {
    if (pid != self && mount_namespace_of(pid) == ns) out.push_back(pid);
  });
  return out;
}

TreeKill kill_tree(pid_t root, std::chrono::milliseconds grace) noexcept {
  TreeKill out;
  if (root <= 0) return out;
  struct Member {
    pid_t pid;
    UniqueFd pidfd;  // -1 if the kernel has no pidfds (then by pid)
  };
  std::vector<Member> members;
  std::unordered_set<pid_t> known;
  auto stop = [&](pid_t pid) {
    UniqueFd fd(open_pidfd(pid));
    if (!fd && errno == ESRCH) return;  // gone already
    (void)send_signal(fd.get(), pid, SIGSTOP);
    known.insert(pid);
    members.push_back(Member{pid, std::move(fd)});
  };
  try {
    stop(root);
    for (int round = 0; round < kMaxTreeRounds; ++round) {
      bool found = false;
      for (pid_t pid : descendants(root)) {
        if (known.count(pid) != 0) continue;
        stop(pid);
        found = true;
      }
      if (!found) break;
    }
  } catch (...) {
    // Out of memory while looking: kill what was found.
  }
  for (const auto& m : members) (void)send_signal(m.pidfd.get(), m.pid, SIGKILL);
  out.killed = members.empty() ? 0 : members.size() - (members.front().pid == root ? 1 : 0);

  const auto deadline = Clock::now() + std::clamp<std::chrono::milliseconds>(grace, std::chrono::milliseconds(0), kLongestWait);
  for (const auto& m : members) {
    for (;;) {
      bool exited;
      if (m.pidfd) {
        // Readable once the process has exited (a zombie counts: it runs no more).
        const auto ms = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
        pollfd pfd{m.pidfd.get(), POLLIN, 0};
        const int p = ::poll(&pfd, 1, static_cast<int>(std::clamp<long long>(ms, 0, INT_MAX)));
        if (p < 0 && errno == EINTR) continue;
        exited = p > 0 || (p < 0 && !is_running(m.pid));
      } else {
        exited = !is_running(m.pid);
        if (!exited && Clock::now() < deadline) {
          std::this_thread::sleep_for(kPollInterval);
          continue;
        }
      }
      if (!exited) ++out.survivors;
      break;
    }
  }
  return out;
}

}  // namespace snaptier::proc
