// tierctl: talk to a tier agent's control plane.
//   exit 0 ok | 1 the agent replied with an error | 2 usage | 3 cannot connect / timeout
#include <cstdio>
#include <algorithm>
#include <cctype>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>
#include <fstream>
#include <iostream>

#include <CLI/CLI.hpp>

#include "snaptier/control.hpp"

namespace {

using namespace snaptier;
using namespace snaptier::control;

constexpr int kExitOk = 0;
constexpr int kExitErrorReply = 1;
constexpr int kExitUsage = 2;
constexpr int kExitTransport = 3;

int usage_error(const std::string& message) {
  std::cerr << "tierctl: " << message << "\n";
  return kExitUsage;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tierctl: control a snaptier tier agent"};
  app.require_subcommand(1);
  std::string socket_path = "/run/snaptier/agent.sock";
  std::string connect_address;
  std::string token;
  std::string token_file;
  bool json_output = false;
  int timeout_ms = 30000;
  auto* socket_option = app.add_option("--socket", socket_path, "agent's Unix socket")->capture_default_str();
  auto* connect_option = app.add_option("--connect", connect_address, "agent's TCP control address ADDR:PORT");
  auto* token_option = app.add_option("--token", token, "control token (TCP)");
  auto* token_file_option = app.add_option("--token-file", token_file, "file whose first line is the token");
  socket_option->excludes(connect_option);
  token_option->excludes(token_file_option);
  app.add_flag("--json", json_output, "print the result as one JSON document");
  app.add_option("--timeout-ms", timeout_ms, "bound on connect, send and receive")->check(CLI::Range(1, 86'400'000))
      ->capture_default_str();

  std::optional<Command> command;
  app.add_subcommand("ping", "check that the agent answers")->callback([&] { command = Ping{}; });
  app.add_subcommand("status", "host, role, tiers with capacity and stats, snapshot count")->callback([&] {
    command = Status{};
  });
  // The agent's list (its status "policies"), not this binary's: the two may be different builds.
  bool policies_only = false;
  app.add_subcommand("policies", "the restore policies the agent knows: name, mechanism, tiers, description")
      ->callback([&] {
        command = Status{};
        policies_only = true;
      });

  SnapshotPut put;
  std::string put_path;
  std::string put_tier;
  std::uint64_t base_vaddr = 0;
  std::vector<std::string> metadata;
  auto* put_cmd = app.add_subcommand("put", "store a snapshot from a file of raw pages (size a multiple of 4096)");
  put_cmd->add_option("id", put.id, "snapshot id")->required();
  put_cmd->add_option("file", put_path, "page data file")->required();
  put_cmd->add_option("--base-vaddr", base_vaddr, "virtual address of the first page");
  put_cmd->add_option("--tier", put_tier, "local | file | cxl | rdma (default: the agent's default tier)");
  put_cmd->add_option("--metadata", metadata, "NAME=FILE, repeatable: opaque blobs stored with the snapshot");
  put_cmd->callback([&] { command = put; });

  app.add_subcommand("list", "list snapshots")->callback([&] { command = SnapshotList{}; });
  SnapshotInfoQuery info;
  auto* info_cmd = app.add_subcommand("info", "page table summary of one snapshot");
  info_cmd->add_option("id", info.id, "snapshot id")->required();
  info_cmd->callback([&] { command = info; });

  SnapshotRead read;
  std::string read_path;
  auto* read_cmd = app.add_subcommand("read", "write a snapshot's page data to a file");
  read_cmd->add_option("id", read.id, "snapshot id")->required();
  read_cmd->add_option("output", read_path, "output file")->required();
  read_cmd->callback([&] { command = read; });

  SnapshotDelete remove;
  auto* delete_cmd = app.add_subcommand("delete", "delete a snapshot");
  delete_cmd->add_option("id", remove.id, "snapshot id")->required();
  delete_cmd->callback([&] { command = remove; });

  FunctionSnapshot function_snapshot;
  std::string snapshot_host;
  std::string snapshot_id;
  auto* snapshot_cmd = app.add_subcommand(
      "snapshot", "start FUNCTION, criu-dump it, ingest it into the tiers and profile its first invocation");
  snapshot_cmd->add_option("function", function_snapshot.function, "a function folder of the agent's workloads_dir")->required();
  snapshot_cmd->add_option("--host", snapshot_host, "the agent that snapshots (default: the one tierctl talks to)");
  snapshot_cmd->add_option("--id", snapshot_id, "snapshot id (default: the function's name)");
  snapshot_cmd->callback([&] {
    if (!snapshot_host.empty()) function_snapshot.host = snapshot_host;
    if (!snapshot_id.empty()) function_snapshot.id = snapshot_id;
    command = function_snapshot;
  });

  FunctionRestore function_restore;
  std::string restore_host;
  auto* restore_cmd = app.add_subcommand(
      "restore", "restore a function snapshot with a policy, invoke it once, check its answer and memory digest");
  restore_cmd->add_option("snapshot", function_restore.snapshot, "snapshot id")->required();
  restore_cmd->add_option("--policy", function_restore.policy,
                          "a name from `tierctl policies`")->required();
  restore_cmd->add_option("--host", restore_host, "the agent that restores (default: the one tierctl talks to)");
  restore_cmd->add_flag("--keep", function_restore.keep, "leave the restored instance running");
  restore_cmd->add_flag("--limit", function_restore.measure_limit,
                        "also measure the restore's limit: bare_restore_ms (a bare restore of the same copy, after "
                        "this one) beside warm_invoke_ms");
  std::uint32_t restore_instances = 0;
  restore_cmd->add_option("--instances", restore_instances,
                          "a burst: restore this many instances at once (each checked; bounded by the agent's max_operations)")
      ->check(CLI::Range(1, 256));
  restore_cmd->callback([&] {
    if (!restore_host.empty()) function_restore.host = restore_host;
    if (restore_instances > 0) function_restore.instances = restore_instances;
    command = function_restore;
  });

  app.add_subcommand("instances", "restored instances left running (--keep) and function operations in flight")
      ->callback([&] { command = FunctionInstances{}; });
  FunctionKill function_kill;
  auto* kill_cmd = app.add_subcommand("kill", "end an instance listed by `tierctl instances`");
  kill_cmd->add_option("instance", function_kill.instance, "its id")->required();
  kill_cmd->callback([&] { command = function_kill; });

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? kExitOk : kExitUsage;
  }
  if (!command) return usage_error("no command given");

