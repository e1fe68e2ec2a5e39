#include "snaptier/config.hpp"

#include <unistd.h>

#include <array>
#include <cctype>
#include <charconv>
#include <fstream>
#include <filesystem>
#include <string>
#include <utility>
#include <limits>
#include <set>
#include <sstream>
#include <sys/un.h>
#include <toml++/toml.h>

#include "core/try.hpp"
#include "snaptier/cxl_directory.hpp"

namespace snaptier {

std::string_view to_string(AgentRole role) noexcept {
  switch (role) {
    case AgentRole::compute: return "compute";
    case AgentRole::memnode: return "memnode";
  }
  return "unknown";
}

Result<std::uint64_t> parse_size(std::string_view text) {
  auto invalid = [&](std::string_view why) {
    return fail(Errc::invalid_argument,
                "invalid size \"" + std::string(text) + "\": " + std::string(why) +
                    " (expected e.g. 4096, \"512K\", \"512M\", \"2G\")");
  };
  std::size_t pos = 0;
  while (pos < text.size() && std::isdigit(static_cast<unsigned char>(text[pos]))) ++pos;
  if (pos == 0) return invalid("no leading number");
  std::uint64_t number = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + pos, number);
  if (ec != std::errc{} || end != text.data() + pos) return invalid("number out of range");

  std::string suffix;
  for (char c : text.substr(pos)) suffix.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
  unsigned shift = 0;
  static constexpr std::array<std::pair<std::string_view, unsigned>, 13> kSuffixes{{
      {"", 0}, {"B", 0},
      {"K", 10}, {"KB", 10}, {"KIB", 10},
      {"M", 20}, {"MB", 20}, {"MIB", 20},
      {"G", 30}, {"GB", 30}, {"GIB", 30},
      {"T", 40}, {"TIB", 40},
  }};
  bool known = false;
  for (const auto& [name, bits] : kSuffixes) {
    if (suffix == name) {
      shift = bits;
      known = true;
      break;
    }
  }
  if (!known) return invalid("unknown suffix \"" + std::string(text.substr(pos)) + "\"");
  if (shift > 0 && number > (std::numeric_limits<std::uint64_t>::max() >> shift)) {
    return invalid("too large");
  }
  return number << shift;
}

namespace {

constexpr std::uint64_t kPage = 4096;

// Reads one TOML table, remembering which keys were consumed so that leftovers can be reported
// as unknown keys (typos must not be silently ignored).
class TableReader {
 public:
  TableReader(const toml::table& table, std::string section, std::string_view source)
      : table_(table), section_(std::move(section)), source_(source) {}

  [[nodiscard]] tl::unexpected<Error> error(std::string_view key, const toml::node* node,
                                            std::string_view why) const {
    std::string where(source_);
    if (node != nullptr && node->source().begin.line > 0) {
      where += ":" + std::to_string(node->source().begin.line);
    }
    std::string name = section_.empty() ? std::string(key) : "[" + section_ + "] " + std::string(key);
    return fail(Errc::invalid_argument, where + ": " + name + ": " + std::string(why));
  }

  [[nodiscard]] const toml::node* find(std::string_view key) {
    seen_.insert(std::string(key));
    return table_.get(key);
  }

  [[nodiscard]] Result<std::optional<std::string>> string(std::string_view key) {
    const toml::node* node = find(key);
    if (node == nullptr) return std::optional<std::string>{};
    if (!node->is_string()) return error(key, node, "expected a string, got " + type_name(*node));
    return std::optional<std::string>{node->as_string()->get()};
  }

  [[nodiscard]] Result<std::string> required_string(std::string_view key) {
    auto value = string(key);
    if (!value) return tl::unexpected(value.error());
    if (!*value) return error(key, nullptr, "required key is missing");
    if ((*value)->empty()) return error(key, table_.get(key), "must not be empty");
    return **value;
  }

