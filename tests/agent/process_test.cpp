// Child processes with bounded waits: exit codes, signals, timeouts that kill the whole process
// group, clean errors for missing executables, log tails, RAII kill, release.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "helpers/temp_dir.hpp"
#include "snaptier/process.hpp"

namespace snaptier::proc {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Running = exists and is not a zombie (orphans are reaped by whoever is pid 1, maybe late).
bool stops_running_within(pid_t pid, std::chrono::milliseconds bound) {
  const auto deadline = Clock::now() + bound;
  while (proc::is_running(pid)) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

// The first line of a log file that a shell writes `$!` into, once it is there.
pid_t wait_for_pid_line(const std::filesystem::path& log) {
  const auto deadline = Clock::now() + 3s;
  while (Clock::now() < deadline) {
    std::istringstream text(read_file(log));
    long pid = 0;
    if (text >> pid && pid > 0) return static_cast<pid_t>(pid);
    std::this_thread::sleep_for(5ms);
  }
  return -1;
}

TEST(ProcessTest, HoldersOfASocketAreTheProcessesGivenItAndNotThoseWithout) {
  int pair[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair), 0);
  struct stat far_end{};
  ASSERT_EQ(::fstat(pair[1], &far_end), 0);
  SpawnOptions given;
  given.pass_fds = {pair[1]};
  auto holder = spawn({"sleep", "30"}, given);
  ASSERT_TRUE(holder) << holder.error().what();
  auto other = spawn({"sleep", "30"});
  ASSERT_TRUE(other) << other.error().what();
  ::close(pair[1]);
  EXPECT_EQ(holders_of_socket(far_end.st_ino), std::vector<pid_t>{holder->pid()})
      << "this process no longer holds it; the other child never did";
  holder->kill();
  (void)holder->wait(5s);
  EXPECT_TRUE(holders_of_socket(far_end.st_ino).empty());
  ::close(pair[0]);
}

TEST(ProcessTest, ProcessesInAMountNamespaceIncludeAChildThereAndNeverThisProcess) {
  const ino_t ours = mount_namespace_of(::getpid());
  ASSERT_NE(ours, 0u);
  auto child = spawn({"sleep", "30"});
  ASSERT_TRUE(child) << child.error().what();
  EXPECT_EQ(mount_namespace_of(child->pid()), ours);
  const auto members = processes_in_mount_namespace(ours);
  EXPECT_NE(std::find(members.begin(), members.end(), child->pid()), members.end());
  EXPECT_EQ(std::find(members.begin(), members.end(), ::getpid()), members.end());
  EXPECT_TRUE(processes_in_mount_namespace(0).empty()) << "0 is no namespace";
}

TEST(ProcessTest, ReadProcFileIsTheWholeFileOrEmptyForAProcessThatIsGone) {
  EXPECT_NE(read_proc_file("/proc/self/status").find("\nPid:"), std::string::npos);
  auto child = spawn({"true"});
  ASSERT_TRUE(child) << child.error().what();
  const pid_t pid = child->pid();
  ASSERT_TRUE(child->wait(5s));
  EXPECT_EQ(read_proc_file("/proc/" + std::to_string(pid) + "/cmdline"), "");
}

TEST(ProcessTest, ExitCodes) {
  auto ok = run({"true"}, 5s);
  ASSERT_TRUE(ok) << ok.error().what();
  EXPECT_TRUE(ok->status.ok());
  EXPECT_EQ(ok->status.exit_code, 0);

  auto three = run({"sh", "-c", "exit 3"}, 5s);
  ASSERT_TRUE(three) << three.error().what();
  EXPECT_EQ(three->status.exit_code, 3);
  EXPECT_EQ(three->status.signal, 0);
  EXPECT_FALSE(three->status.timed_out);
  EXPECT_FALSE(three->status.ok());
  EXPECT_GT(three->status.elapsed_ms, 0.0);
  EXPECT_EQ(describe({"sh", "-c", "exit 3"}, *three), "sh exited with 3");
}

TEST(ProcessTest, KilledBySignal) {
  auto r = run({"sh", "-c", "kill -TERM $$"}, 5s);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_EQ(r->status.signal, SIGTERM);
  EXPECT_EQ(r->status.exit_code, -1);
  EXPECT_FALSE(r->status.timed_out);
  EXPECT_EQ(describe({"sh", "-c", "x"}, *r), "sh was killed by SIGTERM");
}

TEST(ProcessTest, ChildGetsDefaultSignalHandlingEvenIfWeIgnoreIt) {
  struct sigaction ignore {}, previous{};
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGTERM, &ignore, &previous), 0);
  auto child = spawn({"sleep", "100"});
  ::sigaction(SIGTERM, &previous, nullptr);
  ASSERT_TRUE(child) << child.error().what();
  child->kill(SIGTERM);
  auto status = child->wait(5s);
  ASSERT_TRUE(status) << status.error().what();
  EXPECT_EQ(status->signal, SIGTERM);
}

