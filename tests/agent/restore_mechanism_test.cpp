// The restore mechanisms (include/snaptier/restore_mechanism.hpp) with a stand-in `criu` (a
// shell script that fails, or "restores" a sleeping process, as each test tells it), over a
// store holding the committed criu fixture: whatever happens, a restore leaves no work
// directory, no daemon, no thread behind; and the one rendering of a result matches the control
// schema's FunctionRestoreResult.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <algorithm>
#include <functional>
#include <map>
#include <iterator>
#include <set>
#include <span>
#include <string>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "helpers/temp_dir.hpp"
#include "helpers/threads.hpp"
#include "criu/pb_message.hpp"
#include "criu/schema.hpp"
#include "mechanism/criu_steps.hpp"
#include "mechanism/criu_worker.hpp"
#include "mechanism/server_thread.hpp"
#include "snaptier/function_service.hpp"
#include "snaptier/function_snapshot.hpp"
#include "snaptier/process.hpp"
#include "snaptier/restore_mechanism.hpp"
#include "snaptier/restore_policy.hpp"
#include "snaptier/snapshot_store.hpp"
#include "snaptier/tiers.hpp"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace snaptier;
using namespace std::chrono_literals;

namespace {

const fs::path kRepo = fs::path(__FILE__).parent_path().parent_path().parent_path();
const fs::path kFixture = kRepo / "tests" / "agent" / "data" / "criu" / "single";

bool alive(pid_t pid) { return pid > 0 && proc::is_running(pid); }

pid_t read_pid(const fs::path& file) {
  std::ifstream in(file);
  long pid = 0;
  in >> pid;
  return static_cast<pid_t>(pid);
}

// criu restore: "fail" exits 1 with a log line; "run" starts `sleep` as the restored root;
// "run-tree" the same with a child of the root in a session of its own; "hang" starts a
// spinning tree in a session of its own and never returns.
// criu lazy-pages: records its pid; "daemon-dies" exits at once, else it listens on the socket.
constexpr const char* kStandInCriu = R"(#!/bin/bash
set -euo pipefail
here=$(dirname "$0")
mode=$(cat "$here/mode")
echo "$*" >> "$here/calls"
work= pidfile=
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    -W) work=${args[i+1]} ;;
    --pidfile) pidfile=${args[i+1]} ;;
  esac
done
case "$1" in
  restore)
    if [ "$mode" = fail ] || [ "$mode" = daemon-ok-restore-fails ]; then
      echo "Error (criu/cr-restore.c:1): stand-in failure" > "$work/restore.log"
      exit 1
    fi
    if [ "$mode" = hang ]; then
      # criu 4.1.1 on a short pages file: the restored task (its own session) spins in
      # preadv, criu waits for it forever.
      setsid bash -c 'sleep 300 & echo $! >> "$0/tree.pids"; echo $$ >> "$0/tree.pids"; while :; do :; done' "$here" \
        < /dev/null > /dev/null 2>&1 &
      sleep 300
    fi
    if [ "$mode" = run-tree ]; then
      # A restored root whose child is in a session of its own: killing the root alone
      # would leave the child running.
      setsid bash -c 'setsid sleep 300 & echo $! >> "$0/tree.pids"; sleep 300' "$here" < /dev/null > /dev/null 2>&1 &
      root=$!
      while [ ! -s "$here/tree.pids" ]; do sleep 0.01; done  # criu returns once the tree is up
    else
      setsid sleep 300 < /dev/null > /dev/null 2>&1 &
      root=$!
    fi
    echo $root > "$pidfile"
    echo $root > "$here/root.pid"
    ;;
  swrk)
    exec python3 "$here/swrk.py" "$here" "$mode" "$2"
    ;;
  lazy-pages)
    echo $$ > "$here/daemon.pid"
    [ "$mode" = daemon-dies ] && exit 3
    exec python3 -c 'import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1); time.sleep(300)' "$work/lazy-pages.socket"
    ;;
esac
)";

// `criu swrk 3`: reads one RPC request from fd 3, records the restore options it names (as
// "swrk restore images=... work=... log=... lazy=... stopped=..." in calls; both directories are
// resolved as CRIU does, through /proc/<peer>/fd/<n>), then answers as the modes above do:
// "fail" replies success=false with a message, "die" exits without a reply, "die-mid-restore"
// forks a task that keeps the socket and is SIGKILLed, "die-in-restorer" the same with a task
// that has closed it, "hang" starts the
// spinning tree and never replies, "run" and "run-tree" reply with the pid of the root they start.
constexpr const char* kStandInSwrk = R"(import os, socket, struct, subprocess, sys, time
here, mode, fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
sk = socket.socket(fileno=fd)

def varint(b, i):
    v = s = 0
    while True:
        c = b[i]; i += 1; v |= (c & 0x7f) << s; s += 7
        if c < 0x80: return v, i

def fields(b):
    i, out = 0, {}
    while i < len(b):
        key, i = varint(b, i)
        if key & 7 == 0:
            v, i = varint(b, i)
        else:
            n, i = varint(b, i); v = b[i:i + n]; i += n
        out.setdefault(key >> 3, v)
    return out

def enc_varint(v):
    out = b""
    while True:
        if v < 0x80: return out + bytes([v])
        out += bytes([v & 0x7f | 0x80]); v >>= 7

def reply(success, pid=None, msg=None):
    b = enc_varint(1 << 3) + enc_varint(2) + enc_varint(2 << 3) + enc_varint(int(success))
    if pid is not None:
        inner = enc_varint(1 << 3) + enc_varint(pid)
        b += enc_varint(4 << 3 | 2) + enc_varint(len(inner)) + inner
    if msg is not None:
        b += enc_varint(9 << 3 | 2) + enc_varint(len(msg)) + msg.encode()
    sk.send(b)

