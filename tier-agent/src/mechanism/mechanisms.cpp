// The restore mechanisms behind RestoreMechanism (include/snaptier/restore_mechanism.hpp):
// CRIU eager, CRIU's lazy-pages daemon (local images, or the snapshot host's page server for
// criu-remote), the agent's lazy-pages server, and the same with pages mapped in place.
//
// Members are declared in the order things are started, so they are torn down in reverse: the
// server thread (or CRIU's daemon) ends before the images it reads and the work directory go.
#include <fstream>
#include <mutex>
#include <optional>
#include <utility>

#include <spdlog/spdlog.h>

#include "inplace/inplace.hpp"
#include "mechanism/criu_steps.hpp"
#include "mechanism/criu_worker.hpp"
#include "mechanism/server_thread.hpp"
#include "snaptier/function_snapshot.hpp"
#include "snaptier/lazy_pages.hpp"
#include "snaptier/process.hpp"
#include "snaptier/restore_mechanism.hpp"

namespace snaptier::mechanism {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

constexpr milliseconds kServerGraceAfterCriuFailed{500};

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

// The context's copy written from the store into `dir` (all pages, or only what CRIU restores
// itself), and the step's figures for the result.
Result<std::pair<snap::Materialized, MaterializeStep>> materialize_into(const RestoreContext& ctx, const fs::path& dir,
                                                                        bool all_pages) {
  const auto t = Clock::now();
  auto m = snap::materialize(ctx.snapshot, *ctx.store, dir, all_pages);
  if (!m) return tl::unexpected(m.error());
  const MaterializeStep step{ms_since(t), m->pages_written, m->bytes_written};
  return std::make_pair(std::move(*m), step);
}

class Base : public RestoreMechanism {
 public:
  Base(RestoreContext context, WorkDir dir) : dir_(std::move(dir)), ctx_(std::move(context)) {}
  const fs::path& dir() const noexcept override { return dir_.path(); }
  bool private_socket_dir() const noexcept override { return !ctx_.socket_dir.empty(); }

 protected:
  static constexpr const char* kRestoreLog = "restore.log";
  static constexpr int kRestoreLogLevel = 2;

  fs::path images() const { return dir_.path() / "images"; }
  std::vector<std::string> restore_argv() const {
    return {ctx_.criu, "restore", "-D", images().string(), "-W", dir().string(), "-d", "--pidfile",
            (dir() / "pid").string(), "-o", kRestoreLog, "-v" + std::to_string(kRestoreLogLevel)};
  }
  // How criu is spawned for this instance: with its own socket directory (RestoreContext::socket_dir).
  Result<proc::SpawnOptions> criu_spawn_options() const {
    if (ctx_.socket_dir.empty()) return proc::SpawnOptions{};
    return instance_socket_mount(dir() / kInstanceDir, ctx_.socket_dir);
  }
  Result<void> run_criu_restore(const std::vector<std::string>& argv) {
    auto options = criu_spawn_options();
    if (!options) return tl::unexpected(options.error());
    return mechanism::run_criu_restore(images(), argv, ctx_.timeout, dir() / kRestoreLog, "criu restore", *options);
  }
  // With RestoreContext::prestart_criu, the `criu swrk` worker the restore will go to; every
  // mechanism starts it in prepare(), so none pays for loading criu inside its timed restore.
  Result<void> prestart_criu_worker() {
    if (!ctx_.prestart_criu) return {};
    auto options = criu_spawn_options();
    if (!options) return tl::unexpected(options.error());
    auto worker = CriuWorker::start(ctx_.criu, dir() / "criu-swrk.out", std::move(*options));
    if (!worker) return tl::unexpected(worker.error());
    worker_ = std::move(*worker);
    // Its command line names nothing of the work directory, so the pid file does until the
    // restored root replaces it: the sweep (leftovers) of an agent that died in between ends
    // the worker. A worker the agent's death left mid-restore finishes or fails on its own
    // (CRIU kills the tree of a restore that failed; the sweep finds a restored instance by
    // the paths in its command line); only a worker killed mid-restore leaves its tasks
    // waiting, and restore() ends them.
    std::ofstream(dir() / "pid") << worker_->pid() << "\n";
    return {};
  }
  // `criu restore -d [--lazy-pages] [--leave-stopped]`: sent to the prestarted worker, or run.
  // Either way the work directory's `pid` names the restored root afterwards.
  Result<pid_t> criu_restore(bool lazy_pages, bool leave_stopped) {
    if (!worker_) {
      auto argv = restore_argv();
      if (lazy_pages) argv.push_back("--lazy-pages");
      if (leave_stopped) argv.push_back("--leave-stopped");
      if (auto ok = run_criu_restore(argv); !ok) return tl::unexpected(ok.error());
      return read_pid_file(dir() / "pid");
    }
    if (auto ok = check_images_before_restore(images(), "criu restore"); !ok) return tl::unexpected(ok.error());
    const CriuRestoreRequest request{images(), dir(), kRestoreLog, kRestoreLogLevel, lazy_pages, leave_stopped};
    auto root = worker_->restore(request, ctx_.timeout, dir() / kRestoreLog);
    if (root) std::ofstream(dir() / "pid") << *root << "\n";
    return root;
  }
  // Images (and pages) written from the store; all of them, or only what CRIU restores itself.
  Result<void> materialize(bool all_pages, RestoreResult& out) {
    auto m = materialize_into(ctx_, images(), all_pages);
    if (!m) return tl::unexpected(m.error());
    materialized_ = std::move(m->first);
    out.materialize = m->second;
    return {};
  }
  // The images are not needed once the tree runs (or is gone); a kept instance keeps only its
  // work directory's socket and logs.
  void drop_images() {
    std::error_code ec;
    fs::remove_all(images(), ec);
  }
  void keep_dir_if(bool kept) {
    if (kept) dir_.keep();
  }

