// The RDMA pieces' argument checks, apart from libibverbs: a build without it (rdma/no_verbs/)
// refuses bad arguments with the same errors as one with it, before saying it has no RDMA.
#pragma once

#include <cstdint>
#include <memory>

#include "snaptier/error.hpp"
#include "snaptier/rdma.hpp"

namespace snaptier::rdma_detail {

inline constexpr std::uint64_t kMinBounce = 4096;
inline constexpr std::uint64_t kMaxBounce = 1ull << 30;
// Work requests in flight per rdma tier: the send queue's depth.
inline constexpr std::uint32_t kMaxInFlight = 16;

// Port 1..255, a non-negative GID index.
[[nodiscard]] Result<void> check_device_arguments(const RdmaDeviceOptions& options);
// A pool client, a valid reconnect policy, a positive timeout, a bounce buffer of 4 KiB..1 GiB.
[[nodiscard]] Result<void> check_tier_arguments(const RdmaDeviceOptions& options, const RdmaPoolClient* pool,
                                                const RdmaReconnectOptions& reconnect);
// A pool of some size.
[[nodiscard]] Result<void> check_pool_arguments(const RdmaPoolOptions& pool_options);

}  // namespace snaptier::rdma_detail