req = fields(sk.recv(65536))
opts = fields(req[2])
peer = struct.unpack("3i", sk.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
images = os.readlink("/proc/%d/fd/%d" % (peer, opts[1]))  # as criu 4.1.1 does
os.chdir("/proc/%d/fd/%d" % (peer, opts[17]))
with open(os.path.join(here, "calls"), "a") as calls:
    calls.write("swrk restore type=%d images=%s work=%s log=%s lazy=%d stopped=%d\n" % (
        req[1], images, os.getcwd(), opts[10].decode(), opts.get(48, 0), opts.get(69, 0)))
if mode in ("fail", "daemon-ok-restore-fails"):
    with open(opts[10].decode(), "w") as log:
        log.write("Error (criu/cr-restore.c:1): stand-in failure\n")
    reply(False, msg="stand-in failure")
elif mode == "die":
    sys.exit(3)
elif mode in ("die-mid-restore", "die-in-restorer"):
    # As criu does, the task it forks inherits its socket until almost restored (past that, in
    # the restorer, it has closed it); then the worker dies.
    kept = (fd,) if mode == "die-mid-restore" else ()
    task = subprocess.Popen(["sleep", "300"], pass_fds=kept, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    with open(os.path.join(here, "root.pid"), "w") as f:
        f.write("%d\n" % task)
    os.kill(os.getpid(), 9)
elif mode == "hang":
    subprocess.Popen(["setsid", "bash", "-c", 'sleep 300 & echo $! >> "$0/tree.pids"; echo $$ >> "$0/tree.pids"; while :; do :; done', here],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(300)
elif mode == "run-tree":
    root = subprocess.Popen(["setsid", "bash", "-c", 'setsid sleep 300 & echo $! >> "$0/tree.pids"; sleep 300', here],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    while not os.path.exists(os.path.join(here, "tree.pids")) or not os.path.getsize(os.path.join(here, "tree.pids")):
        time.sleep(0.01)
else:
    root = subprocess.Popen(["setsid", "sleep", "300"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL).pid
if mode not in ("fail", "daemon-ok-restore-fails"):
    with open(os.path.join(here, "root.pid"), "w") as f:
        f.write("%d\n" % root)
    reply(True, pid=root)
)";

class RestoreMechanismTest : public ::testing::Test {
 protected:
  void SetUp() override {
    bin_ = tmp_.path() / "bin";
    fs::create_directories(bin_);
    {
      std::ofstream script(bin_ / "criu");
      script << kStandInCriu;
    }
    fs::permissions(bin_ / "criu", fs::perms::owner_all);
    std::ofstream(bin_ / "swrk.py") << kStandInSwrk;
    mode("fail");

    local_ = std::shared_ptr<Tier>(*make_local_tier(64 << 20));
    file_ = std::shared_ptr<Tier>(*make_file_tier(tmp_.path() / "file-tier", 64 << 20));
    auto made = make_snapshot_store(
        StoreOptions{"hostA", tmp_.path() / "state", {{TierKind::local, local_}, {TierKind::file, file_}}, nullptr});
    ASSERT_TRUE(made) << made.error().what();
    store_ = std::shared_ptr<SnapshotStore>(std::move(*made));

    auto ingested = snap::ingest(kFixture);
    ASSERT_TRUE(ingested) << ingested.error().what();
    ingested->snapshot.info.id = "fn:cxl";
    const std::string blob = json{{"function", "helloworld"}, {"digest", "d"}, {"socket", (tmp_.path() / "sock" / "fn.sock").string()},
                                  {"snapshot_host", "hostA"}, {"cold_tier", "file"}}
                                 .dump();
    ingested->snapshot.blobs[snap::kFunctionBlob].assign(reinterpret_cast<const std::byte*>(blob.data()),
                                                         reinterpret_cast<const std::byte*>(blob.data()) + blob.size());
    PlacementRequest placement;
    placement.default_tier = TierKind::file;
    auto info = store_->put(ingested->snapshot, ingested->data, placement);
    ASSERT_TRUE(info) << info.error().what();
    auto got = store_->get("fn:cxl");
    ASSERT_TRUE(got) << got.error().what();
    snapshot_ = *got;
    threads_before_ = snaptier::testing::thread_count();
  }

  void mode(const std::string& m) { std::ofstream(bin_ / "mode") << m << "\n"; }

  mechanism::RestoreContext context(const std::string& policy_name, std::chrono::milliseconds timeout = 20s) {
    auto made = policy::make_policy(policy_name);
    EXPECT_TRUE(made);
    mechanism::RestoreContext c;
    c.criu = (bin_ / "criu").string();
    c.dir = tmp_.path() / "work" / "restores" / ("fn." + policy_name);
    c.timeout = timeout;
    c.store = store_;
    c.snapshot = snapshot_;
    c.snapshot_id = "fn";
    c.policy = std::shared_ptr<const policy::RestorePolicy>(std::move(*made));
    return c;
  }

  mechanism::Invocation invocation() {
    auto spec = function::load_spec(kRepo / "workloads" / "helloworld");
    EXPECT_TRUE(spec) << spec.error().what();
    return mechanism::Invocation{*spec, tmp_.path() / "sock" / "fn.sock", "d", false, 20s, {}};
  }

  // Runs one restore with `policy` to its end; returns the result; the mechanism is gone after.
  mechanism::RestoreResult restore(const std::string& policy_name, std::chrono::milliseconds timeout = 20s) {
    return restore_with(context(policy_name, timeout));
  }
  mechanism::RestoreResult restore_with(mechanism::RestoreContext c) {
    mechanism::RestoreResult result;
    result.snapshot = "fn";
    result.policy = std::string(c.policy->name());
    auto made = mechanism::make_mechanism(std::move(c));
    EXPECT_TRUE(made) << made.error().what();
    if (!made) return result;
    dir_ = (*made)->dir();
    EXPECT_TRUE(fs::is_directory(dir_));
    mechanism::run_restore(**made, invocation(), result);
    made->reset();
    return result;
  }

  void expect_nothing_left() {
    EXPECT_FALSE(fs::exists(dir_)) << dir_ << " left behind";
    if (fs::exists(tmp_.path() / "work" / "restores")) {
      EXPECT_TRUE(fs::is_empty(tmp_.path() / "work" / "restores"));
    }
    for (const char* file : {"root.pid", "daemon.pid"}) {
      if (fs::exists(bin_ / file)) {
        EXPECT_FALSE(alive(read_pid(bin_ / file))) << file << " still running";
      }
    }
    EXPECT_EQ(snaptier::testing::thread_count_settled(threads_before_), threads_before_) << "a thread outlived the restore";
  }

  // The stand-in worker SIGKILLed itself mid-restore, leaving one task: the restore failed
  // saying so, and that task is gone with everything else.
  void expect_failed_for_its_dead_worker(const mechanism::RestoreResult& r) {
    EXPECT_FALSE(r.ok);
    ASSERT_TRUE(r.error);
    EXPECT_EQ(r.error->rfind("i/o error: criu restore failed (criu swrk exited without replying: killed by signal 9; "
                             "killed the 1 process it had forked and left half restored)",
                             0),
              0u)
        << *r.error;
    expect_nothing_left();
  }

  snaptier::testing::TempDir tmp_;
  fs::path bin_, dir_;
  std::shared_ptr<Tier> local_, file_;
  std::shared_ptr<SnapshotStore> store_;
  Snapshot snapshot_;
  std::size_t threads_before_ = 0;
};

TEST_F(RestoreMechanismTest, FailedCriuEagerRestoreLeavesNothingAndSaysWhy) {
  const auto r = restore("criu-eager");
  EXPECT_FALSE(r.ok);
  ASSERT_TRUE(r.error);
  EXPECT_NE(r.error->find("criu restore failed"), std::string::npos) << *r.error;
  EXPECT_NE(r.error->find("stand-in failure"), std::string::npos) << "the log's tail is part of the error";
  ASSERT_TRUE(r.materialize);
  EXPECT_GT(r.materialize->pages, 0u);
  EXPECT_FALSE(r.restore_ms) << "the restore never ran";
  expect_nothing_left();
}

TEST_F(RestoreMechanismTest, RestoredTreeIsKilledWhenTheFlowFailsAfterTheRestore) {
  mode("run");  // the "tree" runs, but the instance's socket never appears
  const auto r = restore("criu-eager");
  EXPECT_FALSE(r.ok);
  ASSERT_TRUE(r.error);
  EXPECT_NE(r.error->find("move "), std::string::npos) << *r.error;
  EXPECT_TRUE(r.restore_ms);
  ASSERT_TRUE(fs::exists(bin_ / "root.pid"));
  expect_nothing_left();
}

TEST_F(RestoreMechanismTest, RestoredTreeIsKilledBelowItsRootToo) {
  mode("run-tree");
  const auto r = restore("criu-eager");
  EXPECT_FALSE(r.ok);
  ASSERT_TRUE(r.restore_ms) << "criu returned: the tree ran";
  std::ifstream in(bin_ / "tree.pids");
  long child = 0;
  ASSERT_TRUE(in >> child) << "the root's child wrote no pid";
  EXPECT_FALSE(alive(static_cast<pid_t>(child))) << "the root's child (own session) outlived the root";
  expect_nothing_left();
}

TEST_F(RestoreMechanismTest, CriuLazyDaemonIsEndedWhenTheRestoreFails) {
  mode("daemon-ok-restore-fails");
  const auto r = restore("criu-lazy");
  EXPECT_FALSE(r.ok);
  ASSERT_TRUE(r.error);
  EXPECT_NE(r.error->find("criu restore failed"), std::string::npos) << *r.error;
  ASSERT_TRUE(fs::exists(bin_ / "daemon.pid")) << "the daemon was never started";
  expect_nothing_left();
}

TEST_F(RestoreMechanismTest, CriuLazyDaemonThatDiesEarlyIsReportedWithItsExit) {
  mode("daemon-dies");
  const auto r = restore("criu-lazy");
  ASSERT_TRUE(r.error);
  EXPECT_NE(r.error->find("criu lazy-pages exited early"), std::string::npos) << *r.error;
  expect_nothing_left();
}

TEST_F(RestoreMechanismTest, AgentLazyServerThreadEndsWhenCriuRestoreFails) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = restore("lazy-cxl");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 15s) << "the server was not told to stop";
  EXPECT_FALSE(r.ok);
  ASSERT_TRUE(r.error);
  EXPECT_EQ(r.error->rfind("i/o error: criu restore failed", 0), 0u) << "criu's failure, not the stopped server's: " << *r.error;
  ASSERT_TRUE(r.in_place);
  EXPECT_EQ(r.in_place->mode, "off");
  expect_nothing_left();
}

std::string file_text(const fs::path& file) {
  std::ifstream in(file);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST_F(RestoreMechanismTest, EveryMechanismsRestoreIsSentToAPrestartedCriuWorkerWithTheCommandLinesOptions) {
  // The baselines too: a ratio against criu-eager or criu-lazy compares page policies, not
  // which one paid for loading criu inside its timed restore.
  struct Case {
    const char* policy;
    const char* mode;
    const char* options;
  };
  for (const Case& c : {Case{"criu-eager", "fail", "lazy=0 stopped=0"}, Case{"criu-lazy", "daemon-ok-restore-fails", "lazy=1 stopped=0"},
                        Case{"lazy-cxl", "fail", "lazy=1 stopped=1"}}) {
    SCOPED_TRACE(c.policy);
    mode(c.mode);
    fs::remove(bin_ / "calls");
    const auto r = restore(c.policy);
    EXPECT_FALSE(r.ok);
    ASSERT_TRUE(r.error);
    EXPECT_EQ(r.error->rfind("i/o error: criu restore failed (criu: stand-in failure)", 0), 0u) << *r.error;
    EXPECT_NE(r.error->find("cr-restore.c:1"), std::string::npos) << "the log's tail: " << *r.error;
    std::string calls = file_text(bin_ / "calls");
    EXPECT_EQ(calls.find("restore -D"), std::string::npos) << "criu restore was run: " << calls;
    if (std::string(c.policy) == "criu-lazy") {
      const std::string daemon = "lazy-pages -D " + (dir_ / "images").string() + " -W " + dir_.string();
      ASSERT_EQ(calls.rfind(daemon, 0), 0u) << "CRIU's daemon starts first: " << calls;
      calls.erase(0, calls.find('\n') + 1);
    }
    const std::string expected = "swrk 3\nswrk restore type=2 images=" + (dir_ / "images").string() + " work=" +
                                 dir_.string() + " log=restore.log " + c.options + "\n";
    EXPECT_EQ(calls, expected);
    expect_nothing_left();
  }
}

TEST_F(RestoreMechanismTest, WithoutAPrestartedWorkerTheAgentRunsCriuRestoreWithTheSameOptions) {
  auto c = context("lazy-cxl");
  c.prestart_criu = false;
  const auto r = restore_with(std::move(c));
  EXPECT_FALSE(r.ok);
  ASSERT_TRUE(r.error);
  EXPECT_EQ(r.error->rfind("i/o error: criu restore failed (exit 1)", 0), 0u) << *r.error;
  const std::string calls = file_text(bin_ / "calls");
  EXPECT_EQ(calls.find("swrk"), std::string::npos) << calls;
  EXPECT_NE(calls.find("restore -D " + (dir_ / "images").string() + " -W " + dir_.string() + " -d"), std::string::npos) << calls;
  EXPECT_NE(calls.find("-o restore.log -v2 --lazy-pages --leave-stopped"), std::string::npos) << calls;
  expect_nothing_left();
}

TEST_F(RestoreMechanismTest, ACriuWorkerThatExitsWithoutReplyingFailsTheRestoreAndSaysHow) {
  mode("die");
  const auto r = restore("reap");
  EXPECT_FALSE(r.ok);
  ASSERT_TRUE(r.error);
  EXPECT_EQ(r.error->rfind("i/o error: criu restore failed (criu swrk exited without replying: exit 3)", 0), 0u) << *r.error;
  expect_nothing_left();
}

TEST_F(RestoreMechanismTest, ACriuWorkerKilledMidRestoreFailsTheRestoreAtOnceAndTheTaskItForkedIsKilled) {
  mode("die-mid-restore");
  // Its task holds the worker's socket open, so only the worker's exit says no reply will come;
  // waiting for the socket alone would last the whole timeout.
  const auto r = restore("lazy-cxl", 60s);
  expect_failed_for_its_dead_worker(r);
}

TEST_F(RestoreMechanismTest, ATaskOfADeadCriuWorkerIsKilledEvenOnceItHasClosedTheWorkersSocket) {
  mode("die-in-restorer");
  auto c = context("criu-eager", 60s);
  // The worker runs in a mount namespace of its own (the instance's socket directory mounted
  // there), as every function restore's does: what is in it is what the worker started.
  c.socket_dir = tmp_.path() / "function-sockets";
  const auto r = restore_with(std::move(c));
  if (r.error && r.error->find("unshare") != std::string::npos) GTEST_SKIP() << "no mount namespaces here: " << *r.error;
  expect_failed_for_its_dead_worker(r);
}

TEST_F(RestoreMechanismTest, BareRestoreIsTheAgentsLazyServerWithNothingBeforeResumeAndNothingInPlace) {
  for (const char* placement : {"cxl", "tiered", "rdma"}) {
    const auto bare = policy::make_bare_policy(placement);
    EXPECT_EQ(bare->mechanism(), policy::Mechanism::snaptier_lazy);
    EXPECT_EQ(bare->placement(), placement) << "it reads the copy the measured restore read";
    EXPECT_EQ(bare->in_place().pages, policy::InPlacePages::none);
    const std::vector<policy::LazyPage> hot{{0x1000, page_hot | page_written, 1, TierKind::cxl},
                                            {0x2000, page_hot, 2, TierKind::cxl}};
    EXPECT_TRUE(bare->plan(hot).before_resume.empty()) << "a bare restore installs nothing before resume";
  }
}

TEST_F(RestoreMechanismTest, FailedBareRestoreSaysWhyAndLeavesNothing) {
  auto c = context("reap");
  c.policy = policy::make_bare_policy("cxl");
  auto made = mechanism::make_mechanism(std::move(c));
  ASSERT_TRUE(made) << made.error().what();
  dir_ = (*made)->dir();
  const auto t0 = std::chrono::steady_clock::now();
  auto ms = mechanism::run_bare_restore(**made);
  made->reset();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 15s) << "the server was not told to stop";
  ASSERT_FALSE(ms);
  EXPECT_NE(ms.error().message.find("criu restore failed"), std::string::npos) << ms.error().what();
  expect_nothing_left();
}

std::map<std::string, std::string> files_in(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    std::ifstream in(e.path(), std::ios::binary);
    out[e.path().filename().string()] = std::string(std::istreambuf_iterator<char>(in), {});
  }
  return out;
}

TEST_F(RestoreMechanismTest, TheInstancesOfABurstRestoreFromImagesMadeOnce) {
  const fs::path shared_dir = tmp_.path() / "work" / "restores" / "fn.reap.burst-1";
  auto shared = mechanism::make_shared_burst(shared_dir);
  ASSERT_TRUE(shared);
  std::vector<std::unique_ptr<mechanism::RestoreMechanism>> instances;
  std::vector<mechanism::RestoreResult> results(3);
  for (int i = 0; i < 3; ++i) {
    auto c = context("reap");
    c.dir += "." + std::to_string(i);
    c.shared_burst = shared;
    auto made = mechanism::make_mechanism(std::move(c));
    ASSERT_TRUE(made) << made.error().what();
    instances.push_back(std::move(*made));
  }
  std::vector<std::thread> threads;
  std::vector<bool> prepared(3, false);
  for (int i = 0; i < 3; ++i) threads.emplace_back([&, i] { prepared[i] = instances[i]->prepare(results[i]).has_value(); });
  for (auto& t : threads) t.join();
  const auto made_once = files_in(shared_dir);
  ASSERT_FALSE(made_once.empty());
  ASSERT_TRUE(made_once.contains("inventory.img"));
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(prepared[i]) << i;
    EXPECT_EQ(files_in(instances[i]->dir() / "images"), made_once) << "instance " << i << " reads its own copy";
    ASSERT_TRUE(results[i].in_place);
    EXPECT_EQ(results[i].in_place->prepared, "once for the burst");
    ASSERT_TRUE(results[i].materialize);
    EXPECT_EQ(results[i].materialize->pages, results[0].materialize->pages);
  }
  // Each never-connected server waits out its stop grace: end them side by side.
  std::vector<std::thread> enders;
  for (auto& m : instances) enders.emplace_back([&m] { m.reset(); });
  for (auto& t : enders) t.join();
  instances.clear();
  EXPECT_TRUE(fs::exists(shared_dir)) << "the burst still holds its images";
  shared.reset();
  EXPECT_FALSE(fs::exists(shared_dir)) << "the last owner removes them";
  EXPECT_TRUE(fs::is_empty(tmp_.path() / "work" / "restores"));
  EXPECT_EQ(snaptier::testing::thread_count_settled(threads_before_), threads_before_);
}

