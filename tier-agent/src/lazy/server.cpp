// LazyPagesServer: CRIU's lazy-pages side of the restore protocol over the FaultEngine.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>

#include <nlohmann/json.hpp>

#include "core/unique_fd.hpp"
#include "snaptier/lazy_pages.hpp"
#include "snaptier/process.hpp"

namespace snaptier::lazy {

using Clock = std::chrono::steady_clock;
using detail::UniqueFd;

Result<PrefetchPolicy> parse_policy(std::string_view name) {
  if (name == "none") return PrefetchPolicy::none;
  if (name == "all") return PrefetchPolicy::all;
  return fail(Errc::invalid_argument, "unknown prefetch policy '" + std::string(name) + "' (none|all)");
}

std::string_view to_string(PrefetchPolicy policy) noexcept {
  return policy == PrefetchPolicy::all ? "all" : "none";
}

namespace {
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

void add_pages(std::vector<std::uint64_t>& pages, std::uint64_t start, std::uint64_t end) {
  using criu::kPageSize;
  if (end <= start) return;
  for (std::uint64_t a = start / kPageSize * kPageSize; a < end; a += kPageSize) pages.push_back(a);
}
}  // namespace

std::vector<std::uint64_t> arg_env_pages(const criu::MmEntry& mm) {
  std::vector<std::uint64_t> pages;
  add_pages(pages, mm.mm_arg_start, mm.mm_arg_end);
  add_pages(pages, mm.mm_env_start, mm.mm_env_end);
  std::sort(pages.begin(), pages.end());
  pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
  return pages;
}

std::size_t require_before_resume(TaskPrefetch& plan, std::span<const std::uint64_t> required,
                                  std::span<const std::uint64_t> lazy) {
  std::set<std::uint64_t> planned(plan.before_resume.begin(), plan.before_resume.end());
  std::set<std::uint64_t> added;
  for (std::uint64_t page : required) {
    if (!std::binary_search(lazy.begin(), lazy.end(), page) || planned.contains(page)) continue;
    if (added.insert(page).second) plan.before_resume.push_back(page);
  }
  if (!added.empty()) std::erase_if(plan.background, [&](std::uint64_t page) { return added.contains(page); });
  return added.size();
}

struct LazyPagesServer::Impl {
  LazyPagesOptions options;
  std::filesystem::path socket_path;
  UniqueFd listen_fd;
  std::shared_ptr<LazySource> source;
  std::unique_ptr<FaultEngine> engine;
  std::map<TaskId, TaskId> fork_parent;  // engine child id -> parent id
  std::set<pid_t> host_pids;             // every sender seen (SCM_CREDENTIALS)
  std::vector<TaskId> adopted;           // pstree tasks adopted
  std::map<TaskId, std::vector<std::uint64_t>> arg_env;  // pstree task -> arg_env_pages()
  LazyPagesReport report;
  bool ran = false;

  // metrics_now(): another thread asks, the serving loop answers within one round.
  std::mutex metrics_mutex;
  std::condition_variable metrics_cv;
  bool metrics_wanted = false;
  bool serving_over = false;
  std::uint64_t metrics_generation = 0;
  FaultMetrics metrics_copy;

  void answer_metrics_request() {
    std::lock_guard lock(metrics_mutex);
    if (!metrics_wanted) return;
    metrics_copy = engine->metrics();
    metrics_wanted = false;
    ++metrics_generation;
    metrics_cv.notify_all();
  }
  void end_metrics_service() {
    std::lock_guard lock(metrics_mutex);
    metrics_copy = engine->metrics();
    serving_over = true;
    metrics_cv.notify_all();
  }

  TaskPrefetch plan_for(TaskId t) {
    const std::vector<std::uint64_t> lazy = source->lazy_pages(t);
    TaskPrefetch p;
    if (options.planner) {
      p = options.planner(t, *source);
    } else if (options.prefetch == PrefetchPolicy::all) {
      p.before_resume = lazy;
    }
    if (auto it = arg_env.find(t); it != arg_env.end()) report.arg_env_pages += require_before_resume(p, it->second, lazy);
    return p;
  }

  void log(const std::string& line) const {
    if (options.log) options.log(line);
  }
  bool stopping() const { return options.stop != nullptr && options.stop->load(); }

