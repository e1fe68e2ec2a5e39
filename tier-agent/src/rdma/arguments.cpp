#include "rdma/arguments.hpp"

#include <string>

#include "rdma/reconnect.hpp"

namespace snaptier::rdma_detail {

Result<void> check_device_arguments(const RdmaDeviceOptions& options) {
  if (options.port < 1 || options.port > 255) {
    return fail(Errc::invalid_argument, "rdma: port " + std::to_string(options.port) + " is out of range 1..255");
  }
  if (options.gid_index < 0) {
    return fail(Errc::invalid_argument, "rdma: gid_index " + std::to_string(options.gid_index) + " is negative");
  }
  return {};
}

Result<void> check_tier_arguments(const RdmaDeviceOptions& options, const RdmaPoolClient* pool,
                                  const RdmaReconnectOptions& reconnect) {
  if (pool == nullptr) return fail(Errc::invalid_argument, "rdma tier: no pool client");
  if (auto ok = check(reconnect); !ok) return ok;
  if (options.timeout_ms <= 0) {
    return fail(Errc::invalid_argument, "rdma tier: timeout_ms must be positive, got " + std::to_string(options.timeout_ms));
  }
  if (options.bounce_bytes < kMinBounce || options.bounce_bytes > kMaxBounce) {
    return fail(Errc::invalid_argument,
                "rdma tier: bounce_bytes " + std::to_string(options.bounce_bytes) + " is outside 4 KiB..1 GiB");
  }
  if (options.max_in_flight < 1 || options.max_in_flight > kMaxInFlight) {
    return fail(Errc::invalid_argument, "rdma tier: max_in_flight " + std::to_string(options.max_in_flight) +
                                            " is outside 1.." + std::to_string(kMaxInFlight));
  }
  return {};
}

Result<void> check_pool_arguments(const RdmaPoolOptions& pool_options) {
  if (pool_options.pool_size == 0) return fail(Errc::invalid_argument, "rdma pool: size is zero");
  return {};
}

}  // namespace snaptier::rdma_detail
