// The control plane: framed JSON over a Unix socket and TCP.
//
// Wire format (docs/control-plane.md, docs/schema/control.schema.json):
//   frame    = 4-byte big-endian payload length + payload (one UTF-8 JSON object)
//   request  = {"v":1,"id":N,"op":"...","token":"...","args":{...}}
//   response = {"v":1,"id":N,"ok":true,"result":{...}}
//            | {"v":1,"id":N,"ok":false,"error":{"code":"<Errc name>","message":"..."}}
//
// Requests are parsed here, at the edge, into a typed Command (a std::variant of structs); the
// agent's handlers only ever see validated commands. Boost.Asio stays behind the pimpls below so
// that users of this header do not compile it.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>

#include <nlohmann/json.hpp>

#include "snaptier/error.hpp"
#include "snaptier/rdma.hpp"
#include "snaptier/tier.hpp"

namespace snaptier {

// "HOST:PORT" or "[IPv6]:PORT". `host` is an IP literal or a DNS name.
struct NetAddress {
  std::string host;
  std::uint16_t port = 0;

  [[nodiscard]] std::string to_string() const;
  friend bool operator==(const NetAddress&, const NetAddress&) = default;
};

// Accepts port 0 only if `allow_port_zero` (a listener asking the kernel for a free port).
[[nodiscard]] Result<NetAddress> parse_net_address(std::string_view text, bool allow_port_zero = false);

namespace control {

inline constexpr int kProtocolVersion = 1;
inline constexpr std::uint32_t kDefaultMaxFrameBytes = 16u << 20;  // requests are small; 16 MiB
inline constexpr std::size_t kFrameHeaderBytes = 4;

// ---- Errc <-> wire names ("invalid_argument", "not_found", ...) ----------------------------
[[nodiscard]] std::string_view errc_name(Errc code) noexcept;
[[nodiscard]] std::optional<Errc> errc_from_name(std::string_view name) noexcept;

// ---- Commands: one struct per op ---------------------------------------------------------
struct Ping {};
struct Status {};
struct SnapshotPut {
  std::string id;
  std::filesystem::path data_path;    // absolute; raw pages, size a multiple of 4096
  std::uint64_t base_vaddr = 0;       // page i has vaddr base_vaddr + i * 4096
  std::optional<TierKind> tier;       // placement of non-zero pages; agent default if absent
  std::map<std::string, std::filesystem::path> metadata;  // blob name -> absolute file path
};
struct SnapshotList {};
struct SnapshotInfoQuery {
  std::string id;
};
struct SnapshotRead {
  std::string id;
  std::filesystem::path output_path;  // absolute; created or truncated
};
struct SnapshotDelete {
  std::string id;
};
struct RdmaConnect {
  RdmaEndpoint client;
};
struct RdmaAlloc {
  std::uint64_t length = 0;
};
struct RdmaFree {
  Extent extent;
};

// Functions (docs/functions.md): snapshot one on this agent's host, restore one here. `host`,
// when it names another agent (a [peers] entry), makes this agent forward the request there.
struct FunctionSnapshot {
  std::string function;               // a folder of the agent's workloads_dir
  std::optional<std::string> id;      // snapshot id; default: the function's name
  std::optional<std::string> host;
};
struct FunctionRestore {
  std::string snapshot;               // id given at snapshot time
  std::string policy;                 // docs/restore-policies.md
  std::optional<std::string> host;
  bool keep = false;                  // leave the restored instance running (else killed after checks)
  // Given (1..256): a burst of that many at once, answered with a BurstResult (its times count
  // from the burst's start, materializing included); absent: one restore, a FunctionRestoreResult.
  std::optional<std::uint32_t> instances;
  // Also measure the restore's limit: a bare restore of the same copy (bare_restore_ms), after
  // the measured one. Ignored for bursts.
  bool measure_limit = false;
};

// Instances left running (keep), operations in flight and their bound.
struct FunctionInstances {};

// End an instance listed by FunctionInstances.
struct FunctionKill {
  std::string instance;
};

// Agent to agent, for the criu-remote policy: restore the snapshot here, then `criu dump
// --lazy-pages` it with its page server on address:port; reply with the non-lazy images.
struct FunctionServeLazy {
  std::string snapshot;
  std::string address;      // IP literal the page server binds (this host's data address)
  std::uint16_t port = 0;
};

using Command = std::variant<Ping, Status, SnapshotPut, SnapshotList, SnapshotInfoQuery,
                             SnapshotRead, SnapshotDelete, RdmaConnect, RdmaAlloc, RdmaFree,
                             FunctionSnapshot, FunctionRestore, FunctionServeLazy, FunctionInstances, FunctionKill>;

// Ops that run for minutes (function snapshot/restore): ServerOptions::long_request_timeout.
[[nodiscard]] bool is_long_running(const Command& command) noexcept;

[[nodiscard]] std::string_view op_name(const Command& command) noexcept;

struct Request {
  std::uint64_t id = 0;
  std::string token;  // empty if absent
  Command command;
};

// A request that could not be parsed; `id` is known if the envelope got that far.
struct RejectedRequest {
  std::optional<std::uint64_t> id;
  Error error;
};

// The edge: payload bytes -> validated Request. Never throws.
[[nodiscard]] tl::expected<Request, RejectedRequest> parse_request(std::string_view payload);
[[nodiscard]] std::string encode_request(const Request& request);

struct Response {
  std::optional<std::uint64_t> id;   // null when the request's id could not be read
  Result<nlohmann::json> outcome;    // result object, or the error the peer reported
};

[[nodiscard]] std::string encode_response(const Response& response);
[[nodiscard]] Result<Response> parse_response(std::string_view payload);

// ---- Framing -------------------------------------------------------------------------------
[[nodiscard]] std::string encode_frame(std::string_view payload);
[[nodiscard]] std::uint32_t decode_frame_length(std::span<const std::byte, kFrameHeaderBytes> header) noexcept;

// ---- Shared JSON encodings of store/tier types (used by results and by their decoders) -------
[[nodiscard]] std::string_view tier_kind_name(TierKind kind) noexcept;
[[nodiscard]] std::optional<TierKind> tier_kind_from_name(std::string_view name) noexcept;
[[nodiscard]] nlohmann::json encode_endpoint(const RdmaEndpoint& endpoint);
[[nodiscard]] Result<RdmaEndpoint> decode_endpoint(const nlohmann::json& j);
[[nodiscard]] nlohmann::json encode_grant(const RdmaPoolGrant& grant);
[[nodiscard]] Result<RdmaPoolGrant> decode_grant(const nlohmann::json& j);
[[nodiscard]] nlohmann::json encode_extent(const Extent& extent);
[[nodiscard]] Result<Extent> decode_extent(const nlohmann::json& j);

// ---- Server --------------------------------------------------------------------------------
// Runs the command; a returned Error becomes an error response with that code.
using CommandHandler = std::function<Result<nlohmann::json>(const Command&)>;

struct ServerOptions {
  std::optional<std::filesystem::path> unix_socket;  // mode 0600, parent created if missing
  std::optional<NetAddress> tcp_listen;              // IP literal; port 0 = any free port
  std::string token;                                 // required iff tcp_listen
  std::uint32_t max_frame_bytes = kDefaultMaxFrameBytes;
  // A request whose handler has not finished by then gets a `timeout` response (the handler
  // keeps running on its worker; its late result is dropped).
  std::chrono::milliseconds request_timeout{30'000};
  std::chrono::milliseconds long_request_timeout{900'000};  // for is_long_running() ops
  // A connection must deliver each complete frame, and read each response, within this time of
  // becoming ready for it, or it is closed. Stalled half-frames therefore cannot pin a slot.
  std::chrono::milliseconds idle_timeout{60'000};
  std::size_t worker_threads = 2;     // handlers run here, never on the I/O thread
  std::size_t max_connections = 128;  // further connections are accepted and closed at once
};

class ControlServer {
 public:
  // Binds every listener (failing cleanly if one cannot be bound) and starts serving on an
  // internal I/O thread.
  [[nodiscard]] static Result<std::unique_ptr<ControlServer>> start(ServerOptions options,
                                                                    CommandHandler handler);
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  [[nodiscard]] std::optional<std::uint16_t> tcp_port() const noexcept;
  [[nodiscard]] std::optional<std::filesystem::path> unix_socket() const;

  // Stops accepting, lets in-flight requests finish for at most `grace`, then closes every
  // connection. Returns false if a handler was still running when the grace period ended
  // (the caller then knows the process cannot shut down cleanly).
  [[nodiscard]] bool stop(std::chrono::milliseconds grace);

  class Impl;

 private:
  explicit ControlServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// ---- Client --------------------------------------------------------------------------------
struct UnixEndpoint {
  std::filesystem::path path;
};
using Endpoint = std::variant<UnixEndpoint, NetAddress>;

[[nodiscard]] std::string to_string(const Endpoint& endpoint);

struct ClientOptions {
  Endpoint endpoint;
  std::string token;  // sent with every request when non-empty (required on TCP)
  std::chrono::milliseconds connect_timeout{3'000};
  std::chrono::milliseconds io_timeout{30'000};  // per send and per receive
  std::uint32_t max_frame_bytes = kDefaultMaxFrameBytes;
};

// A synchronous client; every step is bounded by a timeout. Transport failures are Errors
// (unavailable: cannot connect/closed; timeout; protocol: garbage from the peer); a server's
// error reply is a successful call whose Response.outcome holds the error. Not thread-safe.
class ControlClient;

// One request to another agent on a fresh connection: connect, call, close. Errors name `peer`
// (transport failures are `unavailable`/`timeout`, an error reply keeps its code).
[[nodiscard]] Result<nlohmann::json> call_peer(const std::string& peer, const ClientOptions& options,
                                               const Command& command);

class ControlClient {
 public:
  [[nodiscard]] static Result<ControlClient> connect(const ClientOptions& options);
  ControlClient(ControlClient&&) noexcept;
  ControlClient& operator=(ControlClient&&) noexcept;
  ~ControlClient();

  [[nodiscard]] Result<Response> call(const Command& command);
  // call() with the error reply folded into the Error (for callers that only want the result).
  [[nodiscard]] Result<nlohmann::json> call_ok(const Command& command);

  // Low-level access, for diagnostics and protocol tests.
  [[nodiscard]] Result<void> send_bytes(std::span<const std::byte> bytes);
  [[nodiscard]] Result<void> send_frame(std::string_view payload);
  [[nodiscard]] Result<std::string> receive_frame();
  void close() noexcept;

  class Impl;

 private:
  explicit ControlClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  std::uint64_t next_id_ = 1;
};

// Human-readable rendering of an op's result (tierctl without --json): a few lines or a table.
[[nodiscard]] std::string render_result(const Command& command, const nlohmann::json& result);

// The compute side of the RDMA pool (rdma.hpp's seam) over this control plane: rdma.connect,
// rdma.alloc and rdma.free to a memory node. Connects lazily; after a transport failure the
// next call reconnects (a failed request is not retried: rdma.alloc is not idempotent).
// Thread-safe.
[[nodiscard]] std::shared_ptr<RdmaPoolClient> make_control_rdma_pool_client(ClientOptions options);

}  // namespace control
}  // namespace snaptier