  WorkDir dir_;
  RestoreContext ctx_;
  std::optional<snap::Materialized> materialized_;
  std::optional<CriuWorker> worker_;  // prestart_criu_worker(); used by one restore
};

// `criu restore` from complete images on local storage.
class CriuEager final : public Base {
 public:
  using Base::Base;
  Result<void> prepare(RestoreResult& out) override {
    if (auto ok = materialize(true, out); !ok) return ok;
    return prestart_criu_worker();
  }
  Result<pid_t> restore() override { return criu_restore(/*lazy_pages=*/false, /*leave_stopped=*/false); }
  void finish(bool kept, RestoreResult& out) override {
    // CRIU moved every page itself: nothing faults.
    const std::uint64_t bytes = materialized_ ? materialized_->bytes_written : 0;
    out.faults = FaultCounts{};
    out.bytes_moved_per_tier = std::map<TierKind, std::uint64_t>{{TierKind::file, bytes}};
    out.pages_prefetched = bytes / kPageSize;
    out.pages_copied_before_resume = out.pages_prefetched;
    out.pages_background = 0;
    drop_images();
    keep_dir_if(kept);
  }
};

// CRIU's own `criu lazy-pages` daemon: over complete local images, or (remote) over the
// snapshot host's page server, which a `criu dump --lazy-pages` there runs for us.
class CriuLazy final : public Base {
 public:
  CriuLazy(RestoreContext context, WorkDir dir, bool remote) : Base(std::move(context), std::move(dir)), remote_(remote) {}

