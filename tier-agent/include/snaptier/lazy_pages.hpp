// CRIU lazy-pages server: a drop-in replacement for `criu lazy-pages` that serves the restored
// tasks' userfaultfd faults with the FaultEngine from a checkpoint directory (docs/lazy-restore.md).
//
// Protocol (criu/uffd.c, criu 4.x): the server binds `lazy-pages.socket` in the work dir;
// `criu restore --lazy-pages` connects; per task it sends a raw int pid (the pstree pid; negative
// for a zombie, then no fd) and the task's uffd via SCM_RIGHTS with one dummy byte; after the
// whole tree the u32 0x52535446 ("RSTF"). Host pids of the senders come from SCM_CREDENTIALS
// (SO_PASSCRED): they are what the server watches and kills. Every wait is bounded.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "snaptier/criu_images.hpp"
#include "snaptier/error.hpp"
#include "snaptier/fault_engine.hpp"

namespace snaptier::lazy {

inline constexpr std::uint32_t kRestoreFinished = 0x52535446;  // "RSTF"
inline constexpr const char* kSocketName = "lazy-pages.socket";

enum class PrefetchPolicy : std::uint8_t {
  none,  // pure demand faults
  all,   // install every lazy page after RSTF, before control returns (see resume_after_prefetch)
};
[[nodiscard]] Result<PrefetchPolicy> parse_policy(std::string_view name);
[[nodiscard]] std::string_view to_string(PrefetchPolicy policy) noexcept;

// One lazy range of a task: [start, end) with its data at `file_offset` in pages-<id>.img.
struct LazyRange {
  std::uint64_t start = 0;
  std::uint64_t end = 0;
  std::uint64_t file_offset = 0;
};

// What the server serves from: a PageSource that also knows the restored tasks and which of
// their pages are lazy (CRIU leaves those to the daemon). CheckpointPageSource reads a CRIU
// image directory; the agent's StorePageSource reads the tiered snapshot store.
class LazySource : public PageSource {
 public:
  [[nodiscard]] virtual bool has_task(TaskId task) const noexcept = 0;
  [[nodiscard]] virtual std::vector<std::uint64_t> lazy_pages(TaskId task) const = 0;  // ascending
};

// Pages to install per task (snapshot addresses): before the tasks resume, and in the
// background interleaved with demand faults afterwards.
struct TaskPrefetch {
  std::vector<std::uint64_t> before_resume;
  std::vector<std::uint64_t> background;
};
using PrefetchPlanner = std::function<TaskPrefetch(TaskId task, const LazySource& source)>;

// The pages holding a task's command line and environment: [mm_arg_start, mm_arg_end) and
// [mm_env_start, mm_env_end) of its mm-<pid>.img, page-rounded, ascending, no duplicates. The
// kernel reads them for /proc/PID/cmdline and /proc/PID/environ with access_remote_vm, which
// never raises a userfaultfd fault: left lazy, they read as missing until the task itself
// touches them. So the server installs them before resume whatever the plan says.
[[nodiscard]] std::vector<std::uint64_t> arg_env_pages(const criu::MmEntry& mm);

// Makes every page of `required` that the task serves lazily (`lazy`, ascending) part of
// plan.before_resume exactly once: appended after the plan's own pages (whose order is kept),
// and dropped from plan.background. Returns how many pages it added.
std::size_t require_before_resume(TaskPrefetch& plan, std::span<const std::uint64_t> required,
                                  std::span<const std::uint64_t> lazy);

// The lazy ranges of one task: PE_LAZY pagemap entries cut at VMA bounds (CRIU's
// collect_lazy_iovecs). Errc::unsupported for lazy pages kept in a parent checkpoint.
[[nodiscard]] Result<std::vector<LazyRange>> lazy_ranges_of(const criu::Task& task);

// Where `vaddr` falls among a task's ascending lazy `ranges`: inside `range`, with `pages`
// (1..max_pages) left in it; or in a gap (range == nullptr), `pages` up to the next range. CRIU
// restored the gaps itself, so what faults there is fresh memory: zero.
struct RangeHit {
  const LazyRange* range = nullptr;
  std::size_t pages = 1;
};
[[nodiscard]] RangeHit find_lazy_range(std::span<const LazyRange> ranges, std::uint64_t vaddr,
                                       std::size_t max_pages) noexcept;

// Whether `addr` lies in a VMA of a task with lazy pages that CRIU registers with the task's
// uffd: every VMA that can be lazy is (its restorer's vma_remap), whether or not pages of its
// own are lazy — the anonymous pieces between ranges mapped in place among them. A page can be
// installed there, also a fresh, zero one.
[[nodiscard]] bool in_lazy_vma(const criu::Task& task, std::span<const LazyRange> ranges,
                               std::uint64_t addr) noexcept;

// A PageSource over a checkpoint directory. TaskId = pstree pid. Lazy ranges are the PE_LAZY
// pagemap entries cut at VMA bounds (as CRIU's collect_lazy_iovecs); data is pread from the
// task's pages file. Anything outside the lazy ranges answers `zero` (CRIU's rule).
class CheckpointPageSource final : public LazySource {
 public:
  // Errc::unsupported for lazy entries whose pages are in a parent checkpoint.
  [[nodiscard]] static Result<std::shared_ptr<CheckpointPageSource>> open(const criu::Checkpoint& checkpoint);
  ~CheckpointPageSource() override;

