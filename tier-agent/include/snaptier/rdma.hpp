// The RDMA memory pool: memory nodes lend registered memory; compute hosts reach it with RC
// queue pairs and one-sided READ/WRITE. Connection setup travels over the control plane,
// which is why the tier talks to its pool through the small RdmaPoolClient seam below.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "snaptier/error.hpp"
#include "snaptier/tier.hpp"

namespace snaptier {

// What one side of an RC connection must tell the other.
struct RdmaEndpoint {
  std::string gid;          // 32 hex digits (RoCEv2 GID)
  std::uint32_t qpn = 0;
  std::uint32_t psn = 0;
  std::uint16_t lid = 0;    // 0 on RoCE
};

// What a memory node hands a compute host after connecting: where its pool is.
struct RdmaPoolGrant {
  RdmaEndpoint endpoint;
  std::uint64_t remote_addr = 0;  // base virtual address of the registered pool
  std::uint32_t rkey = 0;
  std::uint64_t pool_size = 0;
  // The pool's identity: random when the pool is created, kept while its contents are (across
  // agent restarts with a pool file); 0 from a memory node that does not track it.
  std::uint64_t epoch = 0;
};

void to_json(nlohmann::json& j, const RdmaEndpoint& e);
void from_json(const nlohmann::json& j, RdmaEndpoint& e);
void to_json(nlohmann::json& j, const RdmaPoolGrant& g);
void from_json(const nlohmann::json& j, RdmaPoolGrant& g);

struct RdmaDeviceOptions {
  std::string device;       // e.g. "rxe0", "mlx5_0"; empty = first device
  int port = 1;
  int gid_index = 1;        // RoCEv2 GID of rxe on IPv4 is index 1
  int timeout_ms = 5000;    // every completion wait and connection step is bounded
  // The rdma tier's registered staging buffer, cut into one slot per work request in flight:
  // a request is sent as chunks of a slot each, up to max_in_flight of them on the wire at once.
  std::uint64_t bounce_bytes = 1ull << 20;
  std::uint32_t max_in_flight = 16;  // 1..16; 1 is one work request at a time, the whole buffer
};

// How the rdma tier gets its queue pair back after an error completion or a completion timeout
// (docs/rdma.md, "Reconnection"). The first attempt comes initial_backoff after the failure,
// attempt k+1 min(initial_backoff * 2^(k-1), max_backoff) after attempt k failed; after
// max_attempts failed attempts the tier is
// down and is probed every down_retry, or max_backoff after the last attempt when a request
// asks for it.
struct RdmaReconnectOptions {
  std::chrono::milliseconds initial_backoff{100};
  std::chrono::milliseconds max_backoff{2000};
  std::uint32_t max_attempts = 20;
  std::chrono::milliseconds down_retry{30000};
};

// The memory node's pool. With a path the pool memory is that file (tmpfs, hugetlbfs) and its
// allocation table is `<path>.table`: a restarted agent keeps both, and the epoch with them.
// Without one it is anonymous memory that dies with the agent.
struct RdmaPoolOptions {
  std::uint64_t pool_size = 0;
  std::filesystem::path path;
};

// What the memory node's status shows about its pool.
struct RdmaPoolState {
  std::uint64_t epoch = 0;
  std::filesystem::path path;  // empty: anonymous memory
  std::string origin;          // "kept 3 extents (12.0 MiB) from ..." or "new pool: <why>"
};

// What the chosen device and port look like (diagnostics; the selftest prints it).
struct RdmaDeviceInfo {
  std::string name;             // "rxe0"
  int port = 1;
  int gid_index = 1;
  std::string gid;              // 32 hex digits
  std::string gid_type;         // "RoCEv2", "RoCEv1", "IB" or "unknown"
  std::string link_layer;       // "Ethernet" or "InfiniBand"
  std::string port_state;       // "ACTIVE", "DOWN", ...
  int active_mtu_bytes = 0;     // path MTU used for RC connections
  std::uint32_t max_msg_bytes = 0;
};
[[nodiscard]] Result<RdmaDeviceInfo> query_rdma_device(const RdmaDeviceOptions& device);

// Compute side: the control-plane client to a memory node. Implemented over the control plane
// (control/), faked nowhere: tests without a device skip.
// Implementations must be safe to call from several threads at once (the tier's requests and
// its reconnect thread).
class RdmaPoolClient {
 public:
  virtual ~RdmaPoolClient() = default;
  [[nodiscard]] virtual Result<RdmaPoolGrant> connect(const RdmaEndpoint& local) = 0;
  [[nodiscard]] virtual Result<Extent> allocate(std::uint64_t length) = 0;
  [[nodiscard]] virtual Result<void> release(Extent extent) = 0;
};

// Memory-node side: a registered pool, its allocator, and the queue pairs of its clients.
// Safe to call from any number of threads at once (one mutex).
class RdmaPoolServer {
 public:
  virtual ~RdmaPoolServer() = default;
  // Creates a QP for a client, connects it to the client's endpoint, returns the grant.
  [[nodiscard]] virtual Result<RdmaPoolGrant> accept(const RdmaEndpoint& client) = 0;
  [[nodiscard]] virtual Result<Extent> allocate(std::uint64_t length) = 0;
  [[nodiscard]] virtual Result<void> release(Extent extent) = 0;
  [[nodiscard]] virtual TierStats stats() const = 0;
  [[nodiscard]] virtual RdmaPoolState state() const = 0;
};

[[nodiscard]] Result<std::unique_ptr<RdmaPoolServer>> make_rdma_pool_server(
    const RdmaDeviceOptions& device, const RdmaPoolOptions& pool);

// A pool client that calls a server in the same process (a host that is its own memory node,
// the selftest, tests). connect() is server->accept(); the server must outlive nothing else.
[[nodiscard]] std::shared_ptr<RdmaPoolClient> make_local_rdma_pool_client(
    std::shared_ptr<RdmaPoolServer> server);

// A Tier whose extents live in one memory node's pool: one RC QP, one-sided READ/WRITE through
// a registered bounce buffer. Each completion waits at most timeout_ms (Errc::timeout); an error
// completion is Errc::unavailable. After either the QP is dropped and a background thread
// connects a new one as `reconnect` says; meanwhile read/write/allocate fail at once with
// unavailable (release still works), and health() tells the state. The first connection is
// made here: a memory node that does not answer now fails the call. Any number of threads may
// call the tier at once: requests are serialised on the QP, each caller gets its own
// completion, and callers queued behind a request that breaks the QP wait for the reconnect
// with it and are retried once (docs/rdma.md, "Reconnection").
[[nodiscard]] Result<std::unique_ptr<Tier>> make_rdma_tier(const RdmaDeviceOptions& device,
                                                           std::shared_ptr<RdmaPoolClient> pool,
                                                           RdmaReconnectOptions reconnect = {});

// True if this machine has at least one RDMA device (tests skip otherwise).
[[nodiscard]] bool rdma_devices_present();

// False in a build without libibverbs: every RDMA call checks its arguments, then fails with
// unavailable ("this build has no RDMA"), and no device is ever present.
[[nodiscard]] bool rdma_support_built() noexcept;

}  // namespace snaptier
