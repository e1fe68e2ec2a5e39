// The RDMA entry points of a build without libibverbs (CMake: SNAPTIER_WITH_IBVERBS=OFF, the
// default where libibverbs-dev is missing). Bad arguments are refused as in a full build; the
// rest is unavailable, so an agent configured with an RDMA tier or pool reports it down with
// this reason and serves its other tiers.
#include "rdma/arguments.hpp"
#include "snaptier/rdma.hpp"
#include "snaptier/tier.hpp"

namespace snaptier {
namespace {
constexpr const char* kNoVerbs = "this build has no RDMA (built without libibverbs: install libibverbs-dev and rebuild)";
}  // namespace

Result<std::unique_ptr<RdmaPoolServer>> make_rdma_pool_server(const RdmaDeviceOptions& options,
                                                              const RdmaPoolOptions& pool_options) {
  if (auto ok = rdma_detail::check_pool_arguments(pool_options); !ok) return tl::unexpected(ok.error());
  if (auto ok = rdma_detail::check_device_arguments(options); !ok) return tl::unexpected(ok.error());
  return fail(Errc::unavailable, std::string("rdma pool: ") + kNoVerbs);
}

Result<std::unique_ptr<Tier>> make_rdma_tier(const RdmaDeviceOptions& options, std::shared_ptr<RdmaPoolClient> pool,
                                             RdmaReconnectOptions reconnect) {
  if (auto ok = rdma_detail::check_tier_arguments(options, pool.get(), reconnect); !ok) {
    return tl::unexpected(ok.error());
  }
  if (auto ok = rdma_detail::check_device_arguments(options); !ok) return tl::unexpected(ok.error());
  return fail(Errc::unavailable, std::string("rdma tier: ") + kNoVerbs);
}

Result<RdmaDeviceInfo> query_rdma_device(const RdmaDeviceOptions& options) {
  if (auto ok = rdma_detail::check_device_arguments(options); !ok) return tl::unexpected(ok.error());
  return fail(Errc::unavailable, std::string("rdma: ") + kNoVerbs);
}

bool rdma_devices_present() { return false; }

bool rdma_support_built() noexcept { return false; }

}  // namespace snaptier