  void kill_tree(const Error& why) {
    if (!report.error) report.error = why;
    for (pid_t p : host_pids) {
      if (p > 0 && ::kill(p, SIGKILL) == 0) report.killed.push_back(p);
    }
    host_pids.clear();
    log("restore failed, killed the restored tree: " + why.what());
  }

  TaskId root_of(TaskId t) const {
    for (int i = 0; i < 64; ++i) {
      auto it = fork_parent.find(t);
      if (it == fork_parent.end()) break;
      t = it->second;
    }
    return t;
  }

  // At most `most`, serving faults meanwhile: returns as soon as `fd` (if >= 0) is readable,
  // and serves the engine the moment its own fd is, so neither a restorer's message nor a fault
  // waits out a polling interval.
  Result<bool> serve_until_readable(int fd, std::chrono::microseconds most) {
    pollfd p[2] = {{engine->wait_fd(), POLLIN, 0}, {fd, POLLIN, 0}};
    const timespec ts{static_cast<time_t>(most.count() / 1'000'000), static_cast<long>(most.count() % 1'000'000) * 1000};
    const bool busy = engine->work_pending();
    static constexpr timespec kNoWait{0, 0};
    const int n = ::ppoll(p, fd >= 0 ? 2 : 1, busy ? &kNoWait : &ts, nullptr);
    if (n < 0 && errno != EINTR) return fail_errno(Errc::io, "poll lazy-pages socket and uffds", errno);
    if (busy || (n > 0 && p[0].revents != 0)) {
      if (auto r = engine->poll(std::chrono::milliseconds(0)); !r) return tl::unexpected(r.error());
    }
    return n > 0 && fd >= 0 && p[1].revents != 0;
  }

  // Wait (bounded) until the socket is readable, serving faults meanwhile.
  Result<void> wait_readable(int fd, Clock::time_point deadline, std::string_view what) {
    for (;;) {
      if (engine->failure()) return tl::unexpected(*engine->failure());
      if (stopping()) return fail(Errc::unavailable, "stopped while waiting for " + std::string(what));
      if (Clock::now() >= deadline) {
        return fail(Errc::timeout, "restorer sent no " + std::string(what) + " within " +
                                       std::to_string(options.step_timeout.count()) + " ms");
      }
      // The bound on one wait is how soon a stop request or the deadline is noticed.
      auto readable = serve_until_readable(fd, std::chrono::milliseconds(2));
      if (!readable) return tl::unexpected(readable.error());
      if (*readable) return {};
    }
  }

  // No fd tells that a task entered group stop: /proc is looked at every 100 us (CRIU stops
  // the tasks just before it exits, so this is a few looks), faults served in between.
  Result<void> wait_stopped(pid_t pid, Clock::time_point deadline) {
    for (;;) {
      const char state = proc::task_state(pid);
      if (state == 'T' || state == 0) return {};  // stopped, or gone (nothing to resume)
      if (engine->failure()) return tl::unexpected(*engine->failure());
      // A restore whose criu died is stopped by its owner: it never leaves the tasks stopped.
      if (stopping()) return fail(Errc::unavailable, "stopped while waiting for task " + std::to_string(pid) + " to be left stopped");
      if (Clock::now() >= deadline) {
        return fail(Errc::timeout, "task " + std::to_string(pid) + " was not left stopped by the restorer (state '" +
                                       std::string(1, state) + "'); was criu restore run with --leave-stopped?");
      }
      if (auto r = serve_until_readable(-1, std::chrono::microseconds(100)); !r) return tl::unexpected(r.error());
    }
  }

  struct Received {
    std::size_t bytes = 0;
    std::vector<UniqueFd> fds;
    pid_t sender = 0;
  };

