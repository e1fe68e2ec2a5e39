// Agent configuration: one TOML file, parsed once at the edge into the typed structs below.
// Nothing past load_config() ever looks at TOML again; every value here is already validated
// (sizes positive and page aligned, addresses well formed, required sections present).
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>

#include "snaptier/control.hpp"
#include "snaptier/error.hpp"
#include "snaptier/fault_engine.hpp"
#include "snaptier/rdma.hpp"

namespace snaptier {

enum class AgentRole : std::uint8_t { compute, memnode };

[[nodiscard]] std::string_view to_string(AgentRole role) noexcept;

struct ControlConfig {
  std::filesystem::path unix_socket;            // always served; protected by file mode 0600
  std::optional<NetAddress> tcp_listen;         // optional; requires a token
  std::string token;                            // from `token` or the first line of `token_file`
  std::uint32_t max_frame_bytes = control::kDefaultMaxFrameBytes;
  std::chrono::milliseconds request_timeout{30'000};
  std::chrono::milliseconds idle_timeout{60'000};
};

struct LocalTierConfig {
  std::uint64_t capacity = 0;  // bytes of anonymous DRAM the tier may use
};

struct FileTierConfig {
  std::filesystem::path dir;   // where the tier's backing file lives
  std::uint64_t capacity = 0;
};

struct CxlTierConfig {
  std::filesystem::path path;   // /dev/daxX.Y on a real or emulated CXL host, or a regular file
  std::uint32_t host_index = 0; // this host's slot in the shared region's directory (< host_count)
  std::uint32_t host_count = 4; // slots laid out when this agent formats the region (1..kCxlMaxHosts)
  bool format = false;          // may this agent format a region that has no directory yet
  // How often an idle agent replays the directory and announces what it has seen, so other
  // hosts can reuse the space they freed (CxlAnnouncer); 0: only when it uses the directory.
  std::chrono::milliseconds announce_interval{1000};
};

struct RdmaTierConfig {
  std::string device;           // "rxe0", "mlx5_0"; empty = first device
  int gid_index = 1;
  NetAddress memnode;           // the memory node's control plane (TCP)
  std::string token;            // the memory node's control token
  RdmaReconnectOptions reconnect;  // reconnect_initial_ms, reconnect_max_ms, ...
};

struct MemnodeConfig {
  std::uint64_t pool_size = 0;  // bytes of registered memory lent to compute hosts
  std::string device;
  int gid_index = 1;
  // The pool file (its allocation table is beside it); default /dev/shm/snaptier-pool-<host>;
  // empty: anonymous memory, lost whenever the agent stops.
  std::filesystem::path pool_path;
};

// Serverless functions this (compute) agent can snapshot and restore (docs/agent-config.md).
struct FunctionsConfig {
  std::filesystem::path workloads_dir;            // folders with function.toml (docs/functions.md)
  std::filesystem::path work_dir;                 // instances, images, restores (tmpfs is best)
  std::string criu = "criu";                      // the criu binary (PATH lookup)
  std::chrono::seconds operation_timeout{900};    // bound on one snapshot or restore
  // Function operations in flight at once (each instance of a burst counts one); beyond it
  // requests get Errc::busy. Bounds the agent's own memory and threads per served instance.
  std::size_t max_operations = 16;
  // How the agent's lazy-pages server serves the instances of one burst once their tasks run:
  // one thread multiplexing every instance's userfaultfds (lazy::ServingLoop), or a thread per
  // instance (as a single restore), to compare the two.
  bool burst_one_serving_thread = true;
  // How long the lazy-pages server keeps checking its userfaultfds after serving a fault before
  // it sleeps (FaultEngineOptions::spin_after_fault): a fault that follows soon is read without a
  // wake-up, at the cost of a core spent yielding; 0 sleeps at once.
  std::chrono::microseconds fault_spin = FaultEngineOptions{}.spin_after_fault;
  // The agent's own restores (the lazy-pages mechanism) go to a `criu swrk` worker started while
  // the restore is prepared, so the timed restore does not pay for loading criu; false runs
  // `criu restore` at restore time, as the CRIU baselines always do (to compare the two).
  bool prestart_criu = true;
};

// [store] page_cache: DRAM for verified pages of rdma and file tiers shared by concurrent
// restores of one snapshot copy (StoreOptions::page_cache_bytes); 0 turns it off.
struct StoreConfig {
  std::uint64_t page_cache_bytes = 64ull << 20;
};

struct AgentConfig {
  std::filesystem::path source;  // the file this was loaded from ("" for in-memory text)
  std::string host;              // this agent's name; defaults to the machine's hostname
  AgentRole role = AgentRole::compute;
  std::filesystem::path state_dir;
  ControlConfig control;
  std::optional<LocalTierConfig> local;
  std::optional<FileTierConfig> file;
  std::optional<CxlTierConfig> cxl;
  std::optional<RdmaTierConfig> rdma;
  std::optional<MemnodeConfig> memnode;  // present iff role == memnode
  std::optional<FunctionsConfig> functions;
  StoreConfig store;
  // Other agents by host name (their TCP control address; they share this agent's token):
  // requests naming another host are forwarded there.
  std::map<std::string, NetAddress> peers;
};

// Parses TOML text. `source_name` labels error messages; relative paths (token_file, dirs) are
// resolved against `base_dir`. Every failure is Errc::invalid_argument naming the offending key.
[[nodiscard]] Result<AgentConfig> parse_config(std::string_view toml_text,
                                               std::string_view source_name = "config",
                                               const std::filesystem::path& base_dir = {});

// Reads and parses a config file; relative paths inside resolve against the file's directory.
[[nodiscard]] Result<AgentConfig> load_config(const std::filesystem::path& file);

// "4096", "512K", "512M", "2G", "1T" (binary multiples; "MiB"/"MB"-style suffixes accepted).
[[nodiscard]] Result<std::uint64_t> parse_size(std::string_view text);

}  // namespace snaptier