  [[nodiscard]] Result<std::optional<std::int64_t>> integer(std::string_view key, std::int64_t min,
                                                            std::int64_t max) {
    const toml::node* node = find(key);
    if (node == nullptr) return std::optional<std::int64_t>{};
    if (!node->is_integer()) return error(key, node, "expected an integer, got " + type_name(*node));
    std::int64_t value = node->as_integer()->get();
    if (value < min || value > max) {
      return error(key, node, "must be between " + std::to_string(min) + " and " +
                                  std::to_string(max) + ", got " + std::to_string(value));
    }
    return std::optional<std::int64_t>{value};
  }

  [[nodiscard]] Result<std::optional<bool>> boolean(std::string_view key) {
    const toml::node* node = find(key);
    if (node == nullptr) return std::optional<bool>{};
    if (!node->is_boolean()) return error(key, node, "expected true or false, got " + type_name(*node));
    return std::optional<bool>{node->as_boolean()->get()};
  }

  // A byte size: an integer or a string with a binary suffix; positive (or zero where that
  // means "off") and page aligned.
  [[nodiscard]] Result<std::optional<std::uint64_t>> size(std::string_view key, bool zero_allowed = false) {
    const toml::node* node = find(key);
    if (node == nullptr) return std::optional<std::uint64_t>{};
    if (zero_allowed && ((node->is_integer() && node->as_integer()->get() == 0) ||
                         (node->is_string() && node->as_string()->get() == "0"))) {
      return std::optional<std::uint64_t>{0};
    }
    std::uint64_t bytes = 0;
    if (node->is_integer()) {
      std::int64_t value = node->as_integer()->get();
      if (value <= 0) return error(key, node, "must be a positive size, got " + std::to_string(value));
      bytes = static_cast<std::uint64_t>(value);
    } else if (node->is_string()) {
      auto parsed = parse_size(node->as_string()->get());
      if (!parsed) return error(key, node, parsed.error().message);
      bytes = *parsed;
    } else {
      return error(key, node, "expected a size (integer or string like \"512M\"), got " + type_name(*node));
    }
    if (bytes == 0) return error(key, node, "must be a positive size");
    if (bytes % kPage != 0) {
      return error(key, node, "must be a multiple of 4096 bytes, got " + std::to_string(bytes));
    }
    return std::optional<std::uint64_t>{bytes};
  }

  [[nodiscard]] Result<std::uint64_t> required_size(std::string_view key) {
    auto value = size(key);
    if (!value) return tl::unexpected(value.error());
    if (!*value) return error(key, nullptr, "required key is missing");
    return **value;
  }

  [[nodiscard]] Result<std::optional<NetAddress>> address(std::string_view key, bool allow_port_zero) {
    auto text = string(key);
    if (!text) return tl::unexpected(text.error());
    if (!*text) return std::optional<NetAddress>{};
    auto parsed = parse_net_address(**text, allow_port_zero);
    if (!parsed) return error(key, table_.get(key), parsed.error().message);
    return std::optional<NetAddress>{*parsed};
  }

  // A sub-table; absent -> nullptr, present but not a table -> error.
  [[nodiscard]] Result<const toml::table*> table(std::string_view key) {
    const toml::node* node = find(key);
    if (node == nullptr) return static_cast<const toml::table*>(nullptr);
    if (!node->is_table()) return error(key, node, "expected a table, got " + type_name(*node));
    return node->as_table();
  }

  [[nodiscard]] Result<void> reject_unknown_keys() const {
    for (auto&& [key, node] : table_) {
      if (!seen_.contains(std::string(key.str()))) return error(key.str(), &node, "unknown key");
    }
    return {};
  }

  [[nodiscard]] const std::string& section() const noexcept { return section_; }
  [[nodiscard]] std::string_view source() const noexcept { return source_; }

 private:
  static std::string type_name(const toml::node& node) {
    switch (node.type()) {
      case toml::node_type::table: return "a table";
      case toml::node_type::array: return "an array";
      case toml::node_type::string: return "a string";
      case toml::node_type::integer: return "an integer";
      case toml::node_type::floating_point: return "a float";
      case toml::node_type::boolean: return "a boolean";
      case toml::node_type::date:
      case toml::node_type::time:
      case toml::node_type::date_time: return "a date/time";
      default: return "nothing";
    }
  }