  // Paths are resolved here: the agent's working directory is not ours.
  if (auto* p = std::get_if<SnapshotPut>(&*command)) {
    p->data_path = std::filesystem::absolute(put_path);
    p->base_vaddr = base_vaddr;
    if (!put_tier.empty()) {
      p->tier = tier_kind_from_name(put_tier);
      if (!p->tier) return usage_error("--tier must be local, file, cxl or rdma, got \"" + put_tier + "\"");
    }
    for (const auto& item : metadata) {
      auto eq = item.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == item.size()) {
        return usage_error("--metadata expects NAME=FILE, got \"" + item + "\"");
      }
      p->metadata[item.substr(0, eq)] = std::filesystem::absolute(item.substr(eq + 1));
    }
  } else if (auto* r = std::get_if<SnapshotRead>(&*command)) {
    r->output_path = std::filesystem::absolute(read_path);
  }

  ClientOptions options;
  if (!connect_address.empty()) {
    auto address = parse_net_address(connect_address);
    if (!address) return usage_error("--connect: " + address.error().message);
    options.endpoint = *address;
    if (!token_file.empty()) {
      std::ifstream in(token_file);
      if (!in || !std::getline(in, token)) return usage_error("--token-file: cannot read " + token_file);
      while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back()))) token.pop_back();
    }
    if (token.empty()) return usage_error("--connect needs --token or --token-file");
  } else {
    options.endpoint = UnixEndpoint{socket_path};
  }
  options.token = token;
  // Function operations take minutes under emulation; their default bound is the agent's.
  const bool long_running = is_long_running(*command) && app.get_option("--timeout-ms")->count() == 0;
  options.connect_timeout = std::chrono::milliseconds(std::min(timeout_ms, 30'000));
  options.io_timeout = std::chrono::milliseconds(long_running ? 900'000 : timeout_ms);

  auto client = ControlClient::connect(options);
  if (!client) {
    std::cerr << "tierctl: cannot reach the agent: " << client.error().what() << "\n";
    return kExitTransport;
  }
  auto response = client->call(*command);
  if (!response) {
    std::cerr << "tierctl: " << op_name(*command) << ": " << response.error().what() << "\n";
    return kExitTransport;
  }
  if (!response->outcome) {
    const Error& error = response->outcome.error();
    if (json_output) {
      std::cout << nlohmann::json{{"error", {{"code", errc_name(error.code)}, {"message", error.message}}}}.dump(2) << "\n";
    }
    std::cerr << "tierctl: " << op_name(*command) << " failed: " << errc_name(error.code) << ": " << error.message << "\n";
    return kExitErrorReply;
  }
  if (policies_only) {
    const nlohmann::json policies = response->outcome->value("policies", nlohmann::json());
    if (!policies.is_array()) {
      std::cerr << "tierctl: policies: this agent runs no function service (its status lists no policies)\n";
      return kExitErrorReply;
    }
    if (json_output) {
      std::cout << policies.dump(2) << "\n";
    } else {
      for (const auto& p : policies) {
        std::string tiers;
        for (const auto& any_of : p.value("tiers", nlohmann::json::array())) {
          std::string one;
          for (const auto& t : any_of) one += (one.empty() ? "" : " or ") + t.get<std::string>();
          tiers += (tiers.empty() ? "" : ", ") + one;
        }
        const nlohmann::json missing = p.value("missing", nlohmann::json());
        std::cout << p.value("name", "") << "  [" << p.value("mechanism", "") << "; needs "
                  << (tiers.empty() ? std::string("no tier here") : tiers) << "]"
                  << (missing.is_string() ? "  NOT HERE: no " + missing.get<std::string>() : std::string()) << "\n    "
                  << p.value("description", "") << "\n";
      }
    }
    return kExitOk;
  }
  if (json_output) {
    std::cout << response->outcome->dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  } else {
    std::cout << render_result(*command, *response->outcome);
  }
  return kExitOk;
}