TEST_F(RestoreMechanismTest, ImagesThatCannotBeMadeFailEveryInstanceOfTheBurst) {
  auto shared = mechanism::make_shared_burst(tmp_.path() / "work" / "restores" / "fn.reap.burst-2");
  ASSERT_TRUE(shared);
  ASSERT_TRUE(store_->remove("fn:cxl"));  // the copy is gone: materializing fails
  for (int i = 0; i < 2; ++i) {
    auto c = context("reap");
    c.dir += "." + std::to_string(i);
    c.shared_burst = shared;
    auto made = mechanism::make_mechanism(std::move(c));
    ASSERT_TRUE(made) << made.error().what();
    mechanism::RestoreResult r;
    auto ok = (*made)->prepare(r);
    EXPECT_FALSE(ok) << "instance " << i;
  }
  shared.reset();
  EXPECT_TRUE(fs::is_empty(tmp_.path() / "work" / "restores"));
}

// ---- what criu is handed, and what is left when it hangs ----------------------------------------

bool ran_criu_restore(const fs::path& calls) {
  std::ifstream in(calls);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("restore", 0) == 0 || line.rfind("swrk restore", 0) == 0) return true;
  return false;
}

TEST_F(RestoreMechanismTest, ShortPagesFileIsRefusedBeforeCriuRestoreRunsForEveryMechanism) {
  for (const char* policy_name : {"criu-eager", "criu-lazy", "lazy-cxl"}) {
    SCOPED_TRACE(policy_name);
    mode("run");
    fs::remove(bin_ / "calls");
    auto made = mechanism::make_mechanism(context(policy_name));
    ASSERT_TRUE(made) << made.error().what();
    dir_ = (*made)->dir();
    mechanism::RestoreResult out;
    ASSERT_TRUE((*made)->prepare(out));
    const fs::path pages = dir_ / "images" / "pages-1.img";
    ASSERT_EQ(fs::file_size(pages), 20 * kPageSize) << "materialized at full size (holes for the lazy pages)";
    fs::resize_file(pages, kPageSize);  // what a full disk or a torn copy leaves
    auto root = (*made)->restore();
    ASSERT_FALSE(root);
    EXPECT_EQ(root.error().code, Errc::corrupt);
    EXPECT_NE(root.error().message.find("criu restore not run: " + pages.string() +
                                        " holds 4096 bytes but pagemap-15884.img needs 81920 bytes"),
              std::string::npos)
        << root.error().message;
    EXPECT_FALSE(ran_criu_restore(bin_ / "calls")) << "criu restore ran on a short pages file";
    made->reset();
    expect_nothing_left();
  }
}

