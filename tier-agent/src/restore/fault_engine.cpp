// The userfaultfd fault engine (see snaptier/fault_engine.hpp and docs/fault-engine.md).
#include "snaptier/fault_engine.hpp"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <cstdio>
#include <deque>
#include <string>
#include <thread>
#include <nlohmann/json.hpp>

#include "core/unique_fd.hpp"
#include "restore/range_map.hpp"

namespace snaptier {

namespace {

using detail::UniqueFd;
using detail::UniqueMapping;
using restore::RangeMap;

constexpr std::uint64_t kPidfdBit = 1ull << 63;
constexpr std::size_t kMaxErrorMessages = 16;
constexpr std::uint64_t kPageMask = ~(kPageSize - 1);

std::uint64_t now_ns() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::steady_clock::now().time_since_epoch())
                                        .count());
}

enum class Origin : std::uint8_t { demand, prefetch, background };

enum class Status : std::uint8_t {
  ok,        // every page installed (or already present)
  again,     // EAGAIN: the mm is changing; read the uffd's events, then retry
  gone,      // ESRCH: the task's mm is gone
  vanished,  // ENOENT: the range is no longer registered; faulters were woken
  failed,    // source error or unexpected ioctl error (in `error`)
};

struct Outcome {
  Status status = Status::ok;
  std::size_t done_pages = 0;  // pages handled (installed or present) before `status`
  std::size_t zero_pages = 0;
  std::size_t present_pages = 0;
  std::size_t ioctls = 0;
  Error error{Errc::io, {}};
};

// A contiguous piece of a prefetch: `pages` pages from `addr`.
struct Run {
  std::uint64_t addr = 0;
  std::size_t pages = 0;
};

// Adds the installation counters of `d` (what fill() and account() touch) to `into`.
void add_install_counts(FaultMetrics& into, const FaultMetrics& d) {
  for (const auto& [tier, n] : d.pages_copied_per_tier) into.pages_copied_per_tier[tier] += n;
  for (const auto& [tier, n] : d.demand_pages_per_tier) into.demand_pages_per_tier[tier] += n;
  into.pages_demand += d.pages_demand;
  into.pages_prefetched += d.pages_prefetched;
  into.pages_background += d.pages_background;
  into.pages_zero += d.pages_zero;
  into.bytes_copied += d.bytes_copied;
  into.copy_ioctls += d.copy_ioctls;
  into.zeropage_ioctls += d.zeropage_ioctls;
  into.eexist += d.eexist;
  into.enoent += d.enoent;
}

// The runs of sorted, unique page addresses.
std::vector<Run> runs_of(const std::vector<std::uint64_t>& sorted) {
  std::vector<Run> runs;
  for (std::size_t i = 0; i < sorted.size();) {
    std::size_t j = i + 1;
    while (j < sorted.size() && sorted[j] == sorted[j - 1] + kPageSize) ++j;
    runs.push_back(Run{sorted[i], j - i});
    i = j;
  }
  return runs;
}

// Cuts `runs` into `k` lists of contiguous address order with about equal page counts (long
// runs are split).
std::vector<std::vector<Run>> slices_of(const std::vector<Run>& runs, std::size_t total, std::size_t k) {
  std::vector<std::vector<Run>> out(k);
  const std::size_t per = (total + k - 1) / k;
  std::size_t slice = 0, filled = 0;
  for (Run r : runs) {
    while (r.pages > 0) {
      if (filled == per && slice + 1 < k) {
        ++slice;
        filled = 0;
      }
      const std::size_t n = slice + 1 < k ? std::min(r.pages, per - filled) : r.pages;
      out[slice].push_back(Run{r.addr, n});
      filled += n;
      r.addr += n * kPageSize;
      r.pages -= n;
    }
  }
  return out;
}

struct PendingFault {
  std::uint64_t addr = 0;
  pid_t tid = 0;
  std::uint64_t first_ns = 0;
};

struct Task {
  std::uint64_t key = 0;
  TaskId id = 0;
  TaskId source_task = 0;
  UniqueFd uffd;
  UniqueFd pidfd;
  pid_t pid = 0;
  RangeMap view;
  std::vector<PendingFault> retry;
  std::deque<std::uint64_t> background;
  bool dead = false;    // reaped at the end of the poll round
  bool failed = false;  // a fault failed and the task could not be killed: faults not served
};

class Engine final : public FaultEngine {
 public:
  Engine(std::shared_ptr<PageSource> source, FaultEngineOptions options, UniqueFd epoll,
         UniqueMapping buffer)
      : source_(std::move(source)),
        options_(std::move(options)),
        epoll_(std::move(epoll)),
        buffer_(std::move(buffer)),
        created_ns_(now_ns()) {}

