// FunctionService: snapshot and restore of serverless functions over CRIU, the tiered store and
// the lazy-pages server (include/snaptier/function_service.hpp, docs/restore-policies.md).
#include "snaptier/function_service.hpp"

#include <signal.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

#include <spdlog/spdlog.h>

#include "agent/snapshot_copies.hpp"
#include "inplace/inplace.hpp"
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

namespace {

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

json tier_bytes(const std::map<TierKind, std::uint64_t>& m, std::uint64_t scale = 1) {
  json j = json::object();
  for (const auto& [tier, n] : m) j[std::string(to_string(tier))] = n * scale;
  return j;
}

Result<pid_t> read_pid_file(const fs::path& path) {
  std::ifstream in(path);
  long pid = 0;
  if (!(in >> pid) || pid <= 0) return fail(Errc::io, "criu wrote no pid to " + path.string());
  return static_cast<pid_t>(pid);
}

std::uint64_t rss_bytes(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      std::istringstream fields(line.substr(6));
      std::uint64_t kib = 0;
      fields >> kib;
      return kib * 1024;
    }
  }
  return 0;
}

// Kills a restored tree (its root is the init of its own pid namespace: the kernel takes the
// rest) and waits, bounded, until it is gone.
void kill_tree(pid_t root) {
  if (root <= 0) return;
  (void)::kill(root, SIGKILL);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (proc::is_running(root) && Clock::now() < deadline) std::this_thread::sleep_for(milliseconds(10));
}