TEST_F(RestoreMechanismTest, ShortPagesFileFromTheSnapshotHostFailsTheRestoreResult) {
  mode("run");
  // criu-remote: the snapshot host's reply carries the images; one pages file came short.
  json images = json::object();
  for (const auto& e : fs::directory_iterator(kFixture)) {
    if (e.path().extension() != ".img") continue;
    std::ifstream in(e.path(), std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (e.path().filename() == "pages-1.img") bytes.resize(3 * kPageSize);
    images[e.path().filename().string()] =
        mechanism::to_hex(std::span<const std::byte>(reinterpret_cast<const std::byte*>(bytes.data()), bytes.size()));
  }
  auto c = context("criu-remote");
  c.remote = mechanism::RemotePeer{"hostA", "127.0.0.1", 7999, [images](const control::Command&) -> Result<json> {
                                     return json{{"ok", true}, {"images", images}};
                                   }};
  const auto r = restore_with(std::move(c));
  EXPECT_FALSE(r.ok);
  ASSERT_TRUE(r.error);
  EXPECT_EQ(r.error->rfind("corrupt: criu restore not run: ", 0), 0u) << *r.error;
  EXPECT_NE(r.error->find("pages-1.img holds 12288 bytes but pagemap-15884.img needs 81920 bytes (20 present pages)"),
            std::string::npos)
      << *r.error;
  EXPECT_FALSE(r.restore_ms) << "no restore was timed";
  EXPECT_EQ(mechanism::to_json(r)["error"], *r.error);
  EXPECT_FALSE(ran_criu_restore(bin_ / "calls"));
  expect_nothing_left();
}

TEST_F(RestoreMechanismTest, CriuRestoreThatHangsIsKilledWithTheTreeItCreated) {
  for (const char* policy_name : {"criu-eager", "lazy-cxl"}) {
    SCOPED_TRACE(policy_name);
    mode("hang");
    fs::remove(bin_ / "tree.pids");
    const auto t0 = std::chrono::steady_clock::now();
    const auto r = restore(policy_name, 1s);
    const auto took = std::chrono::steady_clock::now() - t0;
    EXPECT_FALSE(r.ok);
    ASSERT_TRUE(r.error);
    EXPECT_EQ(r.error->rfind("timeout: criu restore failed (timed out after 1000 ms; killed with the ", 0), 0u) << *r.error;
    EXPECT_LT(took, 12s);
    std::ifstream in(bin_ / "tree.pids");
    std::vector<pid_t> tree;
    for (long pid = 0; in >> pid;) tree.push_back(static_cast<pid_t>(pid));
    ASSERT_EQ(tree.size(), 2u) << "the spinner and its child";
    for (pid_t p : tree) EXPECT_FALSE(alive(p)) << "pid " << p << " of the restored tree still runs";
    expect_nothing_left();
  }
}

TEST_F(RestoreMechanismTest, ServerThreadDestroyedBeforeItsRestorerConnectsLeavesNoThread) {
  auto bound_dir = tmp_.path() / "server";
  fs::create_directories(bound_dir);
  lazy::LazyPagesOptions o;
  o.images_dir = kFixture;
  o.work_dir = bound_dir;
  o.accept_timeout = 60s;  // far longer than the test: only the stop request ends it
  bool chained = false;
  o.on_resumed = [&chained] { chained = true; };
  auto server = mechanism::ServerThread::start(std::move(o));
  ASSERT_TRUE(server) << server.error().what();
  EXPECT_EQ(snaptier::testing::thread_count(), threads_before_ + 1);
  EXPECT_FALSE((*server)->wait_resumed(50ms));
  const auto t0 = std::chrono::steady_clock::now();
  server->reset();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, mechanism::ServerThread::kStopGrace + 2s);
  EXPECT_EQ(snaptier::testing::thread_count_settled(threads_before_), threads_before_);
  EXPECT_FALSE(chained) << "nobody was resumed";
  EXPECT_FALSE(fs::exists(bound_dir / lazy::kSocketName)) << "socket file left behind";
}