  // recvmsg of up to `len` bytes with ancillary data (fds, credentials), bounded.
  Result<Received> receive(int fd, void* buf, std::size_t len, Clock::time_point deadline, std::string_view what) {
    if (auto r = wait_readable(fd, deadline, what); !r) return tl::unexpected(r.error());
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 8) + CMSG_SPACE(sizeof(ucred))];
    iovec iov{buf, len};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    ssize_t n;
    do {
      n = ::recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    Received out;
    if (n < 0) return fail_errno(Errc::io, "recvmsg lazy-pages socket", errno);
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET) continue;
      if (c->cmsg_type == SCM_RIGHTS) {
        std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < count; ++i) {
          int f;
          std::memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
          out.fds.emplace_back(f);
        }
      } else if (c->cmsg_type == SCM_CREDENTIALS) {
        ucred cred{};
        std::memcpy(&cred, CMSG_DATA(c), sizeof(cred));
        out.sender = cred.pid;
      }
    }
    if ((msg.msg_flags & MSG_CTRUNC) != 0) return fail(Errc::protocol, "ancillary data truncated");
    out.bytes = static_cast<std::size_t>(n);
    return out;
  }

  // Exactly 4 bytes (an int pid or RSTF). Errc::protocol on EOF.
  Result<std::pair<std::int32_t, pid_t>> receive_int(int fd, Clock::time_point deadline, std::size_t tasks_so_far) {
    std::uint8_t bytes[4];
    std::size_t have = 0;
    pid_t sender = 0;
    while (have < 4) {
      auto r = receive(fd, bytes + have, 4 - have, deadline, have == 0 ? "pid or RSTF" : "rest of a pid");
      if (!r) return tl::unexpected(r.error());
      if (!r->fds.empty()) return fail(Errc::protocol, "unexpected fd with a pid");
      if (r->bytes == 0) {
        return fail(Errc::protocol, "restorer closed the socket before RSTF (" + std::to_string(tasks_so_far) +
                                        " task(s) received" + (have ? ", mid-message)" : ")"));
      }
      if (r->sender > 0) sender = r->sender;
      have += r->bytes;
    }
    std::int32_t v;
    std::memcpy(&v, bytes, 4);
    return std::make_pair(v, sender);
  }

  Result<void> receive_tasks(int client, Clock::time_point t0) {
    std::set<std::int32_t> seen;
    for (;;) {
      auto deadline = Clock::now() + options.step_timeout;
      auto v = receive_int(client, deadline, seen.size());
      if (!v) return tl::unexpected(v.error());
      auto [value, sender] = *v;
      if (sender > 0) host_pids.insert(sender);
      if (static_cast<std::uint32_t>(value) == kRestoreFinished) {
        report.rstf = true;
        report.rstf_ms = ms_since(t0);
        log("RSTF after " + std::to_string(seen.size()) + " task(s)");
        return {};
      }
      const bool zombie = value < 0;
      const std::int64_t pid = zombie ? -static_cast<std::int64_t>(value) : value;
      if (pid == 0 || !source->has_task(pid)) {
        return fail(Errc::protocol, "restorer sent pid " + std::to_string(value) + ", which is not in pstree.img");
      }
      if (!seen.insert(static_cast<std::int32_t>(pid)).second) {
        return fail(Errc::protocol, "restorer sent pid " + std::to_string(pid) + " twice");
      }
      RestoredTask task{value, sender, zombie};
      if (zombie) {
        report.tasks.push_back(task);
        if (options.on_task) options.on_task(task);
        continue;
      }
      char dummy = 0;
      auto r = receive(client, &dummy, 1, Clock::now() + options.step_timeout, "uffd");
      if (!r) return tl::unexpected(r.error());
      if (r->bytes == 0) return fail(Errc::protocol, "restorer closed the socket before sending the uffd of pid " + std::to_string(pid));
      if (r->fds.size() != 1) {
        return fail(Errc::protocol, "expected one uffd (SCM_RIGHTS) after pid " + std::to_string(pid) + ", got " +
                                        std::to_string(r->fds.size()));
      }
      if (r->sender > 0) {
        task.host_pid = r->sender;
        host_pids.insert(r->sender);
      }
      report.tasks.push_back(task);
      if (options.on_task) options.on_task(task);
      AdoptOptions adopt;
      adopt.initialised = true;
      adopt.pid = task.host_pid;
      if (auto a = engine->adopt(pid, r->fds[0].release(), adopt); !a) {
        return fail(a.error().code, "adopt uffd of pid " + std::to_string(pid) + ": " + a.error().message);
      }
      adopted.push_back(pid);
      report.lazy_pages += source->lazy_pages(pid).size();
      log("task " + std::to_string(pid) + " (host pid " + std::to_string(task.host_pid) + "): uffd adopted");
    }
  }

  bool adopted_gone() const {
    auto live = engine->tasks();
    for (TaskId t : adopted) {
      if (std::find(live.begin(), live.end(), t) != live.end()) return false;
    }
    return true;
  }

  // Install every remaining lazy page of every task still served, so they can run without us.
  Result<void> drain() {
    for (TaskId t : engine->tasks()) {
      auto pages = source->lazy_pages(root_of(t));
      if (pages.empty()) continue;
      auto r = engine->prefetch(t, pages);
      if (!r) {
        if (r.error().code == Errc::unavailable) continue;  // the task is gone
        return tl::unexpected(r.error());
      }
      report.drained_pages += r->pages_installed;
    }
    return {};
  }

  // Set by begin(), read by the serving half.
  Clock::time_point t_rstf;
  Clock::time_point serve_deadline;
  std::optional<Error> serve_error;  // the engine's own (epoll broken)
  bool serve_timed_out = false;

  // Steps 1-4: accept, the tasks until RSTF, the prefetch, the resume. true: the tasks now need
  // serving (serve_round until it says so, then end); false: the restore is over (end).
  bool begin() {
    const auto t0 = Clock::now();
    report.images_dir = options.images_dir.string();
    report.policy = options.prefetch;
    t_rstf = t0;
    // 1. accept (bounded)
    UniqueFd client;
    {
      pollfd p{listen_fd.get(), POLLIN, 0};
      const auto deadline = t0 + options.accept_timeout;
      for (;;) {
        if (stopping()) {
          report.error = Error{Errc::unavailable, "stopped before the restorer connected"};
          break;
        }
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
        if (left <= 0) {
          report.error = Error{Errc::timeout, "no restorer connected to " + socket_path.string() + " within " +
                                                  std::to_string(options.accept_timeout.count()) + " ms"};
          break;
        }
        int n = ::poll(&p, 1, static_cast<int>(std::min<long long>(left, 50)));
        if (n < 0 && errno != EINTR) {
          report.error = Error{Errc::io, std::string("poll listen socket: ") + std::strerror(errno)};
          break;
        }
        if (n > 0) {
          int c = ::accept4(listen_fd.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
          if (c < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            report.error = Error{Errc::io, std::string("accept: ") + std::strerror(errno)};
            break;
          }
          client = UniqueFd(c);
          int one = 1;
          (void)::setsockopt(c, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one));
          report.connected_ms = ms_since(t0);
          break;
        }
      }
    }
    // The socket file is not needed once connected (or given up on).
    ::unlink(socket_path.c_str());
    listen_fd.reset();
    if (!client) return false;
    // 2. tasks until RSTF
    if (auto r = receive_tasks(client.get(), t0); !r) {
      kill_tree(r.error());
      return false;
    }
    client.reset();
    t_rstf = Clock::now();
    // 3. prefetch (the tasks are still stopped if the restorer left them so)
    {
      const auto tp = Clock::now();
      for (TaskId t : adopted) {
        TaskPrefetch plan = plan_for(t);
        if (!plan.before_resume.empty()) {
          auto r = engine->prefetch(t, plan.before_resume);
          if (!r) {
            if (r.error().code == Errc::unavailable) continue;
            kill_tree(Error{r.error().code, "prefetch of task " + std::to_string(t) + ": " + r.error().message});
            break;
          }
          report.prefetched_pages += r->pages_installed;
        }
        if (!plan.background.empty()) {
          report.background_queued += plan.background.size();
          if (auto r = engine->prefetch_in_background(t, std::move(plan.background)); !r) {
            if (r.error().code == Errc::unavailable) continue;
            kill_tree(r.error());
            break;
          }
        }
      }
      report.prefetch_ms = ms_since(tp);
    }
    if (report.error) return false;
    // 4. resume
    if (options.resume_after_prefetch) {
      // CRIU sends RSTF before it detaches and leaves the tasks stopped; a SIGCONT sent in
      // between is lost. So wait (serving faults) until each task is in group stop ('T').
      for (const auto& t : report.tasks) {
        if (t.host_pid <= 0 || t.zombie) continue;
        if (auto r = wait_stopped(t.host_pid, Clock::now() + options.step_timeout); !r) {
          kill_tree(r.error());
          return false;
        }
        (void)::kill(t.host_pid, SIGCONT);
      }
    }
    if (options.on_resumed) options.on_resumed();
    serve_deadline = t_rstf + options.serve_timeout;
    return true;
  }

  // One round of step 5: serves what is ready, waiting at most `wait`. true: serving is over
  // (every adopted task gone, stopped, failed, or past serve_timeout).
  bool serve_round(std::chrono::milliseconds wait) {
    answer_metrics_request();
    if (engine->failure() || stopping() || adopted_gone()) return true;
    const auto now = Clock::now();
    if (now >= serve_deadline) {
      serve_timed_out = true;
      return true;
    }
    wait = std::min(wait, std::chrono::duration_cast<std::chrono::milliseconds>(serve_deadline - now));
    if (auto r = engine->poll(wait); !r) {
      serve_error = r.error();
      return true;
    }
    return false;
  }

  // After serving (or after begin() said there is nothing to serve): the failure handling, the
  // drain, the report.
  void end(bool served, LazyPagesReport& out) {
    if (served) {
      if (serve_error) {
        kill_tree(*serve_error);
      } else if (auto f = engine->failure()) {
        kill_tree(*f);
      } else if (engine->task_count() > 0) {
        // Stopped, timed out, or forked children outlive the adopted tasks: install what is
        // left so nothing faults on an unserved lazy page once our uffds close.
        if (serve_timed_out) log("serve timeout: draining the remaining lazy pages");
        if (auto d = drain(); !d) {
          kill_tree(d.error());
        } else {
          // Every lazy page is in: close the uffds now, so a fault elsewhere in a registered
          // range (fresh memory) is the kernel's again rather than waiting for this object to go.
          for (TaskId t : engine->tasks()) (void)engine->forget(t);
        }
      }
    }
    if (report.rstf) report.served_ms = ms_since(t_rstf);
    report.metrics = engine->metrics();
    out = std::move(report);
    end_metrics_service();
  }
};