  const toml::table& table_;
  std::string section_;
  std::string_view source_;
  std::set<std::string> seen_;
};

std::filesystem::path resolve(const std::filesystem::path& base, const std::string& value) {
  std::filesystem::path path(value);
  if (path.is_relative() && !base.empty()) return base / path;
  return path;
}

Result<std::string> read_token_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) return fail_errno(Errc::invalid_argument, "cannot read token_file " + path.string(), errno);
  std::string line;
  std::getline(in, line);
  while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back()))) line.pop_back();
  return line;
}

// `token` or `token_file`, not both; returns "" if neither is set.
Result<std::string> read_token(TableReader& reader, const std::filesystem::path& base_dir) {
  SNAPTIER_TRY(token, reader.string("token"));
  SNAPTIER_TRY(token_file, reader.string("token_file"));
  if (token && token_file) return reader.error("token_file", nullptr, "set either token or token_file, not both");
  std::string value;
  if (token) {
    value = *token;
  } else if (token_file) {
    auto loaded = read_token_file(resolve(base_dir, *token_file));
    if (!loaded) return reader.error("token_file", nullptr, loaded.error().message);
    value = *loaded;
    if (value.empty()) return reader.error("token_file", nullptr, "the token file's first line is empty");
  } else {
    return std::string{};
  }
  // Short tokens are guessable; 16 characters is the floor we can enforce without knowing more.
  if (value.size() < 16) {
    return reader.error(token ? "token" : "token_file", nullptr, "token must be at least 16 characters");
  }
  return value;
}

std::string default_host_name() {
  std::array<char, 256> name{};
  if (::gethostname(name.data(), name.size() - 1) != 0) return "localhost";
  return name.data();
}