TEST_F(RestoreMechanismTest, FunctionServiceRestoreThatFailsLeavesNoRestoreDirectory) {
  FunctionsConfig config;
  config.workloads_dir = kRepo / "workloads";
  config.work_dir = tmp_.path() / "work";
  config.criu = (bin_ / "criu").string();
  config.operation_timeout = 20s;
  FunctionService service("hostA", config, store_, {{TierKind::local, local_->caps()}, {TierKind::file, file_->caps()}});
  for (const char* policy : {"criu-eager", "criu-lazy", "lazy-cxl"}) {
    control::FunctionRestore request;
    request.snapshot = "fn";
    request.policy = policy;
    auto r = service.restore(request);
    ASSERT_TRUE(r) << policy << ": " << r.error().what();
    EXPECT_EQ((*r)["ok"], false) << policy;
    EXPECT_TRUE(fs::is_empty(config.work_dir / "restores")) << policy << " left a restore directory";
  }
  // Refused before anything starts; the policy list says, typed, what this host lacks for it.
  control::FunctionRestore rdma;
  rdma.snapshot = "fn";
  rdma.policy = "lazy-rdma";
  auto refused = service.restore(rdma);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::not_found);
  std::map<std::string, json> listed;
  for (const auto& p : service.policies()) listed[p["name"]] = p["missing"];
  EXPECT_EQ(listed.size(), policy::policy_names().size());
  EXPECT_EQ(listed["lazy-rdma"], "rdma");
  EXPECT_EQ(listed["aquifer"], "cxl") << "tiered needs cxl and one of rdma, file";
  EXPECT_EQ(listed["trenv"], "cxl") << "no CXL tier: cannot map in place";
  EXPECT_TRUE(listed["criu-eager"] == "cxl" && listed["criu-remote"].is_null());
  // criu-remote without the snapshot host as a peer: a failed result naming the peer.
  control::FunctionRestore remote;
  remote.snapshot = "fn";
  remote.policy = "criu-remote";
  auto no_peer = service.restore(remote);
  ASSERT_TRUE(no_peer) << no_peer.error().what();
  EXPECT_EQ((*no_peer)["ok"], false);
  EXPECT_EQ((*no_peer)["missing"], "peer");
  EXPECT_TRUE(fs::is_empty(config.work_dir / "restores"));
  EXPECT_EQ(snaptier::testing::thread_count_settled(threads_before_), threads_before_);
}

