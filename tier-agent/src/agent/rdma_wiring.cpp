#include "agent/rdma_wiring.hpp"

namespace snaptier::agent_detail {

// TODO(rdma): make_rdma_tier / make_rdma_pool_server are declared in rdma.hpp but not yet
// implemented (src/rdma/ has not landed); calling them now would break every link. Until then a
// configured rdma tier or pool is reported as down with this reason.
Result<std::shared_ptr<Tier>> build_rdma_tier(const RdmaTierConfig& config) {
  (void)config;
  return fail(Errc::unsupported, "this build has no RDMA implementation yet");
}

Result<std::shared_ptr<RdmaPoolServer>> build_rdma_pool(const MemnodeConfig& config) {
  (void)config;
  return fail(Errc::unsupported, "this build has no RDMA implementation yet");
}

}  // namespace snaptier::agent_detail
