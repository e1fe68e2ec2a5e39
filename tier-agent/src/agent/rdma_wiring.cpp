#include "agent/rdma_wiring.hpp"

#include "snaptier/control.hpp"

namespace snaptier::agent_detail {

namespace {

// Connection setup with a memory node is a handful of small control-plane calls; a memory node
// that does not answer within these bounds is down as far as start-up is concerned.
constexpr std::chrono::milliseconds kMemnodeConnectTimeout{3000};
constexpr std::chrono::milliseconds kMemnodeIoTimeout{10000};

}  // namespace

Result<std::shared_ptr<Tier>> build_rdma_tier(const RdmaTierConfig& config) {
  RdmaDeviceOptions device;
  device.device = config.device;
  device.gid_index = config.gid_index;
  control::ClientOptions memnode;
  memnode.endpoint = config.memnode;
  memnode.token = config.token;
  memnode.connect_timeout = kMemnodeConnectTimeout;
  memnode.io_timeout = kMemnodeIoTimeout;
  auto tier = make_rdma_tier(device, control::make_control_rdma_pool_client(std::move(memnode)), config.reconnect);
  if (!tier) return tl::unexpected(tier.error());
  return std::shared_ptr<Tier>(std::move(*tier));
}

Result<std::shared_ptr<RdmaPoolServer>> build_rdma_pool(const MemnodeConfig& config) {
  RdmaDeviceOptions device;
  device.device = config.device;
  device.gid_index = config.gid_index;
  auto pool = make_rdma_pool_server(device, RdmaPoolOptions{.pool_size = config.pool_size, .path = config.pool_path});
  if (!pool) return tl::unexpected(pool.error());
  return std::shared_ptr<RdmaPoolServer>(std::move(*pool));
}

}  // namespace snaptier::agent_detail