TEST(ProcessTest, WaitReturnsPromptlyWhenTheChildExits) {
  auto child = spawn({"sleep", "0.05"});
  ASSERT_TRUE(child) << child.error().what();
  const auto started = Clock::now();
  auto status = child->wait(10s);
  ASSERT_TRUE(status) << status.error().what();
  EXPECT_TRUE(status->ok());
  EXPECT_LT(Clock::now() - started, 1s);
  // Reaped: a second wait and try_wait give the same status, kill is a no-op.
  child->kill();
  auto again = child->wait(1ms);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->exit_code, 0);
  ASSERT_TRUE(child->try_wait().has_value());
  EXPECT_TRUE(child->finished());

  auto forever = spawn({"true"});  // an "infinite" timeout does not overflow the deadline
  ASSERT_TRUE(forever) << forever.error().what();
  auto done = forever->wait(std::chrono::milliseconds::max());
  ASSERT_TRUE(done) << done.error().what();
  EXPECT_EQ(done->exit_code, 0);
}

TEST(ProcessTest, TryWaitDoesNotBlock) {
  auto child = spawn({"sleep", "0.2"});
  ASSERT_TRUE(child) << child.error().what();
  const auto started = Clock::now();
  EXPECT_FALSE(child->try_wait().has_value());
  EXPECT_LT(Clock::now() - started, 50ms);
  auto status = child->wait(5s);
  ASSERT_TRUE(status) << status.error().what();
  EXPECT_EQ(status->exit_code, 0);
}

TEST(ProcessTest, TimeoutKillsTheWholeProcessGroupIncludingAGrandchild) {
  testing::TempDir dir;
  SpawnOptions options;
  options.log_file = dir.path() / "log";
  auto child = spawn({"sh", "-c", "sleep 100 & echo $!; sleep 100"}, options);
  ASSERT_TRUE(child) << child.error().what();
  const pid_t grandchild = wait_for_pid_line(options.log_file);
  ASSERT_GT(grandchild, 0) << read_file(options.log_file);
  ASSERT_TRUE(proc::is_running(grandchild));
  EXPECT_EQ(::getpgid(grandchild), child->pid());

  const auto started = Clock::now();
  auto status = child->wait(200ms);
  const auto waited = Clock::now() - started;
  ASSERT_TRUE(status) << status.error().what();
  EXPECT_TRUE(status->timed_out);
  EXPECT_EQ(status->signal, SIGKILL);
  EXPECT_GE(waited, 190ms);
  EXPECT_LT(waited, 2s);
  EXPECT_TRUE(stops_running_within(grandchild, 2s)) << "grandchild " << grandchild << " survived";
  RunResult r{*status, ""};
  EXPECT_NE(describe({"sh", "-c", "x"}, r).find("sh timed out after "), std::string::npos);
}

TEST(ProcessTest, RunTimesOutWithinTheBound) {
  const auto started = Clock::now();
  auto r = run({"sh", "-c", "echo waiting; sleep 100"}, 150ms);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_TRUE(r->status.timed_out);
  EXPECT_LT(Clock::now() - started, 2s);
  EXPECT_EQ(r->log_tail, "waiting");
}

