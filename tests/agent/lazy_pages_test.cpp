// LazyPagesServer against a test "restorer" speaking criu restore's side of the lazy-pages
// protocol exactly (connect, int pid, uffd via SCM_RIGHTS + one dummy byte, RSTF), with real
// userfaultfd and the committed criu 4.1.1 fixture tests/agent/data/criu/single (pid 15884; its
// PE_LAZY entries include 0x10000000 (3 pages, pages 0-2) and 0x10006000 (page 6), filled with
// 0xA0 + page index; pages 3,4,5,7 of that 8-page mapping are not in the pagemap -> zero).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <linux/userfaultfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <atomic>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "helpers/scm_rights.hpp"
#include "helpers/userfaultfd.hpp"
#include "snaptier/criu_images.hpp"
#include "snaptier/fault_engine.hpp"
#include "snaptier/lazy_pages.hpp"
#include "snaptier/restore_policy.hpp"

namespace fs = std::filesystem;
using namespace snaptier;
using namespace std::chrono_literals;

namespace {

constexpr std::uint64_t kBase = 0x10000000;
constexpr std::size_t kPages = 8;
constexpr std::int32_t kPid = 15884;
constexpr std::uint64_t kPage = 4096;

fs::path fixture_dir() { return fs::path(__FILE__).parent_path() / "data" / "criu" / "single"; }

enum class Mode { good, garbage_pid, no_fd, early_close, no_rstf, zombie_then_good, fork_child };

void send_int(int sk, std::int32_t v) { (void)!::send(sk, &v, sizeof v, MSG_NOSIGNAL); }

void send_fd(int sk, int fd) {
  const char dummy = 0;
  (void)!snaptier::testing::send_with_fd(sk, fd, &dummy, 1);
}

bool wait_fd(int fd, int ms) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, ms) > 0;
}