  Result<void> adopt(TaskId id, int uffd, AdoptOptions options) override {
    UniqueFd fd(uffd);
    if (!fd) return fail(Errc::invalid_argument, "adopt: no uffd");
    if (ids_.count(id) != 0) return fail(Errc::already_exists, "adopt: task " + std::to_string(id));
    if (!options.initialised) {
      uffdio_api api{};
      api.api = UFFD_API;
      api.features = default_uffd_features();
      if (::ioctl(fd.get(), UFFDIO_API, &api) != 0) {
        return fail_errno(Errc::unsupported, "adopt: UFFDIO_API", errno);
      }
    }
    if (auto r = set_nonblock(fd.get()); !r) return tl::unexpected(r.error());
    UniqueFd pidfd;
    if (options.pid > 0) {
#ifdef SYS_pidfd_open
      int p = static_cast<int>(::syscall(SYS_pidfd_open, options.pid, 0));
      if (p < 0 && errno == ESRCH) return fail(Errc::not_found, "adopt: pid " + std::to_string(options.pid) + " is gone");
      pidfd = UniqueFd(p);  // ENOSYS: exit is noticed by ESRCH instead
#endif
    }
    Task& t = add_task(id, options.source_task.value_or(id), std::move(fd), RangeMap{});
    t.pid = options.pid;
    if (auto r = watch(t.uffd.get(), t.key); !r) {
      t.dead = true;
      reap();
      return r;
    }
    if (pidfd) {
      t.pidfd = std::move(pidfd);
      if (auto r = watch(t.pidfd.get(), t.key | kPidfdBit); !r) t.pidfd.reset();
    }
    return {};
  }

  Result<void> forget(TaskId id) override {
    Task* t = find(id);
    if (t == nullptr) return fail(Errc::not_found, "forget: task " + std::to_string(id));
    mark_gone(*t);
    reap();
    return {};
  }

  Result<PrefetchReport> prefetch(TaskId id, std::span<const std::uint64_t> pages) override {
    Task* t = find(id);
    if (t == nullptr) return fail(Errc::not_found, "prefetch: task " + std::to_string(id));
    const std::uint64_t start = now_ns();
    PrefetchReport report;
    std::vector<std::uint64_t> sorted = normalise(pages);
    std::vector<Run> runs = runs_of(sorted);
    if (parallel_threads(sorted.size()) > 1) {
      auto left = prefetch_parallel(*t, runs, sorted.size(), report);
      if (!left) return tl::unexpected(left.error());
      runs = std::move(*left);
    }
    for (const Run& run : runs) {
      std::uint64_t addr = run.addr;
      std::size_t left = run.pages;
      const std::uint64_t deadline = now_ns() + eagain_ns();
      while (left > 0) {
        Outcome o = install(*t, addr, left, Origin::prefetch, buffer_.data(), metrics_);
        report.ioctls += o.ioctls;
        report.pages_present += o.present_pages;
        report.pages_installed += o.done_pages - o.present_pages;
        addr += o.done_pages * kPageSize;
        left -= o.done_pages;
        if (o.status == Status::ok || o.status == Status::vanished) break;
        if (o.status == Status::gone) {
          mark_gone(*t);
          reap();
          return fail(Errc::unavailable, "prefetch: task " + std::to_string(id) + " is gone");
        }
        if (o.status == Status::failed) {
          record_error(o.error);
          if (!failure_) failure_ = o.error;
          return tl::unexpected(o.error);
        }
        // again: consume the events that changed the mapping, then retry
        ++metrics_.eagain_retries;
        drain(*t);
        if (t->dead) {
          reap();
          return fail(Errc::unavailable, "prefetch: task " + std::to_string(id) + " is gone");
        }
        if (now_ns() > deadline) return fail(Errc::timeout, "prefetch: mapping kept changing");
      }
    }
    report.elapsed_ns = now_ns() - start;
    return report;
  }

  Result<void> prefetch_in_background(TaskId id, std::vector<std::uint64_t> pages) override {
    Task* t = find(id);
    if (t == nullptr) return fail(Errc::not_found, "prefetch_in_background: task " + std::to_string(id));
    for (std::uint64_t p : normalise(pages)) t->background.push_back(p);
    return {};
  }

