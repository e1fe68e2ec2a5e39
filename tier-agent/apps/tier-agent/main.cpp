// tier-agent: load the config, bring up tiers and store, serve the control plane until
// SIGTERM/SIGINT, then stop within a bounded time.
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <iostream>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>  // declares stderr_color_mt too
#include <spdlog/spdlog.h>

#include "snaptier/agent.hpp"
#include "snaptier/config.hpp"
#include "snaptier/control.hpp"
#include "snaptier/leftovers.hpp"

namespace {

// In-flight requests get this long to finish after a stop signal.
constexpr std::chrono::milliseconds kStopGrace{5000};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tier-agent: snapshot tiers and control plane of one host"};
  std::string config_path;
  std::string log_level = "info";
  app.add_option("--config", config_path, "agent configuration (TOML)")->required();
  app.add_option("--log-level", log_level, "trace | debug | info | warn | error")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}))
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }

  auto logger = spdlog::stderr_color_mt("tier-agent");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(log_level));

  // Block the stop signals before any thread exists, so every thread inherits the mask and the
  // main thread alone receives them through sigwait. SIGPIPE would kill us on a vanished client.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  auto config = snaptier::load_config(config_path);
  if (!config) {
    spdlog::critical("{}", config.error().message);
    return 2;
  }
  spdlog::info("tier-agent {} starting: role {}, state_dir {}", config->host, snaptier::to_string(config->role),
               config->state_dir.string());

  if (config->functions) {
    // Before anything new starts there: what an earlier agent on this host left running when
    // it was killed mid-operation (stopped restored trees, criu daemons) and their folders.
    const auto swept = snaptier::leftovers::sweep(config->functions->work_dir, ::getpid());
    for (const auto& what : swept.killed) spdlog::warn("startup sweep: killed {}, left by an earlier agent", what);
    if (!swept.removed.empty()) spdlog::warn("startup sweep: removed {} unfinished operation folders", swept.removed.size());
    for (const auto& what : swept.kept) spdlog::info("startup sweep: kept {} (a restore with keep)", what);
    for (const auto& what : swept.problems) spdlog::error("startup sweep: {}", what);
  }

  auto agent = snaptier::make_agent(*config);
  if (!agent) {
    spdlog::critical("cannot start: {}", agent.error().what());
    return 1;
  }

  // Create the Unix socket owner-only from the first instant (chmod after bind leaves a window).
  const mode_t previous_umask = ::umask(0177);
  auto server = snaptier::control::ControlServer::start(
      snaptier::server_options(*config),
      [agent = agent->get()](const snaptier::control::Command& command) { return agent->handle(command); });
  ::umask(previous_umask);
  if (!server) {
    spdlog::critical("cannot serve the control plane: {}", server.error().what());
    return 1;
  }
  spdlog::info("tier-agent {} ready", config->host);

  int received = 0;
  sigwait(&stop_signals, &received);
  spdlog::info("received {}, stopping (at most {} ms)", received == SIGTERM ? "SIGTERM" : "SIGINT", kStopGrace.count());
  if (!(*server)->stop(kStopGrace)) {
    // A handler is stuck (e.g. on a hung device); joining it could hang forever.
    spdlog::error("a request was still running after {} ms; exiting without waiting for it", kStopGrace.count());
    spdlog::shutdown();
    std::_Exit(1);
  }
  // A clean stop gives up this host's directory slot, so it no longer holds back the reuse of
  // extents other hosts free (a crash leaves the slot attached: docs/cxl-directory.md).
  if (auto detached = (*agent)->detach(); !detached) {
    spdlog::warn("cxl directory: could not detach: {}", detached.error().what());
  }
  spdlog::info("stopped");
  return 0;
}
