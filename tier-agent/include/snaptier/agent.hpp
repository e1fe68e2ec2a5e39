// The tier agent's service logic: the request handlers behind the control plane, over the
// SnapshotStore, the tiers and (on a memory node) the RDMA pool. The binary only loads the config,
// builds an Agent with make_agent(), serves agent.handle() and waits for a signal.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "snaptier/config.hpp"
#include "snaptier/control.hpp"
#include "snaptier/cxl_directory.hpp"
#include "snaptier/error.hpp"
#include "snaptier/function_service.hpp"
#include "snaptier/in_place.hpp"
#include "snaptier/rdma.hpp"
#include "snaptier/store.hpp"
#include "snaptier/tier.hpp"

namespace snaptier {

// One configured tier: built, or the reason it is not (a missing device does not stop the
// agent; status reports it and puts to that tier fail with `unavailable`).
struct TierSlot {
  TierKind kind = TierKind::local;
  std::string source;              // what it was built from: "/dev/dax0.0", "10.0.0.9:7400", ...
  std::shared_ptr<Tier> tier;      // null if `problem`
  std::optional<Error> problem;
};

struct AgentParts {
  std::string host;
  AgentRole role = AgentRole::compute;
  std::shared_ptr<SnapshotStore> store;     // null: snapshot ops answer `unsupported`
  std::vector<TierSlot> tiers;
  std::shared_ptr<RdmaPoolServer> pool;     // memory nodes; null: rdma.* answer `unsupported`
  std::optional<Error> pool_problem;        // why a configured pool is missing
  // Placement of snapshot.put without "tier": the first of cxl, local, file, rdma that is up.
  std::optional<TierKind> default_tier;
  std::shared_ptr<FunctionService> functions;  // null: function.* answer `unsupported`
  std::optional<inplace::Backing> in_place;    // the CXL tier's backing for mapping in place
  std::map<std::string, NetAddress> peers;     // requests for another host go there
  std::string peer_token;
  std::shared_ptr<CxlDirectory> cxl_directory;  // null: no CXL tier came up
  std::shared_ptr<CxlAnnouncer> cxl_announcer;  // keeps an idle agent announcing ([tiers.cxl] announce_ms)
};

class Agent {
 public:
  explicit Agent(AgentParts parts);

  // Runs one validated command. Thread-safe (the store serializes its own state).
  [[nodiscard]] Result<nlohmann::json> handle(const control::Command& command);

  [[nodiscard]] const AgentParts& parts() const noexcept { return parts_; }

  // For a clean stop, after the control server stopped: marks this host's CXL directory slot
  // detached (CxlDirectory::detach). Nothing to do without a CXL tier.
  [[nodiscard]] Result<void> detach();

 private:
  [[nodiscard]] Result<nlohmann::json> status();
  [[nodiscard]] Result<nlohmann::json> put(const control::SnapshotPut& put);
  [[nodiscard]] Result<nlohmann::json> list();
  [[nodiscard]] Result<nlohmann::json> info(const control::SnapshotInfoQuery& query);
  [[nodiscard]] Result<nlohmann::json> read(const control::SnapshotRead& read);
  [[nodiscard]] Result<nlohmann::json> remove(const control::SnapshotDelete& remove);
  [[nodiscard]] Result<SnapshotStore*> require_store();
  [[nodiscard]] Result<RdmaPoolServer*> require_pool();
  [[nodiscard]] Result<FunctionService*> require_functions();
  // Sends `command` (host field cleared) to peer `host` and returns its result.
  [[nodiscard]] Result<nlohmann::json> forward(const std::string& host, control::Command command);

  AgentParts parts_;
};

// Builds every tier the config names, the store over the tiers that came up, and on a memory
// node the RDMA pool. Fails only for problems no tier can route around (the state directory,
// the store itself); a tier that fails is logged and recorded in its TierSlot.
[[nodiscard]] Result<std::unique_ptr<Agent>> make_agent(const AgentConfig& config);

// The control server's options for a config's [control] section.
[[nodiscard]] control::ServerOptions server_options(const AgentConfig& config);

}  // namespace snaptier
