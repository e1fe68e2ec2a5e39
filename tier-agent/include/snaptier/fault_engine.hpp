// The userfaultfd fault engine: serves the page faults of restored tasks from a PageSource.
//
// The engine owns one userfaultfd per task (adopted from CRIU's lazy-pages socket, from a
// Firecracker-style handler socket, or created by a test) plus the uffds the kernel hands it on
// FORK events. One poll loop (epoll, every wait bounded) serves PAGEFAULT, FORK, REMAP, UNMAP and
// REMOVE; see docs/fault-engine.md for the event table, the prefetch model and failure
// behaviour.
//
// Threads: call every FaultEngine member from one thread (the owner); none of them may run
// concurrently with another. Inside one prefetch() call the engine may install pages with up to
// FaultEngineOptions::prefetch_threads worker threads, and only if the source's
// concurrent_fetch() is true. The workers (the calling thread is one of them) call
// PageSource::fetch concurrently, read the task's address view (no uffd event is handled while
// prefetch() runs) and issue UFFDIO_COPY / UFFDIO_ZEROPAGE / UFFDIO_WAKE on the task's uffd;
// nothing else. They are joined
// before prefetch() returns, and their counts are merged into metrics() then, so metrics() is
// exact whenever the owner can call it. Callbacks (on_failure, on_fork, on_fault) only ever run
// on the owner's thread.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "snaptier/error.hpp"
#include "snaptier/store.hpp"
#include "snaptier/tier.hpp"

namespace snaptier {

// Who a page belongs to: the restored task's id as the integration layer names it (CRIU: the
// pid in pstree.img). Tasks born from FORK events get engine-assigned ids (see on_fork).
using TaskId = std::int64_t;

// ---------------------------------------------------------------------------------------------
// PageSource: where page contents come from. The engine asks for the page at `vaddr` of task
// `task` (the task whose snapshot view the faulting uffd inherits: a forked child asks with its
// ancestor's id, at the address the page had before any mremap).

enum class PageAnswer : std::uint8_t {
  zero,  // install zero pages (UFFDIO_ZEROPAGE): all-zero snapshot pages, or outside lazy ranges
  copy,  // install `data` (UFFDIO_COPY)
};

struct PageFill {
  PageAnswer answer = PageAnswer::zero;
  TierKind tier = TierKind::local;  // where the bytes came from (metrics); ignored for zero
  // Pages answered, contiguous from vaddr: 1..max_pages. All of them share `answer` and `tier`.
  std::size_t pages = 1;
  // copy: nullptr = the source filled `buffer` (pages * kPageSize bytes); else a pointer to
  // pages * kPageSize bytes (a byte-addressable tier mapped in place), valid until the next call.
  const std::byte* data = nullptr;
};

class PageSource {
 public:
  virtual ~PageSource() = default;
  PageSource() = default;
  PageSource(const PageSource&) = delete;
  PageSource& operator=(const PageSource&) = delete;

  // `vaddr` is page aligned, max_pages >= 1, buffer.size() == max_pages * kPageSize.
  // An error fails the restore: the engine reports it and kills the faulting task (see
  // FaultEngineOptions::on_failure). Must not throw; must return in bounded time.
  [[nodiscard]] virtual Result<PageFill> fetch(TaskId task, std::uint64_t vaddr,
                                               std::size_t max_pages,
                                               std::span<std::byte> buffer) = 0;