  Result<void> poll(std::chrono::milliseconds max_wait) override {
    retry_pending();
    const bool busy = background_pending() > 0 || any_retry();
    int timeout = busy ? 0 : static_cast<int>(std::clamp<std::int64_t>(max_wait.count(), 0, 60'000));
    epoll_event events[64];
    int n = 0;
    const auto spin_ns = static_cast<std::uint64_t>(options_.spin_after_fault.count()) * 1000;
    if (timeout > 0 && spin_ns > 0 && last_fault_served_ns_ != 0) {
      const std::uint64_t until = last_fault_served_ns_ + spin_ns;
      // Yielding between checks leaves the core to any other runnable thread (the faulting
      // task's siblings, CRIU) rather than holding it for the whole spin.
      while ((n = ::epoll_wait(epoll_.get(), events, 64, 0)) == 0 && now_ns() < until) ::sched_yield();
    }
    if (n == 0) n = ::epoll_wait(epoll_.get(), events, 64, timeout);
    if (n < 0) {
      if (errno != EINTR) return fail_errno(Errc::io, "epoll_wait", errno);
      n = 0;
    }
    // Demand first: every ready uffd is drained (faults served, events applied) ...
    for (int i = 0; i < n; ++i) {
      const std::uint64_t key = events[i].data.u64;
      auto it = tasks_.find(key & ~kPidfdBit);
      if (it == tasks_.end() || it->second->dead) continue;
      if ((key & kPidfdBit) != 0) {
        // The process exited. Serve what it left queued (it may be a thread of a live group
        // in theory; pidfds are process-wide, so not), then drop it.
        mark_gone(*it->second);
      } else {
        drain(*it->second);
      }
    }
    retry_pending();
    // ... before one background batch.
    background_round();
    reap();
    return {};
  }

  Result<void> run_until(const std::function<bool()>& done,
                         std::chrono::steady_clock::time_point deadline) override {
    for (;;) {
      if (failure_) return tl::unexpected(*failure_);
      if (done && done()) return {};
      auto now = std::chrono::steady_clock::now();
      if (now >= deadline) return fail(Errc::timeout, "fault engine: deadline passed");
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now);
      if (auto r = poll(std::min(left, std::chrono::milliseconds(10))); !r) return r;
    }
  }

  int wait_fd() const noexcept override { return epoll_.get(); }
  bool work_pending() const noexcept override { return background_pending() > 0 || any_retry(); }
  std::optional<Error> failure() const override { return failure_; }
  std::size_t task_count() const noexcept override { return tasks_.size(); }
  std::vector<TaskId> tasks() const override {
    std::vector<TaskId> out;
    for (const auto& [id, key] : ids_) out.push_back(id);
    return out;
  }
  std::size_t background_pending() const noexcept override {
    std::size_t n = 0;
    for (const auto& [key, t] : tasks_) n += t->background.size();
    return n;
  }
  const FaultMetrics& metrics() const noexcept override { return metrics_; }

 private:
  static Result<void> set_nonblock(int fd) {
    int flags = ::fcntl(fd, F_GETFL);
    if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
      return fail_errno(Errc::io, "fcntl O_NONBLOCK on uffd", errno);
    }
    return {};
  }

