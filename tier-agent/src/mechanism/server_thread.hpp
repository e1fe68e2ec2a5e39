// The agent's lazy-pages server on its own thread for the length of one restore.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

#include "snaptier/error.hpp"
#include "snaptier/lazy_pages.hpp"

namespace snaptier::mechanism {

class ServerThread {
 public:
  // Binds the server with `options` and starts run() on a new thread. The options' on_resumed
  // (if any) still runs; the resumed signal itself lives in state shared with the callback, so
  // the callback never outlives what it writes, whoever is destroyed first.
  [[nodiscard]] static Result<std::unique_ptr<ServerThread>> start(lazy::LazyPagesOptions options);
  ~ServerThread();  // finish(kStopGrace)
  ServerThread(const ServerThread&) = delete;
  ServerThread& operator=(const ServerThread&) = delete;

  static constexpr std::chrono::milliseconds kStopGrace{5'000};

  [[nodiscard]] lazy::LazyPagesServer& server() { return *server_; }
  [[nodiscard]] bool done() const { return state_->done.load(); }
  [[nodiscard]] bool resumed() const { return state_->resumed.load(); }
  // Until the restored tasks were resumed (every before-resume page installed, SIGCONT sent),
  // the server ended, or `timeout` ran out: whether they were resumed.
  [[nodiscard]] bool wait_resumed(std::chrono::milliseconds timeout) const;

  // Waits up to `grace` for the server to end by itself (its tasks gone); then tells it to stop
  // (it installs what is left, so survivors run on) and joins. Idempotent.
  const lazy::LazyPagesReport& finish(std::chrono::milliseconds grace);

 private:
  struct State {
    std::atomic<bool> resumed{false};
    std::atomic<bool> done{false};
    std::atomic<bool> stop{false};
  };
  ServerThread() = default;
  std::shared_ptr<State> state_ = std::make_shared<State>();
  std::unique_ptr<lazy::LazyPagesServer> server_;
  lazy::LazyPagesReport report_;
  std::thread thread_;  // last: started after, and joined before, everything it uses
};

}  // namespace snaptier::mechanism