TEST(ProcessTest, MissingExecutableIsACleanNotFound) {
  auto by_name = spawn({"snaptier-no-such-tool", "--flag"});
  ASSERT_FALSE(by_name);
  EXPECT_EQ(by_name.error().code, Errc::not_found);
  EXPECT_NE(by_name.error().message.find("snaptier-no-such-tool"), std::string::npos) << by_name.error().message;

  auto by_path = run({"/nonexistent/bin/tool"}, 1s);
  ASSERT_FALSE(by_path);
  EXPECT_EQ(by_path.error().code, Errc::not_found);
  EXPECT_NE(by_path.error().message.find("/nonexistent/bin/tool"), std::string::npos);

  testing::TempDir dir;  // a file that is not executable is not an executable
  { std::ofstream(dir.path() / "script") << "#!/bin/sh\n"; }
  auto not_executable = spawn({(dir.path() / "script").string()});
  ASSERT_FALSE(not_executable);
  EXPECT_EQ(not_executable.error().code, Errc::not_found);

  auto empty = spawn({});
  ASSERT_FALSE(empty);
  EXPECT_EQ(empty.error().code, Errc::invalid_argument);

  SpawnOptions bad_cwd;
  bad_cwd.cwd = "/nonexistent/dir";
  auto no_dir = spawn({"true"}, bad_cwd);
  ASSERT_FALSE(no_dir);
  EXPECT_EQ(no_dir.error().code, Errc::not_found);
}

TEST(ProcessTest, LogTailIsTheEndOfThisRunsOutputFromALineStart) {
  testing::TempDir dir;
  SpawnOptions options;
  options.log_file = dir.path() / "run.log";
  { std::ofstream(options.log_file) << "old run\n"; }
  const std::vector<std::string> argv = {
      "sh", "-c", "i=0; while [ $i -lt 500 ]; do echo \"line $i\"; i=$((i+1)); done; echo 'error: boom' >&2; exit 1"};
  auto r = run(argv, 5s, options);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_EQ(r->status.exit_code, 1);
  EXPECT_LE(r->log_tail.size(), 2048u);
  EXPECT_GT(r->log_tail.size(), 1500u);
  EXPECT_EQ(r->log_tail.rfind("line ", 0), 0u) << r->log_tail.substr(0, 40);  // starts at a line
  EXPECT_TRUE(r->log_tail.ends_with("line 499\nerror: boom"));
  const std::string message = describe(argv, *r);
  EXPECT_EQ(message.rfind("sh exited with 1: ", 0), 0u) << message;
  EXPECT_TRUE(message.ends_with("line 499\nerror: boom"));
  EXPECT_LT(std::count(message.begin(), message.end(), '\n'), 10);  // the last lines only

  // The file was appended to; a short run's tail excludes what was there before.
  EXPECT_EQ(read_file(options.log_file).rfind("old run\nline 0\n", 0), 0u);
  auto short_run = run({"sh", "-c", "echo only this"}, 5s, options);
  ASSERT_TRUE(short_run) << short_run.error().what();
  EXPECT_EQ(short_run->log_tail, "only this");

  // Without a log file, run() still captures a tail (through a temporary file).
  auto no_log = run({"sh", "-c", "echo to stderr >&2; exit 4"}, 5s);
  ASSERT_TRUE(no_log) << no_log.error().what();
  EXPECT_EQ(no_log->log_tail, "to stderr");
  EXPECT_EQ(describe({"criu", "restore", "-D", "/x"}, *no_log), "criu restore exited with 4: to stderr");
}

TEST(ProcessTest, EnvironmentWorkingDirectoryAndStdin) {
  testing::TempDir dir;
  SpawnOptions options;
  options.cwd = dir.path();
  options.env_extra = {{"SNAPTIER_TEST_VALUE", "forty two"}, {"HOME", "/nowhere"}};
  auto r = run({"sh", "-c", "echo \"$SNAPTIER_TEST_VALUE|$HOME|$(pwd)\"; if read line; then echo got; else echo eof; fi"}, 5s,
               options);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_EQ(r->log_tail, "forty two|/nowhere|" + std::filesystem::canonical(dir.path()).string() + "\neof");
}

