// FunctionService: snapshot and restore of serverless functions over CRIU, the tiered store and
// the lazy-pages server (include/snaptier/function_service.hpp, docs/restore-policies.md).
#include "snaptier/function_service.hpp"

#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

#include <spdlog/spdlog.h>

#include "agent/admission.hpp"
#include "agent/snapshot_copies.hpp"
#include "inplace/inplace.hpp"
#include "mechanism/criu_steps.hpp"
#include "mechanism/server_thread.hpp"
#include "snaptier/restore_mechanism.hpp"
#include "snaptier/function.hpp"
#include "snaptier/function_snapshot.hpp"
#include "snaptier/lazy_pages.hpp"
#include "snaptier/process.hpp"
#include "snaptier/snapshot_store.hpp"
#include "snaptier/restore_policy.hpp"

namespace snaptier {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

using mechanism::kill_tree;
using mechanism::read_pid_file;
using mechanism::run_criu;
using mechanism::tail_of;
using mechanism::tcp_listening;
using mechanism::to_hex;

namespace {

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

json tier_bytes(const std::map<TierKind, std::uint64_t>& m, std::uint64_t scale = 1) {
  json j = json::object();
  for (const auto& [tier, n] : m) j[std::string(to_string(tier))] = n * scale;
  return j;
}

// The snaptier.function blob of a stored snapshot, parsed once into what a restore needs.
struct FunctionMeta {
  std::string function;
  std::string digest;         // of the instance before the dump
  fs::path socket;            // the instance's socket path, baked into the images
  std::string snapshot_host;  // the agent that took it
  std::string cold_tier;      // where the placement put the pages that were not hot; empty if not recorded
};

Result<FunctionMeta> function_meta(const Snapshot& snapshot) {
  const std::string& id = snapshot.info.id;
  auto blob = snapshot.blobs.find(snap::kFunctionBlob);
  if (blob == snapshot.blobs.end()) return fail(Errc::invalid_argument, "'" + id + "' is not a function snapshot");
  const json meta = json::parse(std::string_view(reinterpret_cast<const char*>(blob->second.data()), blob->second.size()),
                                nullptr, false);
  auto text = [&](const char* key) -> const json* {
    return meta.is_object() && meta.contains(key) && meta[key].is_string() ? &meta[key] : nullptr;
  };
  if (!text("function") || !text("digest") || !text("socket")) {
    return fail(Errc::corrupt, "'" + id + "': function metadata is damaged");
  }
  auto optional_text = [&](const char* key) { return text(key) ? meta[key].get<std::string>() : std::string(); };
  return FunctionMeta{meta["function"].get<std::string>(), meta["digest"].get<std::string>(),
                      meta["socket"].get<std::string>(), optional_text("snapshot_host"), optional_text("cold_tier")};
}

}  // namespace

namespace agent_detail {

Result<StoredCopies> store_copies(SnapshotStore& store, const Snapshot& snapshot, std::span<const std::byte> data,
                                  const json& function_blob, const std::map<TierKind, TierCaps>& up) {
  const std::string& id = snapshot.info.id;
  StoredCopies out;
  for (const auto& placement : policy::all_placements()) {
    const std::string variant = policy::variant_id(id, placement->name());
    auto skip = [&](const std::string& reason) {
      spdlog::warn("snapshot {}: no {} copy: {}", id, placement->name(), reason);
      out.skipped.push_back({{"placement", placement->name()}, {"reason", reason}});
    };
    // The previous copy goes first, made again or not: a skipped placement must not leave an
    // older snapshot under this id. A failed remove is fatal for the same reason.
    if (auto removed = store.remove(variant); !removed && removed.error().code != Errc::not_found) {
      return fail(removed.error().code, "replace " + variant + ": " + removed.error().message);
    }
    auto request = placement->place(snapshot.pages, up);
    auto cold_tier = placement->cold_tier(up);
    if (!request || !cold_tier) {
      skip(!request ? request.error().message : cold_tier.error().message);
      continue;
    }
    Snapshot copy = snapshot;
    copy.info.id = variant;
    json blob = function_blob;
    blob["placement"] = placement->name();
    blob["cold_tier"] = to_string(*cold_tier);
    const std::string text = blob.dump();
    copy.blobs[snap::kFunctionBlob].assign(reinterpret_cast<const std::byte*>(text.data()),
                                           reinterpret_cast<const std::byte*>(text.data()) + text.size());
    auto info = store.put(std::move(copy), data, *request);
    if (!info) {
      skip("store " + variant + ": " + info.error().what());
      continue;
    }
    out.zero_pages = info->zero_pages;
    out.variants.push_back({{"id", variant}, {"placement", placement->name()}, {"cold_tier", to_string(*cold_tier)},
                            {"pages", info->page_count}, {"zero_pages", info->zero_pages},
                            {"bytes_per_tier", tier_bytes(info->bytes_per_tier)}, {"published", info->published}});
    spdlog::info("snapshot {}: stored {} ({} pages, {} zero)", id, variant, info->page_count, info->zero_pages);
  }
  if (out.variants.empty()) return fail(Errc::unavailable, "no placement could be stored: " + out.skipped.dump());
  return out;
}

}  // namespace agent_detail

struct FunctionService::RemoteDump {
  proc::Child dump;
  fs::path dir;
  Clock::time_point deadline;
};

void FunctionService::set_peers(std::map<std::string, NetAddress> peers, std::string token) {
  peers_ = std::move(peers);
  peer_token_ = std::move(token);
}

Result<json> FunctionService::call_peer(const std::string& host, const control::Command& command) {
  auto peer = peers_.find(host);
  if (peer == peers_.end()) return fail(Errc::not_found, "host '" + host + "' is not a peer of " + host_);
  control::ClientOptions options;
  options.endpoint = peer->second;
  options.token = peer_token_;
  options.connect_timeout = milliseconds(10'000);
  options.io_timeout = std::chrono::duration_cast<milliseconds>(config_.operation_timeout);
  return control::call_peer(host + " (" + peer->second.to_string() + ")", options, command);
}

void FunctionService::reap_remote_dumps(bool all) {
  std::lock_guard lock(remote_dumps_mutex_);
  std::error_code ec;
  for (auto it = remote_dumps_.begin(); it != remote_dumps_.end();) {
    auto& d = **it;
    bool over = d.dump.try_wait().has_value();
    if (!over && (all || Clock::now() > d.deadline)) {
      spdlog::warn("criu-remote: page server in {} still running; killed", d.dir.string());
      d.dump.kill();
      (void)d.dump.wait(milliseconds(5'000));
      over = true;
    }
    if (over) {
      fs::remove_all(d.dir, ec);
      it = remote_dumps_.erase(it);
    } else {
      ++it;
    }
  }
}

FunctionService::FunctionService(std::string host, FunctionsConfig config, std::shared_ptr<SnapshotStore> store,
                                 std::map<TierKind, TierCaps> tiers)
    : host_(std::move(host)),
      config_(std::move(config)),
      store_(std::move(store)),
      tiers_(std::move(tiers)),
      admission_(std::make_unique<agent_detail::Admission>(config_.max_operations)) {}

FunctionService::~FunctionService() = default;

// ---------------------------------------------------------------------------------------------
// snapshot

Result<json> FunctionService::snapshot(const control::FunctionSnapshot& request) {
  if (!store_) return fail(Errc::unsupported, host_ + " has no snapshot store");
  const milliseconds timeout = std::chrono::duration_cast<milliseconds>(config_.operation_timeout);
  const auto t_start = Clock::now();
  auto spec = function::load_spec(config_.workloads_dir / request.function);
  if (!spec) return tl::unexpected(spec.error());
  const std::string id = request.id.value_or(request.function);
  if (!is_valid_snapshot_id(id) || id.find(':') != std::string::npos) {
    return fail(Errc::invalid_argument, "'" + id + "' is not a usable snapshot id");
  }
  auto ticket = admission_->snapshot(id);
  if (!ticket) return tl::unexpected(ticket.error());
  const fs::path dir = config_.work_dir / "snapshots" / id;
  std::error_code ec;
  fs::remove_all(dir, ec);
  fs::create_directories(dir / "images", ec);
  if (ec) return fail(Errc::io, "create " + dir.string() + ": " + ec.message());
  spdlog::info("snapshot {}: starting {}", id, request.function);

  // 1. A fresh instance, initialized.
  auto instance = function::start(config_.workloads_dir, *spec, dir / "run", timeout);
  if (!instance) return tl::unexpected(instance.error());
  const auto t_started = Clock::now();
  auto digest = function::digest(instance->socket, milliseconds(120'000));
  if (!digest) {
    (void)function::stop(*instance, milliseconds(10'000));
    return fail(digest.error().code, "digest of the fresh instance: " + digest.error().message);
  }

  // 2. criu dump (kills the instance).
  const fs::path images = dir / "images";
  if (auto ok = run_criu({config_.criu, "dump", "-t", std::to_string(instance->pid), "-D", images.string(), "-W",
                          dir.string(), "-o", "dump.log", "-v2"},
                         timeout, dir / "dump.log", "criu dump");
      !ok) {
    (void)function::stop(*instance, milliseconds(10'000));
    return tl::unexpected(ok.error());
  }
  const auto t_dumped = Clock::now();

  // 3. Ingest.
  auto ingested = snap::ingest(images);
  if (!ingested) return tl::unexpected(ingested.error());
  const auto t_ingested = Clock::now();

  // 4. Profiling restore: serve the first invocation lazily from the images, record the faults.
  snap::ProfileRecorder recorder;
  const fs::path profile_dir = dir / "profile";
  fs::create_directories(profile_dir, ec);
  lazy::LazyPagesOptions lo;
  lo.images_dir = images;
  lo.work_dir = profile_dir;
  lo.prefetch = lazy::PrefetchPolicy::none;
  lo.on_fault = [&recorder](const FaultObservation& f) { recorder.record(f); };
  lo.accept_timeout = milliseconds(60'000);
  lo.serve_timeout = timeout;
  auto started = mechanism::ServerThread::start(std::move(lo));
  if (!started) return tl::unexpected(started.error());
  auto server = std::move(*started);
  auto restored = mechanism::run_criu_restore(
      images,
      {config_.criu, "restore", "--lazy-pages", "-D", images.string(), "-W", profile_dir.string(), "-d", "--pidfile",
       (profile_dir / "pid").string(), "-o", "restore.log", "-v2"},
      timeout, profile_dir / "restore.log", "profiling criu restore");
  if (!restored) return tl::unexpected(restored.error());
  auto restored_pid = read_pid_file(profile_dir / "pid");
  if (!restored_pid) return tl::unexpected(restored_pid.error());
  auto invoked = function::invoke_example(instance->socket, *spec, timeout);
  recorder.freeze();
  snap::ProfileSummary profile;
  if (invoked) profile = snap::apply_profile(*ingested, recorder, *restored_pid);
  kill_tree(*restored_pid);
  const auto& profile_report = server->finish(milliseconds(30'000));
  if (!invoked) return fail(invoked.error().code, "profiled invocation: " + invoked.error().message);
  if (!invoked->problems.empty()) {
    return fail(Errc::corrupt, "the profiled restore answered wrongly: " + invoked->problems.front());
  }
  if (profile_report.error) {
    return fail(profile_report.error->code, "profiling lazy-pages server: " + profile_report.error->message);
  }
  const auto t_profiled = Clock::now();

  // 5. Store one copy per placement this host can hold.
  json function_blob{{"function", request.function}, {"snapshot", id}, {"digest", *digest},
                     {"socket", instance->socket.string()}, {"snapshot_host", host_},
                     {"init_ms", instance->init_ms}, {"profile", profile}};
  ingested->snapshot.info.id = id;
  auto copies = agent_detail::store_copies(*store_, ingested->snapshot, ingested->data, function_blob, tiers_);
  if (!copies) return tl::unexpected(copies.error());
  const auto t_stored = Clock::now();
  fs::remove_all(dir, ec);  // the images live in the store now

  std::uint64_t image_bytes = 0;
  for (const auto& [name, blob] : ingested->snapshot.blobs) image_bytes += blob.size();
  return json{{"id", id}, {"function", request.function}, {"host", host_}, {"digest", *digest},
              {"pages", ingested->snapshot.pages.size()}, {"zero_pages", copies->zero_pages},
              {"metadata_bytes", image_bytes}, {"tasks", ingested->layout.tasks.size()},
              {"profile", profile}, {"profile_answer_ms", invoked->round_trip_ms},
              {"variants", copies->variants}, {"skipped", copies->skipped},
              {"timings_ms", {{"start", ms_between(t_start, t_started)}, {"dump", ms_between(t_started, t_dumped)},
                              {"ingest", ms_between(t_dumped, t_ingested)}, {"profile", ms_between(t_ingested, t_profiled)},
                              {"store", ms_between(t_profiled, t_stored)}, {"total", ms_between(t_start, t_stored)}}}};
}

// ---------------------------------------------------------------------------------------------
// restore

Result<json> FunctionService::restore(const control::FunctionRestore& request) {
  if (!store_) return fail(Errc::unsupported, host_ + " has no snapshot store");
  reap_remote_dumps(false);
  if (request.instances) return burst(request);
  auto ticket = admission_->restore(request.snapshot);
  if (!ticket) return tl::unexpected(ticket.error());
  auto result = restore_one(request);
  if (!result) return tl::unexpected(result.error());
  return mechanism::to_json(*result);
}

Result<mechanism::RestoreResult> FunctionService::restore_one(const control::FunctionRestore& request,
                                                              std::function<void(bool)> at_first_answer,
                                                              std::shared_ptr<mechanism::SharedBurst> shared_burst) {
  auto picked = pick_restore(request);
  if (!picked) return tl::unexpected(picked.error());
  auto& [context, invocation, result] = *picked;
  if (at_first_answer) invocation.at_first_answer = std::move(at_first_answer);
  context.shared_burst = std::move(shared_burst);
  if (result.error) return result;  // refused by what the host lacks, nothing started
  const fs::path dir = context.dir;
  auto restorer = mechanism::make_mechanism(std::move(context));
  if (!restorer) {
    result.fail_with(restorer.error());
    return result;
  }
  const bool private_socket_dir = (*restorer)->private_socket_dir();
  mechanism::run_restore(**restorer, invocation, result);
  restorer->reset();  // its daemons, threads and (unless kept) work directory end here
  if (result.instance) track_kept(result, dir);
  if (request.measure_limit && !request.instances && result.ok) {
    // After the measured restore, so that one runs first on every cache the two share.
    if (result.instance && !private_socket_dir) {
      result.limit_error = "bare restore: the kept instance holds the dumped socket path";
    } else if (auto bare = bare_restore(request)) {
      result.bare_restore_ms = *bare;
    } else {
      result.limit_error = "bare restore: " + bare.error().message;
    }
  }
  return result;
}

Result<double> FunctionService::bare_restore(const control::FunctionRestore& request) {
  auto picked = pick_restore(request);
  if (!picked) return tl::unexpected(picked.error());
  auto& [context, invocation, result] = *picked;
  context.policy = policy::make_bare_policy(context.policy->placement());
  context.remote.reset();
  context.dir += ".bare";
  auto restorer = mechanism::make_mechanism(std::move(context));
  if (!restorer) return tl::unexpected(restorer.error());
  return mechanism::run_bare_restore(**restorer);
}

namespace {

std::uint64_t unix_ms_now() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
}

// MemAvailable of /proc/meminfo in bytes; nullopt if unreadable.
std::optional<std::uint64_t> mem_available_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  std::uint64_t kib = 0;
  std::string unit;
  while (in >> key >> kib) {
    std::getline(in, unit);
    if (key == "MemAvailable:") return kib * 1024;
  }
  return std::nullopt;
}

// The instances of a burst meet once each has answered (or failed), so that every one is
// measured while all are alive: the burst's memory is what the host holds for all at once.
// Every instance calls arrive() or leave() exactly once; the last one takes the samples.
class BurstHold {
 public:
  BurstHold(std::size_t instances, Clock::time_point deadline, std::function<void()> at_release)
      : waiting_for_(instances), deadline_(deadline), at_release_(std::move(at_release)) {
    if (waiting_for_ == 0) release_locked();
  }
  void arrive() {
    std::unique_lock lock(mutex_);
    if (--waiting_for_ == 0) return release_locked();
    // Bounded: an instance stuck in its own restore does not keep the others forever.
    released_cv_.wait_until(lock, deadline_, [&] { return released_; });
  }
  void leave() {
    std::lock_guard lock(mutex_);
    if (--waiting_for_ == 0) release_locked();
  }

 private:
  void release_locked() {
    if (released_) return;
    released_ = true;
    if (at_release_) at_release_();
    released_cv_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable released_cv_;
  std::size_t waiting_for_;
  Clock::time_point deadline_;
  std::function<void()> at_release_;
  bool released_ = false;
};

}  // namespace

Result<json> FunctionService::burst(const control::FunctionRestore& request) {
  const std::size_t n = request.instances.value_or(1);
  const auto t0 = Clock::now();
  const std::uint64_t started_unix_ms = unix_ms_now();
  const std::uint64_t rss_before = mechanism::rss_bytes(::getpid());
  const std::uint64_t threads_before = mechanism::thread_count(::getpid());
  const auto available_before = mem_available_bytes();

  // Admission first, for all: the instances beyond the bound are busy from the start.
  std::vector<std::optional<agent_detail::Admission::Ticket>> tickets(n);
  std::vector<std::optional<Error>> refused(n);
  std::size_t admitted = 0;
  for (std::size_t i = 0; i < n; ++i) {
    auto ticket = admission_->restore(request.snapshot);
    if (ticket) {
      tickets[i] = std::move(*ticket);
      ++admitted;
    } else {
      refused[i] = ticket.error();
    }
  }
  if (admitted == 0) return tl::unexpected(*refused.front());
  // A request that cannot start fails as a whole, before anything runs (as a single restore).
  control::FunctionRestore one = request;
  one.instances.reset();
  auto check = pick_restore(one);
  if (!check) return tl::unexpected(check.error());
  // The agent's server restores every instance from one set of images (the in-place step's
  // check and rewrite once, not per instance); the CRIU mechanisms materialize their own.
  std::shared_ptr<mechanism::SharedBurst> shared;
  if (check->context.policy->mechanism() == policy::Mechanism::snaptier_lazy) {
    shared = mechanism::make_shared_burst(config_.work_dir / "restores" /
                                              (request.snapshot + "." + request.policy + ".burst-" +
                                               std::to_string(++restore_counter_)),
                                          config_.burst_one_serving_thread, config_.fault_spin);
  }

  struct Slot {
    std::optional<Result<mechanism::RestoreResult>> result;
    std::optional<double> started_at_ms;
    std::optional<double> answered_at_ms;
    bool met = false;  // arrived at or left the hold
  };
  std::vector<Slot> slots(n);
  std::uint64_t rss_peak = rss_before;
  std::uint64_t threads_at_hold = threads_before;
  std::optional<std::uint64_t> available_at_hold;
  BurstHold hold(admitted, t0 + std::chrono::duration_cast<milliseconds>(config_.operation_timeout), [&] {
    rss_peak = mechanism::rss_bytes(::getpid());
    threads_at_hold = mechanism::thread_count(::getpid());
    available_at_hold = mem_available_bytes();
  });
  std::vector<std::thread> threads;
  threads.reserve(admitted);
  for (std::size_t i = 0; i < n; ++i) {
    if (!tickets[i]) continue;
    threads.emplace_back([&, i] {
      Slot& slot = slots[i];
      slot.started_at_ms = ms_between(t0, Clock::now());
      slot.result = restore_one(
          one,
          [&](bool answered) {
            if (answered) slot.answered_at_ms = ms_between(t0, Clock::now());
            slot.met = true;
            hold.arrive();
          },
          shared);
      if (!slot.met) hold.leave();  // failed before its first invocation
      tickets[i]->release();
    });
  }
  for (auto& t : threads) t.join();

  json instances = json::array();
  std::size_t ok = 0, failed = 0, busy = 0, answered = 0;
  std::optional<double> first_answer, last_answer;
  std::uint64_t anon_sum = 0, rss_sum = 0, cxl_sum = 0, faults_total = 0;
  std::map<TierKind, std::uint64_t> moved;
  for (std::size_t i = 0; i < n; ++i) {
    const Slot& slot = slots[i];
    json entry;
    if (refused[i]) {
      ++busy;
      entry = json{{"snapshot", request.snapshot}, {"policy", request.policy}, {"host", host_}, {"ok", false},
                   {"error", refused[i]->what()}, {"problems", json::array()}};
    } else if (!slot.result || !*slot.result) {
      ++failed;
      const std::string why = slot.result ? slot.result->error().what() : "the instance did not run";
      entry = json{{"snapshot", request.snapshot}, {"policy", request.policy}, {"host", host_}, {"ok", false},
                   {"error", why}, {"problems", json::array()}};
    } else {
      const mechanism::RestoreResult& r = **slot.result;
      entry = mechanism::to_json(r);
      (r.ok ? ok : failed) += 1;
      anon_sum += r.local_anonymous_bytes.value_or(0);
      rss_sum += r.local_memory_bytes.value_or(0);
      cxl_sum += r.cxl_mapped_bytes.value_or(0);
      if (r.faults && *r.faults) faults_total += (*r.faults)->total;
      if (r.bytes_moved_per_tier) {
        for (const auto& [tier, bytes] : *r.bytes_moved_per_tier) moved[tier] += bytes;
      }
    }
    if (slot.answered_at_ms) {
      ++answered;
      first_answer = std::min(first_answer.value_or(*slot.answered_at_ms), *slot.answered_at_ms);
      last_answer = std::max(last_answer.value_or(*slot.answered_at_ms), *slot.answered_at_ms);
    }
    entry["index"] = i;
    entry["busy"] = refused[i].has_value();
    entry["started_at_ms"] = slot.started_at_ms ? json(*slot.started_at_ms) : json(nullptr);
    entry["answered_at_ms"] = slot.answered_at_ms ? json(*slot.answered_at_ms) : json(nullptr);
    instances.push_back(std::move(entry));
  }
  json host_memory = nullptr;
  if (available_before && available_at_hold && *available_at_hold <= *available_before) {
    host_memory = *available_before - *available_at_hold;
  }
  const double per_s = last_answer && *last_answer > 0 ? static_cast<double>(answered) * 1000.0 / *last_answer : 0.0;
  json summary{{"instances", n}, {"ok", ok}, {"failed", failed}, {"busy", busy},
               {"first_answer_ms", first_answer ? json(*first_answer) : json(nullptr)},
               {"last_answer_ms", last_answer ? json(*last_answer) : json(nullptr)},
               {"instances_per_s", per_s}, {"wall_ms", ms_between(t0, Clock::now())},
               {"local_anonymous_bytes_sum", anon_sum}, {"local_memory_bytes_sum", rss_sum},
               {"cxl_mapped_bytes_sum", cxl_sum}, {"bytes_moved_per_tier", tier_bytes(moved)},
               {"faults_total", faults_total}, {"host_memory_used_bytes", host_memory},
               {"agent_rss_bytes_before", rss_before}, {"agent_rss_bytes_peak", rss_peak},
               {"serving", !shared ? "own-mechanism"
                           : config_.burst_one_serving_thread ? "one-thread" : "thread-per-instance"},
               {"agent_threads_before", threads_before}, {"agent_threads_at_hold", threads_at_hold}};
  spdlog::info("burst {} ({}) x{}: {} ok, {} failed, {} busy, last answer {} ms", request.snapshot, request.policy, n, ok,
               failed, busy, last_answer.value_or(-1));
  return json{{"snapshot", request.snapshot}, {"policy", request.policy}, {"host", host_},
              {"started_unix_ms", started_unix_ms}, {"instances", std::move(instances)}, {"burst", std::move(summary)}};
}

void FunctionService::track_kept(const mechanism::RestoreResult& result, const fs::path& dir) {
  std::lock_guard lock(kept_mutex_);
  kept_[dir.filename().string()] =
      KeptRecord{result.snapshot, result.policy, result.instance->pid, result.instance->socket, dir, unix_ms_now()};
}

Result<json> FunctionService::instances() const {
  json list = json::array();
  {
    std::lock_guard lock(kept_mutex_);
    for (const auto& [id, k] : kept_) {
      list.push_back({{"id", id}, {"snapshot", k.snapshot}, {"policy", k.policy}, {"pid", k.pid}, {"socket", k.socket},
                      {"started_unix_ms", k.started_unix_ms}, {"alive", proc::is_running(k.pid)}});
    }
  }
  return json{{"host", host_}, {"instances", std::move(list)}, {"operations", admission_->in_flight()},
              {"max_operations", admission_->max()}};
}

Result<std::shared_ptr<void>> FunctionService::hold_for_delete(const std::string& id) {
  auto ticket = admission_->snapshot(id.substr(0, id.find(':')));
  if (!ticket) return tl::unexpected(ticket.error());
  return std::make_shared<agent_detail::Admission::Ticket>(std::move(*ticket));
}

Result<json> FunctionService::kill(const control::FunctionKill& request) {
  KeptRecord record;
  {
    std::lock_guard lock(kept_mutex_);
    auto it = kept_.find(request.instance);
    if (it == kept_.end()) return fail(Errc::not_found, "no instance '" + request.instance + "' on " + host_);
    record = std::move(it->second);
    kept_.erase(it);
  }
  const bool was_running = proc::is_running(record.pid);
  kill_tree(record.pid);
  std::error_code ec;
  fs::remove_all(record.dir, ec);
  spdlog::info("instance {} (pid {}) killed", request.instance, record.pid);
  return json{{"instance", request.instance}, {"killed", was_running}};
}

// Everything a restore is refused for comes before anything starts: the policy, the copy it
// reads, the tiers that copy needs, the function's spec.
Result<FunctionService::PickedRestore> FunctionService::pick_restore(const control::FunctionRestore& request) {
  const milliseconds timeout = std::chrono::duration_cast<milliseconds>(config_.operation_timeout);
  auto made = policy::make_policy(request.policy);
  if (!made) return tl::unexpected(made.error());
  std::shared_ptr<const policy::RestorePolicy> chosen = std::move(*made);
  if (auto ok = inplace::admit(*chosen, in_place_); !ok) return tl::unexpected(ok.error());
  const policy::Mechanism kind = chosen->mechanism();
  const std::string variant = policy::variant_id(request.snapshot, chosen->placement());
  auto snapshot = store_->get(variant);
  if (!snapshot) {
    if (snapshot.error().code == Errc::not_found) {
      std::string why;
      if (auto placement = policy::make_placement(chosen->placement())) {
        if (auto cold = (*placement)->cold_tier(tiers_); !cold) why = "; " + cold.error().message;
      }
      return fail(Errc::not_found, "snapshot '" + request.snapshot + "' has no " + std::string(chosen->placement()) +
                                       " copy ('" + variant + "' is not in the store)" + why);
    }
    return tl::unexpected(snapshot.error());
  }
  auto meta = function_meta(*snapshot);
  if (!meta) return tl::unexpected(meta.error());
  // criu-remote reads its pages on the snapshot host. The others refuse up front, rather than
  // have the running copy fail a fault on a page nobody here can read.
  if (kind != policy::Mechanism::criu_remote) {
    if (auto ok = policy::require_readable(snapshot->info, tiers_); !ok) {
      return fail(ok.error().code, "policy " + request.policy + ": " + ok.error().message);
    }
  }
  auto spec = function::load_spec(config_.workloads_dir / meta->function);
  if (!spec) return tl::unexpected(spec.error());

  mechanism::RestoreResult result;
  result.snapshot = request.snapshot;
  result.variant = variant;
  result.function = meta->function;
  result.policy = request.policy;
  result.mechanism = policy::to_string(kind);
  result.host = host_;
  result.zero_pages = snapshot->info.zero_pages;
  result.snapshot_pages = snapshot->info.page_count;
  result.snapshot_bytes_per_tier = snapshot->info.bytes_per_tier;
  if (!meta->cold_tier.empty()) result.cold_tier = meta->cold_tier;

  mechanism::RestoreContext context;
  context.criu = config_.criu;
  const std::uint64_t serial = ++restore_counter_;
  context.dir = config_.work_dir / "restores" / (request.snapshot + "." + request.policy + "." + std::to_string(serial));
  context.socket_dir = meta->socket.parent_path();
  context.timeout = timeout;
  context.fault_spin = config_.fault_spin;
  context.prestart_criu = config_.prestart_criu;
  context.store = store_;
  context.snapshot_id = request.snapshot;
  context.policy = chosen;
  context.in_place = in_place_;
  if (kind == policy::Mechanism::criu_remote) {
    if (auto peer = peers_.find(meta->snapshot_host); peer != peers_.end()) {
      const std::string origin = meta->snapshot_host;
      context.remote = mechanism::RemotePeer{
          origin, peer->second.host, static_cast<std::uint16_t>(27000 + (serial % 1000)),
          [this, origin](const control::Command& command) { return call_peer(origin, command); }};
    } else {
      // A result, not a refusal: the copy exists, this host just cannot reach its page server.
      result.fail_with(Error{Errc::unavailable, "criu-remote needs the snapshot host '" + meta->snapshot_host + "' as a peer"});
      result.missing = "peer";
    }
  }
  context.snapshot = std::move(*snapshot);
  mechanism::Invocation invocation{std::move(*spec), meta->socket, meta->digest, request.keep, timeout, {}};
  return PickedRestore{std::move(context), std::move(invocation), std::move(result)};
}

json FunctionService::policies() const {
  json out = json::array();
  for (const auto& p : policy::describe_policies()) {
    // What this host lacks for it: the first tier requirement none of whose tiers is up, else
    // the in-place mapping a policy requires.
    std::optional<std::string> missing;
    for (const auto& any_of : p.tiers) {
      const bool have = std::any_of(any_of.begin(), any_of.end(), [&](const std::string& name) {
        const auto kind = control::tier_kind_from_name(name);
        return kind && tiers_.contains(*kind);
      });
      if (!have && !any_of.empty()) {
        missing = any_of.front();
        break;
      }
    }
    if (!missing && p.in_place.required && !(in_place_ && in_place_->can_map)) missing = in_place_ ? "in_place" : "cxl";
    out.push_back({{"name", p.name}, {"mechanism", p.mechanism}, {"placement", p.placement}, {"tiers", p.tiers},
                   {"in_place", policy::to_string(p.in_place.pages)}, {"in_place_required", p.in_place.required},
                   {"description", p.description}, {"missing", missing ? json(*missing) : json(nullptr)}});
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// criu-remote, snapshot host side

Result<json> FunctionService::serve_lazy(const control::FunctionServeLazy& request) {
  if (!store_) return fail(Errc::unsupported, host_ + " has no snapshot store");
  reap_remote_dumps(false);
  auto ticket = admission_->restore(request.snapshot);
  if (!ticket) return tl::unexpected(ticket.error());
  // The source instance binds the dumped socket path itself (criu dump cannot take a task out
  // of a mount namespace of its own): one criu-remote source at a time per host.
  std::lock_guard one_source(serve_lazy_mutex_);
  const milliseconds timeout = std::chrono::duration_cast<milliseconds>(config_.operation_timeout);
  const auto t_start = Clock::now();
  const std::string variant = policy::variant_id(request.snapshot, "cxl");
  auto snapshot = store_->get(variant);
  if (!snapshot) return tl::unexpected(snapshot.error());
  auto meta = function_meta(*snapshot);
  if (!meta) return tl::unexpected(meta.error());
  const fs::path dumped_socket = meta->socket;
  const fs::path dir = config_.work_dir / "serve" / (request.snapshot + "." + std::to_string(++restore_counter_));
  auto work = mechanism::WorkDir::create(dir);  // removed on every failure below
  if (!work) return tl::unexpected(work.error());
  std::error_code ec;
  fs::create_directories(dir / "lazy-images", ec);
  fs::create_directories(dumped_socket.parent_path(), ec);
  if (ec) return fail(Errc::io, "create " + dir.string() + ": " + ec.message());

  // A live instance to migrate: the snapshot restored eagerly here.
  auto materialized = snap::materialize(*snapshot, *store_, dir / "images", /*all_pages=*/true);
  if (!materialized) return tl::unexpected(materialized.error());
  if (auto ok = mechanism::run_criu_restore(dir / "images",
                                            {config_.criu, "restore", "-D", (dir / "images").string(), "-W", dir.string(),
                                             "-d", "--pidfile", (dir / "pid").string(), "-o", "restore.log", "-v2"},
                                            timeout, dir / "restore.log", "criu restore (source of criu-remote)");
      !ok) {
    return tl::unexpected(ok.error());
  }
  auto pid = read_pid_file(dir / "pid");
  if (!pid) return tl::unexpected(pid.error());
  fs::remove_all(dir / "images", ec);
  const auto t_live = Clock::now();
  if (tcp_listening(request.port)) {
    kill_tree(*pid);
    return fail(Errc::already_exists, "port " + std::to_string(request.port) + " is in use on " + host_);
  }
  auto dump = proc::spawn({config_.criu, "dump", "-t", std::to_string(*pid), "-D", (dir / "lazy-images").string(), "-W",
                           dir.string(), "--lazy-pages", "--address", request.address, "--port", std::to_string(request.port),
                           "-o", "dump.log", "-v2"});
  if (!dump) {
    kill_tree(*pid);
    return tl::unexpected(dump.error());
  }
  // The images are complete once the page server listens.
  const auto deadline = Clock::now() + timeout;
  while (!tcp_listening(request.port)) {
    if (auto status = dump->try_wait()) {
      kill_tree(*pid);
      return fail(Errc::io, "criu dump --lazy-pages exited (" + std::to_string(status->exit_code) + "); end of dump.log:\n" +
                                tail_of(dir / "dump.log"));
    }
    if (Clock::now() > deadline) {
      kill_tree(*pid);
      return fail(Errc::timeout, "criu dump --lazy-pages never started its page server");
    }
    std::this_thread::sleep_for(milliseconds(10));
  }
  json images = json::object();
  std::uint64_t bytes = 0;
  for (const auto& entry : fs::directory_iterator(dir / "lazy-images", ec)) {
    if (!entry.is_regular_file()) continue;
    std::ifstream in(entry.path(), std::ios::binary);
    std::vector<char> content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    bytes += content.size();
    images[entry.path().filename().string()] =
        to_hex(std::span<const std::byte>(reinterpret_cast<const std::byte*>(content.data()), content.size()));
  }
  if (bytes > 6u << 20) {
    dump->kill();
    kill_tree(*pid);
    return fail(Errc::no_space, "the lazy dump's images (" + std::to_string(bytes) + " bytes) exceed what one reply carries");
  }
  auto remote = std::make_shared<RemoteDump>();
  remote->dump = std::move(*dump);
  remote->dir = dir;
  work->keep();  // reap_remote_dumps removes it once the page server is done
  remote->deadline = Clock::now() + timeout;
  {
    std::lock_guard lock(remote_dumps_mutex_);
    remote_dumps_.push_back(std::move(remote));
  }
  return json{{"images", images}, {"images_bytes", bytes}, {"host", host_},
              {"restore_ms", ms_between(t_start, t_live)}, {"dump_ms", ms_between(t_live, Clock::now())}};
}

}  // namespace snaptier