Result<FaultMetrics> LazyPagesServer::metrics_now(std::chrono::milliseconds timeout) {
  Impl& impl = *impl_;
  std::unique_lock lock(impl.metrics_mutex);
  if (impl.serving_over) return fail(Errc::unavailable, "the lazy-pages server has stopped serving");
  const std::uint64_t generation = impl.metrics_generation;
  impl.metrics_wanted = true;
  if (!impl.metrics_cv.wait_for(lock, timeout, [&] { return impl.serving_over || impl.metrics_generation != generation; })) {
    impl.metrics_wanted = false;
    return fail(Errc::timeout, "the lazy-pages server did not report its metrics within " +
                                   std::to_string(timeout.count()) + " ms");
  }
  return impl.metrics_copy;
}

LazyPagesServer::LazyPagesServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
LazyPagesServer::~LazyPagesServer() {
  if (impl_ && impl_->listen_fd) ::unlink(impl_->socket_path.c_str());
}

const std::filesystem::path& LazyPagesServer::socket_path() const noexcept { return impl_->socket_path; }
std::shared_ptr<LazySource> LazyPagesServer::source() const noexcept { return impl_->source; }

Result<std::unique_ptr<LazyPagesServer>> LazyPagesServer::bind(LazyPagesOptions options) {
  auto impl = std::make_unique<Impl>();
  auto checkpoint = criu::load_checkpoint(options.images_dir);
  if (!checkpoint) return tl::unexpected(checkpoint.error());
  for (const auto& task : checkpoint->tasks) {
    if (task.mm) impl->arg_env.emplace(static_cast<TaskId>(task.pstree.pid), arg_env_pages(*task.mm));
  }
  if (options.source) {
    impl->source = options.source;
  } else {
    auto source = CheckpointPageSource::open(*checkpoint);
    if (!source) return tl::unexpected(source.error());
    impl->source = *source;
  }
  Impl* raw = impl.get();
  FaultEngineOptions eo;
  eo.on_failure = [raw](const FaultFailure& f) {
    raw->kill_tree(Error{f.error.code, "fault of task " + std::to_string(f.task) + " at 0x" +
                                           [](std::uint64_t a) {
                                             char b[32];
                                             std::snprintf(b, sizeof b, "%llx", static_cast<unsigned long long>(a));
                                             return std::string(b);
                                           }(f.address) +
                                           ": " + f.error.message});
    if (f.pid > 0) (void)::kill(f.pid, SIGKILL);
    return true;
  };
  eo.on_fork = [raw](TaskId parent, TaskId child) { raw->fork_parent[child] = parent; };
  eo.on_fault = options.on_fault;
  eo.spin_after_fault = options.spin_after_fault;
  auto engine = FaultEngine::create(impl->source, std::move(eo));
  if (!engine) return tl::unexpected(engine.error());
  impl->engine = std::move(*engine);

  if (options.work_dir.empty()) options.work_dir = options.images_dir;
  impl->socket_path = options.work_dir / kSocketName;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  const std::string path = impl->socket_path.string();
  if (path.size() >= sizeof(addr.sun_path)) return fail(Errc::invalid_argument, "socket path too long: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return fail_errno(Errc::io, "socket", errno);
  impl->listen_fd = UniqueFd(fd);
  int one = 1;
  (void)::setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one));  // inherited by accept
  struct stat st{};
  if (::lstat(path.c_str(), &st) == 0) ::unlink(path.c_str());  // stale socket
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0) return fail_errno(Errc::io, "bind " + path, errno);
  if (::listen(fd, 4) < 0) return fail_errno(Errc::io, "listen " + path, errno);
  impl->options = std::move(options);
  return std::unique_ptr<LazyPagesServer>(new LazyPagesServer(std::move(impl)));
}

