// The userfaultfd fault engine against the real kernel: a forked child maps anonymous memory,
// registers it with a uffd and passes the fd over a socketpair (SCM_RIGHTS, as CRIU does); the
// engine in the test process serves its faults from an in-memory PageSource. Every wait has a
// deadline; a child that outlives its deadline is SIGKILLed.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <fcntl.h>

#include <filesystem>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>
#include <vector>

#include "core/unique_fd.hpp"
#include "helpers/scm_rights.hpp"
#include "helpers/threads.hpp"
#include "restore/range_map.hpp"
#include "snaptier/fault_engine.hpp"

namespace snaptier {
namespace {

using detail::UniqueFd;
using namespace std::chrono_literals;

constexpr auto kDeadline = 5s;
constexpr std::uint64_t P = kPageSize;

// ---- page contents ------------------------------------------------------------------------

std::vector<std::byte> page_bytes(std::size_t idx) {
  std::vector<std::byte> p(P);
  for (std::size_t i = 0; i < P; ++i) p[i] = static_cast<std::byte>((i * 7 + idx * 13 + 1) & 0xFF);
  p[0] = static_cast<std::byte>(0xA5 ^ (idx & 0xFF));
  return p;
}

std::uint64_t fnv(const std::byte* p, std::size_t n) {
  std::uint64_t h = 1469598103934665603ull;
  for (std::size_t i = 0; i < n; ++i) h = (h ^ static_cast<std::uint8_t>(p[i])) * 1099511628211ull;
  return h;
}

std::uint64_t source_sum(std::size_t idx) { return fnv(page_bytes(idx).data(), P); }
std::uint64_t zero_sum() {
  std::vector<std::byte> z(P);
  return fnv(z.data(), P);
}

// ---- an in-memory page source ---------------------------------------------------------------

class MemorySource final : public PageSource {
 public:
  MemorySource(std::size_t pages, std::set<std::size_t> zero = {}, std::set<std::size_t> failing = {})
      : zero_(std::move(zero)), failing_(std::move(failing)), data_(pages * P) {
    for (std::size_t i = 0; i < pages; ++i) {
      if (zero_.count(i) != 0) continue;
      auto b = page_bytes(i);
      std::memcpy(data_.data() + i * P, b.data(), P);
    }
  }
  void set_base(TaskId task, std::uint64_t base) { bases_[task] = base; }
  bool in_place = false;  // answer with a pointer (byte-addressable tier)
  std::chrono::microseconds delay{0};  // per fetch: a slow tier
  TierKind tier = TierKind::local;
  std::atomic<std::size_t> calls{0};
  bool concurrent = false;  // concurrent_fetch(): the engine may prefetch with several threads

  bool concurrent_fetch() const noexcept override { return concurrent; }
  std::set<std::thread::id> fetch_threads() const {
    std::lock_guard lock(threads_mutex_);
    return threads_;
  }

  Result<PageFill> fetch(TaskId task, std::uint64_t vaddr, std::size_t max_pages,
                         std::span<std::byte> buffer) override {
    ++calls;
    {
      std::lock_guard lock(threads_mutex_);
      threads_.insert(std::this_thread::get_id());
    }
    if (delay.count() > 0) std::this_thread::sleep_for(delay);
    auto it = bases_.find(task);
    const std::size_t total = data_.size() / P;
    if (it == bases_.end() || vaddr < it->second || (vaddr - it->second) / P >= total) {
      return PageFill{PageAnswer::zero, tier, 1, nullptr};  // outside the snapshot
    }
    const std::size_t idx = (vaddr - it->second) / P;
    if (failing_.count(idx) != 0) return fail(Errc::io, "injected failure at page " + std::to_string(idx));
    const bool zero = zero_.count(idx) != 0;
    std::size_t n = 1;
    while (n < max_pages && idx + n < total && failing_.count(idx + n) == 0 &&
           (zero_.count(idx + n) != 0) == zero) {
      ++n;
    }
    if (zero) return PageFill{PageAnswer::zero, tier, n, nullptr};
    if (in_place) return PageFill{PageAnswer::copy, tier, n, data_.data() + idx * P};
    std::memcpy(buffer.data(), data_.data() + idx * P, n * P);
    return PageFill{PageAnswer::copy, tier, n, nullptr};
  }

 private:
  std::set<std::size_t> zero_, failing_;
  std::vector<std::byte> data_;
  std::map<TaskId, std::uint64_t> bases_;
  mutable std::mutex threads_mutex_;
  std::set<std::thread::id> threads_;
};

// ---- the child process ----------------------------------------------------------------------

// In the child: sums of pages are sent to the parent as frames (u32 count, count x u64).
void send_frame(int sock, const std::vector<std::uint64_t>& v) {
  std::uint32_t n = static_cast<std::uint32_t>(v.size());
  if (::write(sock, &n, sizeof n) != sizeof n) ::_exit(40);
  const std::size_t bytes = v.size() * sizeof(std::uint64_t);
  if (bytes > 0 && ::write(sock, v.data(), bytes) != static_cast<ssize_t>(bytes)) ::_exit(41);
}

// Reads through a volatile pointer so that a discarded result still touches the page.
std::uint64_t read_sum(std::byte* page) {
  std::vector<std::byte> copy(P);
  const volatile std::byte* v = page;
  for (std::size_t i = 0; i < P; ++i) copy[i] = v[i];
  return fnv(copy.data(), P);
}

using ChildFn = std::function<void(std::byte* base, int sock)>;

struct Child {
  pid_t pid = -1;
  UniqueFd sock;
  std::uint64_t base = 0;
  int uffd = -1;
  int status = 0;
  bool exited = false;