Result<AgentConfig> parse_root(const toml::table& root, std::string_view source,
                               const std::filesystem::path& base_dir) {
  AgentConfig config;
  TableReader top(root, "", source);

  // [agent]
  SNAPTIER_TRY(agent_table, top.table("agent"));
  if (agent_table == nullptr) return top.error("agent", nullptr, "required section [agent] is missing");
  TableReader agent(*agent_table, "agent", source);
  SNAPTIER_TRY(host, agent.string("host"));
  config.host = host ? *host : default_host_name();
  if (config.host.empty()) return agent.error("host", nullptr, "must not be empty");
  SNAPTIER_TRY(role, agent.string("role"));
  if (!role || *role == "compute") {
    config.role = AgentRole::compute;
  } else if (*role == "memnode") {
    config.role = AgentRole::memnode;
  } else {
    return agent.error("role", agent_table->get("role"), "must be \"compute\" or \"memnode\", got \"" + *role + "\"");
  }
  SNAPTIER_TRY(state_dir, agent.required_string("state_dir"));
  config.state_dir = resolve(base_dir, state_dir);
  if (auto ok = agent.reject_unknown_keys(); !ok) return tl::unexpected(ok.error());

  // [control]
  SNAPTIER_TRY(control_table, top.table("control"));
  static const toml::table kEmpty;
  TableReader control(control_table ? *control_table : kEmpty, "control", source);
  SNAPTIER_TRY(unix_socket, control.string("unix_socket"));
  config.control.unix_socket = unix_socket ? resolve(base_dir, *unix_socket) : config.state_dir / "agent.sock";
  if (config.control.unix_socket.string().size() >= sizeof(sockaddr_un::sun_path)) {
    return control.error("unix_socket", nullptr,
                         "path is longer than " + std::to_string(sizeof(sockaddr_un::sun_path) - 1) +
                             " bytes, the limit of a Unix socket address");
  }
  SNAPTIER_TRY(tcp_listen, control.address("tcp_listen", /*allow_port_zero=*/true));
  config.control.tcp_listen = tcp_listen;
  SNAPTIER_TRY(token, read_token(control, base_dir));
  config.control.token = token;
  if (config.control.tcp_listen && config.control.token.empty()) {
    return control.error("tcp_listen", nullptr, "a TCP listener requires token or token_file");
  }
  SNAPTIER_TRY(max_frame, control.integer("max_frame_bytes", 1024, 1ll << 30));
  if (max_frame) config.control.max_frame_bytes = static_cast<std::uint32_t>(*max_frame);
  SNAPTIER_TRY(request_timeout, control.integer("request_timeout_ms", 1, 24ll * 3600 * 1000));
  if (request_timeout) config.control.request_timeout = std::chrono::milliseconds(*request_timeout);
  SNAPTIER_TRY(idle_timeout, control.integer("idle_timeout_ms", 1, 24ll * 3600 * 1000));
  if (idle_timeout) config.control.idle_timeout = std::chrono::milliseconds(*idle_timeout);
  if (auto ok = control.reject_unknown_keys(); !ok) return tl::unexpected(ok.error());

  // [tiers.*]
  SNAPTIER_TRY(tiers_table, top.table("tiers"));
  if (tiers_table != nullptr) {
    TableReader tiers(*tiers_table, "tiers", source);

    SNAPTIER_TRY(local_table, tiers.table("local"));
    if (local_table != nullptr) {
      TableReader local(*local_table, "tiers.local", source);
      SNAPTIER_TRY(capacity, local.required_size("capacity"));
      config.local = LocalTierConfig{capacity};
      if (auto ok = local.reject_unknown_keys(); !ok) return tl::unexpected(ok.error());
    }

    SNAPTIER_TRY(file_table, tiers.table("file"));
    if (file_table != nullptr) {
      TableReader file(*file_table, "tiers.file", source);
      SNAPTIER_TRY(dir, file.required_string("dir"));
      SNAPTIER_TRY(capacity, file.required_size("capacity"));
      config.file = FileTierConfig{resolve(base_dir, dir), capacity};
      if (auto ok = file.reject_unknown_keys(); !ok) return tl::unexpected(ok.error());
    }

    SNAPTIER_TRY(cxl_table, tiers.table("cxl"));
    if (cxl_table != nullptr) {
      TableReader cxl(*cxl_table, "tiers.cxl", source);
      SNAPTIER_TRY(path, cxl.required_string("path"));
      // The shared region's directory has one slot per host.
      SNAPTIER_TRY(host_count, cxl.integer("host_count", 1, kCxlMaxHosts));
      CxlTierConfig tier;
      tier.path = resolve(base_dir, path);
      tier.host_count = static_cast<std::uint32_t>(host_count.value_or(4));
      SNAPTIER_TRY(host_index, cxl.integer("host_index", 0, kCxlMaxHosts - 1));
      if (!host_index) return cxl.error("host_index", nullptr, "required key is missing");
      // host_count shapes only a new format; an existing region's layout decides otherwise,
      // so the index is checked against it only when it is spelled out.
      if (host_count && *host_index >= tier.host_count) {
        return cxl.error("host_index", cxl_table->get("host_index"),
                         "must be less than host_count (" + std::to_string(tier.host_count) + ")");
      }
      tier.host_index = static_cast<std::uint32_t>(*host_index);
      SNAPTIER_TRY(format, cxl.boolean("format"));
      tier.format = format.value_or(false);
      SNAPTIER_TRY(announce_ms, cxl.integer("announce_ms", 0, 60'000));
      if (announce_ms) tier.announce_interval = std::chrono::milliseconds(*announce_ms);
      config.cxl = tier;
      if (auto ok = cxl.reject_unknown_keys(); !ok) return tl::unexpected(ok.error());
    }

    SNAPTIER_TRY(rdma_table, tiers.table("rdma"));
    if (rdma_table != nullptr) {
      TableReader rdma(*rdma_table, "tiers.rdma", source);
      RdmaTierConfig tier;
      SNAPTIER_TRY(device, rdma.string("device"));
      tier.device = device.value_or("");
      SNAPTIER_TRY(gid_index, rdma.integer("gid_index", 0, 255));
      tier.gid_index = static_cast<int>(gid_index.value_or(1));
      SNAPTIER_TRY(memnode, rdma.address("memnode", /*allow_port_zero=*/false));
      if (!memnode) return rdma.error("memnode", nullptr, "required key is missing (\"ADDR:PORT\" of a memory node)");
      tier.memnode = *memnode;
      SNAPTIER_TRY(rdma_token, read_token(rdma, base_dir));
      if (rdma_token.empty()) return rdma.error("token", nullptr, "the memory node's token (token or token_file) is required");
      tier.token = rdma_token;
      SNAPTIER_TRY(initial, rdma.integer("reconnect_initial_ms", 1, 3'600'000));
      SNAPTIER_TRY(max_backoff, rdma.integer("reconnect_max_ms", 1, 3'600'000));
      SNAPTIER_TRY(attempts, rdma.integer("reconnect_attempts", 1, 1'000'000));
      SNAPTIER_TRY(down_retry, rdma.integer("reconnect_down_retry_ms", 1, 86'400'000));
      if (initial) tier.reconnect.initial_backoff = std::chrono::milliseconds(*initial);
      if (max_backoff) tier.reconnect.max_backoff = std::chrono::milliseconds(*max_backoff);
      if (attempts) tier.reconnect.max_attempts = static_cast<std::uint32_t>(*attempts);
      if (down_retry) tier.reconnect.down_retry = std::chrono::milliseconds(*down_retry);
      if (tier.reconnect.max_backoff < tier.reconnect.initial_backoff) {
        return rdma.error("reconnect_max_ms", nullptr,
                          "must be at least reconnect_initial_ms (" +
                              std::to_string(tier.reconnect.initial_backoff.count()) + ")");
      }
      config.rdma = tier;
      if (auto ok = rdma.reject_unknown_keys(); !ok) return tl::unexpected(ok.error());
    }
    if (auto ok = tiers.reject_unknown_keys(); !ok) return tl::unexpected(ok.error());
  }

  // [memnode]
  SNAPTIER_TRY(memnode_table, top.table("memnode"));
  if (memnode_table != nullptr) {
    if (config.role != AgentRole::memnode) {
      return top.error("memnode", memnode_table, "section [memnode] requires [agent] role = \"memnode\"");
    }
    TableReader memnode(*memnode_table, "memnode", source);
    MemnodeConfig node;
    SNAPTIER_TRY(pool_size, memnode.required_size("pool_size"));
    node.pool_size = pool_size;
    SNAPTIER_TRY(device, memnode.string("device"));
    node.device = device.value_or("");
    SNAPTIER_TRY(gid_index, memnode.integer("gid_index", 0, 255));
    node.gid_index = static_cast<int>(gid_index.value_or(1));
    SNAPTIER_TRY(pool_path, memnode.string("pool_path"));
    if (!pool_path) {
      node.pool_path = "/dev/shm/snaptier-pool-" + config.host;
    } else if (!pool_path->empty()) {
      node.pool_path = resolve(base_dir, *pool_path);
    }
    config.memnode = node;
    if (auto ok = memnode.reject_unknown_keys(); !ok) return tl::unexpected(ok.error());
  } else if (config.role == AgentRole::memnode) {
    return top.error("memnode", nullptr, "role \"memnode\" requires a [memnode] section with pool_size");
  }
  if (config.role == AgentRole::memnode && !config.control.tcp_listen) {
    return control.error("tcp_listen", nullptr, "a memory node must listen on TCP (compute hosts reach it there)");
  }

  // [functions]
  SNAPTIER_TRY(functions_table, top.table("functions"));
  if (functions_table != nullptr) {
    TableReader functions(*functions_table, "functions", source);
    FunctionsConfig fc;
    SNAPTIER_TRY(workloads_dir, functions.string("workloads_dir"));
    if (!workloads_dir || workloads_dir->empty()) {
      return functions.error("workloads_dir", nullptr, "required key is missing (the folder with the function folders)");
    }
    fc.workloads_dir = resolve(base_dir, *workloads_dir);
    SNAPTIER_TRY(work_dir, functions.string("work_dir"));
    if (!work_dir || work_dir->empty()) {
      return functions.error("work_dir", nullptr, "required key is missing (where instances and images live)");
    }
    fc.work_dir = resolve(base_dir, *work_dir);
    SNAPTIER_TRY(criu, functions.string("criu"));
    if (criu) {
      if (criu->empty()) return functions.error("criu", functions_table->get("criu"), "must not be empty");
      fc.criu = *criu;
    }
    SNAPTIER_TRY(timeout_s, functions.integer("operation_timeout_s", 1, 86'400));
    if (timeout_s) fc.operation_timeout = std::chrono::seconds(*timeout_s);
    SNAPTIER_TRY(max_operations, functions.integer("max_operations", 1, 256));
    if (max_operations) fc.max_operations = static_cast<std::size_t>(*max_operations);
    SNAPTIER_TRY(burst_serving, functions.string("burst_serving"));
    if (burst_serving) {
      if (*burst_serving != "one-thread" && *burst_serving != "thread-per-instance") {
        return functions.error("burst_serving", functions_table->get("burst_serving"),
                               "must be \"one-thread\" or \"thread-per-instance\", got \"" + *burst_serving + "\"");
      }
      fc.burst_one_serving_thread = *burst_serving == "one-thread";
    }
    SNAPTIER_TRY(fault_spin_us, functions.integer("fault_spin_us", 0, 100'000));
    if (fault_spin_us) fc.fault_spin = std::chrono::microseconds(*fault_spin_us);
    SNAPTIER_TRY(prestart_criu, functions.boolean("prestart_criu"));
    if (prestart_criu) fc.prestart_criu = *prestart_criu;
    config.functions = fc;
    if (auto ok = functions.reject_unknown_keys(); !ok) return tl::unexpected(ok.error());
  }

  // [store]
  SNAPTIER_TRY(store_table, top.table("store"));
  if (store_table != nullptr) {
    TableReader store(*store_table, "store", source);
    SNAPTIER_TRY(page_cache, store.size("page_cache", /*zero_allowed=*/true));
    if (page_cache) config.store.page_cache_bytes = *page_cache;
    if (auto ok = store.reject_unknown_keys(); !ok) return tl::unexpected(ok.error());
  }

  // [peers]: host = "ADDR:PORT"
  SNAPTIER_TRY(peers_table, top.table("peers"));
  if (peers_table != nullptr) {
    TableReader peers(*peers_table, "peers", source);
    for (auto&& [key, node] : *peers_table) {
      const std::string name(key.str());
      SNAPTIER_TRY(address, peers.address(name, /*allow_port_zero=*/false));
      if (name == config.host) return peers.error(name, &node, "a peer cannot have this agent's own host name");
      config.peers.emplace(name, *address);
    }
  }

  if (auto ok = top.reject_unknown_keys(); !ok) return tl::unexpected(ok.error());
  return config;
}

}  // namespace

Result<AgentConfig> parse_config(std::string_view toml_text, std::string_view source_name,
                                 const std::filesystem::path& base_dir) {
  // toml++ reports syntax errors by exception (TOML_EXCEPTIONS is on in every build we use);
  // this is the one place it may throw, so this is where it becomes an Error value.
  try {
    toml::table root = toml::parse(toml_text, source_name);
    return parse_root(root, source_name, base_dir);
  } catch (const toml::parse_error& e) {
    std::ostringstream message;
    message << source_name << ":" << e.source().begin.line << ":" << e.source().begin.column
            << ": TOML syntax error: " << e.description();
    return fail(Errc::invalid_argument, message.str());
  }
}

Result<AgentConfig> load_config(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return fail_errno(Errc::invalid_argument, "cannot read config " + file.string(), errno);
  std::ostringstream text;
  text << in.rdbuf();
  std::filesystem::path base = std::filesystem::absolute(file).parent_path();
  auto config = parse_config(text.str(), file.string(), base);
  if (config) config->source = file;
  return config;
}

}  // namespace snaptier