// ---- the result against the schema --------------------------------------------------------------

json load_schema() {
  std::ifstream in(kRepo / "docs" / "schema" / "control.schema.json");
  return json::parse(in);
}

// The subset of JSON Schema the control schema uses: type, enum, const, $ref, oneOf,
// required, properties, additionalProperties: false, items, minimum. `strict`: every key of an
// object must be a listed property (results may gain fields only through the schema).
class Validator {
 public:
  explicit Validator(json schema) : schema_(std::move(schema)) {}

  std::vector<std::string> check(const json& value, const std::string& def, bool strict) {
    problems_.clear();
    strict_ = strict;
    validate(value, schema_["$defs"][def], def);
    return problems_;
  }

 private:
  bool type_ok(const json& v, const std::string& type) {
    if (type == "string") return v.is_string();
    if (type == "integer") return v.is_number_integer();
    if (type == "number") return v.is_number();
    if (type == "boolean") return v.is_boolean();
    if (type == "object") return v.is_object();
    if (type == "array") return v.is_array();
    if (type == "null") return v.is_null();
    return false;
  }
  bool passes(const json& v, const json& s, const std::string& at) {
    const auto before = problems_.size();
    validate(v, s, at);
    const bool ok = problems_.size() == before;
    problems_.resize(before);
    return ok;
  }
  void validate(const json& v, const json& s, const std::string& at) {
    if (s.contains("$ref")) {
      const std::string ref = s["$ref"];
      validate(v, schema_["$defs"][ref.substr(ref.rfind('/') + 1)], at);
    }
    if (s.contains("type") && !type_ok(v, s["type"].get<std::string>())) {
      problems_.push_back(at + ": not " + s["type"].get<std::string>());
    }
    if (s.contains("enum") && std::find(s["enum"].begin(), s["enum"].end(), v) == s["enum"].end()) {
      problems_.push_back(at + ": " + v.dump() + " not in the enum");
    }
    if (s.contains("const") && v != s["const"]) problems_.push_back(at + ": not " + s["const"].dump());
    if (s.contains("minimum") && v.is_number() && v.get<double>() < s["minimum"].get<double>()) {
      problems_.push_back(at + ": below the minimum");
    }
    if (s.contains("oneOf")) {
      int n = 0;
      for (const auto& alt : s["oneOf"]) n += passes(v, alt, at) ? 1 : 0;
      if (n != 1) problems_.push_back(at + ": matches " + std::to_string(n) + " alternatives of oneOf");
    }
    if (v.is_object()) {
      for (const auto& key : s.value("required", json::array())) {
        if (!v.contains(key.get<std::string>())) problems_.push_back(at + ": required " + key.get<std::string>() + " missing");
      }
      const json properties = s.value("properties", json::object());
      const json extra = s.value("additionalProperties", json(true));
      for (const auto& [key, item] : v.items()) {
        if (s.contains("propertyNames")) validate(json(key), s["propertyNames"], at + " key " + key);
        if (properties.contains(key)) {
          validate(item, properties[key], at + "." + key);
        } else if (extra.is_object()) {
          validate(item, extra, at + "." + key);
        } else if (extra == false || (strict_ && s.contains("properties"))) {
          problems_.push_back(at + ": " + key + " is not in the schema");
        }
      }
    }
    if (v.is_array() && s.contains("items")) {
      for (std::size_t i = 0; i < v.size(); ++i) validate(v[i], s["items"], at + "[" + std::to_string(i) + "]");
    }
  }

