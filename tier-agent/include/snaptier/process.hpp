// Child processes with bounded waits: criu, start-function, restore-function, helpers.
//
// spawn() uses posix_spawn (safe in the multi-threaded agent: no code of ours runs between
// fork and exec), resolves the executable on PATH up front (a missing one is Errc::not_found,
// not a child exiting 127), gives the child stdin = /dev/null, stdout+stderr appended to a log
// file, SpawnOptions::pass_fds as 3, 4, ..., all other descriptors closed, default signal dispositions and an empty signal mask.
// Every wait is bounded; a Child that goes out of scope unreaped is SIGKILLed (its whole
// process group when it leads one) and reaped.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <csignal>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "snaptier/error.hpp"

namespace snaptier::proc {

struct SpawnOptions {
  std::filesystem::path log_file;            // stdout+stderr appended here; empty = /dev/null
  std::filesystem::path cwd;                 // empty = inherit
  std::vector<std::pair<std::string, std::string>> env_extra;  // added to the inherited env (replacing same names)
  bool new_session = true;                   // setsid(): the child leads its own process group
  // Non-empty: the child runs in a mount namespace of its own (a private copy of ours) with
  // each `source` bind-mounted on `target` (both existing directories). The child's children
  // inherit it; we do not see the mounts. CRIU restores a function's socket this way into a
  // directory of each instance's own, so instances of one snapshot do not collide.
  std::vector<std::pair<std::filesystem::path, std::filesystem::path>> bind_mounts;
  // Descriptors the child gets as 3, 4, ... in this order (every other one is closed); the
  // caller keeps its own. For a worker that talks over a socket, such as `criu swrk 3`.
  std::vector<int> pass_fds;
};

struct ExitStatus {
  int exit_code = -1;      // WEXITSTATUS if it exited, else -1
  int signal = 0;          // the signal that killed it, else 0
  bool timed_out = false;  // wait() ran out and killed it
  std::size_t descendants_killed = 0;  // when timed out: processes below it that were killed with it
  double elapsed_ms = 0;   // spawn to reap

  [[nodiscard]] bool ok() const noexcept { return exit_code == 0 && signal == 0 && !timed_out; }
};

class Child;
[[nodiscard]] Result<Child> spawn(const std::vector<std::string>& argv, const SpawnOptions& options = {});

class Child {
 public:
  Child() = default;
  Child(Child&& other) noexcept;
  Child& operator=(Child&& other) noexcept;
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  // Still running and owned: SIGKILL (the group if new_session, and every process below it) and reap.
  ~Child();

  [[nodiscard]] pid_t pid() const noexcept { return pid_; }
  // Readable (POLLIN) once the child has exited: its pidfd, owned by the Child. -1 if the kernel
  // has no pidfds or the child was reaped; then try_wait() tells.
  [[nodiscard]] int exit_fd() const noexcept { return reaped_ ? -1 : pidfd_; }
  // True once wait()/try_wait() reaped it (or it was released / moved from).
  [[nodiscard]] bool finished() const noexcept { return pid_ <= 0 || reaped_.has_value(); }

  // Waits at most `timeout`; then SIGKILLs it, its group if new_session and every process below
  // it (kill_tree: a child that made its own session or pid namespace, as CRIU's restored tree
  // does, dies too), reaps, timed_out = true.
  // Errc::timeout only if the child survives SIGKILL for seconds (uninterruptible sleep);
  // Errc::io if it cannot be waited for (someone else reaped it). Calling again after the
  // child was reaped returns the same status.
  [[nodiscard]] Result<ExitStatus> wait(std::chrono::milliseconds timeout);
  // Non-blocking: the status if it has exited (reaping it), else nullopt.
  [[nodiscard]] std::optional<ExitStatus> try_wait();
  // To the process group if new_session, else to the pid; nothing once reaped.
  void kill(int sig = SIGKILL) noexcept;
  // Stop owning: no kill on destruction, no waits. For daemons that must outlive us.
  pid_t release() noexcept;

 private:
  friend Result<Child> spawn(const std::vector<std::string>& argv, const SpawnOptions& options);
  Child(pid_t pid, int pidfd, bool group, std::chrono::steady_clock::time_point started) noexcept
      : pid_(pid), pidfd_(pidfd), group_(group), started_(started) {}
  int reap(int flags) noexcept;  // 1 reaped (reaped_ set), 0 still running, -errno
  int reap_until(std::chrono::steady_clock::time_point deadline) noexcept;
  void close_pidfd() noexcept;
  void terminate() noexcept;  // SIGKILL + bounded reap if owned and unreaped