  // true: fetch may be called from several threads at once (parallel prefetch); each thread
  // passes its own buffer, and a PageFill::data pointer must stay valid until the same
  // thread's next call. false (the default): the engine never calls fetch concurrently.
  [[nodiscard]] virtual bool concurrent_fetch() const noexcept { return false; }
};

// ---------------------------------------------------------------------------------------------
// Metrics of one restore (one engine).

struct FaultMetrics {
  std::uint64_t faults = 0;               // PAGEFAULT messages served
  std::uint64_t read_faults = 0;
  std::uint64_t write_faults = 0;         // UFFD_PAGEFAULT_FLAG_WRITE set
  std::uint64_t zero_filled_faults = 0;   // served with UFFDIO_ZEROPAGE
  std::map<TierKind, std::uint64_t> pages_copied_per_tier;  // demand + prefetch + background
  std::map<TierKind, std::uint64_t> demand_pages_per_tier;  // copied because of a fault
  std::uint64_t pages_demand = 0;         // pages installed because of a fault (copy or zero)
  std::uint64_t pages_prefetched = 0;     // installed by prefetch() before resume
  std::uint64_t pages_background = 0;     // installed by the background prefetch
  std::uint64_t pages_zero = 0;           // zero pages installed, any origin
  std::uint64_t bytes_copied = 0;         // bytes moved with UFFDIO_COPY
  std::uint64_t copy_ioctls = 0;          // UFFDIO_COPY calls (a contiguous run is one call)
  std::uint64_t zeropage_ioctls = 0;
  std::uint64_t eexist = 0;               // page already present (fine; faulter woken)
  std::uint64_t eagain_retries = 0;       // mapping changed under a copy; retried after events
  std::uint64_t enoent = 0;               // range vanished under a copy; faulter woken
  std::optional<std::uint64_t> first_fault_ns;  // since the engine was created
  std::uint64_t fault_service_ns = 0;     // total time spent serving PAGEFAULT messages
  std::uint64_t events_fork = 0;
  std::uint64_t events_remap = 0;
  std::uint64_t events_unmap = 0;
  std::uint64_t events_remove = 0;
  std::uint64_t tasks_adopted = 0;        // adopt() + FORK children
  std::uint64_t tasks_gone = 0;           // exited (pidfd, ESRCH) or forgotten
  std::uint64_t errors = 0;
  std::vector<std::string> error_messages;  // the first 16
};

void to_json(nlohmann::json& j, const FaultMetrics& m);

// ---------------------------------------------------------------------------------------------

struct FaultFailure {
  TaskId task = 0;            // the task whose fault could not be served
  pid_t pid = 0;              // its pid if known (adopt option, or UFFD_FEATURE_THREAD_ID), else 0
  std::uint64_t address = 0;  // the faulting page
  Error error;
};

// One PAGEFAULT as the engine saw it, before serving it (profiling restores record these).
struct FaultObservation {
  TaskId task = 0;                          // the faulting uffd's task
  TaskId source_task = 0;                   // whose snapshot view it reads (see PageSource)
  std::uint64_t address = 0;                // faulting page, current address
  std::optional<std::uint64_t> source_address;  // the page in the snapshot; nullopt = zero range
  bool write = false;                       // UFFD_PAGEFAULT_FLAG_WRITE
  // > 0: not a fault but a REMOVE event (MADV_DONTNEED / MADV_REMOVE) that discarded
  // [source_address, source_address + discarded_bytes) of the snapshot view; one observation
  // per contiguous piece of it. Pages mapped from a file answer such a discard with the file's
  // bytes, not zeros, so a profile must know about it.
  std::uint64_t discarded_bytes = 0;
  // > 0: not a fault but a REMAP event (mremap) that moved [source_address, source_address +
  // remapped_bytes) of the snapshot view, one observation per piece. The event does not say
  // whether the range also grew, and a file mapping grows into the file's next pages (an
  // anonymous one into zeros), so a profile must know about it too.
  std::uint64_t remapped_bytes = 0;
};

struct FaultEngineOptions {
  // Max pages per UFFDIO_COPY and per PageSource::fetch (prefetch and background), and the
  // size of the engine's copy buffer(s). Zero pages are not cut by it: a zero range of the view
  // and consecutive zero answers of the source go in one UFFDIO_ZEROPAGE.
  std::size_t prefetch_batch_pages = 64;
  // Installer threads of one prefetch() (the caller counts as one), used only when the source's
  // concurrent_fetch() is true and the call has at least prefetch_parallel_min_pages pages.
  // The sorted runs are cut into this many contiguous slices of about equal page count.
  std::size_t prefetch_threads = 2;
  std::size_t prefetch_parallel_min_pages = 1024;
  std::size_t background_batch_pages = 32;  // background pages installed per poll round
  // Called once per failed fault (source error, unexpected ioctl error). It must make sure the
  // task never runs on with missing memory: kill it (or its whole tree). Return true if the task
  // is being killed; the engine then closes its uffd. Default: SIGKILL `pid` if known.
  std::function<bool(const FaultFailure&)> on_failure;
  // A FORK event created task `child` (engine-assigned id) from `parent`.
  std::function<void(TaskId parent, TaskId child)> on_fork;
  // Called for every PAGEFAULT message, before it is served, and for every REMOVE and REMAP
  // event (see FaultObservation::discarded_bytes, remapped_bytes). Must be cheap and must not throw.
  std::function<void(const FaultObservation&)> on_fault;
  // EAGAIN retries of one fault give up (and fail the restore) after this long.
  std::chrono::milliseconds eagain_deadline{1000};
  // A task that just faulted usually faults again within microseconds. For this long after
  // serving a fault, poll() checks its uffds without sleeping, so the next fault is read at once
  // instead of after the server thread's wake-up (tens of microseconds on a loaded or virtual
  // machine). At most this much CPU is spent per pause in a stream of faults; 0 turns it off.
  std::chrono::microseconds spin_after_fault{50};
};

struct AdoptOptions {
  // true: the uffd went through UFFDIO_API already (CRIU, Firecracker, create_userfaultfd()).
  // false: the engine does the handshake with kDefaultUffdFeatures.
  bool initialised = true;
  pid_t pid = 0;  // >0: watched with a pidfd (exit drops the task) and killed on failure
  // The task whose snapshot view this uffd serves (default: the adopted task's own id).
  std::optional<TaskId> source_task;
};

struct PrefetchReport {
  std::uint64_t pages_installed = 0;  // copied or zero-filled now
  std::uint64_t pages_present = 0;    // already there (EEXIST)
  std::uint64_t ioctls = 0;
  std::uint64_t elapsed_ns = 0;
};

// The features the engine asks for on uffds it initialises (CRIU's set plus THREAD_ID).
[[nodiscard]] std::uint64_t default_uffd_features() noexcept;

// userfaultfd(2) + UFFDIO_API in the *calling* process (a uffd always serves the mm of the
// process that created it: call this in the task, then pass the fd to the engine, e.g. over
// SCM_RIGHTS). O_CLOEXEC|O_NONBLOCK. Errc::unsupported if the kernel refuses (with the reason).
[[nodiscard]] Result<int> create_userfaultfd(std::uint64_t features);
[[nodiscard]] Result<int> create_userfaultfd_raw();  // no handshake (AdoptOptions::initialised=false)
// UFFDIO_REGISTER (MISSING mode) of [addr, addr+len) on `uffd`.
[[nodiscard]] Result<void> register_missing(int uffd, void* addr, std::size_t len);

class FaultEngine {
 public:
  [[nodiscard]] static Result<std::unique_ptr<FaultEngine>> create(
      std::shared_ptr<PageSource> source, FaultEngineOptions options = {});
  virtual ~FaultEngine() = default;
  FaultEngine(const FaultEngine&) = delete;
  FaultEngine& operator=(const FaultEngine&) = delete;