  Result<void> watch(int fd, std::uint64_t key) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = key;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
      return fail_errno(Errc::io, "epoll_ctl ADD", errno);
    }
    return {};
  }

  std::uint64_t eagain_ns() const {
    return static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(options_.eagain_deadline).count());
  }

  static std::vector<std::uint64_t> normalise(std::span<const std::uint64_t> pages) {
    std::vector<std::uint64_t> v;
    v.reserve(pages.size());
    for (std::uint64_t p : pages) v.push_back(p & kPageMask);
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
    return v;
  }

  Task& add_task(TaskId id, TaskId source_task, UniqueFd fd, RangeMap view) {
    auto t = std::make_unique<Task>();
    t->key = next_key_++;
    t->id = id;
    t->source_task = source_task;
    t->uffd = std::move(fd);
    t->view = std::move(view);
    Task& ref = *t;
    tasks_.emplace(ref.key, std::move(t));
    ids_[id] = ref.key;
    ++metrics_.tasks_adopted;
    return ref;
  }

  Task* find(TaskId id) {
    auto it = ids_.find(id);
    if (it == ids_.end()) return nullptr;
    Task* t = tasks_.at(it->second).get();
    return t->dead ? nullptr : t;
  }

  void mark_gone(Task& t) {
    if (t.dead) return;
    t.dead = true;
    ++metrics_.tasks_gone;
  }

  void reap() {
    for (auto it = tasks_.begin(); it != tasks_.end();) {
      Task& t = *it->second;
      if (!t.dead) {
        ++it;
        continue;
      }
      // Closing a uffd deregisters its ranges; closing the fd removes it from the epoll set.
      ids_.erase(t.id);
      it = tasks_.erase(it);
    }
  }

  void record_error(const Error& e) {
    ++metrics_.errors;
    if (metrics_.error_messages.size() < kMaxErrorMessages) metrics_.error_messages.push_back(e.what());
  }

  // A fault (or a background page) cannot be served: the restore has failed. The faulting task
  // must not run on with a hole in its memory: the callback kills it.
  void fail_task(Task& t, std::uint64_t addr, pid_t tid, Error error) {
    record_error(error);
    if (!failure_) failure_ = error;
    FaultFailure f{t.id, t.pid > 0 ? t.pid : tid, addr, std::move(error)};
    bool killed = false;
    if (options_.on_failure) {
      killed = options_.on_failure(f);
    } else if (f.pid > 0) {
      killed = ::kill(f.pid, SIGKILL) == 0;
    }
    if (killed) {
      mark_gone(t);  // the SIGKILL is pending before the uffd closes: the task never resumes
    } else {
      t.failed = true;  // faults stay unserved (blocked) until the owner kills the task
    }
  }

  // ---- parallel prefetch -----------------------------------------------------------------------

  std::size_t parallel_threads(std::size_t pages) const {
    if (options_.prefetch_threads <= 1 || !source_->concurrent_fetch()) return 1;
    if (pages < std::max<std::size_t>(2, options_.prefetch_parallel_min_pages)) return 1;
    return std::min(options_.prefetch_threads, pages);
  }

  // One worker's share of a parallel prefetch.
  struct Slice {
    std::vector<Run> runs;
    std::byte* buffer = nullptr;
    FaultMetrics counts;  // merged by the owner after the join
    PrefetchReport report;
    Status status = Status::ok;  // first non-ok outcome (vanished runs are skipped, as serially)
    Error error{Errc::io, {}};
    std::uint64_t error_addr = 0;
    std::vector<Run> left;  // not installed because of `status` again (retried by the owner)
  };

  // Runs on a worker thread: touches nothing of the engine but the task's uffd (ioctls), its
  // view (read only: no event is handled while prefetch runs) and the source.
  void run_slice(const Task& t, Slice& s, const std::atomic<bool>& stop) {
    for (std::size_t i = 0; i < s.runs.size(); ++i) {
      std::uint64_t addr = s.runs[i].addr;
      std::size_t left = s.runs[i].pages;
      while (left > 0) {
        if (stop.load(std::memory_order_relaxed)) {
          s.left.push_back(Run{addr, left});
          s.left.insert(s.left.end(), s.runs.begin() + static_cast<long>(i) + 1, s.runs.end());
          return;
        }
        Outcome o = install(t, addr, left, Origin::prefetch, s.buffer, s.counts, &stop);
        s.report.ioctls += o.ioctls;
        s.report.pages_present += o.present_pages;
        s.report.pages_installed += o.done_pages - o.present_pages;
        addr += o.done_pages * kPageSize;
        left -= o.done_pages;
        if (o.status == Status::vanished) break;
        if (o.status != Status::ok) {
          s.status = o.status;
          s.error = std::move(o.error);
          s.error_addr = addr;
          s.left.push_back(Run{addr, left});
          s.left.insert(s.left.end(), s.runs.begin() + static_cast<long>(i) + 1, s.runs.end());
          return;
        }
      }
    }
  }

  std::byte* worker_buffer(std::size_t i) {
    while (worker_buffers_.size() < i) {
      const std::size_t bytes = buffer_.size();
      void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) return nullptr;
      worker_buffers_.emplace_back(p, bytes);
    }
    return worker_buffers_[i - 1].data();
  }

  // Installs `runs` on several threads. Returns the runs still to install (those an EAGAIN
  // stopped; the owner retries them after reading the events), or the error that failed it.
  Result<std::vector<Run>> prefetch_parallel(Task& t, const std::vector<Run>& runs, std::size_t total,
                                             PrefetchReport& report) {
    const std::size_t k = parallel_threads(total);
    std::vector<std::vector<Run>> cut = slices_of(runs, total, k);
    std::vector<Slice> slices(k);
    for (std::size_t i = 0; i < k; ++i) {
      slices[i].runs = std::move(cut[i]);
      slices[i].buffer = i == 0 ? buffer_.data() : worker_buffer(i);
    }
    std::atomic<bool> stop{false};
    auto work = [&](std::size_t i) {
      run_slice(t, slices[i], stop);
      if (slices[i].status == Status::failed || slices[i].status == Status::gone) {
        stop.store(true, std::memory_order_relaxed);
      }
    };
    std::vector<std::thread> threads;
    std::vector<std::size_t> here{0};  // slices the calling thread runs
    for (std::size_t i = 1; i < k; ++i) {
      bool started = false;
      if (slices[i].buffer != nullptr) {
        try {
          threads.emplace_back(work, i);
          started = true;
        } catch (...) {  // no thread to be had: this one does it
        }
      }
      if (!started) {
        if (slices[i].buffer == nullptr) slices[i].buffer = buffer_.data();
        here.push_back(i);
      }
    }
    for (std::size_t i : here) work(i);
    for (std::thread& th : threads) th.join();

    std::vector<Run> left;
    const Slice* failed = nullptr;
    bool gone = false;
    for (Slice& s : slices) {
      add_install_counts(metrics_, s.counts);
      report.ioctls += s.report.ioctls;
      report.pages_present += s.report.pages_present;
      report.pages_installed += s.report.pages_installed;
      if (s.status == Status::failed && failed == nullptr) failed = &s;
      if (s.status == Status::gone) gone = true;
      if (s.status == Status::again) ++metrics_.eagain_retries;
      left.insert(left.end(), s.left.begin(), s.left.end());
    }
    if (failed != nullptr) {
      record_error(failed->error);
      if (!failure_) failure_ = failed->error;
      return tl::unexpected(failed->error);
    }
    if (gone) {
      mark_gone(t);
      reap();
      return fail(Errc::unavailable, "prefetch: task " + std::to_string(t.id) + " is gone");
    }
    if (!left.empty()) drain(t);  // an EAGAIN: the events that changed the mapping first
    if (t.dead) {
      reap();
      return fail(Errc::unavailable, "prefetch: task is gone");
    }
    return left;
  }

  // ---- ioctls ---------------------------------------------------------------------------------

  static void wake(const Task& t, std::uint64_t addr, std::uint64_t len) {
    uffdio_range r{addr, len};
    (void)::ioctl(t.uffd.get(), UFFDIO_WAKE, &r);
  }

  static void account(FaultMetrics& m, Origin origin, std::size_t pages, bool zero, TierKind tier) {
    if (pages == 0) return;
    switch (origin) {
      case Origin::demand: m.pages_demand += pages; break;
      case Origin::prefetch: m.pages_prefetched += pages; break;
      case Origin::background: m.pages_background += pages; break;
    }
    if (zero) {
      m.pages_zero += pages;
    } else {
      m.pages_copied_per_tier[tier] += pages;
      if (origin == Origin::demand) m.demand_pages_per_tier[tier] += pages;
      m.bytes_copied += pages * kPageSize;
    }
  }

  // UFFDIO_COPY (src != nullptr) or UFFDIO_ZEROPAGE of `pages` pages at dst. Handles partial
  // progress, EEXIST (skip the page, wake its faulters) and EINTR; reports the rest. Counts go
  // to `m` (the engine's metrics, or a prefetch worker's own, merged after the join).
  static Outcome fill(const Task& t, std::uint64_t dst, const std::byte* src, std::size_t pages,
                      TierKind tier, Origin origin, FaultMetrics& m) {
    Outcome o;
    const std::uint64_t len = pages * kPageSize;
    std::uint64_t off = 0;
    while (off < len) {
      std::int64_t progress = 0;
      int rc;
      ++o.ioctls;
      if (src != nullptr) {
        uffdio_copy c{};
        c.dst = dst + off;
        c.src = reinterpret_cast<std::uint64_t>(src + off);
        c.len = len - off;
        ++m.copy_ioctls;
        rc = ::ioctl(t.uffd.get(), UFFDIO_COPY, &c);
        progress = rc == 0 ? static_cast<std::int64_t>(c.len) : c.copy;
      } else {
        uffdio_zeropage z{};
        z.range.start = dst + off;
        z.range.len = len - off;
        ++m.zeropage_ioctls;
        rc = ::ioctl(t.uffd.get(), UFFDIO_ZEROPAGE, &z);
        progress = rc == 0 ? static_cast<std::int64_t>(z.range.len) : z.zeropage;
      }
      const int err = rc == 0 ? 0 : errno;
      if (progress > 0) {
        const std::size_t n = static_cast<std::size_t>(progress) / kPageSize;
        account(m, origin, n, src == nullptr, tier);
        if (src == nullptr) o.zero_pages += n;
        o.done_pages += n;
        off += static_cast<std::uint64_t>(progress);
        continue;  // partial progress (the kernel reports EAGAIN): go on from there
      }
      if (err == EINTR) continue;
      if (err == EEXIST) {
        ++m.eexist;
        wake(t, dst + off, kPageSize);  // no wake on error: whoever waits for it, wake them
        ++o.present_pages;
        ++o.done_pages;
        off += kPageSize;
        continue;
      }
      if (err == EAGAIN) {
        o.status = Status::again;
        return o;
      }
      if (err == ESRCH) {
        o.status = Status::gone;
        return o;
      }
      if (err == ENOENT) {
        ++m.enoent;
        wake(t, dst + off, len - off);
        o.status = Status::vanished;
        return o;
      }
      o.status = Status::failed;
      o.error = fail_errno(Errc::io, src != nullptr ? "UFFDIO_COPY" : "UFFDIO_ZEROPAGE", err).value();
      return o;
    }
    return o;
  }

  // Installs `pages` pages from `addr` (current addresses of task t), translating through its
  // view and asking the source, in UFFDIO_COPYs of at most prefetch_batch_pages. Zero pages go
  // in one UFFDIO_ZEROPAGE per contiguous stretch: a zero range of the view at once, and
  // consecutive zero answers of the source coalesced. `buffer` holds prefetch_batch_pages pages
  // for the source. With `stop`, returns early (status ok, fewer pages done) once it is set.
  Outcome install(const Task& t, std::uint64_t addr, std::size_t pages, Origin origin, std::byte* buffer,
                  FaultMetrics& m, const std::atomic<bool>* stop = nullptr) {
    Outcome total;
    const std::size_t batch = std::max<std::size_t>(1, options_.prefetch_batch_pages);
    auto add = [&total](Outcome& o) {
      total.done_pages += o.done_pages;
      total.zero_pages += o.zero_pages;
      total.present_pages += o.present_pages;
      total.ioctls += o.ioctls;
      if (o.status == Status::ok) return true;
      total.status = o.status;
      total.error = std::move(o.error);
      return false;
    };
    std::uint64_t zero_at = 0;  // source-answered zero pages not installed yet, ending at `seen`
    std::size_t zero_pages = 0;
    auto flush_zero = [&] {
      if (zero_pages == 0) return true;
      Outcome o = fill(t, zero_at, nullptr, zero_pages, TierKind::local, origin, m);
      zero_pages = 0;
      return add(o);
    };
    std::size_t seen = 0;  // pages looked at: installed, or pending as zero
    while (seen < pages) {
      if (stop != nullptr && stop->load(std::memory_order_relaxed)) break;
      const std::uint64_t a = addr + seen * kPageSize;
      RangeMap::Lookup l = t.view.translate(a);
      std::size_t run = pages - seen;
      if (!l.zero) run = std::min(run, batch);
      if (l.run_end != UINT64_MAX) run = std::min<std::size_t>(run, (l.run_end - a) / kPageSize);
      run = std::max<std::size_t>(run, 1);
      if (l.zero) {
        if (!flush_zero()) return total;
        Outcome o = fill(t, a, nullptr, run, TierKind::local, origin, m);
        seen += run;
        if (!add(o)) return total;
        continue;
      }
      auto got = source_->fetch(t.source_task, l.source, run, std::span<std::byte>(buffer, run * kPageSize));
      if (!got) {
        if (!flush_zero()) return total;
        total.status = Status::failed;
        total.error = got.error();
        return total;
      }
      const std::size_t n = std::clamp<std::size_t>(got->pages, 1, run);
      if (got->answer == PageAnswer::zero) {
        if (zero_pages == 0) zero_at = a;
        zero_pages += n;
        seen += n;
        continue;
      }
      if (!flush_zero()) return total;
      const std::byte* src = got->data != nullptr ? got->data : buffer;
      Outcome o = fill(t, a, src, n, got->tier, origin, m);
      seen += n;
      if (!add(o)) return total;
    }
    (void)flush_zero();
    return total;
  }

  // ---- events ---------------------------------------------------------------------------------

  void serve_fault(Task& t, std::uint64_t addr, pid_t tid, std::uint64_t first_ns) {
    if (t.failed || t.dead) return;
    Outcome o = install(t, addr, 1, Origin::demand, buffer_.data(), metrics_);
    switch (o.status) {
      case Status::ok:
        if (o.zero_pages > 0) ++metrics_.zero_filled_faults;
        break;
      case Status::again:
        ++metrics_.eagain_retries;
        if (now_ns() - first_ns > eagain_ns()) {
          fail_task(t, addr, tid, Error{Errc::timeout, "fault kept failing with EAGAIN"});
        } else {
          t.retry.push_back(PendingFault{addr, tid, first_ns});
        }
        break;
      case Status::gone: mark_gone(t); break;
      case Status::vanished: break;
      case Status::failed:
        fail_task(t, addr, tid,
                  Error{o.error.code, "task " + std::to_string(t.id) + " page 0x" +
                                          to_hex(addr) + ": " + o.error.message});
        break;
    }
  }

  static std::string to_hex(std::uint64_t v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%llx", static_cast<unsigned long long>(v));
    return buf;
  }

  // The snapshot pieces a REMOVE event discards or a REMAP event moves, as they were before it
  // (zero ones were gone already).
  void observe_range(const Task& t, std::uint64_t start, std::uint64_t end, bool remap) {
    for (std::uint64_t a = start; a < end;) {
      const RangeMap::Lookup l = t.view.translate(a);
      const std::uint64_t piece_end = std::min(l.run_end, end);
      if (!l.zero) {
        FaultObservation seen;
        seen.task = t.id;
        seen.source_task = t.source_task;
        seen.address = a;
        seen.source_address = l.source;
        (remap ? seen.remapped_bytes : seen.discarded_bytes) = piece_end - a;
        options_.on_fault(seen);
      }
      a = piece_end;
    }
  }

  void handle(Task& t, const uffd_msg& msg) {
    switch (msg.event) {
      case UFFD_EVENT_PAGEFAULT: {
        const std::uint64_t start = now_ns();
        if (!metrics_.first_fault_ns) metrics_.first_fault_ns = start - created_ns_;
        ++metrics_.faults;
        if ((msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0) {
          ++metrics_.write_faults;
        } else {
          ++metrics_.read_faults;
        }
        if (options_.on_fault) {
          const std::uint64_t page = msg.arg.pagefault.address & kPageMask;
          const RangeMap::Lookup l = t.view.translate(page);
          FaultObservation seen;
          seen.task = t.id;
          seen.source_task = t.source_task;
          seen.address = page;
          if (!l.zero) seen.source_address = l.source;
          seen.write = (msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0;
          options_.on_fault(seen);
        }
        serve_fault(t, msg.arg.pagefault.address & kPageMask,
                    static_cast<pid_t>(msg.arg.pagefault.feat.ptid), start);
        last_fault_served_ns_ = now_ns();
        metrics_.fault_service_ns += last_fault_served_ns_ - start;
        break;
      }
      case UFFD_EVENT_FORK: {
        ++metrics_.events_fork;
        UniqueFd child_fd(static_cast<int>(msg.arg.fork.ufd));
        if (!set_nonblock(child_fd.get())) {
          record_error(Error{Errc::io, "FORK: child uffd unusable"});
          break;
        }
        const TaskId child_id = next_fork_id_++;
        Task& child = add_task(child_id, t.source_task, std::move(child_fd), t.view);
        if (auto r = watch(child.uffd.get(), child.key); !r) {
          record_error(r.error());
          child.dead = true;
          break;
        }
        if (options_.on_fork) options_.on_fork(t.id, child_id);
        break;
      }
      case UFFD_EVENT_REMAP: {
        ++metrics_.events_remap;
        const std::uint64_t from = msg.arg.remap.from, to = msg.arg.remap.to, len = msg.arg.remap.len;
        if (options_.on_fault) observe_range(t, from, from + len, true);
        t.view.move(from, to, len);
        for (std::uint64_t& p : t.background) {
          if (p >= from && p < from + len) p = p - from + to;
        }
        break;
      }
      case UFFD_EVENT_UNMAP:
      case UFFD_EVENT_REMOVE: {
        if (msg.event == UFFD_EVENT_UNMAP) {
          ++metrics_.events_unmap;
        } else {
          ++metrics_.events_remove;
        }
        const std::uint64_t start = msg.arg.remove.start, end = msg.arg.remove.end;
        if (msg.event == UFFD_EVENT_REMOVE && options_.on_fault) observe_range(t, start, end, false);
        t.view.assign(start, end, RangeMap::Kind::zero);
        std::erase_if(t.background, [&](std::uint64_t p) { return p >= start && p < end; });
        break;
      }
      default:
        record_error(Error{Errc::protocol, "unknown uffd event " + std::to_string(msg.event)});
        break;
    }
  }

  // Reads and handles every queued message of one uffd (non-blocking).
  void drain(Task& t) {
    uffd_msg msgs[32];
    while (!t.dead) {
      ssize_t n = ::read(t.uffd.get(), msgs, sizeof msgs);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN) {
          record_error(fail_errno(Errc::io, "read uffd", errno).value());
          mark_gone(t);
        }
        return;
      }
      if (n == 0) return;
      const std::size_t count = static_cast<std::size_t>(n) / sizeof(uffd_msg);
      for (std::size_t i = 0; i < count; ++i) handle(t, msgs[i]);
      if (count < std::size(msgs)) return;
    }
  }

  bool any_retry() const {
    for (const auto& [key, t] : tasks_) {
      if (!t->retry.empty() && !t->dead) return true;
    }
    return false;
  }

  void retry_pending() {
    for (auto& [key, tp] : tasks_) {
      Task& t = *tp;
      if (t.retry.empty() || t.dead) continue;
      drain(t);  // the events that made the copy fail come first
      std::vector<PendingFault> pending;
      pending.swap(t.retry);
      for (const PendingFault& p : pending) serve_fault(t, p.addr, p.tid, p.first_ns);
    }
  }

  void background_round() {
    std::size_t budget = std::max<std::size_t>(1, options_.background_batch_pages);
    for (auto& [key, tp] : tasks_) {
      Task& t = *tp;
      if (budget == 0) break;
      if (t.dead || t.failed || t.background.empty()) continue;
      // The longest contiguous run at the front of the queue, within the budget.
      std::uint64_t addr = t.background.front();
      std::size_t run = 1;
      while (run < budget && run < t.background.size() &&
             t.background[run] == addr + run * kPageSize) {
        ++run;
      }
      Outcome o = install(t, addr, run, Origin::background, buffer_.data(), metrics_);
      std::size_t consumed = o.done_pages;
      if (o.status == Status::vanished || o.status == Status::failed) ++consumed;  // skip it
      consumed = std::min(consumed, t.background.size());
      t.background.erase(t.background.begin(), t.background.begin() + static_cast<long>(consumed));
      budget -= std::min(budget, std::max<std::size_t>(consumed, 1));
      switch (o.status) {
        case Status::ok:
        case Status::vanished: break;
        case Status::again:
          ++metrics_.eagain_retries;
          drain(t);
          break;
        case Status::gone: mark_gone(t); break;
        case Status::failed:
          fail_task(t, addr + o.done_pages * kPageSize, 0,
                    Error{o.error.code, "background prefetch, task " + std::to_string(t.id) + ": " +
                                            o.error.message});
          break;
      }
    }
  }

  std::shared_ptr<PageSource> source_;
  FaultEngineOptions options_;
  UniqueFd epoll_;
  UniqueMapping buffer_;
  std::vector<UniqueMapping> worker_buffers_;  // prefetch workers 1..k-1 (0 uses buffer_)
  std::uint64_t created_ns_;
  std::uint64_t last_fault_served_ns_ = 0;  // when the last PAGEFAULT was served (spin_after_fault)
  std::map<std::uint64_t, std::unique_ptr<Task>> tasks_;  // key -> task
  std::map<TaskId, std::uint64_t> ids_;
  std::uint64_t next_key_ = 1;
  TaskId next_fork_id_ = TaskId{1} << 40;  // forked children: ids no pid can have
  FaultMetrics metrics_;
  std::optional<Error> failure_;
};

}  // namespace