  pid_t pid_ = -1;
  int pidfd_ = -1;  // pidfd_open() of the child, -1 if the kernel lacks it (then we poll)
  bool group_ = false;
  std::chrono::steady_clock::time_point started_{};
  std::optional<ExitStatus> reaped_;
};

// spawn + wait; the tail (last ~2 KiB, from a line start) of the log file is returned for error
// messages. With an empty options.log_file the output goes to a temporary file (removed
// afterwards) so that the tail is still there.
struct RunResult {
  ExitStatus status;
  std::string log_tail;
};
[[nodiscard]] Result<RunResult> run(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                                    const SpawnOptions& options = {});

// "criu restore exited with 1: <last lines of log>", "sleep was killed by SIGKILL",
// "start-function timed out after 2000 ms (killed)".
[[nodiscard]] std::string describe(const std::vector<std::string>& argv, const RunResult& r);

// Additions used by the above and by callers:
// The executable argv0 names: itself if it contains '/', else the first match on `path_env`
// (colon-separated; empty = $PATH, or /usr/local/bin:/usr/bin:/bin). Errc::not_found.
[[nodiscard]] Result<std::filesystem::path> find_executable(const std::string& name, const std::string& path_env = {});
// The last `max_bytes` of a file from offset `from` on, starting after a line break if cut,
// trailing whitespace removed; "" if unreadable.
[[nodiscard]] std::string read_tail(const std::filesystem::path& file, std::size_t max_bytes = 2048,
                                    std::uintmax_t from = 0);

// The whole of a small file such as /proc/PID/status, read with read(2); empty if it cannot be
// read. For files of other processes: libstdc++'s streams throw when a read fails, as one of a
// process that exits meanwhile does (ESRCH).
[[nodiscard]] std::string read_proc_file(const std::filesystem::path& file) noexcept;

// The processes below `root` (its children, theirs, ...) as /proc shows them now: each one
// whose parent (/proc/PID/stat) is `root` or one of them. Thread-group leaders only.
[[nodiscard]] std::vector<pid_t> descendants(pid_t root);

struct TreeKill {
  std::size_t killed = 0;     // processes below the root that were sent SIGKILL
  std::size_t survivors = 0;  // of those and the root, still not exited when the wait ran out
};
// Ends `root` and everything below it, whatever session, process group or pid namespace each is
// in. SIGSTOP first, to every process found below the root and again to those found on the next
// look, until a look finds none new: a stopped process cannot fork, and one killed while its
// child was not yet known would leave that child reparented and out of reach. Then SIGKILL to
// each (through pidfds opened when found, so a reused pid is never hit) and a wait of at most
// `grace` for each to exit. Nobody is reaped: the root's parent reaps it (Child does), the
// others are the root's or its children's, and go to init when those die. Not found: a process
// that left the tree before (a double fork whose middle process already exited).
TreeKill kill_tree(pid_t root, std::chrono::milliseconds grace) noexcept;

// Every process (thread-group leader) with a descriptor open on the socket whose inode is
// `inode` (as /proc/PID/fd shows it: "socket:[inode]"), this process excepted. It finds what a
// process that died had forked and not yet let go of the socket it passed on to them: they
// were reparented, so no tree leads to them.
[[nodiscard]] std::vector<pid_t> holders_of_socket(ino_t inode);

// The inode of PID's mount namespace (/proc/PID/ns/mnt), 0 if it cannot be read.
[[nodiscard]] ino_t mount_namespace_of(pid_t pid) noexcept;
// Every process (thread-group leader) in the mount namespace `ns` (an inode from
// mount_namespace_of), this process excepted.
[[nodiscard]] std::vector<pid_t> processes_in_mount_namespace(ino_t ns);

// pidfd_open(2) (Linux >= 5.3, O_CLOEXEC implied); -1 with errno if the kernel lacks it.
[[nodiscard]] int open_pidfd(pid_t pid) noexcept;

// The state letter of /proc/PID/stat ('R', 'S', 'T' stopped, 'Z' zombie, ...), 0 if there is
// no such task.
[[nodiscard]] char task_state(pid_t pid) noexcept;
// Exists and is not a zombie (a killed child nobody reaped yet is not running).
[[nodiscard]] inline bool is_running(pid_t pid) noexcept {
  const char state = task_state(pid);
  return state != 0 && state != 'Z' && state != 'X';
}

}  // namespace snaptier::proc