TEST(ProcessTest, PassedDescriptorsAreTheChildsThreeFourAndNothingElseLeaks) {
  int first[2], second[2], other[2];
  ASSERT_EQ(::pipe2(first, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(second, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe(other), 0);  // no O_CLOEXEC: still not the child's
  SpawnOptions options;
  options.pass_fds = {second[1], first[1]};  // in this order: 3 is `second`, 4 is `first`
  auto r = run({"sh", "-c", "echo three >&3; echo four >&4; if (echo x >&5) 2>/dev/null; then echo leaked; else echo closed; fi"},
               5s, options);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_EQ(r->log_tail, "closed");
  for (int fd : {first[1], second[1], other[0], other[1]}) ::close(fd);
  char buf[16] = {};
  ASSERT_GT(::read(second[0], buf, sizeof buf - 1), 0);
  EXPECT_STREQ(buf, "three\n");
  std::fill(std::begin(buf), std::end(buf), 0);
  ASSERT_GT(::read(first[0], buf, sizeof buf - 1), 0);
  EXPECT_STREQ(buf, "four\n");
  ::close(first[0]);
  ::close(second[0]);

  options.pass_fds = {12345};
  auto bad = spawn({"true"}, options);
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("descriptor 12345 to pass"), std::string::npos) << bad.error().what();
}

TEST(ProcessTest, NewSessionOrNot) {
  auto leader = spawn({"sleep", "10"});
  ASSERT_TRUE(leader) << leader.error().what();
  EXPECT_EQ(::getsid(leader->pid()), leader->pid());
  EXPECT_EQ(::getpgid(leader->pid()), leader->pid());

  SpawnOptions same;
  same.new_session = false;
  auto member = spawn({"sleep", "10"}, same);
  ASSERT_TRUE(member) << member.error().what();
  EXPECT_EQ(::getpgid(member->pid()), ::getpgid(0));
  member->kill();
  auto status = member->wait(5s);
  ASSERT_TRUE(status) << status.error().what();
  EXPECT_EQ(status->signal, SIGKILL);
}

TEST(ProcessTest, DestructorKillsTheGroupAndReaps) {
  testing::TempDir dir;
  SpawnOptions options;
  options.log_file = dir.path() / "log";
  pid_t pid = -1;
  pid_t grandchild = -1;
  {
    auto child = spawn({"sh", "-c", "sleep 100 & echo $!; wait"}, options);
    ASSERT_TRUE(child) << child.error().what();
    pid = child->pid();
    grandchild = wait_for_pid_line(options.log_file);
    ASSERT_GT(grandchild, 0);
  }
  // Reaped by the destructor: not even a zombie of ours is left.
  EXPECT_EQ(::waitpid(pid, nullptr, WNOHANG), -1);
  EXPECT_EQ(errno, ECHILD);
  EXPECT_FALSE(proc::is_running(pid));
  EXPECT_TRUE(stops_running_within(grandchild, 2s));
}

TEST(ProcessTest, MoveTransfersOwnership) {
  auto spawned = spawn({"sleep", "100"});
  ASSERT_TRUE(spawned) << spawned.error().what();
  Child owner = std::move(*spawned);
  const pid_t pid = owner.pid();
  EXPECT_EQ(spawned->pid(), -1);
  EXPECT_FALSE(spawned->wait(1ms));
  Child other;
  other = std::move(owner);
  EXPECT_EQ(other.pid(), pid);
  EXPECT_TRUE(proc::is_running(pid));
  other = Child();  // assigning over a live child kills and reaps it
  EXPECT_FALSE(proc::is_running(pid));
}

TEST(ProcessTest, ReleasedChildOutlivesTheChildObject) {
  pid_t pid = -1;
  {
    auto child = spawn({"sleep", "100"});
    ASSERT_TRUE(child) << child.error().what();
    pid = child->release();
    EXPECT_EQ(child->pid(), -1);
  }
  ASSERT_GT(pid, 0);
  EXPECT_TRUE(proc::is_running(pid));
  // Ours to clean up now.
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFSIGNALED(status));
}