  json schema_;
  bool strict_ = false;
  std::vector<std::string> problems_;
};

std::string joined(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += s + "\n";
  return out;
}

mechanism::RestoreResult every_field() {
  mechanism::RestoreResult r;
  r.snapshot = "fn";
  r.variant = "fn";
  r.function = "helloworld";
  r.policy = "tiered";
  r.mechanism = "snaptier-lazy";
  r.host = "host1";
  r.ok = true;
  r.answer_ok = true;
  r.digest_ok = true;
  r.digest = std::string(64, 'a');
  r.zero_pages = 3;
  r.snapshot_pages = 100;
  r.snapshot_bytes_per_tier = {{TierKind::cxl, 4096}, {TierKind::rdma, 8192}};
  r.cold_tier = "rdma";
  r.materialize = mechanism::MaterializeStep{1.5, 10, 40960};
  r.remote = mechanism::RemoteStep{"host0", "10.0.0.1", 27001, 512, 3.0, json{{"host", "host0"}}};
  r.in_place = inplace::StepReport{.pages = "read-only hot pages", .mode = "mapped", .tier = "in-place: yes",
                                   .prepared = "once for the burst",
                                   .mapped = inplace::StepReport::Mapped{.prepare_ms = 1.5, .pages_mapped = 60,
                                                                         .pages_wanted = 64, .skipped_discarded = 1,
                                                                         .skipped_remapped = 1, .skipped_layout = 2,
                                                                         .skipped_tier = 1, .skipped_vma = 1, .runs = 3,
                                                                         .vmas_before = 10, .vmas_after = 16,
                                                                         .bytes_cut_from_images = 245760,
                                                                         .backing_file = "/dev/shm/cxl"}};
  r.restore_ms = 10;
  r.first_response_ms = 20;
  r.invoke_ms = 5;
  r.warm_invoke_ms = 4;
  r.bare_restore_ms = 9;
  r.limit_error = "bare restore: the kept instance holds the dumped socket path";
  r.local_memory_bytes = 1 << 20;
  r.local_anonymous_bytes = 1 << 19;
  r.cxl_mapped_bytes = 1 << 18;
  r.mapped_cow_bytes = 4096;
  r.pages_mapped_in_place = 64;
  r.cow_copies_after_first_response = 2;
  r.faults = mechanism::FaultCounts{10, 7, 3, 1, 0.25, {{TierKind::rdma, 9}}};
  r.bytes_moved_per_tier = std::map<TierKind, std::uint64_t>{{TierKind::rdma, 36864}};
  r.pages_prefetched = 5;
  r.pages_copied_before_resume = 5;
  r.pages_background = 2;
  r.prefetch_ms = 0.5;
  r.faults_after_digest = 12;
  r.lazy_pages = 40;
  r.server = mechanism::ServerReport{std::nullopt, 0};
  r.instance = mechanism::KeptInstance{1234, "/run/x.sock"};
  return r;
}

