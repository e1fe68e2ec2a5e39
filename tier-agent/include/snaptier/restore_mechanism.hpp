// How a function snapshot is restored (docs/restore-policies.md, "Mechanisms"): the policy
// names a mechanism, the mechanism gets the images onto local storage, runs the restore and
// reports what it did; one flow (run_restore) invokes and checks the restored copy between.
//
// A mechanism object owns everything its restore starts: the restore's work directory, CRIU's
// lazy-pages daemon, the agent's lazy-pages server thread. Destroying it, at any point, ends
// them and removes the directory (unless the instance was kept), so a restore that fails
// half-way leaves nothing behind.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <utility>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "snaptier/control.hpp"
#include "snaptier/error.hpp"
#include "snaptier/fault_engine.hpp"
#include "snaptier/function.hpp"
#include "snaptier/in_place.hpp"
#include "snaptier/restore_policy.hpp"
#include "snaptier/store.hpp"
#include "snaptier/tier.hpp"

namespace snaptier::mechanism {

// ---- The result -------------------------------------------------------------------------------
// docs/schema/control.schema.json, FunctionRestoreResult. Optional fields are left out of the
// JSON until the restore got far enough to know them.

struct FaultCounts {
  std::uint64_t total = 0, read = 0, write = 0, zero = 0;
  double service_ms = 0;  // the server's time serving them (message read to page installed)
  std::map<TierKind, std::uint64_t> per_tier;  // demand faults served from each tier
};
struct MaterializeStep {
  double ms = 0;
  std::uint64_t pages = 0, bytes = 0;
};
struct RemoteStep {
  std::string host, address;
  std::uint16_t port = 0;
  std::uint64_t images_bytes = 0;
  double prepare_ms = 0;
  nlohmann::json peer;  // the snapshot host's function.serve_lazy reply, without its images
};
struct ServerReport {
  std::optional<std::string> error;
  std::uint64_t drained_pages = 0;
};
struct KeptInstance {
  pid_t pid = 0;
  std::string socket;
};

struct RestoreResult {
  std::string snapshot, variant, function, policy, mechanism, host;
  bool ok = false;
  std::optional<std::string> error;    // "code: message" when !ok
  std::optional<std::string> missing;  // what this host lacked, when that was the cause ("peer")
  bool answer_ok = false;
  std::vector<std::string> problems;
  std::optional<bool> digest_ok;
  std::optional<std::string> digest;
  std::uint64_t zero_pages = 0, snapshot_pages = 0;
  std::map<TierKind, std::uint64_t> snapshot_bytes_per_tier;
  std::optional<std::string> cold_tier;

  std::optional<MaterializeStep> materialize;
  std::optional<RemoteStep> remote;
  std::optional<inplace::StepReport> in_place;  // inplace::describe_choice + inplace::report
  std::optional<double> restore_ms, first_response_ms, invoke_ms;
  // The limit of first_response_ms (docs/restore-policies.md, "The limit"): the same input
  // answered again once the first invocation and the digest have run (every page it touches
  // installed), and a bare restore of the same copy (FunctionRestore::measure_limit).
  std::optional<double> warm_invoke_ms, bare_restore_ms;
  std::optional<std::string> limit_error;  // why one of the two is missing (the restore itself is fine)
  std::optional<std::uint64_t> local_memory_bytes, local_anonymous_bytes, cxl_mapped_bytes, mapped_cow_bytes;
  std::optional<std::uint64_t> pages_mapped_in_place;
  // Copy-on-write copies the later requests (the digest and the warm invocation) took in the
  // ranges mapped in place, in pages: mapped_cow_bytes measured after them minus at the first
  // response. Only for restores that mapped pages and ran the warm invocation.
  std::optional<std::uint64_t> cow_copies_after_first_response;
  // Outer: the restore got that far; inner nullopt: the mechanism does not count faults (CRIU's daemon).
  std::optional<std::optional<FaultCounts>> faults;
  std::optional<std::map<TierKind, std::uint64_t>> bytes_moved_per_tier;
  std::optional<std::uint64_t> pages_prefetched, pages_copied_before_resume, pages_background;
  std::optional<double> prefetch_ms;
  std::optional<std::uint64_t> faults_after_digest, lazy_pages;
  std::optional<ServerReport> server;
  std::optional<KeptInstance> instance;

  // Marks the restore failed with `error` (keeps problems found so far).
  void fail_with(const Error& error);
};

// The one rendering of a result (function.restore's reply).
[[nodiscard]] nlohmann::json to_json(const RestoreResult& result);

// ---- Ownership --------------------------------------------------------------------------------

// A restore's work directory: created empty, removed with everything in it on destruction
// unless keep() was called (an instance left running has its socket there).
class WorkDir {
 public:
  [[nodiscard]] static Result<WorkDir> create(std::filesystem::path path);
  WorkDir() = default;
  WorkDir(WorkDir&& other) noexcept;
  WorkDir& operator=(WorkDir&& other) noexcept;
  WorkDir(const WorkDir&) = delete;
  WorkDir& operator=(const WorkDir&) = delete;
  ~WorkDir();

  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
  void keep() noexcept { keep_ = true; }

 private:
  explicit WorkDir(std::filesystem::path path) : path_(std::move(path)) {}
  std::filesystem::path path_;
  bool keep_ = false;
};

// A restored process tree (its root is the init of its own pid namespace: killing it takes
// the rest). Killed, with a bounded wait, on destruction unless released.
class RestoredTree {
 public:
  explicit RestoredTree(pid_t root) : root_(root) {}
  RestoredTree(const RestoredTree&) = delete;
  RestoredTree& operator=(const RestoredTree&) = delete;
  ~RestoredTree() { kill(); }
  [[nodiscard]] pid_t root() const noexcept { return root_; }
  void kill() noexcept;
  pid_t release() noexcept { return std::exchange(root_, 0); }