TEST(ProcessTest, FindExecutable) {
  auto sh = find_executable("sh");
  ASSERT_TRUE(sh) << sh.error().what();
  EXPECT_TRUE(sh->is_absolute());
  auto restricted = find_executable("sh", "/nonexistent");
  ASSERT_FALSE(restricted);
  EXPECT_EQ(restricted.error().code, Errc::not_found);
}

// Concurrent restores of one snapshot rely on this: each child sees its own directory at the
// shared path, writes land in that directory, and the agent's own view is untouched.
TEST(ProcessTest, BindMountsAreTheChildsOwn) {
  if (::geteuid() != 0) GTEST_SKIP() << "mount namespaces need root";
  snaptier::testing::TempDir tmp;
  const auto shared = tmp.path() / "shared";
  std::filesystem::create_directories(shared);
  std::ofstream(shared / "who") << "agent\n";
  std::vector<std::filesystem::path> own;
  std::vector<Child> children;
  for (int i = 0; i < 3; ++i) {
    own.push_back(tmp.path() / ("own" + std::to_string(i)));
    std::filesystem::create_directories(own.back());
    std::ofstream(own.back() / "who") << "child" << i << "\n";
    SpawnOptions options;
    options.bind_mounts.emplace_back(own.back(), shared);
    auto child = spawn({"/bin/sh", "-c", "cat " + (shared / "who").string() + " > " + (shared / "seen").string()}, options);
    ASSERT_TRUE(child) << child.error().what();
    children.push_back(std::move(*child));
  }
  for (int i = 0; i < 3; ++i) {
    auto status = children[i].wait(10s);
    ASSERT_TRUE(status) << status.error().what();
    EXPECT_TRUE(status->ok());
    EXPECT_EQ(read_file(own[i] / "seen"), "child" + std::to_string(i) + "\n") << "child " << i << " saw another directory";
  }
  EXPECT_EQ(read_file(shared / "who"), "agent\n");
  EXPECT_FALSE(std::filesystem::exists(shared / "seen")) << "a child's write reached the shared path";
}

TEST(ProcessTest, ABindMountThatCannotBeMadeIsAnErrorNotAChild) {
  if (::geteuid() != 0) GTEST_SKIP() << "mount namespaces need root";
  snaptier::testing::TempDir tmp;
  SpawnOptions options;
  options.bind_mounts.emplace_back(tmp.path() / "missing", tmp.path());
  auto child = spawn({"/bin/true"}, options);
  ASSERT_FALSE(child);
  EXPECT_NE(child.error().message.find("bind"), std::string::npos) << child.error().what();
}

// A stand-in for `criu restore` that hangs after creating its tree, the way criu 4.1.1 does
// when the restored task spins on a short pages file: a task in a session of its own (CRIU's
// restored root keeps the dumped session, not criu's process group) spinning, with a child; an
// instance as pid 1 of its own pid namespace (if this kernel lets root make one); criu itself
// waiting (`wait`: bash would exec a last plain command). A group kill reaches none of the
// first two.
constexpr const char* kHangingTree = R"(
setsid bash -c 'sleep 300 & while :; do :; done' &
setsid unshare --pid --fork sleep 300 2>/dev/null &
sleep 300 &
wait
)";

// Orphans of the tree come to this process while it lives (instead of to pid 1, which may reap
// late), so the test can reap them and check that the pids are really gone.
class Subreaper {
 public:
  Subreaper() { ok_ = ::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0; }
  ~Subreaper() { (void)::prctl(PR_SET_CHILD_SUBREAPER, 0); }
  [[nodiscard]] bool ok() const { return ok_; }
  // Reaps what came to us until every pid in `pids` is gone (kill(pid, 0) == ESRCH) or `bound`.
  static bool all_gone_within(const std::vector<pid_t>& pids, std::chrono::milliseconds bound) {
    const auto deadline = Clock::now() + bound;
    for (;;) {
      while (::waitpid(-1, nullptr, WNOHANG) > 0) {
      }
      const bool gone = std::all_of(pids.begin(), pids.end(), [](pid_t p) { return ::kill(p, 0) != 0 && errno == ESRCH; });
      if (gone) return true;
      if (Clock::now() >= deadline) return false;
      std::this_thread::sleep_for(5ms);
    }
  }