  bool poll_exit() {
    if (exited) return true;
    if (::waitpid(pid, &status, WNOHANG) == pid) exited = true;
    return exited;
  }
  ~Child() {
    if (pid > 0 && !exited) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
    }
  }
};

// Forks a child that maps `pages` pages, makes a uffd (handshake in the child unless `raw`),
// registers the mapping (after the parent's go if `raw`), sends {base, uffd} over SCM_RIGHTS,
// waits for the parent's go byte and runs `fn`.
std::unique_ptr<Child> spawn(std::size_t pages, ChildFn fn, bool raw = false) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return nullptr;
  pid_t pid = ::fork();
  if (pid < 0) return nullptr;
  if (pid == 0) {
    ::close(sv[0]);
    const int sock = sv[1];
    ::alarm(10);  // never outlive a broken parent
    void* mem = ::mmap(nullptr, pages * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) ::_exit(30);
    auto fd = raw ? create_userfaultfd_raw() : create_userfaultfd(default_uffd_features());
    if (!fd) ::_exit(31);
    if (!raw && !register_missing(*fd, mem, pages * P)) ::_exit(32);
    const std::uint64_t base = reinterpret_cast<std::uint64_t>(mem);
    if (snaptier::testing::send_with_fd(sock, *fd, &base, sizeof base) != sizeof base) ::_exit(33);
    char go = 0;
    if (::read(sock, &go, 1) != 1) ::_exit(34);
    if (raw && !register_missing(*fd, mem, pages * P)) ::_exit(35);
    fn(static_cast<std::byte*>(mem), sock);
    ::_exit(0);
  }
  ::close(sv[1]);
  auto child = std::make_unique<Child>();
  child->pid = pid;
  child->sock = UniqueFd(sv[0]);
  child->uffd = snaptier::testing::receive_with_fd(child->sock.get(), &child->base, sizeof child->base, 5000);
  return child;
}

void go(Child& c) {
  char g = 'g';
  ASSERT_EQ(::write(c.sock.get(), &g, 1), 1);
}

// Serve until the child exits; then collect its frames.
std::vector<std::vector<std::uint64_t>> serve_to_exit(FaultEngine& engine, Child& c,
                                                      Result<void>* outcome = nullptr) {
  auto r = engine.run_until([&] { return c.poll_exit(); }, std::chrono::steady_clock::now() + kDeadline);
  if (outcome != nullptr) {
    *outcome = r;
    // a failed restore still must not leave the child hanging: wait for it, bounded
    auto until = std::chrono::steady_clock::now() + kDeadline;
    while (!c.poll_exit() && std::chrono::steady_clock::now() < until) {
      (void)engine.poll(5ms);
    }
  } else {
    EXPECT_TRUE(r.has_value()) << r.error().what();
  }
  std::vector<std::vector<std::uint64_t>> frames;
  for (;;) {
    std::uint32_t n = 0;
    if (::recv(c.sock.get(), &n, sizeof n, MSG_DONTWAIT) != sizeof n) break;
    std::vector<std::uint64_t> v(n);
    std::size_t got = 0;
    while (got < n * sizeof(std::uint64_t)) {
      ssize_t k = ::recv(c.sock.get(), reinterpret_cast<char*>(v.data()) + got, n * 8 - got, MSG_DONTWAIT);
      if (k <= 0) break;
      got += static_cast<std::size_t>(k);
    }
    frames.push_back(std::move(v));
  }
  return frames;
}

class FaultEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto fd = create_userfaultfd(default_uffd_features());
    if (!fd) GTEST_SKIP() << "userfaultfd unavailable: " << fd.error().what();
    ::close(*fd);
  }

  // spawn + adopt (with the child's pid unless pid_known is false)
  std::unique_ptr<Child> start(FaultEngine& engine, MemorySource& source, std::size_t pages,
                               ChildFn fn, bool pid_known = true, bool raw = false) {
    auto c = spawn(pages, std::move(fn), raw);
    if (!c || c->uffd < 0) {
      ADD_FAILURE() << "child setup failed";
      return c;
    }
    source.set_base(1, c->base);
    AdoptOptions o;
    o.pid = pid_known ? c->pid : 0;
    o.initialised = !raw;
    auto r = engine.adopt(1, c->uffd, o);
    EXPECT_TRUE(r.has_value()) << r.error().what();
    return c;
  }

  static std::unique_ptr<FaultEngine> make(std::shared_ptr<MemorySource> s, FaultEngineOptions o = {}) {
    auto e = FaultEngine::create(std::move(s), std::move(o));
    EXPECT_TRUE(e.has_value());
    return e ? std::move(*e) : nullptr;
  }
};

void expect_exit_ok(const Child& c) {
  ASSERT_TRUE(c.exited);
  EXPECT_TRUE(WIFEXITED(c.status)) << "status " << c.status;
  if (WIFEXITED(c.status)) {
    EXPECT_EQ(WEXITSTATUS(c.status), 0);
  }
}

// ---- tests ----------------------------------------------------------------------------------

TEST(RangeMap, TranslateAssignMove) {
  restore::RangeMap m;
  EXPECT_FALSE(m.translate(0x5000).zero);
  EXPECT_EQ(m.translate(0x5000).source, 0x5000u);
  m.assign(0x10000, 0x14000, restore::RangeMap::Kind::zero);  // REMOVE
  EXPECT_TRUE(m.translate(0x12000).zero);
  EXPECT_EQ(m.translate(0xF000).run_end, 0x10000u);
  // move [0x8000,0x18000) to 0x100000: identity part keeps old data, zero part stays zero
  m.move(0x8000, 0x100000, 0x10000);
  EXPECT_EQ(m.translate(0x100000).source, 0x8000u);
  EXPECT_TRUE(m.translate(0x108000).zero);   // was 0x10000 (removed)
  EXPECT_EQ(m.translate(0x10C000).source, 0x14000u);
  EXPECT_TRUE(m.translate(0x8000).zero);     // old range gone
  // move again: translations compose
  m.move(0x100000, 0x200000, 0x4000);
  EXPECT_EQ(m.translate(0x201000).source, 0x9000u);
  EXPECT_TRUE(m.translate(0x101000).zero);
}

TEST_F(FaultEngineTest, ReadWriteAndZeroFaultsServedFromSource) {
  auto source = std::make_shared<MemorySource>(32, std::set<std::size_t>{5, 20});
  auto engine = make(source);
  auto c = start(*engine, *source, 32, [](std::byte* base, int sock) {
    std::vector<std::uint64_t> sums;
    for (std::size_t i = 0; i < 16; ++i) sums.push_back(read_sum(base + i * P));
    for (std::size_t i = 16; i < 32; ++i) {
      base[i * P + 100] = std::byte{0x5A};  // write fault first
      sums.push_back(read_sum(base + i * P));
    }
    send_frame(sock, sums);
  });
  ASSERT_TRUE(c && c->uffd >= 0);
  go(*c);
  auto frames = serve_to_exit(*engine, *c);
  expect_exit_ok(*c);
  ASSERT_EQ(frames.size(), 1u);
  ASSERT_EQ(frames[0].size(), 32u);
  for (std::size_t i = 0; i < 32; ++i) {
    std::vector<std::byte> want = i == 5 || i == 20 ? std::vector<std::byte>(P) : page_bytes(i);
    if (i >= 16) want[100] = std::byte{0x5A};
    EXPECT_EQ(frames[0][i], fnv(want.data(), P)) << "page " << i;
  }
  const FaultMetrics& m = engine->metrics();
  EXPECT_EQ(m.faults, 32u);
  EXPECT_EQ(m.read_faults, 16u);
  EXPECT_EQ(m.write_faults, 16u);
  EXPECT_EQ(m.zero_filled_faults, 2u);
  EXPECT_EQ(m.pages_copied_per_tier.at(TierKind::local), 30u);
  EXPECT_EQ(m.bytes_copied, 30 * P);
  EXPECT_TRUE(m.first_fault_ns.has_value());
  EXPECT_EQ(m.errors, 0u);
  // the pidfd reports the exit (possibly a round after waitpid saw it)
  auto r = engine->run_until([&] { return engine->task_count() == 0; },
                             std::chrono::steady_clock::now() + kDeadline);
  EXPECT_TRUE(r.has_value());
  EXPECT_EQ(m.tasks_gone, 1u);
}