  Result<void> prepare(RestoreResult& out) override {
    if (remote_) {
      if (auto ok = fetch_remote_images(out); !ok) return ok;
    } else if (auto ok = materialize(true, out); !ok) {
      return ok;
    }
    std::vector<std::string> argv{ctx_.criu, "lazy-pages", "-D", images().string(), "-W", dir().string(),
                                  "-o", "lazy-pages.log", "-v2"};
    if (remote_) {
      argv.insert(argv.end(), {"--page-server", "--address", ctx_.remote->address, "--port",
                               std::to_string(ctx_.remote->port)});
    }
    auto daemon = proc::spawn(argv);
    if (!daemon) return tl::unexpected(daemon.error());
    daemon_ = std::move(*daemon);
    if (auto ok = wait_for_socket(dir() / lazy::kSocketName, daemon_, milliseconds(30'000), dir() / "lazy-pages.log");
        !ok) {
      return ok;
    }
    return prestart_criu_worker();
  }

  Result<pid_t> restore() override { return criu_restore(/*lazy_pages=*/true, /*leave_stopped=*/false); }

  void finish(bool kept, RestoreResult& out) override {
    // criu lazy-pages does not report its faults.
    const std::uint64_t bytes = materialized_ ? materialized_->bytes_written : 0;
    out.faults = std::optional<FaultCounts>();
    out.bytes_moved_per_tier = std::map<TierKind, std::uint64_t>{{TierKind::file, bytes}};
    out.pages_prefetched = 0;
    out.pages_copied_before_resume = 0;
    out.pages_background = 0;
    // It exits once its tasks are gone or every page is sent; the Child kills it after that.
    if (daemon_.pid() > 0) (void)daemon_.wait(milliseconds(30'000));
    drop_images();
    keep_dir_if(kept);
  }

 private:
  Result<void> fetch_remote_images(RestoreResult& out) {
    if (!ctx_.remote) return fail(Errc::unavailable, "criu-remote needs the snapshot host as a peer");
    const auto t = Clock::now();
    const RemotePeer& peer = *ctx_.remote;
    auto served = peer.call(control::FunctionServeLazy{ctx_.snapshot_id, peer.address, peer.port});
    if (!served) return tl::unexpected(served.error());
    std::error_code ec;
    fs::create_directories(images(), ec);
    if (ec) return fail(Errc::io, "create " + images().string() + ": " + ec.message());
    std::uint64_t image_bytes = 0;
    if (!served->contains("images") || !(*served)["images"].is_object()) {
      return fail(Errc::protocol, peer.host + " sent no images");
    }
    for (const auto& [name, hex] : (*served)["images"].items()) {
      if (name.empty() || name.find('/') != std::string::npos || name == "." || name == ".." || !hex.is_string()) {
        return fail(Errc::protocol, peer.host + " sent a bad image entry");
      }
      auto bytes = from_hex(hex.get<std::string>());
      if (!bytes) return tl::unexpected(bytes.error());
      std::ofstream file(images() / name, std::ios::binary);
      file.write(reinterpret_cast<const char*>(bytes->data()), static_cast<std::streamsize>(bytes->size()));
      if (!file) return fail(Errc::io, "write " + (images() / name).string());
      image_bytes += bytes->size();
    }
    json reply = *served;
    reply.erase("images");
    out.remote = RemoteStep{peer.host, peer.address, peer.port, image_bytes, ms_since(t), std::move(reply)};
    return {};
  }

  bool remote_;
  proc::Child daemon_;  // killed and reaped on destruction if still running
};

// What the agent's lazy-pages server restores from, once made (AgentLazy::make_images).
struct PreparedImages {
  snap::Materialized materialized;
  std::optional<inplace::Prepared> mapped;  // the in-place step's result, if it mapped pages
  inplace::StepReport in_place;             // the result's "in_place" report
  MaterializeStep step;
  std::shared_ptr<snap::StorePageSource> source;  // what the server serves from (read-only: shareable)
};

}  // namespace

class SharedBurst {
 public:
  SharedBurst(WorkDir dir, bool one_serving_thread, std::chrono::microseconds fault_spin)
      : dir_(std::move(dir)), loop_tried_(!one_serving_thread), fault_spin_(fault_spin) {}
  // The first caller runs `make` in dir(); the others wait for it and get the same result
  // (a failure too: every instance of the burst fails with it).
  const Result<PreparedImages>& get(const std::function<Result<PreparedImages>(const fs::path&)>& make) {
    std::lock_guard lock(mutex_);
    if (!made_) made_ = make(dir_.path());
    return *made_;
  }
  [[nodiscard]] const fs::path& dir() const noexcept { return dir_.path(); }
  // The burst's one serving thread, started by the first instance that asks; null if it could
  // not start (each instance then serves on its own thread).
  std::shared_ptr<lazy::ServingLoop> loop() {
    std::lock_guard lock(mutex_);
    if (!loop_tried_) {
      loop_tried_ = true;
      if (auto started = lazy::ServingLoop::start(fault_spin_)) {
        loop_ = std::move(*started);
      } else {
        spdlog::warn("burst serving loop: {}; every instance serves on its own thread", started.error().what());
      }
    }
    return loop_;
  }

 private:
  std::mutex mutex_;
  WorkDir dir_;
  std::optional<Result<PreparedImages>> made_;
  bool loop_tried_ = false;
  std::chrono::microseconds fault_spin_;
  std::shared_ptr<lazy::ServingLoop> loop_;  // before dir_ goes: its servers read the images
};

std::shared_ptr<SharedBurst> make_shared_burst(fs::path dir, bool one_serving_thread,
                                               std::chrono::microseconds fault_spin) {
  auto made = WorkDir::create(dir);
  if (!made) {
    spdlog::warn("burst images: {}; every instance prepares its own", made.error().what());
    return nullptr;
  }
  return std::make_shared<SharedBurst>(std::move(*made), one_serving_thread, fault_spin);
}

namespace {

// `criu restore --lazy-pages --leave-stopped`, the agent's lazy-pages server serving the uffds
// from the store with the policy's plan. The in-place step comes first: the pages the policy
// uses in place (none for most) are checked and written into the images as file mappings of
// the CXL region, so the server sees only the pages that are still copied.
class AgentLazy final : public Base {
 public:
  using Base::Base;

  Result<void> prepare(RestoreResult& out) override {
    if (ctx_.shared_burst) {
      const auto& made = ctx_.shared_burst->get([this](const fs::path& dir) { return make_images(dir); });
      if (!made) return tl::unexpected(made.error());
      const auto t = Clock::now();
      std::error_code ec;
      fs::copy(ctx_.shared_burst->dir(), images(), fs::copy_options::recursive, ec);
      if (ec) return fail(Errc::io, "copy the burst's images into " + images().string() + ": " + ec.message());
      take(*made, out);
      out.materialize->ms = ms_since(t);  // this instance's share: the copy
      out.in_place->prepared = "once for the burst";
    } else {
      auto made = make_images(images());
      if (!made) return tl::unexpected(made.error());
      take(*made, out);
    }
    lazy::LazyPagesOptions lo;
    lo.images_dir = images();
    lo.work_dir = dir();
    lo.source = source_;
    // The planner runs on the server's thread: it holds what it reads (the policy and the source).
    lo.planner = [policy = ctx_.policy, src = source_](TaskId task, const lazy::LazySource&) {
      return policy->plan(src->policy_view(task));
    };
    lo.resume_after_prefetch = true;
    lo.accept_timeout = milliseconds(60'000);
    lo.serve_timeout = ctx_.timeout;
    lo.spin_after_fault = ctx_.fault_spin;
    if (ctx_.prestart_criu && materialized_ && !materialized_->checkpoint.tasks.empty()) {
      // The work directory's `pid` names the tree from the moment the root is known, as
      // `criu restore --pidfile` does before it leaves the tasks stopped: an agent that dies
      // before criu swrk's reply leaves a tree the next agent's sweep (leftovers) can find.
      const auto root = static_cast<std::int32_t>(materialized_->checkpoint.tasks.front().pstree.pid);
      lo.on_task = [pid_file = dir() / "pid", root](const lazy::RestoredTask& task) {
        if (task.pid == root && task.host_pid > 0) std::ofstream(pid_file) << task.host_pid << "\n";
      };
    }
    auto server = ServerThread::start(std::move(lo), ctx_.shared_burst ? ctx_.shared_burst->loop() : nullptr);
    if (!server) return tl::unexpected(server.error());
    server_ = std::move(*server);
    return prestart_criu_worker();
  }

  Result<pid_t> restore() override {
    auto root = criu_restore(/*lazy_pages=*/true, /*leave_stopped=*/true);
    if (!root) {
      // No restorer comes once CRIU has failed; a server that found the cause (a page failing
      // its checksum) kept it as its error before it killed the tree, which is what made CRIU
      // fail, so a short grace reads it, and a stop ends a server still waiting to be connected.
      const auto& report = server_->finish(kServerGraceAfterCriuFailed);
      // A server that never saw the restorer only reports that it was stopped; one that did may
      // hold the cause, so its code leads, unless all it says is that it was stopped.
      if (report.error && report.connected_ms) {
        const Errc code = report.error->code == Errc::unavailable ? root.error().code : report.error->code;
        return fail(code, root.error().message + "; lazy-pages server: " + report.error->message);
      }
      return root;
    }
    // Resumed = every before-resume page installed and SIGCONT sent.
    if (!server_->wait_resumed(ctx_.timeout)) {
      kill_tree(*root);
      const auto& report = server_->finish(milliseconds(5'000));
      return tl::unexpected(report.error ? *report.error : Error{Errc::timeout, "the restored tasks were never resumed"});
    }
    return root;
  }

  void at_first_response() override {
    if (auto m = server_->server().metrics_now(milliseconds(5'000))) at_first_response_ = *m;
  }

  void finish(bool kept, RestoreResult& out) override {
    const auto& report = server_->finish(kept ? milliseconds(0) : milliseconds(30'000));
    const FaultMetrics& m = at_first_response_ ? *at_first_response_ : report.metrics;
    out.faults = FaultCounts{m.faults, m.read_faults, m.write_faults, m.zero_filled_faults,
                             static_cast<double>(m.fault_service_ns) / 1e6, m.demand_pages_per_tier};
    std::map<TierKind, std::uint64_t> moved;
    for (const auto& [tier, pages] : m.pages_copied_per_tier) moved[tier] = pages * kPageSize;
    out.bytes_moved_per_tier = moved;
    out.pages_prefetched = report.prefetched_pages;
    out.pages_copied_before_resume = report.prefetched_pages;
    out.pages_background = m.pages_background;
    out.prefetch_ms = report.prefetch_ms;
    out.faults_after_digest = report.metrics.faults;
    out.lazy_pages = report.lazy_pages;
    out.server = ServerReport{report.error ? std::optional<std::string>(report.error->what()) : std::nullopt,
                              report.drained_pages};
    if (report.error && !kept) {
      // The cause (e.g. a page that fails its checksum) comes before what it did to the invocation.
      out.problems.insert(out.problems.begin(), "lazy-pages server: " + report.error->what());
    }
    drop_images();
    keep_dir_if(kept);
  }

  fs::path mapped_backing() const override { return mapped_ ? mapped_->plan.rewrite.backing_file : fs::path(); }

  // The images the server and CRIU read, in `dir`: materialized without the lazy pages, then
  // the in-place step for a policy that maps pages (the pages it maps checked and cut).
  Result<PreparedImages> make_images(const fs::path& dir) const {
    PreparedImages made;
    auto m = materialize_into(ctx_, dir, false);
    if (!m) return tl::unexpected(m.error());
    made.materialized = std::move(m->first);
    made.step = m->second;
    const policy::RestorePolicy& chosen = *ctx_.policy;
    const auto selection = inplace::selection(chosen, ctx_.in_place);
    made.in_place = inplace::describe_choice(chosen, ctx_.in_place);
    if (selection != policy::InPlacePages::none) {
      auto prepared = inplace::prepare(*ctx_.store, ctx_.snapshot, dir, made.materialized.checkpoint, selection,
                                       *ctx_.in_place);
      if (prepared) {
        made.mapped = std::move(*prepared);
        inplace::report(*made.mapped, made.in_place);
      } else if (prepared.error().code == Errc::unsupported && !chosen.in_place().required) {
        made.in_place.mode = "copied (" + prepared.error().message + ")";  // an older snapshot
      } else {
        return tl::unexpected(prepared.error());
      }
    }
    auto source = snap::StorePageSource::open(ctx_.store, ctx_.snapshot,
                                              made.mapped ? made.mapped->checkpoint : made.materialized.checkpoint);
    if (!source) return tl::unexpected(source.error());
    made.source = std::move(*source);
    return made;
  }
  void take(const PreparedImages& made, RestoreResult& out) {
    materialized_ = made.materialized;
    mapped_ = made.mapped;
    materialized_->checkpoint.dir = images();  // this instance's copy, whoever made it
    if (mapped_) mapped_->checkpoint.dir = images();
    out.materialize = made.step;
    out.in_place = made.in_place;
    source_ = made.source;
  }
  std::uint64_t pages_mapped_in_place() const override { return mapped_ ? mapped_->plan.pages : 0; }

 private:
  std::optional<inplace::Prepared> mapped_;  // the in-place step's plan, if it mapped pages
  std::optional<FaultMetrics> at_first_response_;
  std::shared_ptr<snap::StorePageSource> source_;  // the burst's, or this restore's own
  std::unique_ptr<ServerThread> server_;  // last: its thread reads the images and the source
};

}  // namespace

Result<std::unique_ptr<RestoreMechanism>> make_mechanism(RestoreContext context) {
  if (!context.policy) return fail(Errc::invalid_argument, "a restore needs a policy");
  auto dir = WorkDir::create(context.dir);
  if (!dir) return tl::unexpected(dir.error());
  const policy::Mechanism kind = context.policy->mechanism();
  switch (kind) {
    case policy::Mechanism::criu_eager:
      return std::make_unique<CriuEager>(std::move(context), std::move(*dir));
    case policy::Mechanism::criu_lazy:
      return std::make_unique<CriuLazy>(std::move(context), std::move(*dir), false);
    case policy::Mechanism::criu_remote:
      return std::make_unique<CriuLazy>(std::move(context), std::move(*dir), true);
    case policy::Mechanism::snaptier_lazy:
      return std::make_unique<AgentLazy>(std::move(context), std::move(*dir));
  }
  return fail(Errc::invalid_argument, "unknown mechanism");
}

}  // namespace snaptier::mechanism