std::uint64_t default_uffd_features() noexcept {
  return UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_UNMAP |
         UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_THREAD_ID;
}

Result<int> create_userfaultfd_raw() {
#ifndef SYS_userfaultfd
  return fail(Errc::unsupported, "userfaultfd: no syscall number in this build");
#else
  int fd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd < 0) {
    const int err = errno;
    return fail_errno(Errc::unsupported,
                      err == EPERM ? "userfaultfd (EPERM: vm.unprivileged_userfaultfd=0 and no "
                                     "CAP_SYS_PTRACE?)"
                                   : "userfaultfd",
                      err);
  }
  return fd;
#endif
}

Result<int> create_userfaultfd(std::uint64_t features) {
  auto raw = create_userfaultfd_raw();
  if (!raw) return raw;
  UniqueFd fd(*raw);
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = features;
  if (::ioctl(fd.get(), UFFDIO_API, &api) != 0) {
    return fail_errno(Errc::unsupported, "UFFDIO_API (features not supported?)", errno);
  }
  if ((api.features & features) != features) {
    return fail(Errc::unsupported, "UFFDIO_API: kernel lacks some requested features");
  }
  return fd.release();
}

Result<void> register_missing(int uffd, void* addr, std::size_t len) {
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<std::uint64_t>(addr);
  reg.range.len = len;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  if (::ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) return fail_errno(Errc::io, "UFFDIO_REGISTER", errno);
  if ((reg.ioctls & (1ull << _UFFDIO_COPY)) == 0) {
    return fail(Errc::unsupported, "UFFDIO_REGISTER: range does not support UFFDIO_COPY");
  }
  return {};
}