// spin_after_fault: the engine polls without sleeping for a moment after each fault, and only
// then. A task that pauses (here 300 ms after its faults) costs the engine no CPU meanwhile.
TEST_F(FaultEngineTest, TheSpinAfterAFaultIsBoundedAndOffWithZero) {
  for (auto spin : {FaultEngineOptions{}.spin_after_fault, std::chrono::microseconds(0)}) {
    SCOPED_TRACE(spin.count());
    auto source = std::make_shared<MemorySource>(8);
    FaultEngineOptions options;
    options.spin_after_fault = spin;
    auto engine = make(source, options);
    auto c = start(*engine, *source, 8, [](std::byte* base, int sock) {
      std::vector<std::uint64_t> sums;
      for (std::size_t i = 0; i < 8; ++i) sums.push_back(read_sum(base + i * P));
      ::usleep(300'000);
      send_frame(sock, sums);
    });
    ASSERT_TRUE(c && c->uffd >= 0);
    timespec t0{}, t1{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
    go(*c);
    auto frames = serve_to_exit(*engine, *c);
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
    expect_exit_ok(*c);
    ASSERT_EQ(frames.size(), 1u);
    for (std::size_t i = 0; i < 8; ++i) EXPECT_EQ(frames[0][i], fnv(page_bytes(i).data(), P)) << "page " << i;
    EXPECT_EQ(engine->metrics().faults, 8u);
    const double cpu_ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
    EXPECT_LT(cpu_ms, 100.0) << "the engine kept a core busy while its task slept for 300 ms";
  }
}

TEST_F(FaultEngineTest, ByteAddressableSourceCopiesFromItsPointer) {
  auto source = std::make_shared<MemorySource>(8);
  source->in_place = true;
  source->tier = TierKind::cxl;
  auto engine = make(source);
  auto c = start(*engine, *source, 8, [](std::byte* base, int sock) {
    std::vector<std::uint64_t> sums;
    for (std::size_t i = 0; i < 8; ++i) sums.push_back(read_sum(base + i * P));
    send_frame(sock, sums);
  });
  ASSERT_TRUE(c && c->uffd >= 0);
  go(*c);
  auto frames = serve_to_exit(*engine, *c);
  expect_exit_ok(*c);
  ASSERT_EQ(frames.size(), 1u);
  for (std::size_t i = 0; i < 8; ++i) EXPECT_EQ(frames[0][i], source_sum(i)) << i;
  EXPECT_EQ(engine->metrics().pages_copied_per_tier.at(TierKind::cxl), 8u);
}

TEST_F(FaultEngineTest, PrefetchedPagesCauseNoFaults) {
  auto source = std::make_shared<MemorySource>(64, std::set<std::size_t>{40});
  FaultEngineOptions o;
  o.prefetch_batch_pages = 16;
  auto engine = make(source, o);
  auto c = start(*engine, *source, 64, [](std::byte* base, int sock) {
    std::vector<std::uint64_t> sums;
    for (std::size_t i = 0; i < 64; ++i) sums.push_back(read_sum(base + i * P));
    send_frame(sock, sums);
  });
  ASSERT_TRUE(c && c->uffd >= 0);
  // pages 0..47 in two runs (0..31, 32..47 with zero page 40 inside), plus page 60
  std::vector<std::uint64_t> pages;
  for (std::size_t i = 0; i < 48; ++i) pages.push_back(c->base + i * P);
  pages.push_back(c->base + 60 * P);
  pages.push_back(c->base + 3 * P);  // duplicate
  auto r = engine->prefetch(1, pages);
  ASSERT_TRUE(r.has_value()) << r.error().what();
  EXPECT_EQ(r->pages_installed, 49u);
  // 0..31: 2 copies (batch 16); 32..39, 40 (zero), 41..47: 3 ioctls; 60: 1
  EXPECT_EQ(r->ioctls, 6u);
  EXPECT_EQ(engine->metrics().copy_ioctls, 5u);
  // installing again: everything already present (EEXIST), nothing copied twice
  auto again = engine->prefetch(1, std::vector<std::uint64_t>{c->base + 60 * P});
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->pages_present, 1u);
  go(*c);
  auto frames = serve_to_exit(*engine, *c);
  expect_exit_ok(*c);
  ASSERT_EQ(frames.size(), 1u);
  for (std::size_t i = 0; i < 64; ++i) {
    EXPECT_EQ(frames[0][i], i == 40 ? zero_sum() : source_sum(i)) << i;
  }
  const FaultMetrics& m = engine->metrics();
  EXPECT_EQ(m.faults, 64u - 49u);  // only the pages not prefetched faulted
  EXPECT_EQ(m.pages_prefetched, 49u);
  EXPECT_EQ(m.pages_demand, 15u);
  EXPECT_EQ(m.eexist, 1u);
}

// ---- parallel prefetch and zero runs --------------------------------------------------------

// Whether page `idx` of the child's mapping is present (/proc/PID/pagemap bit 63).
bool page_present(pid_t pid, std::uint64_t base, std::size_t idx) {
  UniqueFd fd(::open(("/proc/" + std::to_string(pid) + "/pagemap").c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return false;
  std::uint64_t entry = 0;
  const off_t off = static_cast<off_t>((base / P + idx) * sizeof entry);
  if (::pread(fd.get(), &entry, sizeof entry, off) != static_cast<ssize_t>(sizeof entry)) return false;
  return (entry >> 63) != 0;
}

// Prefetch on 4 threads whatever its size, in copies of 16 pages.
FaultEngineOptions parallel_options() {
  FaultEngineOptions o;
  o.prefetch_batch_pages = 16;
  o.prefetch_threads = 4;
  o.prefetch_parallel_min_pages = 2;
  return o;
}

ChildFn read_all(std::size_t pages) {
  return [pages](std::byte* base, int sock) {
    std::vector<std::uint64_t> sums;
    for (std::size_t i = 0; i < pages; ++i) sums.push_back(read_sum(base + i * P));
    send_frame(sock, sums);
  };
}

TEST_F(FaultEngineTest, ParallelPrefetchInstallsEveryPageWithTheRightBytes) {
  constexpr std::size_t kPages = 3000;
  std::set<std::size_t> zero;
  for (std::size_t i = 500; i < 700; ++i) zero.insert(i);  // a zero run across a slice boundary?
  zero.insert(1234);
  auto source = std::make_shared<MemorySource>(kPages, zero);
  source->concurrent = true;
  source->in_place = true;
  const FaultEngineOptions o = parallel_options();
  auto engine = make(source, o);
  auto c = start(*engine, *source, kPages, read_all(kPages));
  ASSERT_TRUE(c && c->uffd >= 0);
  // every page but each 7th, in a shuffled order with duplicates
  std::vector<std::uint64_t> pages;
  std::set<std::size_t> listed;
  for (std::size_t i = 0; i < kPages; ++i) {
    if (i % 7 == 3) continue;
    listed.insert(i);
    pages.push_back(c->base + ((i * 1237) % kPages) * P);
  }
  listed.clear();
  for (std::uint64_t a : pages) listed.insert((a - c->base) / P);
  pages.push_back(pages.front());
  const std::size_t before = testing::thread_count();
  auto r = engine->prefetch(1, pages);
  ASSERT_TRUE(r.has_value()) << r.error().what();
  EXPECT_EQ(testing::thread_count_settled(before), before);  // the workers are gone
  EXPECT_GT(source->fetch_threads().size(), 1u);  // it did run on several threads
  EXPECT_EQ(r->pages_installed, listed.size());
  EXPECT_EQ(r->pages_present, 0u);
  const FaultMetrics after_prefetch = engine->metrics();
  EXPECT_EQ(after_prefetch.pages_prefetched, listed.size());
  EXPECT_EQ(after_prefetch.copy_ioctls + after_prefetch.zeropage_ioctls, r->ioctls);
  std::size_t zero_listed = 0;
  for (std::size_t i : listed) zero_listed += zero.count(i);
  EXPECT_EQ(after_prefetch.pages_zero, zero_listed);
  EXPECT_EQ(after_prefetch.pages_copied_per_tier.at(TierKind::local), listed.size() - zero_listed);
  EXPECT_EQ(after_prefetch.bytes_copied, (listed.size() - zero_listed) * P);
  EXPECT_EQ(after_prefetch.faults, 0u);
  go(*c);
  auto frames = serve_to_exit(*engine, *c);
  expect_exit_ok(*c);
  ASSERT_EQ(frames.size(), 1u);
  ASSERT_EQ(frames[0].size(), kPages);
  for (std::size_t i = 0; i < kPages; ++i) {
    ASSERT_EQ(frames[0][i], zero.count(i) != 0 ? zero_sum() : source_sum(i)) << "page " << i;
  }
  const FaultMetrics& m = engine->metrics();
  EXPECT_EQ(m.faults, kPages - listed.size());  // only the pages not prefetched faulted
  EXPECT_EQ(m.pages_demand + m.pages_prefetched, kPages);
  EXPECT_EQ(m.errors, 0u);
}

TEST_F(FaultEngineTest, ParallelPrefetchCutsOneRunIntoEqualSlicesOfWholeBatches) {
  // 1024 contiguous pages on 4 threads: 4 slices of 256 pages, 16 copies of 16 pages each.
  constexpr std::size_t kPages = 1024;
  auto source = std::make_shared<MemorySource>(kPages);
  source->concurrent = true;
  const FaultEngineOptions o = parallel_options();
  auto engine = make(source, o);
  auto c = start(*engine, *source, kPages, read_all(kPages));
  ASSERT_TRUE(c && c->uffd >= 0);
  std::vector<std::uint64_t> pages;
  for (std::size_t i = 0; i < kPages; ++i) pages.push_back(c->base + i * P);
  auto r = engine->prefetch(1, pages);
  ASSERT_TRUE(r.has_value()) << r.error().what();
  EXPECT_EQ(r->pages_installed, kPages);
  EXPECT_EQ(engine->metrics().copy_ioctls, 64u);
  EXPECT_EQ(engine->metrics().pages_prefetched, kPages);
  EXPECT_EQ(source->calls.load(), 64u);  // the buffer-filling source: one fetch per copy
  go(*c);
  auto frames = serve_to_exit(*engine, *c);
  expect_exit_ok(*c);
  ASSERT_EQ(frames.size(), 1u);
  for (std::size_t i = 0; i < kPages; ++i) ASSERT_EQ(frames[0][i], source_sum(i)) << i;
  EXPECT_EQ(engine->metrics().faults, 0u);
}

TEST_F(FaultEngineTest, ASourceThatIsNotConcurrentIsNeverCalledFromTwoThreads) {
  constexpr std::size_t kPages = 2048;
  auto source = std::make_shared<MemorySource>(kPages);  // concurrent = false
  const FaultEngineOptions o = parallel_options();
  auto engine = make(source, o);
  auto c = start(*engine, *source, kPages, [](std::byte*, int) {});
  ASSERT_TRUE(c && c->uffd >= 0);
  std::vector<std::uint64_t> pages;
  for (std::size_t i = 0; i < kPages; ++i) pages.push_back(c->base + i * P);
  auto r = engine->prefetch(1, pages);
  ASSERT_TRUE(r.has_value()) << r.error().what();
  EXPECT_EQ(r->pages_installed, kPages);
  EXPECT_EQ(source->fetch_threads(), std::set<std::thread::id>{std::this_thread::get_id()});
}

TEST_F(FaultEngineTest, ZeroRunsAreInstalledAsOneZeropageRange) {
  // pages 0..299 zero (more than a batch of 16), 300..309 data, 310..399 zero
  constexpr std::size_t kPages = 400;
  std::set<std::size_t> zero;
  for (std::size_t i = 0; i < kPages; ++i) {
    if (i < 300 || i >= 310) zero.insert(i);
  }
  auto source = std::make_shared<MemorySource>(kPages, zero);
  FaultEngineOptions o;
  o.prefetch_batch_pages = 16;
  auto engine = make(source, o);
  auto c = start(*engine, *source, kPages, read_all(kPages));
  ASSERT_TRUE(c && c->uffd >= 0);
  std::vector<std::uint64_t> pages;
  for (std::size_t i = 0; i < kPages; ++i) pages.push_back(c->base + i * P);
  auto r = engine->prefetch(1, pages);
  ASSERT_TRUE(r.has_value()) << r.error().what();
  const FaultMetrics& m = engine->metrics();
  EXPECT_EQ(m.zeropage_ioctls, 2u);  // 0..299 and 310..399, each one range
  EXPECT_EQ(m.copy_ioctls, 1u);      // 300..309
  EXPECT_EQ(m.pages_zero, 390u);
  EXPECT_EQ(r->ioctls, 3u);
  EXPECT_EQ(r->pages_installed, kPages);
  go(*c);
  auto frames = serve_to_exit(*engine, *c);
  expect_exit_ok(*c);
  ASSERT_EQ(frames.size(), 1u);
  for (std::size_t i = 0; i < kPages; ++i) {
    ASSERT_EQ(frames[0][i], zero.count(i) != 0 ? zero_sum() : source_sum(i)) << i;
  }
  EXPECT_EQ(m.faults, 0u);
}

TEST_F(FaultEngineTest, ErrorInOneThreadFailsTheParallelPrefetchAndLeavesNothingHanging) {
  // 4 slices of 1024 pages; slice 1 starts with the failing page. The source is slow (0.2 ms
  // per fetch of 16 pages), so the other slices are stopped long before their end.
  constexpr std::size_t kPages = 4096, kBad = 1024;
  auto source = std::make_shared<MemorySource>(kPages, std::set<std::size_t>{}, std::set<std::size_t>{kBad});
  source->concurrent = true;
  source->delay = std::chrono::microseconds(200);
  FaultEngineOptions o = parallel_options();
  std::atomic<int> failures{0};
  o.on_failure = [&](const FaultFailure&) {
    ++failures;
    return false;
  };
  auto engine = make(source, o);
  auto c = start(*engine, *source, kPages, [](std::byte*, int) {});
  ASSERT_TRUE(c && c->uffd >= 0);
  std::vector<std::uint64_t> pages;
  for (std::size_t i = 0; i < kPages; ++i) pages.push_back(c->base + i * P);
  const std::size_t before = testing::thread_count();
  const auto t0 = std::chrono::steady_clock::now();
  auto r = engine->prefetch(1, pages);
  const auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message.find("page 1024"), std::string::npos) << r.error().what();
  EXPECT_EQ(testing::thread_count_settled(before), before);  // every worker joined
  ASSERT_TRUE(engine->failure().has_value());
  const FaultMetrics& m = engine->metrics();
  EXPECT_EQ(m.errors, 1u);
  EXPECT_EQ(failures.load(), 0);  // prefetch returns the error; the task is not running
  EXPECT_FALSE(page_present(c->pid, c->base, kBad));
  // stopped early: a full slice alone is 64 fetches = 12.8 ms and far more than this
  EXPECT_LT(m.pages_prefetched, kPages / 2);
  EXPECT_LT(took, std::chrono::seconds(2));
  // the counts are exact: every prefetched page is present, the rest are not
  std::size_t present = 0;
  for (std::size_t i = 0; i < kPages; ++i) present += page_present(c->pid, c->base, i) ? 1 : 0;
  EXPECT_EQ(present, m.pages_prefetched);
  EXPECT_EQ(m.copy_ioctls * 16, m.pages_prefetched);
}

TEST_F(FaultEngineTest, EngineDoesTheHandshakeOnARawUffd) {
  auto source = std::make_shared<MemorySource>(4);
  auto engine = make(source);
  auto c = start(*engine, *source, 4, [](std::byte* base, int sock) {
    std::vector<std::uint64_t> sums;
    for (std::size_t i = 0; i < 4; ++i) sums.push_back(read_sum(base + i * P));
    send_frame(sock, sums);
  }, true, /*raw=*/true);
  ASSERT_TRUE(c && c->uffd >= 0);
  go(*c);
  auto frames = serve_to_exit(*engine, *c);
  expect_exit_ok(*c);
  ASSERT_EQ(frames.size(), 1u);
  for (std::size_t i = 0; i < 4; ++i) EXPECT_EQ(frames[0][i], source_sum(i));
  EXPECT_EQ(engine->metrics().faults, 4u);
}

TEST_F(FaultEngineTest, ForkedGrandchildIsServedThroughTheAdoptedUffd) {
  auto source = std::make_shared<MemorySource>(16);
  std::vector<std::pair<TaskId, TaskId>> forks;
  FaultEngineOptions o;
  o.on_fork = [&](TaskId parent, TaskId child) { forks.emplace_back(parent, child); };
  auto engine = make(source, o);
  auto c = start(*engine, *source, 16, [](std::byte* base, int sock) {
    std::uint64_t before = read_sum(base);  // page 0 present before the fork
    pid_t gc = ::fork();
    if (gc < 0) ::_exit(50);
    if (gc == 0) {
      std::vector<std::uint64_t> sums;
      for (std::size_t i = 0; i < 8; ++i) sums.push_back(read_sum(base + i * P));
      base[9 * P] = std::byte{1};  // a write fault in the grandchild
      send_frame(sock, sums);
      ::_exit(0);
    }
    int st = 0;
    if (::waitpid(gc, &st, 0) != gc || !WIFEXITED(st) || WEXITSTATUS(st) != 0) ::_exit(51);
    std::vector<std::uint64_t> sums{before};
    for (std::size_t i = 8; i < 16; ++i) sums.push_back(read_sum(base + i * P));
    send_frame(sock, sums);
  });
  ASSERT_TRUE(c && c->uffd >= 0);
  go(*c);
  auto frames = serve_to_exit(*engine, *c);
  expect_exit_ok(*c);
  ASSERT_EQ(frames.size(), 2u);
  ASSERT_EQ(frames[0].size(), 8u);
  for (std::size_t i = 0; i < 8; ++i) EXPECT_EQ(frames[0][i], source_sum(i)) << "grandchild page " << i;
  ASSERT_EQ(frames[1].size(), 9u);
  EXPECT_EQ(frames[1][0], source_sum(0));
  for (std::size_t i = 8; i < 16; ++i) EXPECT_EQ(frames[1][i - 7], source_sum(i)) << "child page " << i;
  const FaultMetrics& m = engine->metrics();
  EXPECT_EQ(m.events_fork, 1u);
  ASSERT_EQ(forks.size(), 1u);
  EXPECT_EQ(forks[0].first, 1);
  EXPECT_EQ(m.tasks_adopted, 2u);
  // child: page 0 + pages 8..15; grandchild: pages 1..7 + 9 (its own copy of the mm)
  EXPECT_EQ(m.faults, 9u + 8u);
  EXPECT_EQ(m.write_faults, 1u);
  EXPECT_EQ(m.errors, 0u);
}

TEST_F(FaultEngineTest, MremapFaultsAtTheNewAddressGetTheOldAddressData) {
  auto source = std::make_shared<MemorySource>(16);
  auto engine = make(source);
  auto c = start(*engine, *source, 16, [](std::byte* base, int sock) {
    std::vector<std::uint64_t> sums;
    sums.push_back(read_sum(base + 8 * P));  // present before the move
    void* hole = ::mmap(nullptr, 8 * P, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (hole == MAP_FAILED) ::_exit(60);
    void* moved = ::mremap(base + 8 * P, 8 * P, 8 * P, MREMAP_MAYMOVE | MREMAP_FIXED, hole);
    if (moved != hole) ::_exit(61);
    auto* m = static_cast<std::byte*>(moved);
    for (std::size_t i = 0; i < 8; ++i) sums.push_back(read_sum(m + i * P));
    sums.push_back(read_sum(base));
    send_frame(sock, sums);
  });
  ASSERT_TRUE(c && c->uffd >= 0);
  go(*c);
  auto frames = serve_to_exit(*engine, *c);
  expect_exit_ok(*c);
  ASSERT_EQ(frames.size(), 1u);
  ASSERT_EQ(frames[0].size(), 10u);
  EXPECT_EQ(frames[0][0], source_sum(8));
  for (std::size_t i = 0; i < 8; ++i) EXPECT_EQ(frames[0][1 + i], source_sum(8 + i)) << "moved page " << i;
  EXPECT_EQ(frames[0][9], source_sum(0));
  const FaultMetrics& m = engine->metrics();
  EXPECT_EQ(m.events_remap, 1u);
  EXPECT_EQ(m.faults, 1u + 7u + 1u);  // page 8 moved with its contents
  EXPECT_EQ(m.errors, 0u);
}

TEST_F(FaultEngineTest, MunmapDropsTheRange) {
  auto source = std::make_shared<MemorySource>(32);
  auto engine = make(source);
  auto c = start(*engine, *source, 32, [](std::byte* base, int sock) {
    std::vector<std::uint64_t> sums{read_sum(base)};
    if (::munmap(base + 16 * P, 16 * P) != 0) ::_exit(70);
    for (std::size_t i = 1; i < 4; ++i) sums.push_back(read_sum(base + i * P));
    send_frame(sock, sums);
  }, /*pid_known=*/false);
  ASSERT_TRUE(c && c->uffd >= 0);
  go(*c);
  auto frames = serve_to_exit(*engine, *c);
  expect_exit_ok(*c);
  ASSERT_EQ(frames.size(), 1u);
  for (std::size_t i = 0; i < 4; ++i) EXPECT_EQ(frames[0][i], source_sum(i));
  EXPECT_EQ(engine->metrics().events_unmap, 1u);
  EXPECT_EQ(engine->metrics().faults, 4u);
  EXPECT_EQ(engine->metrics().errors, 0u);
}

TEST_F(FaultEngineTest, MadviseDontneedMakesLaterFaultsZeroFilled) {
  auto source = std::make_shared<MemorySource>(8);
  auto engine = make(source);
  auto c = start(*engine, *source, 8, [](std::byte* base, int sock) {
    std::vector<std::uint64_t> sums;
    for (std::size_t i = 0; i < 4; ++i) sums.push_back(read_sum(base + i * P));
    if (::madvise(base, 4 * P, MADV_DONTNEED) != 0) ::_exit(80);
    for (std::size_t i = 0; i < 4; ++i) sums.push_back(read_sum(base + i * P));
    sums.push_back(read_sum(base + 4 * P));
    send_frame(sock, sums);
  });
  ASSERT_TRUE(c && c->uffd >= 0);
  go(*c);
  auto frames = serve_to_exit(*engine, *c);
  expect_exit_ok(*c);
  ASSERT_EQ(frames.size(), 1u);
  ASSERT_EQ(frames[0].size(), 9u);
  for (std::size_t i = 0; i < 4; ++i) EXPECT_EQ(frames[0][i], source_sum(i));
  for (std::size_t i = 4; i < 8; ++i) EXPECT_EQ(frames[0][i], zero_sum()) << "removed page " << i - 4;
  EXPECT_EQ(frames[0][8], source_sum(4));
  const FaultMetrics& m = engine->metrics();
  EXPECT_EQ(m.events_remove, 1u);
  EXPECT_EQ(m.faults, 9u);
  EXPECT_EQ(m.zero_filled_faults, 4u);
  EXPECT_EQ(m.pages_copied_per_tier.at(TierKind::local), 5u);
}

TEST_F(FaultEngineTest, SourceErrorFailsTheRestoreAndKillsTheFaultingTask) {
  auto source = std::make_shared<MemorySource>(8, std::set<std::size_t>{}, std::set<std::size_t>{3});
  std::vector<FaultFailure> failures;
  FaultEngineOptions o;
  o.on_failure = [&](const FaultFailure& f) {
    failures.push_back(f);
    return ::kill(f.pid, SIGKILL) == 0;
  };
  auto engine = make(source, o);
  auto c = start(*engine, *source, 8, [](std::byte* base, int sock) {
    std::vector<std::uint64_t> sums{read_sum(base)};
    send_frame(sock, sums);
    (void)read_sum(base + 3 * P);  // never returns
    ::_exit(90);
  }, /*pid_known=*/false);  // the pid comes from UFFD_FEATURE_THREAD_ID
  ASSERT_TRUE(c && c->uffd >= 0);
  go(*c);
  Result<void> outcome;
  auto start_t = std::chrono::steady_clock::now();
  auto frames = serve_to_exit(*engine, *c, &outcome);
  EXPECT_LT(std::chrono::steady_clock::now() - start_t, 3s);
  ASSERT_FALSE(outcome.has_value());
  EXPECT_EQ(outcome.error().code, Errc::io);
  EXPECT_NE(outcome.error().message.find("injected"), std::string::npos) << outcome.error().message;
  ASSERT_TRUE(c->exited);
  EXPECT_TRUE(WIFSIGNALED(c->status));
  EXPECT_EQ(WTERMSIG(c->status), SIGKILL);
  ASSERT_EQ(failures.size(), 1u);
  EXPECT_EQ(failures[0].pid, c->pid);
  EXPECT_EQ(failures[0].task, 1);
  EXPECT_EQ(failures[0].address, c->base + 3 * P);
  EXPECT_EQ(engine->metrics().errors, 1u);
  ASSERT_TRUE(engine->failure().has_value());
  EXPECT_EQ(engine->task_count(), 0u);
  ASSERT_EQ(frames.size(), 1u);
  EXPECT_EQ(frames[0][0], source_sum(0));
}

TEST_F(FaultEngineTest, DefaultFailurePolicyKillsAKnownPid) {
  auto source = std::make_shared<MemorySource>(4, std::set<std::size_t>{}, std::set<std::size_t>{0});
  auto engine = make(source);
  auto c = start(*engine, *source, 4, [](std::byte* base, int) {
    (void)read_sum(base);
    ::_exit(91);
  });
  ASSERT_TRUE(c && c->uffd >= 0);
  go(*c);
  Result<void> outcome;
  serve_to_exit(*engine, *c, &outcome);
  EXPECT_FALSE(outcome.has_value());
  ASSERT_TRUE(c->exited);
  EXPECT_TRUE(WIFSIGNALED(c->status) && WTERMSIG(c->status) == SIGKILL) << c->status;
}

TEST_F(FaultEngineTest, ChildExitingMidRestoreIsDropped) {
  // with a pid: the pidfd reports the exit while background work is still queued
  {
    auto source = std::make_shared<MemorySource>(256);
    FaultEngineOptions o;
    o.background_batch_pages = 1;  // slow on purpose: the child exits long before it is done
    auto engine = make(source, o);
    auto c = start(*engine, *source, 256, [](std::byte* base, int sock) {
      send_frame(sock, {read_sum(base + 200 * P)});
    });
    ASSERT_TRUE(c && c->uffd >= 0);
    std::vector<std::uint64_t> pages;
    for (std::size_t i = 0; i < 256; ++i) pages.push_back(c->base + i * P);
    ASSERT_TRUE(engine->prefetch_in_background(1, pages).has_value());
    go(*c);
    auto r = engine->run_until([&] { return engine->task_count() == 0; },
                               std::chrono::steady_clock::now() + kDeadline);
    ASSERT_TRUE(r.has_value()) << r.error().what();
    auto until = std::chrono::steady_clock::now() + kDeadline;
    while (!c->poll_exit() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
    expect_exit_ok(*c);
    EXPECT_EQ(engine->background_pending(), 0u);
    EXPECT_EQ(engine->metrics().tasks_gone, 1u);
    EXPECT_EQ(engine->metrics().errors, 0u);
    EXPECT_FALSE(engine->failure().has_value());
  }
  // without a pid: the next ioctl sees ESRCH and drops the task
  {
    auto source = std::make_shared<MemorySource>(16);
    auto engine = make(source);
    auto c = start(*engine, *source, 16, [](std::byte* base, int sock) {
      send_frame(sock, {read_sum(base)});
    }, /*pid_known=*/false);
    ASSERT_TRUE(c && c->uffd >= 0);
    go(*c);
    serve_to_exit(*engine, *c);
    expect_exit_ok(*c);
    EXPECT_EQ(engine->task_count(), 1u);  // nothing told the engine yet
    std::vector<std::uint64_t> pages{c->base + 5 * P};
    auto r = engine->prefetch(1, pages);
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code, Errc::unavailable);
    EXPECT_EQ(engine->task_count(), 0u);
    EXPECT_FALSE(engine->failure().has_value());
  }
}

TEST_F(FaultEngineTest, BackgroundPrefetchInterleavesWithDemandFaults) {
  constexpr std::size_t kPages = 512;
  auto source = std::make_shared<MemorySource>(kPages);
  source->delay = std::chrono::microseconds(500);  // background alone needs >= 32 ms
  FaultEngineOptions o;
  o.background_batch_pages = 8;
  auto engine = make(source, o);
  auto c = start(*engine, *source, kPages, [](std::byte* base, int sock) {
    std::vector<std::uint64_t> sums(kPages);
    for (std::size_t i = kPages; i-- > 0;) sums[i] = read_sum(base + i * P);  // against the queue
    send_frame(sock, sums);
  });
  ASSERT_TRUE(c && c->uffd >= 0);
  std::vector<std::uint64_t> pages;
  for (std::size_t i = 0; i < kPages; ++i) pages.push_back(c->base + i * P);
  ASSERT_TRUE(engine->prefetch_in_background(1, pages).has_value());
  go(*c);
  auto frames = serve_to_exit(*engine, *c);
  expect_exit_ok(*c);
  ASSERT_EQ(frames.size(), 1u);
  for (std::size_t i = 0; i < kPages; ++i) ASSERT_EQ(frames[0][i], source_sum(i)) << i;
  const FaultMetrics& m = engine->metrics();
  EXPECT_EQ(m.pages_demand + m.pages_background, kPages);  // each page installed exactly once
  EXPECT_GT(m.pages_background, 0u);
  EXPECT_GT(m.faults, 0u);
  EXPECT_EQ(m.errors, 0u);
}

TEST_F(FaultEngineTest, OnFaultSeesEveryFaultWithItsWriteFlagAndSourceAddress) {
  auto source = std::make_shared<MemorySource>(16);
  source->tier = TierKind::cxl;
  std::vector<FaultObservation> seen;
  FaultEngineOptions o;
  o.on_fault = [&](const FaultObservation& f) { seen.push_back(f); };
  auto engine = make(source, o);
  auto c = start(*engine, *source, 16, [](std::byte* base, int sock) {
    std::vector<std::uint64_t> out;
    for (std::size_t i = 0; i < 4; ++i) out.push_back(read_sum(base + i * P));  // read faults
    for (std::size_t i = 4; i < 8; ++i) base[i * P + 1] = std::byte{0x11};      // write faults
    if (::madvise(base, 2 * P, MADV_DONTNEED) != 0) ::_exit(80);
    out.push_back(read_sum(base));  // a removed range: zero, no snapshot page behind it
    void* hole = ::mmap(nullptr, 4 * P, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (hole == MAP_FAILED) ::_exit(81);
    void* moved = ::mremap(base + 8 * P, 4 * P, 4 * P, MREMAP_MAYMOVE | MREMAP_FIXED, hole);
    if (moved != hole) ::_exit(82);
    out.push_back(reinterpret_cast<std::uint64_t>(moved));
    out.push_back(read_sum(static_cast<std::byte*>(moved) + P));  // snapshot page 9 at a new address
    send_frame(sock, out);
  });
  ASSERT_TRUE(c && c->uffd >= 0);
  go(*c);
  auto frames = serve_to_exit(*engine, *c);
  expect_exit_ok(*c);
  ASSERT_EQ(frames.size(), 1u);
  ASSERT_EQ(frames[0].size(), 7u);
  EXPECT_EQ(frames[0][4], zero_sum());
  EXPECT_EQ(frames[0][6], source_sum(9));
  const std::uint64_t moved = frames[0][5];

  // The MADV_DONTNEED is seen too, as a discard of the snapshot's pages 0 and 1, between the
  // write faults and the fault that follows it; and the mremap, as a move of the snapshot's
  // pages 8-11 as they were before it, between that fault and the one at the new address.
  ASSERT_EQ(seen.size(), 12u);
  EXPECT_EQ(seen[8].discarded_bytes, 2 * P);
  EXPECT_EQ(seen[8].remapped_bytes, 0u);
  EXPECT_EQ(seen[8].address, c->base);
  ASSERT_TRUE(seen[8].source_address.has_value());
  EXPECT_EQ(*seen[8].source_address, c->base);
  EXPECT_EQ(seen[10].remapped_bytes, 4 * P);
  EXPECT_EQ(seen[10].discarded_bytes, 0u);
  EXPECT_EQ(seen[10].address, c->base + 8 * P);
  ASSERT_TRUE(seen[10].source_address.has_value());
  EXPECT_EQ(*seen[10].source_address, c->base + 8 * P);
  seen.erase(seen.begin() + 10);
  seen.erase(seen.begin() + 8);
  EXPECT_EQ(seen.size(), engine->metrics().faults);
  for (const auto& f : seen) EXPECT_EQ(f.discarded_bytes + f.remapped_bytes, 0u);
  for (std::size_t i = 0; i < 8; ++i) {
    SCOPED_TRACE("fault " + std::to_string(i));
    EXPECT_EQ(seen[i].task, 1);
    EXPECT_EQ(seen[i].source_task, 1);
    EXPECT_EQ(seen[i].address, c->base + i * P);
    ASSERT_TRUE(seen[i].source_address.has_value());
    EXPECT_EQ(*seen[i].source_address, c->base + i * P);
    EXPECT_EQ(seen[i].write, i >= 4);
  }
  EXPECT_EQ(seen[8].address, c->base);
  EXPECT_FALSE(seen[8].source_address.has_value()) << "a removed range has no snapshot page";
  EXPECT_FALSE(seen[8].write);
  EXPECT_EQ(seen[9].address, moved + P);
  ASSERT_TRUE(seen[9].source_address.has_value());
  EXPECT_EQ(*seen[9].source_address, c->base + 9 * P);
  EXPECT_FALSE(seen[9].write);
  // Only faults that copied count as demand pages of the tier (the removed page was zero-filled).
  EXPECT_EQ(engine->metrics().demand_pages_per_tier.at(TierKind::cxl), 9u);
  EXPECT_EQ(engine->metrics().write_faults, 4u);
}

TEST_F(FaultEngineTest, MetricsAsJson) {
  FaultMetrics m;
  m.faults = 3;
  m.read_faults = 2;
  m.write_faults = 1;
  m.pages_copied_per_tier[TierKind::cxl] = 2;
  m.demand_pages_per_tier[TierKind::rdma] = 1;
  m.first_fault_ns = 42;
  m.error_messages.push_back("io: x");
  nlohmann::json j = m;
  EXPECT_EQ(j["faults"]["total"], 3);
  EXPECT_EQ(j["faults"]["write"], 1);
  EXPECT_EQ(j["pages"]["copied_per_tier"]["cxl"], 2);
  EXPECT_EQ(j["pages"]["demand_per_tier"]["rdma"], 1);
  EXPECT_EQ(j["first_fault_ns"], 42);
  EXPECT_EQ(j["errors"]["messages"][0], "io: x");
  EXPECT_TRUE(j.contains("events"));
}

// Not a benchmark harness, but the numbers the design doc quotes: N pages touched by demand
// faults vs installed by prefetch before resume.
TEST_F(FaultEngineTest, DemandVersusPrefetchTiming) {
  constexpr std::size_t kPages = 4096;  // 16 MiB
  auto touch_all = [](std::byte* base, int sock) {
    auto t0 = std::chrono::steady_clock::now();
    std::uint64_t acc = 0;
    for (std::size_t i = 0; i < kPages; ++i) acc += static_cast<std::uint8_t>(base[i * P]);
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
    send_frame(sock, {static_cast<std::uint64_t>(ns), acc});
  };
  std::uint64_t demand_ns = 0, prefetch_ns = 0, touch_after_prefetch_ns = 0;
  {
    auto source = std::make_shared<MemorySource>(kPages);
    auto engine = make(source);
    auto c = start(*engine, *source, kPages, touch_all);
    ASSERT_TRUE(c && c->uffd >= 0);
    go(*c);
    auto frames = serve_to_exit(*engine, *c);
    expect_exit_ok(*c);
    ASSERT_EQ(frames.size(), 1u);
    demand_ns = frames[0][0];
    EXPECT_EQ(engine->metrics().faults, kPages);
  }
  {
    auto source = std::make_shared<MemorySource>(kPages);
    auto engine = make(source);
    auto c = start(*engine, *source, kPages, touch_all);
    ASSERT_TRUE(c && c->uffd >= 0);
    std::vector<std::uint64_t> pages;
    for (std::size_t i = 0; i < kPages; ++i) pages.push_back(c->base + i * P);
    auto r = engine->prefetch(1, pages);
    ASSERT_TRUE(r.has_value());
    prefetch_ns = r->elapsed_ns;
    go(*c);
    auto frames = serve_to_exit(*engine, *c);
    expect_exit_ok(*c);
    ASSERT_EQ(frames.size(), 1u);
    touch_after_prefetch_ns = frames[0][0];
    EXPECT_EQ(engine->metrics().faults, 0u);
  }
  const double faults_per_s = static_cast<double>(kPages) * 1e9 / static_cast<double>(demand_ns);
  std::printf("[ numbers  ] %zu pages: demand %.2f ms (%.0f faults/s, %.1f us/fault); prefetch %.2f ms "
              "+ touch %.2f ms\n",
              kPages, demand_ns / 1e6, faults_per_s, demand_ns / 1e3 / kPages, prefetch_ns / 1e6,
              touch_after_prefetch_ns / 1e6);
  RecordProperty("demand_faults_per_s", static_cast<int>(faults_per_s));
  RecordProperty("prefetch_us", static_cast<int>(prefetch_ns / 1000));
}

}  // namespace
}  // namespace snaptier