// A lazy-pages server running on its own thread for the length of one restore.
class ServerThread {
 public:
  explicit ServerThread(std::unique_ptr<lazy::LazyPagesServer> server) : server_(std::move(server)) {
    thread_ = std::thread([this] {
      report_ = server_->run();
      done_.store(true);
    });
  }
  ~ServerThread() { finish(milliseconds(30'000)); }
  ServerThread(const ServerThread&) = delete;
  ServerThread& operator=(const ServerThread&) = delete;

  lazy::LazyPagesServer& server() { return *server_; }
  bool done() const { return done_.load(); }

  // Waits up to `grace` for the server to end by itself (its tasks gone); then tells it to stop
  // (it installs what is left, so survivors run on) and joins.
  const lazy::LazyPagesReport& finish(milliseconds grace) {
    if (!thread_.joinable()) return report_;
    const auto deadline = Clock::now() + grace;
    while (!done_.load() && Clock::now() < deadline) std::this_thread::sleep_for(milliseconds(5));
    stop_.store(true);
    thread_.join();
    return report_;
  }
  std::atomic<bool>* stop_flag() { return &stop_; }

 private:
  std::unique_ptr<lazy::LazyPagesServer> server_;
  std::thread thread_;
  std::atomic<bool> done_{false};
  std::atomic<bool> stop_{false};
  lazy::LazyPagesReport report_;
};

std::string tail_of(const fs::path& log) { return proc::read_tail(log, 1500); }

Result<void> run_criu(const std::vector<std::string>& argv, milliseconds timeout, const fs::path& log,
                      std::string_view what) {
  auto r = proc::run(argv, timeout);
  if (!r) return tl::unexpected(r.error());
  if (!r->status.ok()) {
    return fail(r->status.timed_out ? Errc::timeout : Errc::io,
                std::string(what) + " failed (" + (r->status.timed_out ? "timed out" : "exit " + std::to_string(r->status.exit_code)) +
                    "); end of " + log.string() + ":\n" + tail_of(log));
  }
  return {};
}

Result<void> wait_for_socket(const fs::path& path, proc::Child& daemon, milliseconds timeout, const fs::path& log) {
  const auto deadline = Clock::now() + timeout;
  struct stat st{};
  while (::stat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) {
    if (daemon.try_wait()) return fail(Errc::io, "criu lazy-pages exited early; end of " + log.string() + ":\n" + tail_of(log));
    if (Clock::now() >= deadline) return fail(Errc::timeout, "criu lazy-pages did not create " + path.string());
    std::this_thread::sleep_for(milliseconds(10));
  }
  return {};
}

std::string to_hex(std::span<const std::byte> bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (std::byte b : bytes) {
    out.push_back(kDigits[std::to_integer<unsigned>(b) >> 4]);
    out.push_back(kDigits[std::to_integer<unsigned>(b) & 15]);
  }
  return out;
}

Result<std::vector<std::byte>> from_hex(const std::string& text) {
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  if (text.size() % 2 != 0) return fail(Errc::protocol, "odd-length hex image");
  std::vector<std::byte> out(text.size() / 2);
  for (std::size_t i = 0; i < out.size(); ++i) {
    const int hi = digit(text[2 * i]), lo = digit(text[2 * i + 1]);
    if (hi < 0 || lo < 0) return fail(Errc::protocol, "bad hex digit in an image");
    out[i] = static_cast<std::byte>(hi * 16 + lo);
  }
  return out;
}

// Is something listening on TCP `port` (any address)? From /proc/net/tcp{,6}: connecting to
// find out would use up the page server's one connection.
bool tcp_listening(std::uint16_t port) {
  char hex_port[8];
  std::snprintf(hex_port, sizeof hex_port, ":%04X", static_cast<unsigned>(port));
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state;
      fields >> slot >> local >> remote >> state;
      if (state == "0A" && local.size() > 5 && local.compare(local.size() - 5, 5, hex_port) == 0) return true;
    }
  }
  return false;
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
    : host_(std::move(host)), config_(std::move(config)), store_(std::move(store)), tiers_(std::move(tiers)) {}

// ---------------------------------------------------------------------------------------------
// snapshot

Result<json> FunctionService::snapshot(const control::FunctionSnapshot& request) {
  std::lock_guard operation(operation_mutex_);
  if (!store_) return fail(Errc::unsupported, host_ + " has no snapshot store");
  const milliseconds timeout = std::chrono::duration_cast<milliseconds>(config_.operation_timeout);
  const auto t_start = Clock::now();
  auto spec = function::load_spec(config_.workloads_dir / request.function);
  if (!spec) return tl::unexpected(spec.error());
  const std::string id = request.id.value_or(request.function);
  if (!is_valid_snapshot_id(id) || id.find(':') != std::string::npos) {
    return fail(Errc::invalid_argument, "'" + id + "' is not a usable snapshot id");
  }
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
  auto bound = lazy::LazyPagesServer::bind(std::move(lo));
  if (!bound) return tl::unexpected(bound.error());
  auto server = std::make_unique<ServerThread>(std::move(*bound));
  auto restored = run_criu({config_.criu, "restore", "--lazy-pages", "-D", images.string(), "-W", profile_dir.string(), "-d",
                            "--pidfile", (profile_dir / "pid").string(), "-o", "restore.log", "-v2"},
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
  std::lock_guard operation(operation_mutex_);
  if (!store_) return fail(Errc::unsupported, host_ + " has no snapshot store");
  const milliseconds timeout = std::chrono::duration_cast<milliseconds>(config_.operation_timeout);
  auto policy = policy::make_policy(request.policy);
  if (!policy) return tl::unexpected(policy.error());
  const policy::Mechanism mechanism = (*policy)->mechanism();
  if (auto ok = inplace::admit(**policy, in_place_); !ok) return tl::unexpected(ok.error());
  reap_remote_dumps(false);
  const std::string variant = policy::variant_id(request.snapshot, (*policy)->placement());
  auto snapshot = store_->get(variant);
  if (!snapshot) {
    if (snapshot.error().code == Errc::not_found) {
      std::string why;
      if (auto placement = policy::make_placement((*policy)->placement())) {
        if (auto cold = (*placement)->cold_tier(tiers_); !cold) why = "; " + cold.error().message;
      }
      return fail(Errc::not_found, "snapshot '" + request.snapshot + "' has no " + std::string((*policy)->placement()) +
                                       " copy ('" + variant + "' is not in the store)" + why);
    }
    return tl::unexpected(snapshot.error());
  }
  auto meta = function_meta(*snapshot);
  if (!meta) return tl::unexpected(meta.error());
  // criu-remote reads its pages on the snapshot host. The others refuse up front, rather than
  // have the running copy fail a fault on a page nobody here can read.
  if (mechanism != policy::Mechanism::criu_remote) {
    if (auto ok = policy::require_readable(snapshot->info, tiers_); !ok) {
      return fail(ok.error().code, "policy " + request.policy + ": " + ok.error().message);
    }
  }
  const std::string function_name = meta->function;
  auto spec = function::load_spec(config_.workloads_dir / function_name);
  if (!spec) return tl::unexpected(spec.error());
  const fs::path dumped_socket = meta->socket;

  const fs::path dir = config_.work_dir / "restores" /
                       (request.snapshot + "." + request.policy + "." + std::to_string(++restore_counter_));
  std::error_code ec;
  fs::remove_all(dir, ec);
  fs::create_directories(dir, ec);
  fs::create_directories(dumped_socket.parent_path(), ec);
  if (ec) return fail(Errc::io, "create " + dir.string() + ": " + ec.message());
  const fs::path images = dir / "images";

  json result{{"snapshot", request.snapshot}, {"variant", variant}, {"function", function_name}, {"policy", request.policy},
              {"mechanism", policy::to_string(mechanism)}, {"host", host_}, {"ok", false}, {"error", nullptr},
              {"answer_ok", false}, {"problems", json::array()}, {"digest_ok", nullptr},
              {"zero_pages", snapshot->info.zero_pages}, {"snapshot_pages", snapshot->info.page_count},
              {"snapshot_bytes_per_tier", tier_bytes(snapshot->info.bytes_per_tier)},
              {"cold_tier", meta->cold_tier.empty() ? json(nullptr) : json(meta->cold_tier)}};
  auto failed = [&](const Error& e) -> Result<json> {
    result["ok"] = false;
    result["error"] = e.what();
    spdlog::warn("restore {} ({}): {}", request.snapshot, request.policy, e.what());
    return result;
  };

  // 1. Images on local storage: everything for the CRIU baselines, only what CRIU restores
  //    itself for the lazy policies; for criu-remote, what the snapshot host's lazy dump wrote.
  //    Not part of the timed restore.
  const auto t_materialize = Clock::now();
  std::optional<snap::Materialized> materialized;
  std::string remote_address;
  std::uint16_t remote_port = 0;
  if (mechanism == policy::Mechanism::criu_remote) {
    const std::string origin = meta->snapshot_host;
    auto peer = peers_.find(origin);
    if (peer == peers_.end()) {
      return failed(Error{Errc::unavailable, "criu-remote needs the snapshot host '" + origin + "' as a peer"});
    }
    remote_address = peer->second.host;
    remote_port = static_cast<std::uint16_t>(27000 + (restore_counter_ % 1000));
    auto served = call_peer(origin, control::FunctionServeLazy{request.snapshot, remote_address, remote_port});
    if (!served) return failed(served.error());
    fs::create_directories(images, ec);
    std::uint64_t image_bytes = 0;
    for (const auto& [name, hex] : (*served)["images"].items()) {
      if (name.empty() || name.find('/') != std::string::npos || name == "." || name == ".." || !hex.is_string()) {
        return failed(Error{Errc::protocol, origin + " sent a bad image entry"});
      }
      auto bytes = from_hex(hex.get<std::string>());
      if (!bytes) return failed(bytes.error());
      std::ofstream out(images / name, std::ios::binary);
      out.write(reinterpret_cast<const char*>(bytes->data()), static_cast<std::streamsize>(bytes->size()));
      if (!out) return failed(Error{Errc::io, "write " + (images / name).string()});
      image_bytes += bytes->size();
    }
    result["remote"] = {{"host", origin}, {"address", remote_address}, {"port", remote_port},
                        {"images_bytes", image_bytes}, {"prepare_ms", ms_between(t_materialize, Clock::now())},
                        {"peer", *served}};
    result["remote"]["peer"].erase("images");
  } else {
    auto m = snap::materialize(*snapshot, *store_, images, mechanism != policy::Mechanism::snaptier_lazy);
    if (!m) return failed(m.error());
    materialized = std::move(*m);
    result["materialize"] = {{"ms", ms_between(t_materialize, Clock::now())}, {"pages", materialized->pages_written},
                             {"bytes", materialized->bytes_written}};
  }

  // 2. The restore itself.
  std::unique_ptr<ServerThread> server;
  std::shared_ptr<snap::StorePageSource> source;
  std::optional<inplace::Prepared> in_place_use;
  proc::Child criu_daemon;
  std::atomic<bool> resumed{false};
  std::vector<std::string> restore_argv{config_.criu, "restore", "-D", images.string(), "-W", dir.string(), "-d",
                                        "--pidfile", (dir / "pid").string(), "-o", "restore.log", "-v2"};
  if (mechanism == policy::Mechanism::criu_lazy || mechanism == policy::Mechanism::criu_remote) {
    std::vector<std::string> daemon_argv{config_.criu, "lazy-pages", "-D", images.string(), "-W", dir.string(), "-o",
                                         "lazy-pages.log", "-v2"};
    if (mechanism == policy::Mechanism::criu_remote) {
      daemon_argv.insert(daemon_argv.end(), {"--page-server", "--address", remote_address, "--port", std::to_string(remote_port)});
    }
    auto daemon = proc::spawn(daemon_argv);
    if (!daemon) return failed(daemon.error());
    criu_daemon = std::move(*daemon);
    if (auto ok = wait_for_socket(dir / lazy::kSocketName, criu_daemon, milliseconds(30'000), dir / "lazy-pages.log"); !ok) {
      return failed(ok.error());
    }
    restore_argv.push_back("--lazy-pages");
  } else if (mechanism == policy::Mechanism::snaptier_lazy) {
    // Pages used in place: checked, then written into the images as file mappings of the CXL
    // region; the lazy source then sees only the pages that are still copied.
    const auto selection = inplace::selection(**policy, in_place_);
    result["in_place"] = inplace::describe_choice(**policy, in_place_);
    if (selection != policy::InPlacePages::none) {
      auto prepared = inplace::prepare(*store_, *snapshot, images, materialized->checkpoint, selection, *in_place_);
      if (prepared) {
        in_place_use = std::move(*prepared);
        inplace::report(*in_place_use, result["in_place"]);
      } else if (prepared.error().code == Errc::unsupported && !(*policy)->in_place().required) {
        result["in_place"]["mode"] = "copied (" + prepared.error().message + ")";  // an older snapshot
      } else {
        return failed(prepared.error());
      }
    }
    auto opened = snap::StorePageSource::open(store_, *snapshot, in_place_use ? in_place_use->checkpoint : materialized->checkpoint);
    if (!opened) return failed(opened.error());
    source = *opened;
    lazy::LazyPagesOptions lo;
    lo.images_dir = images;
    lo.work_dir = dir;
    lo.source = source;
    const policy::RestorePolicy* p = policy->get();
    lo.planner = [p, src = source.get()](TaskId task, const lazy::LazySource&) { return p->plan(src->policy_view(task)); };
    lo.resume_after_prefetch = true;
    lo.on_resumed = [&resumed] { resumed.store(true); };
    lo.accept_timeout = milliseconds(60'000);
    lo.serve_timeout = timeout;
    auto bound = lazy::LazyPagesServer::bind(std::move(lo));
    if (!bound) return failed(bound.error());
    server = std::make_unique<ServerThread>(std::move(*bound));
    restore_argv.push_back("--lazy-pages");
    restore_argv.push_back("--leave-stopped");
  }
  const auto t0 = Clock::now();
  if (auto ok = run_criu(restore_argv, timeout, dir / "restore.log", "criu restore"); !ok) {
    if (server) {
      const auto& report = server->finish(milliseconds(5'000));
      if (report.error) return failed(Error{report.error->code, ok.error().message + "; lazy-pages server: " + report.error->message});
    }
    return failed(ok.error());
  }
  auto root = read_pid_file(dir / "pid");
  if (!root) return failed(root.error());
  if (server) {
    // Resumed = every before-resume page installed and SIGCONT sent.
    const auto deadline = Clock::now() + timeout;
    while (!resumed.load() && !server->done() && Clock::now() < deadline) std::this_thread::sleep_for(milliseconds(1));
    if (!resumed.load()) {
      kill_tree(*root);
      const auto& report = server->finish(milliseconds(5'000));
      return failed(report.error ? *report.error : Error{Errc::timeout, "the restored tasks were never resumed"});
    }
  }
  const auto t_restored = Clock::now();
  result["restore_ms"] = ms_between(t0, t_restored);

  // 3. Give the copy its own socket path (CRIU rebinds the dumped one), invoke, check.
  const fs::path socket = dir / "instance.sock";
  fs::rename(dumped_socket, socket, ec);
  if (ec) {
    kill_tree(*root);
    return failed(Error{Errc::io, "move " + dumped_socket.string() + " to " + socket.string() + ": " + ec.message()});
  }
  auto invoked = function::invoke_example(socket, *spec, std::min(timeout, milliseconds(300'000)));
  const auto t_first = Clock::now();
  std::optional<FaultMetrics> at_first_response;
  if (server) {
    if (auto m = server->server().metrics_now(milliseconds(5'000))) at_first_response = *m;
  }
  result["local_memory_bytes"] = rss_bytes(*root);
  const inplace::MemoryUse memory = inplace::measure(*root, in_place_use ? in_place_use->plan.rewrite.backing_file : fs::path());
  result["local_anonymous_bytes"] = memory.local_anonymous_bytes;
  result["cxl_mapped_bytes"] = memory.cxl_mapped_bytes;
  result["mapped_cow_bytes"] = memory.mapped_cow_bytes;
  result["pages_mapped_in_place"] = in_place_use ? in_place_use->plan.pages : 0;
  if (invoked) {
    result["first_response_ms"] = ms_between(t0, t_first);
    result["invoke_ms"] = invoked->round_trip_ms;
    result["problems"] = invoked->problems;
    result["answer_ok"] = invoked->problems.empty();
    auto after = function::digest(socket, timeout);
    if (after) {
      result["digest_ok"] = *after == meta->digest;
      result["digest"] = *after;
    } else {
      result["problems"].push_back("digest: " + after.error().message);
    }
  } else {
    result["problems"].push_back("invoke: " + invoked.error().message);
  }

  // 4. Done with it (or leave it running, with every page installed).
  bool kept = false;
  if (request.keep && proc::is_running(*root)) {
    kept = true;
    result["instance"] = {{"pid", *root}, {"socket", socket.string()}};
  } else {
    kill_tree(*root);
  }
  if (server) {
    const auto& report = server->finish(kept ? milliseconds(0) : milliseconds(30'000));
    const FaultMetrics& m = at_first_response ? *at_first_response : report.metrics;
    json per_tier = tier_bytes(m.demand_pages_per_tier);
    result["faults"] = {{"total", m.faults}, {"read", m.read_faults}, {"write", m.write_faults},
                        {"zero", m.zero_filled_faults}, {"per_tier", per_tier}};
    result["bytes_moved_per_tier"] = tier_bytes(m.pages_copied_per_tier, kPageSize);
    result["pages_prefetched"] = report.prefetched_pages;
    result["pages_copied_before_resume"] = report.prefetched_pages;
    result["pages_background"] = m.pages_background;
    result["prefetch_ms"] = report.prefetch_ms;
    result["faults_after_digest"] = report.metrics.faults;
    result["lazy_pages"] = report.lazy_pages;
    result["server"] = {{"error", report.error ? json(report.error->what()) : json(nullptr)},
                        {"drained_pages", report.drained_pages}};
    if (report.error && !kept) {
      // The cause (e.g. a page that fails its checksum) comes before what it did to the invocation.
      result["problems"].insert(result["problems"].begin(), "lazy-pages server: " + report.error->what());
    }
  } else {
    // CRIU moved the pages: eager restore faults on nothing; criu lazy-pages does not report.
    const bool eager = mechanism == policy::Mechanism::criu_eager;
    result["faults"] = eager ? json{{"total", 0}, {"read", 0}, {"write", 0}, {"zero", 0}, {"per_tier", json::object()}}
                             : json(nullptr);
    const std::uint64_t local_bytes = materialized ? materialized->bytes_written : 0;
    result["bytes_moved_per_tier"] = {{"file", local_bytes}};
    result["pages_prefetched"] = eager ? local_bytes / kPageSize : 0;
    result["pages_copied_before_resume"] = result["pages_prefetched"];
    result["pages_background"] = 0;
  }
  if (criu_daemon.pid() > 0) (void)criu_daemon.wait(milliseconds(30'000));
  fs::remove_all(images, ec);
  if (!kept) fs::remove_all(dir, ec);
  result["ok"] = result["answer_ok"].get<bool>() && result["digest_ok"] == json(true) && result["problems"].empty();
  if (!result["ok"].get<bool>() && result["error"].is_null()) {
    result["error"] = result["problems"].empty() ? "restore failed" : result["problems"][0];
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// criu-remote, snapshot host side

Result<json> FunctionService::serve_lazy(const control::FunctionServeLazy& request) {
  std::lock_guard operation(operation_mutex_);
  if (!store_) return fail(Errc::unsupported, host_ + " has no snapshot store");
  reap_remote_dumps(false);
  const milliseconds timeout = std::chrono::duration_cast<milliseconds>(config_.operation_timeout);
  const auto t_start = Clock::now();
  const std::string variant = policy::variant_id(request.snapshot, "cxl");
  auto snapshot = store_->get(variant);
  if (!snapshot) return tl::unexpected(snapshot.error());
  auto meta = function_meta(*snapshot);
  if (!meta) return tl::unexpected(meta.error());
  const fs::path dumped_socket = meta->socket;
  const fs::path dir = config_.work_dir / "serve" / (request.snapshot + "." + std::to_string(++restore_counter_));
  std::error_code ec;
  fs::remove_all(dir, ec);
  fs::create_directories(dir / "lazy-images", ec);
  fs::create_directories(dumped_socket.parent_path(), ec);
  if (ec) return fail(Errc::io, "create " + dir.string() + ": " + ec.message());

  // A live instance to migrate: the snapshot restored eagerly here.
  auto materialized = snap::materialize(*snapshot, *store_, dir / "images", /*all_pages=*/true);
  if (!materialized) return tl::unexpected(materialized.error());
  if (auto ok = run_criu({config_.criu, "restore", "-D", (dir / "images").string(), "-W", dir.string(), "-d", "--pidfile",
                          (dir / "pid").string(), "-o", "restore.log", "-v2"},
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
  remote->deadline = Clock::now() + timeout;
  remote_dumps_.push_back(std::move(remote));
  return json{{"images", images}, {"images_bytes", bytes}, {"host", host_},
              {"restore_ms", ms_between(t_start, t_live)}, {"dump_ms", ms_between(t_live, Clock::now())}};
}

}  // namespace snaptier
