// The startup sweep: what a killed agent left in its work_dir is ended (processes naming a path
// under it, trees recorded by unfinished restores, even stopped ones in their own pid
// namespace) and its folders removed; finished `keep` restores, unrelated processes and pids a
// stale pid file names after reuse are left alone.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "helpers/temp_dir.hpp"
#include "snaptier/leftovers.hpp"
#include "snaptier/process.hpp"

namespace snaptier {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

// The one child of `parent` (unshare --fork's: the init of the new pid namespace), once it exists.
pid_t child_of(pid_t parent) {
  for (int i = 0; i < 500; ++i) {
    std::ifstream in("/proc/" + std::to_string(parent) + "/task/" + std::to_string(parent) + "/children");
    pid_t child = 0;
    if (in >> child && child > 0) return child;
    std::this_thread::sleep_for(10ms);
  }
  return 0;
}

void write_pid(const fs::path& file, pid_t pid) {
  fs::create_directories(file.parent_path());
  std::ofstream(file) << pid << "\n";
}

bool stops_running_within(pid_t pid, std::chrono::milliseconds bound) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  while (proc::is_running(pid)) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

class LeftoversTest : public ::testing::Test {
 protected:
  void SetUp() override {
    work_ = tmp_.path() / "work";
    fs::create_directories(work_ / "restores" / "bin");
    // A sleep whose argv[0] is a path in an operation folder, as criu's -D/-W and the runtime's
    // --socket are; and one elsewhere under work_dir, which is no reason to end it.
    fs::create_symlink(*proc::find_executable("sleep"), work_ / "restores" / "bin" / "sleep");
    fs::create_directories(work_ / "other");
    fs::create_symlink(*proc::find_executable("sleep"), work_ / "other" / "sleep");
  }

  // `unshare --pid --fork` of a sleep that is the new namespace's init: returns the owning
  // Child and that init. The program is passed in the environment, so that only the init's
  // command line names it (unshare's does not).
  std::pair<proc::Child, pid_t> tree(const std::string& sleep) {
    proc::SpawnOptions options;
    options.env_extra = {{"SLEEP", sleep}};
    auto child = proc::spawn({"unshare", "--pid", "--fork", "/bin/sh", "-c", "exec \"$SLEEP\" 300"}, options);
    EXPECT_TRUE(child.has_value()) << child.error().what();
    const pid_t init = child ? child_of(child->pid()) : 0;
    // Until the exec, the init is still the shell.
    for (int i = 0; i < 500 && init > 0; ++i) {
      std::ifstream in("/proc/" + std::to_string(init) + "/cmdline");
      std::string argv0;
      std::getline(in, argv0, '\0');
      if (argv0 == sleep) break;
      std::this_thread::sleep_for(10ms);
    }
    return {child ? std::move(*child) : proc::Child(), init};
  }

  testing::TempDir tmp_;
  fs::path work_;
};

TEST_F(LeftoversTest, EndsWhatAKilledAgentLeftAndKeepsTheRest) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root for a pid namespace (unshare --pid)";
  // A criu-like process naming work_dir, not in any recorded folder.
  auto daemon = proc::spawn({(work_ / "restores" / "bin" / "sleep").string(), "300"});
  ASSERT_TRUE(daemon.has_value()) << daemon.error().what();
  // An interrupted restore: images/ still there, its tree stopped in its own pid namespace
  // (as --leave-stopped leaves it until the lazy-pages server resumes it).
  auto [stopped_owner, stopped] = tree(*proc::find_executable("sleep"));
  ASSERT_GT(stopped, 0);
  ASSERT_EQ(::kill(stopped, SIGSTOP), 0);
  fs::create_directories(work_ / "restores" / "fn.lazy-cxl.1" / "images");
  write_pid(work_ / "restores" / "fn.lazy-cxl.1" / "pid", stopped);
  // A restore that finished with keep: no images/, its instance (naming work_dir) runs on.
  auto [kept_owner, kept] = tree((work_ / "restores" / "bin" / "sleep").string());
  ASSERT_GT(kept, 0);
  write_pid(work_ / "restores" / "fn.reap.2" / "pid", kept);
  // A stale pid file whose pid is now an unrelated process started after it was written.
  auto unrelated = proc::spawn({"sleep", "300"});
  ASSERT_TRUE(unrelated.has_value());
  fs::create_directories(work_ / "restores" / "fn.criu-eager.3" / "images");
  write_pid(work_ / "restores" / "fn.criu-eager.3" / "pid", unrelated->pid());
  const fs::path stale = work_ / "restores" / "fn.criu-eager.3" / "pid";
  const timeval old[2] = {{::time(nullptr) - 7200, 0}, {::time(nullptr) - 7200, 0}};
  ASSERT_EQ(::utimes(stale.c_str(), old), 0);
  // A process naming work_dir outside the operation folders.
  auto bystander = proc::spawn({(work_ / "other" / "sleep").string(), "300"});
  ASSERT_TRUE(bystander.has_value());
  // An interrupted snapshot's folder.
  fs::create_directories(work_ / "snapshots" / "fn" / "images");

  const auto report = leftovers::sweep(work_, ::getpid());

  EXPECT_TRUE(report.problems.empty()) << report.problems.front();
  EXPECT_TRUE(stops_running_within(daemon->pid(), 5s)) << "the process naming work_dir";
  EXPECT_TRUE(stops_running_within(stopped, 5s)) << "the stopped tree of the interrupted restore";
  EXPECT_TRUE(proc::is_running(kept)) << "the instance of a finished keep restore";
  EXPECT_TRUE(proc::is_running(unrelated->pid())) << "a pid reused after its pid file was written";
  EXPECT_TRUE(proc::is_running(bystander->pid())) << "naming work_dir outside restores/, snapshots/, serve/";
  EXPECT_FALSE(fs::exists(work_ / "restores" / "fn.lazy-cxl.1"));
  EXPECT_FALSE(fs::exists(work_ / "restores" / "fn.criu-eager.3"));
  EXPECT_FALSE(fs::exists(work_ / "snapshots" / "fn"));
  EXPECT_TRUE(fs::exists(work_ / "restores" / "fn.reap.2" / "pid"));
  EXPECT_EQ(report.kept.size(), 1u);
  EXPECT_EQ(report.killed.size(), 2u);
  // fn.lazy-cxl.1, fn.criu-eager.3, snapshots/fn, and restores/bin (a folder no operation
  // finished: no images/, no live pid).
  EXPECT_EQ(report.removed.size(), 4u);
}

TEST_F(LeftoversTest, NothingToDoWithoutAWorkDir) {
  const auto report = leftovers::sweep(tmp_.path() / "absent", ::getpid());
  EXPECT_TRUE(report.killed.empty());
  EXPECT_TRUE(report.removed.empty());
  EXPECT_TRUE(report.problems.empty());
}

}  // namespace
}  // namespace snaptier