std::vector<std::byte> criu_reply(std::uint64_t type, bool success, std::optional<std::int64_t> pid, std::string message = "",
                                  std::int64_t cr_errno = 0) {
  namespace schema = criu::schema;
  criu::pb::Message resp(schema::criu_resp::kSpec);
  resp.set_unsigned(schema::criu_resp::type, type);
  resp.set_unsigned(schema::criu_resp::success, success ? 1 : 0);
  if (pid) {
    criu::pb::Message restored(schema::criu_restore_resp::kSpec);
    restored.set_signed(schema::criu_restore_resp::pid, *pid);
    resp.set_bytes(schema::criu_resp::restore, criu::pb::encode(restored));
  }
  if (cr_errno != 0) resp.set_signed(schema::criu_resp::cr_errno, cr_errno);
  if (!message.empty()) resp.set_string(schema::criu_resp::cr_errmsg, message);
  return criu::pb::encode(resp);
}

TEST(CriuWorkerReply, ARestoreReplyGivesThePidOrCriusReasonAndAnythingElseIsRefused) {
  auto ok = mechanism::decode_restore_reply(criu_reply(criu::schema::kRpcRestore, true, 4242));
  ASSERT_TRUE(ok) << ok.error().what();
  EXPECT_TRUE(ok->success);
  EXPECT_EQ(ok->pid, 4242);

  auto failed = mechanism::decode_restore_reply(criu_reply(criu::schema::kRpcRestore, false, -1, "no such image", ENOENT));
  ASSERT_TRUE(failed) << failed.error().what();
  EXPECT_FALSE(failed->success);
  EXPECT_EQ(failed->message, "no such image");
  EXPECT_EQ(failed->cr_errno, ENOENT);

  // CRIU answers a request it could not read with an EMPTY (0) reply.
  auto other = mechanism::decode_restore_reply(criu_reply(0, false, std::nullopt, "Invalid req"));
  ASSERT_FALSE(other);
  EXPECT_EQ(other.error().code, Errc::corrupt);
  EXPECT_NE(other.error().message.find("Invalid req"), std::string::npos) << other.error().what();

  auto no_pid = mechanism::decode_restore_reply(criu_reply(criu::schema::kRpcRestore, true, std::nullopt));
  ASSERT_FALSE(no_pid);
  EXPECT_EQ(no_pid.error().code, Errc::corrupt);

  const std::byte garbage[] = {std::byte{0x08}, std::byte{0x82}};  // a varint cut short
  auto bad = mechanism::decode_restore_reply(garbage);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::corrupt);
}

TEST(RestoreResultSchema, EveryRenderedFieldIsInTheSchemaWithItsType) {
  const json schema = load_schema();
  Validator v(schema);
  const json full = mechanism::to_json(every_field());
  const auto problems = v.check(full, "FunctionRestoreResult", true);
  EXPECT_TRUE(problems.empty()) << joined(problems);
  // Every property the schema describes is one the rendering can produce.
  for (const auto& item : schema["$defs"]["FunctionRestoreResult"]["properties"].items()) {
    EXPECT_TRUE(full.contains(item.key())) << item.key() << " is in the schema but never rendered";
  }
}

TEST(RestoreResultSchema, FailedAndUnreportedResultsMatchTooWithNulls) {
  Validator v(load_schema());
  mechanism::RestoreResult failed;
  failed.policy = "criu-remote";
  failed.mechanism = "criu-remote";
  failed.fail_with(Error{Errc::unavailable, "criu-remote needs the snapshot host as a peer"});
  failed.missing = "peer";
  const json j = mechanism::to_json(failed);
  EXPECT_EQ(v.check(j, "FunctionRestoreResult", true), std::vector<std::string>{}) << j.dump(2);
  EXPECT_EQ(j["missing"], "peer");
  EXPECT_EQ(j["error"], "unavailable: criu-remote needs the snapshot host as a peer");
  EXPECT_FALSE(j.contains("restore_ms"));

  mechanism::RestoreResult lazy = every_field();
  lazy.faults = std::optional<mechanism::FaultCounts>();  // criu lazy-pages counts nothing
  const json k = mechanism::to_json(lazy);
  EXPECT_TRUE(k["faults"].is_null());
  EXPECT_EQ(v.check(k, "FunctionRestoreResult", true), std::vector<std::string>{});
}

TEST(RestoreResultSchema, PolicyNamesAndMechanismsAreTheSchemasOnes) {
  const json schema = load_schema();
  const auto in_schema = schema["$defs"]["PolicyName"]["enum"].get<std::vector<std::string>>();
  EXPECT_EQ(policy::policy_names(), in_schema) << "docs/schema/control.schema.json PolicyName lists other policies";
  const json mechanisms = schema["$defs"]["FunctionRestoreResult"]["properties"]["mechanism"]["enum"];
  const json placements = schema["$defs"]["PlacementName"]["enum"];
  for (const auto& p : policy::describe_policies()) {
    EXPECT_NE(std::find(mechanisms.begin(), mechanisms.end(), p.mechanism), mechanisms.end()) << p.name;
    EXPECT_NE(std::find(placements.begin(), placements.end(), p.placement), placements.end()) << p.name;
    EXPECT_FALSE(p.description.empty()) << p.name;
    EXPECT_EQ(p.tiers.empty(), p.mechanism == "criu-remote") << p.name << ": only criu-remote needs no tier here";
  }
}

}  // namespace
