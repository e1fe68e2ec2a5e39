// The agent's two uses of the RDMA component (rdma.hpp), kept in one place: the compute side's
// rdma tier over a control-plane pool client, and the memory node's pool server.
#pragma once

#include <memory>

#include "snaptier/config.hpp"
#include "snaptier/rdma.hpp"
#include "snaptier/tier.hpp"

namespace snaptier::agent_detail {

[[nodiscard]] Result<std::shared_ptr<Tier>> build_rdma_tier(const RdmaTierConfig& config);
[[nodiscard]] Result<std::shared_ptr<RdmaPoolServer>> build_rdma_pool(const MemnodeConfig& config);

}  // namespace snaptier::agent_detail