bool LazyPagesServer::claim_run(LazyPagesReport& out) {
  if (impl_->ran) {
    out.error = Error{Errc::invalid_argument, "LazyPagesServer::run called twice"};
    return false;
  }
  impl_->ran = true;
  return true;
}

LazyPagesReport LazyPagesServer::run() {
  if (auto over = run_until_resumed()) return std::move(*over);
  return serve_rest();
}

std::optional<LazyPagesReport> LazyPagesServer::run_until_resumed() {
  LazyPagesReport out;
  if (!claim_run(out)) return out;
  if (impl_->begin()) return std::nullopt;
  impl_->end(false, out);
  return out;
}

LazyPagesReport LazyPagesServer::serve_rest() {
  LazyPagesReport out;
  while (!impl_->serve_round(std::chrono::milliseconds(10))) {
  }
  impl_->end(true, out);
  return out;
}

int LazyPagesServer::serve_fd() const noexcept { return impl_->engine->wait_fd(); }
bool LazyPagesServer::serve_work_pending() const noexcept { return impl_->engine->work_pending(); }
bool LazyPagesServer::serve_round() { return impl_->serve_round(std::chrono::milliseconds(0)); }
std::uint64_t LazyPagesServer::faults_served() const noexcept { return impl_->engine->metrics().faults; }
LazyPagesReport LazyPagesServer::end_serving() {
  LazyPagesReport out;
  impl_->end(true, out);
  return out;
}