// The restorer child: never returns. Exit 0 = pages as expected; 3x = setup; 1x+i = page i wrong.
// `extra_page` (0: none): one more page of the fixture mapped and registered at its address,
// left untouched.
[[noreturn]] void restorer(const fs::path& socket, Mode mode, int go_fd, const std::vector<std::byte>& expected,
                           std::uint64_t extra_page = 0) {
  void* m = ::mmap(reinterpret_cast<void*>(kBase), kPages * kPage, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  if (m != reinterpret_cast<void*>(kBase)) ::_exit(30);
  // criu's restorer: UFFDIO_API with features 0 (fork_child: EVENT_FORK, as a FORK-capable set)
  auto uffd = create_userfaultfd(mode == Mode::fork_child ? UFFD_FEATURE_EVENT_FORK : 0);
  if (!uffd) ::_exit(31);
  if (!register_missing(*uffd, m, kPages * kPage)) ::_exit(32);
  if (extra_page != 0) {
    void* e = ::mmap(reinterpret_cast<void*>(extra_page), kPage, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (e != reinterpret_cast<void*>(extra_page)) ::_exit(36);
    if (!register_missing(*uffd, e, kPage)) ::_exit(37);
  }
  int sk = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket.c_str(), sizeof(addr.sun_path) - 1);
  if (::connect(sk, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) ::_exit(33);
  switch (mode) {
    case Mode::garbage_pid:
      send_int(sk, 4242);
      send_fd(sk, *uffd);
      break;
    case Mode::no_fd:
      send_int(sk, kPid);
      send_fd(sk, -1);
      break;
    case Mode::early_close:
      send_int(sk, kPid);
      send_fd(sk, *uffd);
      ::close(sk);
      break;
    case Mode::no_rstf:
      send_int(sk, kPid);
      send_fd(sk, *uffd);
      break;
    case Mode::zombie_then_good:
    case Mode::fork_child:
    case Mode::good:
      send_int(sk, kPid);
      send_fd(sk, *uffd);
      send_int(sk, static_cast<std::int32_t>(lazy::kRestoreFinished));
      break;
  }
  ::close(*uffd);  // the server holds it now
  if (mode != Mode::good && mode != Mode::zombie_then_good && mode != Mode::fork_child) {
    ::sleep(20);  // the server must kill us well before this
    ::_exit(40);
  }
  if (go_fd >= 0 && !wait_fd(go_fd, 5000)) ::_exit(34);
  const auto* p = static_cast<const unsigned char*>(m);
  auto check = [&]() -> int {
    for (std::size_t i = 0; i < kPages; ++i) {
      const bool data = i <= 2 || i == 6;
      for (std::size_t b = 0; b < kPage; ++b) {
        unsigned char want = data ? static_cast<unsigned char>(expected[i * kPage + b]) : 0;
        if (p[i * kPage + b] != want) return 10 + static_cast<int>(i);
      }
    }
    return 0;
  };
  if (mode == Mode::fork_child) {
    // The child faults first (pages untouched in the parent): served through the FORK uffd.
    pid_t g = ::fork();
    if (g == 0) ::_exit(check());
    int st = 0;
    if (::waitpid(g, &st, 0) != g || !WIFEXITED(st)) ::_exit(35);
    if (WEXITSTATUS(st) != 0) ::_exit(50 + WEXITSTATUS(st));
  }
  if (int rc = check(); rc != 0) ::_exit(rc);
  ::_exit(0);
}

struct RunResult {
  lazy::LazyPagesReport report;
  int status = -1;
  double ms = 0;
};

class LazyPagesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    work_ = fs::temp_directory_path() / ("lazy_pages_test." + std::to_string(::getpid()) + "." +
                                         ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(work_);
    fs::create_directories(work_);
    // Expected bytes of the 8-page mapping, straight from pages-1.img (offsets: page 8 of the
    // file for 0x10000000, page 11 for 0x10006000; see the fixture's pagemap).
    std::ifstream f(fixture_dir() / "pages-1.img", std::ios::binary);
    std::vector<char> all((std::istreambuf_iterator<char>(f)), {});
    ASSERT_EQ(all.size(), 20 * kPage);
    expected_.assign(kPages * kPage, std::byte{0});
    std::memcpy(expected_.data(), all.data() + 8 * kPage, 3 * kPage);
    std::memcpy(expected_.data() + 6 * kPage, all.data() + 11 * kPage, kPage);
    for (std::size_t i : {0, 1, 2, 6}) ASSERT_EQ(static_cast<unsigned char>(expected_[i * kPage]), 0xA0 + i);
  }
  void TearDown() override { fs::remove_all(work_); }

  RunResult run(Mode mode, lazy::LazyPagesOptions o, const fs::path& images = fixture_dir(),
                std::uint64_t extra_page = 0) {
    RunResult out;
    o.images_dir = images;
    o.work_dir = work_;
    int go[2];
    EXPECT_EQ(::pipe2(go, O_CLOEXEC), 0);
    o.on_resumed = [&] {
      if (at_resume_) at_resume_();
      (void)!::write(go[1], "g", 1);
    };
    auto server = lazy::LazyPagesServer::bind(o);
    EXPECT_TRUE(server) << (server ? "" : server.error().what());
    if (!server) return out;
    const fs::path socket = (*server)->socket_path();
    pid_t child = ::fork();
    child_ = child;
    if (child == 0) restorer(socket, mode, go[0], expected_, extra_page);
    const auto t0 = std::chrono::steady_clock::now();
    out.report = (*server)->run();
    out.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    // Bounded reap: the child either finished or was killed; kill it anyway after 5 s.
    for (int i = 0; i < 500; ++i) {
      if (::waitpid(child, &out.status, WNOHANG) == child) break;
      ::usleep(10'000);
      if (i == 499) {
        ::kill(child, SIGKILL);
        ::waitpid(child, &out.status, 0);
        ADD_FAILURE() << "restorer child still alive 5 s after the server returned";
      }
    }
    ::close(go[0]);
    ::close(go[1]);
    EXPECT_FALSE(fs::exists(socket)) << "socket file left behind";
    return out;
  }

  static lazy::LazyPagesOptions quick() {
    lazy::LazyPagesOptions o;
    o.accept_timeout = 2000ms;
    o.step_timeout = 1000ms;
    o.serve_timeout = 5000ms;
    return o;
  }

  // One of several restores run at once: its server, its restorer child, what it reported.
  struct Concurrent {
    std::shared_ptr<lazy::LazyPagesServer> server;
    int go[2] = {-1, -1};  // the restorer touches its pages once a byte arrives here
    pid_t child = 0;
    std::optional<lazy::LazyPagesReport> report;
    std::mutex mutex;
    std::condition_variable ended;
    int status = -1;
    ~Concurrent() {
      for (int fd : go) {
        if (fd >= 0) ::close(fd);
      }
    }
  };
  // A server per element over the fixture's images, each in a work dir of its own with
  // `adjust` applied to its options, and a restorer child connected to each.
  void start_restores(std::vector<Concurrent>& restores,
                      const std::function<void(int, Concurrent&, lazy::LazyPagesOptions&)>& adjust) {
    for (std::size_t i = 0; i < restores.size(); ++i) {
      Concurrent& one = restores[i];
      ASSERT_EQ(::pipe2(one.go, O_CLOEXEC), 0);
      auto o = quick();
      o.images_dir = fixture_dir();
      o.work_dir = work_ / std::to_string(i);
      fs::create_directories(o.work_dir);
      adjust(static_cast<int>(i), one, o);
      auto server = lazy::LazyPagesServer::bind(o);
      ASSERT_TRUE(server) << server.error().what();
      one.server = std::move(*server);
    }
    for (auto& one : restores) {
      one.child = ::fork();
      if (one.child == 0) restorer(one.server->socket_path(), Mode::good, one.go[0], expected_);
    }
  }

  fs::path work_;
  std::vector<std::byte> expected_;
  pid_t child_ = 0;                  // the restorer of the current run()
  std::function<void()> at_resume_;  // run() calls it in on_resumed, before the restorer goes on
};

// The tests that run a restorer stand-in: it needs a userfaultfd of its own.
class LazyRestoreTest : public LazyPagesTest {
 protected:
  void SetUp() override {
    LazyPagesTest::SetUp();
    if (auto why = snaptier::testing::userfaultfd_unavailable()) GTEST_SKIP() << *why;
  }
};

TEST_F(LazyPagesTest, PageSourceLazyRangesFromRealFixture) {
  auto cp = criu::load_checkpoint(fixture_dir());
  ASSERT_TRUE(cp) << cp.error().what();
  auto src = lazy::CheckpointPageSource::open(*cp);
  ASSERT_TRUE(src) << src.error().what();
  auto ranges = (*src)->lazy_ranges(kPid);
  // 0x4ad000/2, 0x10000000/3, 0x10006000/1, heap 0x25ebe000/2, stack 4 pages.
  ASSERT_EQ(ranges.size(), 5u);
  EXPECT_EQ(ranges[1].start, kBase);
  EXPECT_EQ(ranges[1].end, kBase + 3 * kPage);
  EXPECT_EQ(ranges[1].file_offset, 8 * kPage);
  EXPECT_EQ(ranges[2].start, kBase + 6 * kPage);
  EXPECT_EQ(ranges[2].file_offset, 11 * kPage);
  EXPECT_EQ((*src)->lazy_page_count(), 12u);
  std::vector<std::byte> buf(4 * kPage);
  auto f = (*src)->fetch(kPid, kBase + kPage, 4, buf);
  ASSERT_TRUE(f);
  EXPECT_EQ(f->answer, PageAnswer::copy);
  EXPECT_EQ(f->pages, 2u);  // cut at the range end
  EXPECT_EQ(std::memcmp(buf.data(), expected_.data() + kPage, 2 * kPage), 0);
  auto z = (*src)->fetch(kPid, kBase + 3 * kPage, 4, buf);
  ASSERT_TRUE(z);
  EXPECT_EQ(z->answer, PageAnswer::zero);
  EXPECT_EQ(z->pages, 3u);  // up to the next lazy range (page 6)
  // Non-lazy present data (the binary's .data at 0x401000) is not lazy: zero by CRIU's rule.
  auto nl = (*src)->fetch(kPid, 0x401000, 1, buf);
  ASSERT_TRUE(nl);
  EXPECT_EQ(nl->answer, PageAnswer::zero);
  EXPECT_FALSE((*src)->fetch(4242, kBase, 1, buf));
}

TEST_F(LazyRestoreTest, DemandFaultsServeThePagesFileAndZeroOutside) {
  auto r = run(Mode::good, quick());
  ASSERT_FALSE(r.report.error) << r.report.error->what();
  ASSERT_TRUE(WIFEXITED(r.status)) << r.status;
  EXPECT_EQ(WEXITSTATUS(r.status), 0) << "10+i: page i had the wrong bytes";
  EXPECT_TRUE(r.report.rstf);
  ASSERT_EQ(r.report.tasks.size(), 1u);
  EXPECT_EQ(r.report.tasks[0].pid, kPid);
  EXPECT_GT(r.report.tasks[0].host_pid, 0);  // from SCM_CREDENTIALS
  const auto& m = r.report.metrics;
  EXPECT_EQ(m.pages_prefetched, 0u);
  EXPECT_GE(m.faults, 2u);  // at least one fault per lazy range touched, zero range faults too
  EXPECT_GE(m.pages_copied_per_tier.at(TierKind::file), 4u);
  EXPECT_GE(m.pages_zero, 4u);
  EXPECT_TRUE(m.first_fault_ns.has_value());
  nlohmann::json j = r.report;
  EXPECT_TRUE(j["ok"].get<bool>());
  EXPECT_EQ(j["policy"], "none");
}

TEST_F(LazyRestoreTest, EachAnnouncedTaskIsReportedWithItsHostPidBeforeRstf) {
  auto o = quick();
  std::vector<lazy::RestoredTask> announced;
  bool resumed_before = false;
  bool resumed = false;
  o.on_task = [&](const lazy::RestoredTask& t) {
    announced.push_back(t);
    resumed_before = resumed_before || resumed;
  };
  at_resume_ = [&] { resumed = true; };
  auto r = run(Mode::good, o);
  ASSERT_FALSE(r.report.error) << r.report.error->what();
  ASSERT_EQ(announced.size(), 1u);
  EXPECT_EQ(announced[0].pid, kPid);
  EXPECT_EQ(announced[0].host_pid, child_) << "the restorer's own pid, from SCM_CREDENTIALS";
  EXPECT_FALSE(resumed_before) << "announced only after the resume";
  EXPECT_TRUE(resumed);
}

// A burst: several restores served at once, each by its own server on its own thread, all
// from one shared page source; every restored process sees exactly its pages.
TEST_F(LazyRestoreTest, ConcurrentRestoresFromOneSharedSourceEachGetTheirPages) {
  constexpr int kRestores = 6;
  auto cp = criu::load_checkpoint(fixture_dir());
  ASSERT_TRUE(cp) << cp.error().what();
  auto made = lazy::CheckpointPageSource::open(*cp);
  ASSERT_TRUE(made) << made.error().what();
  std::shared_ptr<lazy::LazySource> shared = *made;
  std::vector<Concurrent> restores(kRestores);
  start_restores(restores, [&](int i, Concurrent& one, lazy::LazyPagesOptions& o) {
    o.source = shared;
    o.prefetch = i % 2 == 0 ? lazy::PrefetchPolicy::none : lazy::PrefetchPolicy::all;
    const int go_write = one.go[1];
    o.on_resumed = [go_write] { (void)!::write(go_write, "g", 1); };
  });
  if (HasFatalFailure()) return;
  std::vector<std::thread> threads;
  for (auto& one : restores) threads.emplace_back([&one] { one.report = one.server->run(); });
  for (auto& t : threads) t.join();
  for (int i = 0; i < kRestores; ++i) {
    Concurrent& one = restores[i];
    ASSERT_EQ(::waitpid(one.child, &one.status, 0), one.child);
    ASSERT_TRUE(one.report);
    EXPECT_FALSE(one.report->error) << "restore " << i << ": " << one.report->error->what();
    ASSERT_TRUE(WIFEXITED(one.status)) << "restore " << i;
    EXPECT_EQ(WEXITSTATUS(one.status), 0) << "restore " << i << ": 10+p: page p had the wrong bytes";
    EXPECT_EQ(one.report->tasks.size(), 1u);
    EXPECT_GE(one.report->metrics.pages_copied_per_tier.at(TierKind::file), 4u) << "restore " << i;
  }
}

// The fixture's pages, except that the tier holding the registered mapping's pages has damaged
// them: every fetch there fails its check.
class CorruptMapping final : public lazy::LazySource {
 public:
  explicit CorruptMapping(std::shared_ptr<lazy::CheckpointPageSource> inner) : inner_(std::move(inner)) {}
  Result<PageFill> fetch(TaskId task, std::uint64_t vaddr, std::size_t max_pages, std::span<std::byte> buffer) override {
    if (vaddr >= kBase && vaddr < kBase + kPages * kPage) return fail(Errc::corrupt, "page fails its CRC32C");
    return inner_->fetch(task, vaddr, max_pages, buffer);
  }
  bool has_task(TaskId task) const noexcept override { return inner_->has_task(task); }
  std::vector<std::uint64_t> lazy_pages(TaskId task) const override { return inner_->lazy_pages(task); }

 private:
  std::shared_ptr<lazy::CheckpointPageSource> inner_;
};

// One thread for many trees: each restore does its protocol half on a thread of its own, then
// hands its server to one ServingLoop, which serves every tree's faults from then on. All of
// them are served at once (the restorers wait until the loop holds every server), every fault
// is served on the loop's thread, and a tree whose pages fail their check is
// killed alone while the others get their pages.
TEST_F(LazyRestoreTest, OneServingLoopServesManyTreesAndAFailureEndsOnlyItsOwn) {
  constexpr int kRestores = 5;
  constexpr int kBroken = 2;
  auto loop = lazy::ServingLoop::start();
  ASSERT_TRUE(loop) << loop.error().what();
  auto cp = criu::load_checkpoint(fixture_dir());
  ASSERT_TRUE(cp) << cp.error().what();
  auto checkpoint_source = lazy::CheckpointPageSource::open(*cp);
  ASSERT_TRUE(checkpoint_source) << checkpoint_source.error().what();
  std::mutex fault_threads_mutex;
  std::map<int, std::set<std::thread::id>> fault_threads;  // restore -> threads that saw its faults
  std::vector<Concurrent> restores(kRestores);
  start_restores(restores, [&](int i, Concurrent&, lazy::LazyPagesOptions& o) {
    if (i == kBroken) o.source = std::make_shared<CorruptMapping>(*checkpoint_source);
    o.on_fault = [&, i](const FaultObservation&) {
      std::lock_guard lock(fault_threads_mutex);
      fault_threads[i].insert(std::this_thread::get_id());
    };
  });
  if (HasFatalFailure()) return;
  std::vector<std::thread> protocol;
  for (auto& one : restores) {
    protocol.emplace_back([&one, &loop] {
      auto over = one.server->run_until_resumed();
      ASSERT_FALSE(over) << (over->error ? over->error->what() : "ended before serving");
      auto handed = (*loop)->serve(one.server, [&one](lazy::LazyPagesReport r) {
        std::lock_guard lock(one.mutex);
        one.report = std::move(r);
        one.ended.notify_all();
      });
      ASSERT_TRUE(handed) << handed.error().what();
    });
  }
  for (auto& t : protocol) t.join();
  for (int i = 0; i < 500 && (*loop)->stats().most_at_once < kRestores; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_EQ((*loop)->stats().most_at_once, static_cast<std::uint64_t>(kRestores));
  for (auto& one : restores) (void)!::write(one.go[1], "g", 1);
  for (int i = 0; i < kRestores; ++i) {
    Concurrent& one = restores[i];
    {
      std::unique_lock lock(one.mutex);
      ASSERT_TRUE(one.ended.wait_for(lock, 10s, [&] { return one.report.has_value(); })) << "restore " << i << " never ended";
    }
    for (int k = 0; k < 500 && ::waitpid(one.child, &one.status, WNOHANG) != one.child; ++k) ::usleep(10'000);
    if (i == kBroken) {
      ASSERT_TRUE(one.report->error) << "restore " << i;
      EXPECT_EQ(one.report->error->code, Errc::corrupt) << one.report->error->what();
      EXPECT_TRUE(WIFSIGNALED(one.status) && WTERMSIG(one.status) == SIGKILL) << one.status;
    } else {
      EXPECT_FALSE(one.report->error) << "restore " << i << ": " << one.report->error->what();
      ASSERT_TRUE(WIFEXITED(one.status)) << "restore " << i << ": " << one.status;
      EXPECT_EQ(WEXITSTATUS(one.status), 0) << "restore " << i << ": 10+p: page p had the wrong bytes";
      EXPECT_GE(one.report->metrics.pages_copied_per_tier.at(TierKind::file), 4u) << "restore " << i;
    }
    std::lock_guard lock(fault_threads_mutex);
    EXPECT_EQ(fault_threads[i], std::set<std::thread::id>{(*loop)->thread_id()})
        << "restore " << i << ": its faults were served off the loop's thread";
  }
  EXPECT_EQ((*loop)->stats().servers_served, static_cast<std::uint64_t>(kRestores));
}

// A loop that ends while it serves a tree installs that tree's remaining pages first (as a
// stopped server does), so the tree runs on without it, and reports it.
TEST_F(LazyRestoreTest, AServingLoopThatEndsDrainsWhatItServes) {
  auto loop = lazy::ServingLoop::start();
  ASSERT_TRUE(loop) << loop.error().what();
  auto o = quick();
  o.images_dir = fixture_dir();
  o.work_dir = work_;
  int go[2];
  ASSERT_EQ(::pipe2(go, O_CLOEXEC), 0);
  auto bound = lazy::LazyPagesServer::bind(o);
  ASSERT_TRUE(bound) << bound.error().what();
  std::shared_ptr<lazy::LazyPagesServer> server = std::move(*bound);
  pid_t child = ::fork();
  if (child == 0) restorer(server->socket_path(), Mode::good, go[0], expected_);
  ASSERT_FALSE(server->run_until_resumed());
  std::optional<lazy::LazyPagesReport> report;
  ASSERT_TRUE((*loop)->serve(server, [&](lazy::LazyPagesReport r) { report = std::move(r); }));
  loop->reset();  // ends the loop: the tree is drained and reported before the join returns
  ASSERT_TRUE(report);
  EXPECT_FALSE(report->error) << report->error->what();
  // The 4 lazy pages of the registered mapping (the others' ranges are not registered here).
  EXPECT_EQ(report->drained_pages, 4u);
  EXPECT_EQ(report->metrics.faults, 0u);
  (void)!::write(go[1], "g", 1);  // the tree now runs with no server at all
  int status = -1;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0) << "10+p: page p had the wrong bytes";
  ::close(go[0]);
  ::close(go[1]);
}

TEST_F(LazyRestoreTest, PrefetchAllInstallsEveryLazyPageBeforeResume) {
  auto o = quick();
  o.prefetch = lazy::PrefetchPolicy::all;
  auto r = run(Mode::good, o);
  ASSERT_FALSE(r.report.error) << r.report.error->what();
  ASSERT_TRUE(WIFEXITED(r.status));
  EXPECT_EQ(WEXITSTATUS(r.status), 0);
  // The 4 lazy pages of the registered mapping; the others' ranges are not registered here.
  EXPECT_EQ(r.report.prefetched_pages, 4u);
  EXPECT_EQ(r.report.metrics.pages_copied_per_tier.at(TierKind::file), 4u);
  // The touches after resume fault only on the zero pages (3,4,5,7), never on lazy data.
  EXPECT_EQ(r.report.metrics.faults, r.report.metrics.zero_filled_faults);
}

TEST_F(LazyRestoreTest, ForkedChildInheritsTheParentsPageSource) {
  if (::geteuid() != 0) GTEST_SKIP() << "UFFD_FEATURE_EVENT_FORK needs CAP_SYS_PTRACE";
  auto r = run(Mode::fork_child, quick());
  ASSERT_FALSE(r.report.error) << r.report.error->what();
  ASSERT_TRUE(WIFEXITED(r.status)) << r.status;
  EXPECT_EQ(WEXITSTATUS(r.status), 0) << "5x: the forked child saw wrong bytes; 1x: the parent did";
  EXPECT_EQ(r.report.metrics.events_fork, 1u);
  EXPECT_EQ(r.report.metrics.tasks_adopted, 2u);
}

TEST_F(LazyRestoreTest, GarbagePidIsAProtocolErrorAndKillsTheSender) {
  auto r = run(Mode::garbage_pid, quick());
  ASSERT_TRUE(r.report.error);
  EXPECT_EQ(r.report.error->code, Errc::protocol) << r.report.error->what();
  EXPECT_NE(r.report.error->message.find("4242"), std::string::npos);
  EXPECT_TRUE(WIFSIGNALED(r.status) && WTERMSIG(r.status) == SIGKILL) << r.status;
  EXPECT_LT(r.ms, 2000);
}

TEST_F(LazyRestoreTest, MissingFdIsAProtocolError) {
  auto r = run(Mode::no_fd, quick());
  ASSERT_TRUE(r.report.error);
  EXPECT_EQ(r.report.error->code, Errc::protocol) << r.report.error->what();
  EXPECT_TRUE(WIFSIGNALED(r.status) && WTERMSIG(r.status) == SIGKILL) << r.status;
}

TEST_F(LazyRestoreTest, EarlyCloseBeforeRstfIsAProtocolError) {
  auto r = run(Mode::early_close, quick());
  ASSERT_TRUE(r.report.error);
  EXPECT_EQ(r.report.error->code, Errc::protocol) << r.report.error->what();
  EXPECT_NE(r.report.error->message.find("before RSTF"), std::string::npos);
  EXPECT_TRUE(WIFSIGNALED(r.status) && WTERMSIG(r.status) == SIGKILL) << r.status;
}

TEST_F(LazyRestoreTest, NoRstfWithinStepTimeoutTimesOutAndKills) {
  auto o = quick();
  o.step_timeout = 300ms;
  auto r = run(Mode::no_rstf, o);
  ASSERT_TRUE(r.report.error);
  EXPECT_EQ(r.report.error->code, Errc::timeout) << r.report.error->what();
  EXPECT_TRUE(WIFSIGNALED(r.status) && WTERMSIG(r.status) == SIGKILL) << r.status;
  EXPECT_LT(r.ms, 1500);
}

TEST_F(LazyRestoreTest, AStopEndsTheWaitForTasksCriuWouldLeaveStopped) {
  // A criu that dies after RSTF never leaves its tasks stopped: its owner stops the server,
  // which then ends at once (and kills the tree) instead of after the step timeout.
  auto o = quick();
  o.resume_after_prefetch = true;
  o.step_timeout = 60s;
  std::atomic<bool> stop{false};
  o.stop = &stop;
  std::thread stopper([&] {
    std::this_thread::sleep_for(300ms);
    stop.store(true);
  });
  auto r = run(Mode::good, o);
  stopper.join();
  ASSERT_TRUE(r.report.error);
  EXPECT_EQ(r.report.error->code, Errc::unavailable) << r.report.error->what();
  EXPECT_NE(r.report.error->message.find("to be left stopped"), std::string::npos) << r.report.error->what();
  EXPECT_TRUE(WIFSIGNALED(r.status) && WTERMSIG(r.status) == SIGKILL) << r.status;
  EXPECT_LT(r.ms, 30'000) << "the stop was not seen; the step timeout ended the wait";
}

TEST_F(LazyPagesTest, NoRestorerTimesOutAndUnlinksStaleSocket) {
  { std::ofstream(work_ / lazy::kSocketName) << "stale"; }
  auto o = quick();
  o.images_dir = fixture_dir();
  o.work_dir = work_;
  o.accept_timeout = 200ms;
  auto server = lazy::LazyPagesServer::bind(o);
  ASSERT_TRUE(server) << server.error().what();
  const auto t0 = std::chrono::steady_clock::now();
  auto report = (*server)->run();
  ASSERT_TRUE(report.error);
  EXPECT_EQ(report.error->code, Errc::timeout);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 1s);
  EXPECT_FALSE(fs::exists(work_ / lazy::kSocketName));
}

TEST_F(LazyRestoreTest, PageSourceFailureKillsTheTree) {
  const fs::path images = work_ / "images";
  fs::create_directories(images);
  for (const auto& e : fs::directory_iterator(fixture_dir())) fs::copy(e.path(), images / e.path().filename());
  auto o = quick();
  o.images_dir = images;
  o.work_dir = work_;
  int go[2];
  ASSERT_EQ(::pipe2(go, O_CLOEXEC), 0);
  o.on_resumed = [&] { (void)!::write(go[1], "g", 1); };
  auto server = lazy::LazyPagesServer::bind(o);
  ASSERT_TRUE(server) << server.error().what();
  fs::resize_file(images / "pages-1.img", 8 * kPage);  // the lazy data vanishes after bind
  pid_t child = ::fork();
  if (child == 0) restorer((*server)->socket_path(), Mode::good, go[0], expected_);
  auto report = (*server)->run();
  int status = 0;
  for (int i = 0; i < 500 && ::waitpid(child, &status, WNOHANG) != child; ++i) ::usleep(10'000);
  ::kill(child, SIGKILL);
  ::waitpid(child, &status, WNOHANG);
  ::close(go[0]);
  ::close(go[1]);
  ASSERT_TRUE(report.error);
  EXPECT_EQ(report.error->code, Errc::corrupt) << report.error->what();
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;
  EXPECT_GE(report.metrics.errors, 1u);
}

// The fixtures ran as `./tiny` and `./tiny fork` with an empty environment (data/criu/README.md):
// those strings are in a lazy stack page, which is what /proc/PID/cmdline reads.
TEST_F(LazyPagesTest, ArgEnvPagesOfTheRealFixturesAreLazyAndHoldTheCommandLine) {
  const std::map<std::string, std::string> cmdline{{"single", std::string("./tiny\0", 7)},
                                                   {"tree", std::string("./tiny\0fork\0", 12)}};
  for (const auto& [name, args] : cmdline) {
    SCOPED_TRACE(name);
    auto cp = criu::load_checkpoint(fixture_dir().parent_path() / name);
    ASSERT_TRUE(cp) << cp.error().what();
    auto src = lazy::CheckpointPageSource::open(*cp);
    ASSERT_TRUE(src) << src.error().what();
    ASSERT_FALSE(cp->tasks.empty());
    for (const auto& task : cp->tasks) {
      ASSERT_TRUE(task.mm);
      const auto& mm = *task.mm;
      const TaskId pid = task.pstree.pid;
      ASSERT_EQ(mm.mm_arg_end - mm.mm_arg_start, args.size());
      EXPECT_EQ(mm.mm_env_start, mm.mm_arg_end);
      EXPECT_EQ(mm.mm_env_end, mm.mm_env_start);  // env -i
      const auto pages = lazy::arg_env_pages(mm);
      ASSERT_EQ(pages.size(), 1u);  // the strings do not cross a page boundary here
      const std::uint64_t page = pages.front();
      EXPECT_EQ(page % kPage, 0u);
      EXPECT_LE(page, mm.mm_arg_start);
      EXPECT_GE(page + kPage, mm.mm_arg_end);
      const auto lazy_pages = (*src)->lazy_pages(pid);
      EXPECT_TRUE(std::binary_search(lazy_pages.begin(), lazy_pages.end(), page)) << "arg page not lazy";
      std::vector<std::byte> buf(kPage);
      auto f = (*src)->fetch(pid, page, 1, buf);
      ASSERT_TRUE(f) << f.error().what();
      ASSERT_EQ(f->answer, PageAnswer::copy);
      EXPECT_EQ(std::string(reinterpret_cast<const char*>(buf.data()) + (mm.mm_arg_start - page), args.size()), args);
    }
  }
}

TEST_F(LazyPagesTest, ArgEnvPagesCoverBothRangesAndNothingBetween) {
  criu::MmEntry mm;
  mm.mm_arg_start = 0x10ff0;  // crosses into the next page
  mm.mm_arg_end = 0x11008;
  mm.mm_env_start = 0x19000;  // moved elsewhere (prctl PR_SET_MM_ENV_START)
  mm.mm_env_end = 0x19010;
  EXPECT_EQ(lazy::arg_env_pages(mm), (std::vector<std::uint64_t>{0x10000, 0x11000, 0x19000}));
  mm.mm_env_start = mm.mm_env_end = 0x11008;  // empty environment
  EXPECT_EQ(lazy::arg_env_pages(mm), (std::vector<std::uint64_t>{0x10000, 0x11000}));
  mm.mm_arg_end = mm.mm_arg_start;
  mm.mm_env_start = mm.mm_env_end;
  EXPECT_TRUE(lazy::arg_env_pages(mm).empty());
}

// Fresh pages can be installed wherever CRIU registers the task's uffd: every VMA that can be
// lazy, also one without lazy pages of its own (the anonymous piece between two ranges mapped in
// place), never a file mapping, and nowhere in a task without lazy pages (it has no uffd).
TEST_F(LazyPagesTest, FreshPagesGoWhereCriuRegistersTheUffd) {
  constexpr std::uint32_t kPrivateAnonymous = 0x02 | 0x20;
  constexpr std::uint32_t kPrivateFile = 0x02;
  criu::Task task;
  task.mm.emplace();
  task.mm->vmas = {
      criu::VmaEntry{.start = 0x10000, .end = 0x14000, .flags = kPrivateAnonymous, .status = criu::kVmaAnonPrivate},
      criu::VmaEntry{.start = 0x14000, .end = 0x18000, .flags = kPrivateFile, .status = criu::kVmaFilePrivate},
      criu::VmaEntry{.start = 0x18000, .end = 0x1c000, .flags = kPrivateAnonymous, .status = criu::kVmaAnonPrivate},
  };
  const std::vector<lazy::LazyRange> ranges{{0x10000, 0x11000, 0}};
  EXPECT_TRUE(lazy::in_lazy_vma(task, ranges, 0x13000)) << "the VMA holding lazy pages";
  EXPECT_TRUE(lazy::in_lazy_vma(task, ranges, 0x1b000)) << "an anonymous VMA without lazy pages of its own";
  EXPECT_FALSE(lazy::in_lazy_vma(task, ranges, 0x15000)) << "a file mapping (pages mapped in place)";
  EXPECT_FALSE(lazy::in_lazy_vma(task, ranges, 0x20000)) << "outside every VMA";
  EXPECT_FALSE(lazy::in_lazy_vma(task, {}, 0x13000)) << "a task without lazy pages";
}

// Every policy the agent serves, even one that installs nothing before resume, ends up with the
// fixture's arg page before resume, once, and not in the background list.
TEST_F(LazyPagesTest, ArgEnvPagesJoinEveryAgentPolicysBeforeResumeSetOnce) {
  auto cp = criu::load_checkpoint(fixture_dir());
  ASSERT_TRUE(cp) << cp.error().what();
  auto src = lazy::CheckpointPageSource::open(*cp);
  ASSERT_TRUE(src);
  const auto lazy_pages = (*src)->lazy_pages(kPid);
  const auto arg = lazy::arg_env_pages(*cp->tasks[0].mm);
  ASSERT_EQ(arg.size(), 1u);
  std::size_t served = 0;
  for (const auto& name : policy::policy_names()) {
    auto p = policy::make_policy(name);
    ASSERT_TRUE(p);
    if ((*p)->mechanism() != policy::Mechanism::snaptier_lazy) continue;
    ++served;
    for (bool arg_page_hot : {false, true}) {
      SCOPED_TRACE(name + (arg_page_hot ? " (arg page hot)" : ""));
      std::vector<policy::LazyPage> view;
      for (std::uint64_t a : lazy_pages) {
        const bool hot = a == kBase || (arg_page_hot && a == arg[0]);
        view.push_back({a, hot ? std::uint32_t{page_hot} : 0u, hot ? 1u : 0u, TierKind::cxl});
      }
      lazy::TaskPrefetch plan = (*p)->plan(view);
      plan.background.push_back(arg[0]);
      const std::vector<std::uint64_t> policy_own = plan.before_resume;
      const bool planned = std::count(policy_own.begin(), policy_own.end(), arg[0]) != 0;
      const std::size_t added = lazy::require_before_resume(plan, arg, lazy_pages);
      EXPECT_EQ(added, planned ? 0u : 1u);
      EXPECT_EQ(std::count(plan.before_resume.begin(), plan.before_resume.end(), arg[0]), 1);
      EXPECT_TRUE(std::equal(policy_own.begin(), policy_own.end(), plan.before_resume.begin()))
          << "the policy's own order is kept";
      EXPECT_EQ(std::count(plan.background.begin(), plan.background.end(), arg[0]), planned ? 1 : 0);
    }
  }
  EXPECT_GE(served, 4u);  // lazy-cxl, lazy-rdma, reap, tiered
  // A page that is not lazy (CRIU restored it) is left alone.
  lazy::TaskPrefetch plan;
  EXPECT_EQ(lazy::require_before_resume(plan, std::vector<std::uint64_t>{0x401000}, lazy_pages), 0u);
  EXPECT_TRUE(plan.before_resume.empty());
}

// The user-visible property: right after resume, a remote reader that cannot raise a uffd
// fault (/proc/PID/mem, the path of /proc/PID/cmdline) sees the arg strings, with a planner
// that installs nothing (lazy-cxl's).
TEST_F(LazyRestoreTest, ArgEnvPagesAreReadableRemotelyRightAfterResumeWithoutPrefetch) {
  auto cp = criu::load_checkpoint(fixture_dir());
  ASSERT_TRUE(cp) << cp.error().what();
  const auto& mm = *cp->tasks[0].mm;
  const std::uint64_t page = lazy::arg_env_pages(mm).at(0);
  void* probe = ::mmap(reinterpret_cast<void*>(page), kPage, PROT_NONE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  if (probe != reinterpret_cast<void*>(page)) GTEST_SKIP() << "the fixture's stack page is in use in this process";
  ::munmap(probe, kPage);  // the forked restorer has the same layout: it can map it there

  auto lazy_cxl = policy::make_policy("lazy-cxl");
  ASSERT_TRUE(lazy_cxl);
  auto o = quick();
  o.planner = [p = lazy_cxl->get()](TaskId, const lazy::LazySource&) { return p->plan({}); };
  std::string seen;
  int read_errno = 0;
  const std::size_t len = mm.mm_arg_end - mm.mm_arg_start;
  at_resume_ = [&] {  // the restorer has not touched the page yet: its gate opens after this
    const std::string path = "/proc/" + std::to_string(child_) + "/mem";
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      read_errno = errno;
      return;
    }
    std::string buf(len, '\0');
    const ssize_t n = ::pread(fd, buf.data(), buf.size(), static_cast<off_t>(mm.mm_arg_start));
    if (n < 0) read_errno = errno;
    if (n > 0) seen = buf.substr(0, static_cast<std::size_t>(n));
    ::close(fd);
  };
  auto result = run(Mode::good, o, fixture_dir(), page);
  ASSERT_FALSE(result.report.error) << result.report.error->what();
  ASSERT_TRUE(WIFEXITED(result.status)) << result.status;
  ASSERT_EQ(WEXITSTATUS(result.status), 0) << "36/37: could not map/register the arg page";
  EXPECT_EQ(read_errno, 0) << std::strerror(read_errno);
  EXPECT_EQ(seen, std::string("./tiny\0", 7));
  EXPECT_EQ(result.report.arg_env_pages, 1u);
  EXPECT_EQ(result.report.prefetched_pages, 1u);
  nlohmann::json j = result.report;
  EXPECT_EQ(j["arg_env_pages"], 1);
}

TEST_F(LazyPagesTest, PolicyParsing) {
  EXPECT_EQ(*lazy::parse_policy("none"), lazy::PrefetchPolicy::none);
  EXPECT_EQ(*lazy::parse_policy("all"), lazy::PrefetchPolicy::all);
  EXPECT_FALSE(lazy::parse_policy("some"));
}

}  // namespace
