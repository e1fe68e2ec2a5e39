// snaptier-lazy-pages: a drop-in replacement for `criu lazy-pages` (docs/lazy-restore.md).
//
//   snaptier-lazy-pages --images DIR [--work-dir DIR] [--prefetch none|all] [--resume]
//                       [--timeout-s N] [--metrics-json FILE] [--status-fd FD]
//   criu restore --lazy-pages -D DIR [-W WORK_DIR] -d [--leave-stopped, with --resume]
//
// Prints the report (engine metrics included) as one JSON line on stdout at exit.
// Exit status: 0 served, 1 restore failed (the tree was killed), 2 usage/setup.
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "snaptier/lazy_pages.hpp"

namespace {
std::atomic<bool> g_stop{false};
extern "C" void on_signal(int) { g_stop.store(true); }
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"snaptier-lazy-pages: serve CRIU lazy restores from the checkpoint images"};
  std::string images, work_dir, policy = "none", metrics_path;
  int timeout_s = 600, accept_timeout_s = 60, step_timeout_s = 120, status_fd = -1;
  bool resume = false, quiet = false;
  app.add_option("--images,-D", images, "CRIU images directory")->required();
  app.add_option("--work-dir,-W", work_dir, "where lazy-pages.socket is bound (default: images dir)");
  app.add_option("--prefetch", policy, "none | all")->check(CLI::IsMember({"none", "all"}));
  app.add_flag("--resume", resume, "SIGCONT the restored tasks after RSTF+prefetch (criu restore --leave-stopped)");
  app.add_option("--timeout-s", timeout_s, "bound on serving after RSTF")->check(CLI::Range(1, 86'400));
  app.add_option("--accept-timeout-s", accept_timeout_s, "bound on the restorer connecting")->check(CLI::Range(1, 86'400));
  app.add_option("--step-timeout-s", step_timeout_s, "bound between protocol messages")->check(CLI::Range(1, 86'400));
  app.add_option("--metrics-json", metrics_path, "also write the report to FILE");
  app.add_flag("--quiet,-q", quiet, "no progress lines on stderr");
  app.add_option("--status-fd", status_fd,
                 "as criu's: write one NUL byte to FD once listening, then close it (closed without it on failure)")
      ->check(CLI::NonNegativeNumber);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  auto parsed = snaptier::lazy::parse_policy(policy);
  if (!parsed) {
    std::cerr << "snaptier-lazy-pages: " << parsed.error().what() << "\n";
    return 2;
  }
  struct sigaction sa{};
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  snaptier::lazy::LazyPagesOptions options;
  options.images_dir = images;
  options.work_dir = work_dir;
  options.prefetch = *parsed;
  options.resume_after_prefetch = resume;
  options.serve_timeout = std::chrono::seconds(timeout_s);
  options.accept_timeout = std::chrono::seconds(accept_timeout_s);
  options.step_timeout = std::chrono::seconds(step_timeout_s);
  options.stop = &g_stop;
  if (!quiet) options.log = [](std::string_view line) { std::cerr << "snaptier-lazy-pages: " << line << "\n"; };

  auto server = snaptier::lazy::LazyPagesServer::bind(options);
  if (!server) {
    std::cerr << "snaptier-lazy-pages: " << server.error().what() << "\n";
    return 2;
  }
  if (!quiet) std::cerr << "snaptier-lazy-pages: listening on " << (*server)->socket_path().string() << "\n";
  if (status_fd >= 0) {
    const char ready = '\0';
    if (::write(status_fd, &ready, 1) != 1) std::cerr << "snaptier-lazy-pages: --status-fd " << status_fd << ": write failed\n";
    ::close(status_fd);
  }
  auto report = (*server)->run();
  nlohmann::json j = report;
  std::cout << j.dump() << std::endl;
  if (!metrics_path.empty()) {
    std::ofstream f(metrics_path);
    f << j.dump(2) << "\n";
  }
  if (report.error) {
    std::cerr << "snaptier-lazy-pages: " << report.error->what() << "\n";
    return 1;
  }
  return 0;
}