void to_json(nlohmann::json& j, const LazyPagesReport& r) {
  j = nlohmann::json::object();
  j["images"] = r.images_dir;
  j["policy"] = std::string(to_string(r.policy));
  auto tasks = nlohmann::json::array();
  for (const auto& t : r.tasks) tasks.push_back({{"pid", t.pid}, {"host_pid", t.host_pid}, {"zombie", t.zombie}});
  j["tasks"] = tasks;
  j["rstf"] = r.rstf;
  j["connected_ms"] = r.connected_ms ? nlohmann::json(*r.connected_ms) : nlohmann::json(nullptr);
  j["rstf_ms"] = r.rstf_ms ? nlohmann::json(*r.rstf_ms) : nlohmann::json(nullptr);
  j["lazy_pages"] = r.lazy_pages;
  j["prefetched_pages"] = r.prefetched_pages;
  j["arg_env_pages"] = r.arg_env_pages;
  j["background_queued"] = r.background_queued;
  j["prefetch_ms"] = r.prefetch_ms;
  j["served_ms"] = r.served_ms;
  j["drained_pages"] = r.drained_pages;
  j["killed"] = r.killed;
  j["ok"] = !r.error.has_value();
  j["error"] = r.error ? nlohmann::json(r.error->what()) : nlohmann::json(nullptr);
  j["engine"] = r.metrics;
}

}  // namespace snaptier::lazy
