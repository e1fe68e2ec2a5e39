// The agent's lazy-pages server for the length of one restore: on a thread of its own, or,
// for the instances of a burst, on its own thread until the tasks are resumed and then on the
// burst's lazy::ServingLoop (one thread serving every instance's faults).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

#include "snaptier/error.hpp"
#include "snaptier/lazy_pages.hpp"

namespace snaptier::mechanism {

class ServerThread {
 public:
  // Binds the server with `options` and starts run() on a new thread (with `loop`: its first
  // half, then hands the server to the loop). The options' on_resumed (if any) still runs; the
  // resumed signal and the report live in state shared with the callbacks, so no callback
  // outlives what it writes, whoever is destroyed first.
  [[nodiscard]] static Result<std::unique_ptr<ServerThread>> start(lazy::LazyPagesOptions options,
                                                                   std::shared_ptr<lazy::ServingLoop> loop = nullptr);
  ~ServerThread();  // finish(kStopGrace)
  ServerThread(const ServerThread&) = delete;
  ServerThread& operator=(const ServerThread&) = delete;

  static constexpr std::chrono::milliseconds kStopGrace{5'000};
  // After the stop: how long finish() waits for the server to install what is left and end.
  static constexpr std::chrono::milliseconds kEndBound{120'000};

  [[nodiscard]] lazy::LazyPagesServer& server() { return *server_; }
  [[nodiscard]] bool done() const;
  [[nodiscard]] bool resumed() const { return state_->resumed.load(); }
  // Until the restored tasks were resumed (every before-resume page installed, SIGCONT sent),
  // the server ended, or `timeout` ran out: whether they were resumed.
  [[nodiscard]] bool wait_resumed(std::chrono::milliseconds timeout) const;

  // Waits up to `grace` for the server to end by itself (its tasks gone); then tells it to stop
  // (it installs what is left, so survivors run on) and waits for its report. Idempotent.
  const lazy::LazyPagesReport& finish(std::chrono::milliseconds grace);

 private:
  struct State {
    std::atomic<bool> resumed{false};
    std::atomic<bool> stop{false};
    mutable std::mutex mutex;
    mutable std::condition_variable ended;
    bool done = false;  // `report` is final
    lazy::LazyPagesReport report;
    void end(lazy::LazyPagesReport r);
    bool wait_done(std::chrono::milliseconds timeout) const;
  };
  ServerThread() = default;
  std::shared_ptr<State> state_ = std::make_shared<State>();
  std::shared_ptr<lazy::LazyPagesServer> server_;
  lazy::LazyPagesReport final_;  // what finish() returns
  bool finished_ = false;
  std::thread thread_;  // last: started after, and joined before, everything it uses
};

}  // namespace snaptier::mechanism