 private:
  pid_t root_ = 0;
};

// ---- Mechanisms -------------------------------------------------------------------------------

// What the instances of one burst of the agent's lazy-pages server share
// (mechanism/mechanisms.cpp): the images, made once (the first instance materializes the copy
// and does the in-place step — plan, CRC32C check, rewrite — in `dir`; the others wait for it
// and copy the result), the page source over them, and one lazy::ServingLoop that serves every
// instance's faults on one thread once its tasks run. `dir` is removed with the last owner.
class SharedBurst;
// one_serving_thread false: each instance serves its faults on a thread of its own; fault_spin:
// the loop's spin after a fault (lazy::ServingLoop::start).
[[nodiscard]] std::shared_ptr<SharedBurst> make_shared_burst(
    std::filesystem::path dir, bool one_serving_thread = true,
    std::chrono::microseconds fault_spin = FaultEngineOptions{}.spin_after_fault);

// The snapshot host's page server, for criu-remote: `call` sends it function.serve_lazy.
struct RemotePeer {
  std::string host;     // the agent that took the snapshot
  std::string address;  // its data address; its page server listens there
  std::uint16_t port = 0;
  std::function<Result<nlohmann::json>(const control::Command&)> call;
};

struct RestoreContext {
  std::string criu;                   // the criu binary
  std::filesystem::path dir;          // the restore's work directory (created; owned by the mechanism)
  std::chrono::milliseconds timeout;  // of each step
  std::shared_ptr<SnapshotStore> store;
  Snapshot snapshot;                  // the variant the policy reads
  std::string snapshot_id;            // as requested (criu-remote asks the peer for it)
  std::shared_ptr<const policy::RestorePolicy> policy;
  std::optional<inplace::Backing> in_place;  // none: no CXL tier up
  std::optional<RemotePeer> remote;          // criu-remote only
  // Where the dumped instance had its socket (baked into the images). Each restore binds its
  // own dir/kInstanceDir there, in a mount namespace of its own: the socket lands in
  // dir/kInstanceDir. Empty: CRIU binds the dumped path itself (one instance at a time).
  std::filesystem::path socket_dir;
  // Set for the instances of one burst: the agent's lazy-pages server reads images made once.
  std::shared_ptr<SharedBurst> shared_burst;
  // The agent's lazy-pages server: how long it checks for the next fault before sleeping.
  std::chrono::microseconds fault_spin = FaultEngineOptions{}.spin_after_fault;
  // The agent's lazy-pages mechanism: start a `criu swrk` worker in prepare() and send it the
  // restore, so the timed restore does not load criu (the CRIU baselines always run `criu restore`).
  bool prestart_criu = true;
};

// The restored instance's socket directory inside a restore's work directory.
inline constexpr const char* kInstanceDir = "instance";

class RestoreMechanism {
 public:
  virtual ~RestoreMechanism() = default;
  // Everything before the timed restore: the images on local storage, daemons and servers up.
  [[nodiscard]] virtual Result<void> prepare(RestoreResult& out) = 0;
  // The timed restore: returns the restored tree's root once its tasks run. On failure nothing
  // it started runs on.
  [[nodiscard]] virtual Result<pid_t> restore() = 0;
  // Right after the first response (the server's metrics at that moment).
  virtual void at_first_response() {}
  // The tree is gone (or kept running with every page installed, if `kept`): ends the
  // daemons and servers and adds what they report to `out`.
  virtual void finish(bool kept, RestoreResult& out) = 0;

  [[nodiscard]] virtual const std::filesystem::path& dir() const noexcept = 0;
  // Whether CRIU binds the instance's socket in dir()/kInstanceDir (RestoreContext::socket_dir).
  [[nodiscard]] virtual bool private_socket_dir() const noexcept = 0;
  // The CXL file the tree maps pages from, if any (for inplace::measure); its mapped pages.
  [[nodiscard]] virtual std::filesystem::path mapped_backing() const { return {}; }
  [[nodiscard]] virtual std::uint64_t pages_mapped_in_place() const { return 0; }
};

// The mechanism the context's policy names (snaptier_lazy: the agent's server, preceded by the
// in-place step for a policy that maps pages). Creates the work directory.
[[nodiscard]] Result<std::unique_ptr<RestoreMechanism>> make_mechanism(RestoreContext context);

// What the flow checks the restored copy against.
struct Invocation {
  function::FunctionSpec spec;
  std::filesystem::path dumped_socket;  // the instance's socket path baked into the images
  std::string expected_digest;
  bool keep = false;
  std::chrono::milliseconds timeout;
  // Called once the instance answered its first invocation, before the memory is measured
  // and the digest taken: a burst holds every instance there until all have answered.
  // `answered`: the invocation answered (right or wrong).
  std::function<void(bool answered)> at_first_answer;
};

// prepare, restore, move the socket, invoke once, check the answer and the digest, measure,
// kill (or keep) and finish; fills `out`. Never throws; every failure ends up in `out`.
void run_restore(RestoreMechanism& mechanism, const Invocation& invocation, RestoreResult& out);

// The timed part of a restore alone (prepare, restore, kill, finish): its milliseconds, for a
// mechanism made with policy::make_bare_policy (bare_restore_ms).
[[nodiscard]] Result<double> run_bare_restore(RestoreMechanism& mechanism);

}  // namespace snaptier::mechanism