 private:
  bool ok_ = false;
};

// The tree below `root` once it has at least `at_least` processes (or 3 s passed).
std::vector<pid_t> settled_tree(pid_t root, std::size_t at_least) {
  const auto deadline = Clock::now() + 3s;
  std::vector<pid_t> tree = descendants(root);
  while (tree.size() < at_least && Clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
    tree = descendants(root);
  }
  return tree;
}

TEST(ProcessTreeTest, TimeoutKillsEveryProcessBelowTheChildInAnySessionOrPidNamespace) {
  Subreaper subreaper;
  ASSERT_TRUE(subreaper.ok());
  auto child = spawn({"bash", "-c", kHangingTree});
  ASSERT_TRUE(child) << child.error().what();
  // The spinner and its sleep, unshare and its pid-namespace init (if made), bash's sleep.
  const std::vector<pid_t> tree = settled_tree(child->pid(), 5);
  ASSERT_GE(tree.size(), 3u);
  std::size_t other_sessions = 0;
  for (pid_t p : tree) {
    EXPECT_TRUE(is_running(p)) << p;
    if (::getsid(p) != child->pid()) ++other_sessions;
  }
  EXPECT_GE(other_sessions, 2u) << "the spinner and its child left criu's session and group";

  const auto started = Clock::now();
  auto status = child->wait(300ms);
  const auto waited = Clock::now() - started;
  ASSERT_TRUE(status) << status.error().what();
  EXPECT_TRUE(status->timed_out);
  EXPECT_EQ(status->descendants_killed, tree.size());
  EXPECT_LT(waited, 3s) << "bounded: the kill waits for the tree, not for the sleeps";
  // wait() returned only after every one of them had exited (zombies at most, none running).
  for (pid_t p : tree) EXPECT_FALSE(is_running(p)) << "pid " << p << " of the tree still runs";
  EXPECT_TRUE(Subreaper::all_gone_within(tree, 2s)) << "a process of the tree is still there";
}

TEST(ProcessTreeTest, KillTreeEndsARootThatIsNotOurChildAndEverythingBelowIt) {
  Subreaper subreaper;
  ASSERT_TRUE(subreaper.ok());
  testing::TempDir dir;
  SpawnOptions options;
  options.log_file = dir.path() / "log";
  // The "restored root": a grandchild in its own session, with a child and a grandchild.
  // `wait`s keep every bash there (bash would exec a last plain command), whatever its version.
  auto child = spawn(
      {"bash", "-c", "setsid bash -c 'bash -c \"sleep 300 & sleep 300 & wait\" & sleep 300 & wait' & echo $!; sleep 300 & wait"},
      options);
  ASSERT_TRUE(child) << child.error().what();
  const pid_t root = wait_for_pid_line(options.log_file);
  ASSERT_GT(root, 0);
  const std::vector<pid_t> below = settled_tree(root, 4);
  ASSERT_EQ(below.size(), 4u) << "bash, its two sleeps, the root's sleep";

  const auto started = Clock::now();
  const TreeKill killed = kill_tree(root, 5s);
  EXPECT_LT(Clock::now() - started, 2s);
  EXPECT_EQ(killed.killed, 4u);
  EXPECT_EQ(killed.survivors, 0u);
  EXPECT_FALSE(is_running(root));
  for (pid_t p : below) EXPECT_FALSE(is_running(p)) << p;
  // The root stays its parent's zombie to reap (a shell that does not); what was below it
  // came to us.
  EXPECT_TRUE(Subreaper::all_gone_within(below, 2s));
  EXPECT_TRUE(is_running(child->pid())) << "the root's parent is not part of the root's tree";
  EXPECT_TRUE(descendants(root).empty());
}

TEST(ProcessTreeTest, KillTreeOfAGonePidIsANoOp) {
  auto r = run({"true"}, 5s);
  ASSERT_TRUE(r);
  EXPECT_EQ(kill_tree(0, 1s).killed, 0u);
  EXPECT_TRUE(descendants(0).empty());
}

}  // namespace
}  // namespace snaptier::proc
