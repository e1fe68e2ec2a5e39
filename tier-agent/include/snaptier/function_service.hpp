// The agent's function operations (docs/restore-policies.md): snapshot a function on this host
// (start, criu dump, ingest into the tiers, profile the first invocation) and restore one here
// with a policy (materialize the images, criu restore, serve the lazy pages, invoke, check the
// answer and the memory digest, report metrics). Operations run concurrently, each in a work
// directory of its own, up to [functions] max_operations at once (then Errc::busy); a snapshot
// id is never re-taken while restores read it. Every member is safe to call from any thread.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "snaptier/config.hpp"
#include "snaptier/control.hpp"
#include "snaptier/error.hpp"
#include "snaptier/in_place.hpp"
#include "snaptier/restore_mechanism.hpp"
#include "snaptier/store.hpp"
#include "snaptier/tier.hpp"

namespace snaptier {

namespace agent_detail {
class Admission;
}

class FunctionService {
 public:
  // `tiers` are the tiers that came up on this host (placements need them).
  FunctionService(std::string host, FunctionsConfig config, std::shared_ptr<SnapshotStore> store,
                  std::map<TierKind, TierCaps> tiers);
  ~FunctionService();

  // The JSON results are documented in docs/restore-policies.md ("Results").
  [[nodiscard]] Result<nlohmann::json> snapshot(const control::FunctionSnapshot& request);
  // A restore that ran but failed (wrong answer, a tier failing mid-restore) is a result with
  // "ok": false and the reason; errors are for requests that could not start. With
  // request.instances given, a burst: that many restores at once, each a result of its own
  // (docs/schema BurstResult), instances beyond the admission bound marked busy.
  [[nodiscard]] Result<nlohmann::json> restore(const control::FunctionRestore& request);
  // Instances left running by keep (InstancesResult), and ending one of them.
  [[nodiscard]] Result<nlohmann::json> instances() const;
  [[nodiscard]] Result<nlohmann::json> kill(const control::FunctionKill& request);
  // Held while snapshot.delete removes `id` (a copy "ID:placement" or an id): refused with busy
  // while restores on this host read that snapshot, whose pages they may be using in place.
  [[nodiscard]] Result<std::shared_ptr<void>> hold_for_delete(const std::string& id);
  // criu-remote, snapshot host side: restore the snapshot eagerly, `criu dump --lazy-pages` it
  // with its page server on request.address:port (running on after the reply, bounded by the
  // operation timeout), reply {"images": {file: hex}}.
  [[nodiscard]] Result<nlohmann::json> serve_lazy(const control::FunctionServeLazy& request);

  // The restore policies (policy::describe_policies) with what this host lacks for each
  // ("missing": a tier kind, "in_place", or null): StatusResult.policies.
  [[nodiscard]] nlohmann::json policies() const;

  // Other agents (criu-remote asks the snapshot host for a page server).
  void set_peers(std::map<std::string, NetAddress> peers, std::string token);
  // The CXL tier's file as restored processes would map it (policies that use pages in place).
  void set_in_place_backing(inplace::Backing backing) { in_place_ = std::move(backing); }

 private:
  std::string host_;
  FunctionsConfig config_;
  std::shared_ptr<SnapshotStore> store_;
  std::map<TierKind, TierCaps> tiers_;
  std::unique_ptr<agent_detail::Admission> admission_;
  std::atomic<std::uint64_t> restore_counter_{0};
  std::map<std::string, NetAddress> peers_;
  std::string peer_token_;
  std::optional<inplace::Backing> in_place_;  // none: no CXL tier up
  struct RemoteDump;  // a `criu dump --lazy-pages` serving pages after its reply
  std::mutex remote_dumps_mutex_;
  std::mutex serve_lazy_mutex_;
  std::vector<std::shared_ptr<RemoteDump>> remote_dumps_;
  void reap_remote_dumps(bool all);
  struct KeptRecord {
    std::string snapshot;
    std::string policy;
    pid_t pid = 0;
    std::string socket;
    std::filesystem::path dir;
    std::uint64_t started_unix_ms = 0;
  };
  mutable std::mutex kept_mutex_;
  std::map<std::string, KeptRecord> kept_;  // by the restore's work directory name
  void track_kept(const mechanism::RestoreResult& result, const std::filesystem::path& dir);
  // One restore that was admitted; `at_first_answer` as in mechanism::Invocation.
  // `shared_burst`: a burst's images, made once for its instances.
  [[nodiscard]] Result<mechanism::RestoreResult> restore_one(const control::FunctionRestore& request,
                                                             std::function<void(bool)> at_first_answer = {},
                                                             std::shared_ptr<mechanism::SharedBurst> shared_burst = {});
  [[nodiscard]] Result<nlohmann::json> burst(const control::FunctionRestore& request);
  [[nodiscard]] Result<nlohmann::json> call_peer(const std::string& host, const control::Command& command);
  // A restore request checked and resolved: what the mechanism needs, what the flow checks,
  // the result's fields known before it starts (or its failure, when a peer is missing).
  struct PickedRestore {
    mechanism::RestoreContext context;
    mechanism::Invocation invocation;
    mechanism::RestoreResult result;
  };
  [[nodiscard]] Result<PickedRestore> pick_restore(const control::FunctionRestore& request);
  // bare_restore_ms of `request`'s copy (policy::make_bare_policy), or why it has none.
  [[nodiscard]] Result<double> bare_restore(const control::FunctionRestore& request);

};

}  // namespace snaptier