  [[nodiscard]] Result<PageFill> fetch(TaskId task, std::uint64_t vaddr, std::size_t max_pages,
                                       std::span<std::byte> buffer) override;

  [[nodiscard]] bool has_task(TaskId task) const noexcept override;
  [[nodiscard]] std::vector<LazyRange> lazy_ranges(TaskId task) const;
  [[nodiscard]] std::vector<std::uint64_t> lazy_pages(TaskId task) const override;  // page addresses
  [[nodiscard]] std::uint64_t lazy_page_count() const noexcept;

  struct Impl;

 private:
  explicit CheckpointPageSource(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct RestoredTask;

struct LazyPagesOptions {
  // The checkpoint CRIU restores from; read at bind even with a `source` (its mm-<pid>.img
  // give the arg/env pages).
  std::filesystem::path images_dir;
  std::filesystem::path work_dir;  // where lazy-pages.socket is bound; empty = images_dir
  PrefetchPolicy prefetch = PrefetchPolicy::none;
  // Where pages come from; null = a CheckpointPageSource over images_dir.
  std::shared_ptr<LazySource> source;
  // Overrides `prefetch`: asked once per adopted task after RSTF. Either way the task's lazy
  // arg/env pages (arg_env_pages) are added to what it installs before resume.
  PrefetchPlanner planner;
  // Every PAGEFAULT before it is served (profiling); runs on the server's thread.
  std::function<void(const FaultObservation&)> on_fault;
  // SIGCONT every restored task after RSTF (+ prefetch): pairs with `criu restore
  // --lazy-pages --leave-stopped`, so prefetched pages are installed before the tasks run.
  bool resume_after_prefetch = false;
  std::chrono::milliseconds accept_timeout{30'000};  // bind -> restorer connects
  std::chrono::milliseconds step_timeout{60'000};    // between protocol messages, until RSTF
  std::chrono::milliseconds serve_timeout{600'000};  // RSTF -> all tasks gone
  // After a fault, how long the server checks for the next before it sleeps
  // (FaultEngineOptions::spin_after_fault).
  std::chrono::microseconds spin_after_fault = FaultEngineOptions{}.spin_after_fault;
  // Set (e.g. from a signal handler) to stop serving: remaining lazy pages are drained
  // (installed) first, so the tasks can run on without the server.
  const std::atomic<bool>* stop = nullptr;
  // Called once after RSTF, the prefetch and the SIGCONTs (tests use it as "control returned").
  std::function<void()> on_resumed;
  // Called on the server's thread for each task the restorer announces, as it arrives (before
  // RSTF, while the tree is being restored): the earliest moment its host pid is known.
  std::function<void(const RestoredTask&)> on_task;
  std::function<void(std::string_view)> log;  // progress lines; may be empty
};

struct RestoredTask {
  std::int32_t pid = 0;     // as sent by the restorer (pstree pid; negative: zombie)
  pid_t host_pid = 0;       // from SCM_CREDENTIALS, 0 if unknown
  bool zombie = false;
};

struct LazyPagesReport {
  std::string images_dir;
  PrefetchPolicy policy = PrefetchPolicy::none;
  std::vector<RestoredTask> tasks;
  bool rstf = false;
  std::optional<double> connected_ms;  // since run() began
  std::optional<double> rstf_ms;
  std::uint64_t lazy_pages = 0;         // of the adopted tasks
  std::uint64_t prefetched_pages = 0;   // installed before resume (copied or zero)
  std::uint64_t arg_env_pages = 0;      // lazy arg/env pages the plan lacked, added before resume
  std::uint64_t background_queued = 0;  // queued for background installation
  double prefetch_ms = 0;
  double served_ms = 0;                 // RSTF -> end
  std::uint64_t drained_pages = 0;      // installed at stop/timeout
  std::vector<pid_t> killed;            // host pids SIGKILLed because of a failure
  FaultMetrics metrics;
  std::optional<Error> error;           // why the restore failed (tree killed)
};
void to_json(nlohmann::json& j, const LazyPagesReport& r);

class LazyPagesServer {
 public:
  // Loads the checkpoint, opens the page source, binds `lazy-pages.socket` (stale file
  // unlinked) and listens. Nothing blocks.
  [[nodiscard]] static Result<std::unique_ptr<LazyPagesServer>> bind(LazyPagesOptions options);
  ~LazyPagesServer();
  LazyPagesServer(const LazyPagesServer&) = delete;
  LazyPagesServer& operator=(const LazyPagesServer&) = delete;

  [[nodiscard]] const std::filesystem::path& socket_path() const noexcept;
  [[nodiscard]] std::shared_ptr<LazySource> source() const noexcept;

  // The engine's metrics as of now, from any thread while run() serves (the serving loop
  // copies them within one poll round). Errc::timeout if run() does not answer in `timeout`,
  // Errc::unavailable once run() has returned.
  [[nodiscard]] Result<FaultMetrics> metrics_now(std::chrono::milliseconds timeout);

  // Accept, receive tasks until RSTF (serving faults meanwhile), prefetch per policy, resume,
  // serve until every task is gone / stop / serve_timeout. On any failure the restored tree is
  // killed and report.error says why. Call once.
  [[nodiscard]] LazyPagesReport run();

  // run() in two halves, so that one thread can serve many servers' tasks (ServingLoop):
  // run_until_resumed() accepts, receives the tasks, prefetches and resumes on the caller's
  // thread; it returns the report if the restore is already over (failed, no restorer), or
  // nullopt if the tasks now need serving: hand the server to ServingLoop::serve, or call
  // serve_rest() to serve them on this thread. Call one of run() / run_until_resumed() once.
  [[nodiscard]] std::optional<LazyPagesReport> run_until_resumed();
  [[nodiscard]] LazyPagesReport serve_rest();

  struct Impl;

 private:
  friend class ServingLoop;
  explicit LazyPagesServer(std::unique_ptr<Impl> impl);
  bool claim_run(LazyPagesReport& out);
  // The serving half, one round at a time, for ServingLoop (its thread only).
  [[nodiscard]] int serve_fd() const noexcept;
  [[nodiscard]] bool serve_work_pending() const noexcept;
  [[nodiscard]] bool serve_round();  // without waiting; true: serving is over, call end_serving
  [[nodiscard]] std::uint64_t faults_served() const noexcept;
  [[nodiscard]] LazyPagesReport end_serving();
  std::unique_ptr<Impl> impl_;
};

// One thread serving the userfaultfds of many restored trees: the instances of a burst hand
// their servers over once their tasks run (LazyPagesServer::run_until_resumed), and from then
// on one epoll set over every server's fault engine serves them all, each server ending on its
// own terms (its tasks gone, its stop flag, its serve_timeout, a failure that kills its tree
// only). A fault is read as soon as its uffd is ready; the housekeeping every server needs
// (metrics_now, stop flags, deadlines) runs at least every 10 ms.
struct ServingLoopStats {
  std::uint64_t servers_served = 0;  // handed over so far
  std::uint64_t most_at_once = 0;    // servers served at the same time, at most
  std::uint64_t rounds = 0;          // epoll rounds of the loop
};

class ServingLoop {
 public:
  using Done = std::function<void(LazyPagesReport)>;
  // spin_after_fault: as FaultEngineOptions::spin_after_fault, for the loop's own epoll set
  // (the engines' poll(0) never sleeps, so never spins).
  [[nodiscard]] static Result<std::shared_ptr<ServingLoop>> start(
      std::chrono::microseconds spin_after_fault = FaultEngineOptions{}.spin_after_fault);
  // Ends every server still served as if stopped (their remaining lazy pages installed, so
  // their tasks run on), calls their Done, joins the thread.
  ~ServingLoop();
  ServingLoop(const ServingLoop&) = delete;
  ServingLoop& operator=(const ServingLoop&) = delete;

  // Serves `server` (run_until_resumed() returned nullopt) on the loop's thread until it ends,
  // then calls `done` with its report there. Errc::unavailable once the loop is ending (the
  // caller then serves it itself: serve_rest()).
  [[nodiscard]] Result<void> serve(std::shared_ptr<LazyPagesServer> server, Done done);
  [[nodiscard]] ServingLoopStats stats() const;
  [[nodiscard]] std::thread::id thread_id() const noexcept;

  struct Impl;

 private:
  explicit ServingLoop(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace snaptier::lazy