  // Takes ownership of `uffd` (also on error). Errc::already_exists if `task` is known.
  [[nodiscard]] virtual Result<void> adopt(TaskId task, int uffd, AdoptOptions options = {}) = 0;
  // Stop serving a task and close its uffd (e.g. CRIU reported it dead).
  [[nodiscard]] virtual Result<void> forget(TaskId task) = 0;

  // Installs `pages` (page-aligned addresses, any order, duplicates fine) now, before the task
  // resumes: sorted, coalesced into runs, one UFFDIO_COPY per contiguous run the source answers
  // (at most prefetch_batch_pages), on up to prefetch_threads threads (see the top of this
  // file). A source error is returned (the task is not running yet); with several threads the
  // others stop at their next batch, all are joined, and the first error (by address) is
  // returned. Pages installed before the error stay installed.
  [[nodiscard]] virtual Result<PrefetchReport> prefetch(TaskId task,
                                                        std::span<const std::uint64_t> pages) = 0;
  // Queues `pages` for background installation, interleaved with demand faults (demand first:
  // each poll round serves every ready message before one background batch).
  [[nodiscard]] virtual Result<void> prefetch_in_background(TaskId task,
                                                            std::vector<std::uint64_t> pages) = 0;

  // One round: serve what is ready, waiting at most `max_wait` (0 if background work is queued).
  // Errors here are the engine's own (epoll broken); a failed restore is failure().
  [[nodiscard]] virtual Result<void> poll(std::chrono::milliseconds max_wait) = 0;
  // poll() until `done()` is true (Ok), the restore fails (its error), or `deadline` passes
  // (Errc::timeout). Each round waits at most 10 ms.
  [[nodiscard]] virtual Result<void> run_until(const std::function<bool()>& done,
                                               std::chrono::steady_clock::time_point deadline) = 0;

  // For one thread serving several engines (lazy::ServingLoop): an fd that is readable while
  // poll() has events or faults to serve (the engine's epoll fd: add it to an epoll set of your
  // own), and whether it has work no fd signals (background pages, EAGAIN retries): then call
  // poll(0) without waiting for the fd.
  [[nodiscard]] virtual int wait_fd() const noexcept = 0;
  [[nodiscard]] virtual bool work_pending() const noexcept = 0;

  [[nodiscard]] virtual std::optional<Error> failure() const = 0;  // first failure, if any
  [[nodiscard]] virtual std::size_t task_count() const noexcept = 0;
  [[nodiscard]] virtual std::vector<TaskId> tasks() const = 0;
  [[nodiscard]] virtual std::size_t background_pending() const noexcept = 0;
  [[nodiscard]] virtual const FaultMetrics& metrics() const noexcept = 0;

 protected:
  FaultEngine() = default;
};

}  // namespace snaptier