Result<std::unique_ptr<FaultEngine>> FaultEngine::create(std::shared_ptr<PageSource> source,
                                                         FaultEngineOptions options) {
  if (!source) return fail(Errc::invalid_argument, "fault engine: no page source");
  options.prefetch_batch_pages = std::max<std::size_t>(1, options.prefetch_batch_pages);
  UniqueFd ep(::epoll_create1(EPOLL_CLOEXEC));
  if (!ep) return fail_errno(Errc::io, "epoll_create1", errno);
  const std::size_t bytes = options.prefetch_batch_pages * kPageSize;
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return fail_errno(Errc::no_space, "fault engine buffer", errno);
  UniqueMapping buffer(p, bytes);
  return std::unique_ptr<FaultEngine>(
      new Engine(std::move(source), std::move(options), std::move(ep), std::move(buffer)));
}

void to_json(nlohmann::json& j, const FaultMetrics& m) {
  nlohmann::json tiers = nlohmann::json::object();
  for (const auto& [tier, pages] : m.pages_copied_per_tier) tiers[std::string(to_string(tier))] = pages;
  nlohmann::json demand_tiers = nlohmann::json::object();
  for (const auto& [tier, pages] : m.demand_pages_per_tier) demand_tiers[std::string(to_string(tier))] = pages;
  j = nlohmann::json{
      {"faults", {{"total", m.faults}, {"read", m.read_faults}, {"write", m.write_faults},
                  {"zero_filled", m.zero_filled_faults}}},
      {"pages", {{"copied_per_tier", tiers}, {"demand_per_tier", demand_tiers}, {"demand", m.pages_demand},
                 {"prefetched", m.pages_prefetched}, {"background", m.pages_background},
                 {"zero", m.pages_zero}}},
      {"bytes_copied", m.bytes_copied},
      {"ioctls", {{"copy", m.copy_ioctls}, {"zeropage", m.zeropage_ioctls}}},
      {"outcomes", {{"eexist", m.eexist}, {"eagain_retries", m.eagain_retries}, {"enoent", m.enoent}}},
      {"first_fault_ns", m.first_fault_ns ? nlohmann::json(*m.first_fault_ns) : nlohmann::json(nullptr)},
      {"fault_service_ns", m.fault_service_ns},
      {"events", {{"fork", m.events_fork}, {"remap", m.events_remap}, {"unmap", m.events_unmap},
                  {"remove", m.events_remove}}},
      {"tasks", {{"adopted", m.tasks_adopted}, {"gone", m.tasks_gone}}},
      {"errors", {{"count", m.errors}, {"messages", m.error_messages}}},
  };
}

}  // namespace snaptier
