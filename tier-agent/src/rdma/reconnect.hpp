// The rdma tier's connection state, kept apart from verbs so that it can be tested with a
// scripted connector: a failure moves the tier from up to reconnecting; attempts follow with
// exponential backoff; after max_attempts failures the tier is down and is probed every
// down_retry (sooner when a request wants it). Requests never wait for a reconnect: while the
// tier is not up they fail at once with Errc::unavailable saying why.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

#include "snaptier/error.hpp"
#include "snaptier/rdma.hpp"
#include "snaptier/tier.hpp"

namespace snaptier::rdma_detail {

// Validates the options (positive backoffs, max >= initial, at least one attempt).
[[nodiscard]] Result<void> check(const RdmaReconnectOptions& options);

// Pure state: every transition gets the time from its caller. Not thread-safe.
class ReconnectMachine {
 public:
  using Clock = std::chrono::steady_clock;

  explicit ReconnectMachine(RdmaReconnectOptions options) : options_(options) {}

  [[nodiscard]] TierState state() const noexcept { return state_; }
  [[nodiscard]] bool attempt_running() const noexcept { return running_; }
  [[nodiscard]] std::uint32_t attempt() const noexcept { return attempt_; }
  [[nodiscard]] const std::string& last_error() const noexcept { return last_error_; }

  // The connection failed. From up: reconnecting, first attempt after initial_backoff. While an
  // attempt runs it is the new connection that failed (the old one takes no requests): the
  // attempt counts as failed when it reports success. Otherwise ignored (same episode).
  void failed(std::string why, Clock::time_point now, std::uint64_t now_unix_ms);
  // If an attempt is due at `now` and none is running, marks one running and returns true.
  [[nodiscard]] bool start_attempt(Clock::time_point now);
  void attempt_succeeded(Clock::time_point now);
  void attempt_failed(std::string why, Clock::time_point now);
  // A request found the tier down: probe again no later than max_backoff after the last
  // attempt ended (a busy caller cannot turn probing into a tight loop).
  void demand(Clock::time_point now);

  // When the next attempt may start; nullopt while up or while an attempt runs.
  [[nodiscard]] std::optional<Clock::time_point> due() const noexcept;
  [[nodiscard]] std::chrono::milliseconds backoff_after(std::uint32_t failures) const noexcept;
  [[nodiscard]] TierHealth health(Clock::time_point now, std::uint64_t now_unix_ms) const;
  // "reconnecting since <time> (attempt 3, next in 400 ms): <last error>"
  [[nodiscard]] std::string describe(Clock::time_point now) const;

 private:
  RdmaReconnectOptions options_;
  TierState state_ = TierState::up;
  bool running_ = false;
  std::uint32_t attempt_ = 0;
  std::uint64_t since_unix_ms_ = 0;
  std::string last_error_;
  std::optional<std::string> failed_while_running_;
  Clock::time_point next_{};
  Clock::time_point last_end_{};
};

// Drives a ReconnectMachine with one background thread that calls `connect` when an attempt is
// due. `connect` must be bounded (every step of it has a timeout) and must not call back into
// the Reconnector. Destruction stops the thread, after the attempt in progress (if any) ends.
class Reconnector {
 public:
  using Connect = std::function<Result<void>()>;

  Reconnector(RdmaReconnectOptions options, Connect connect);
  ~Reconnector();
  Reconnector(const Reconnector&) = delete;
  Reconnector& operator=(const Reconnector&) = delete;

  // Ok while up; otherwise Errc::unavailable naming `what` and the state, at once.
  [[nodiscard]] Result<void> admit(std::string_view what);
  // The connection failed (a request's completion error or timeout).
  void report_failure(std::string why);
  // For the request that saw the failure: waits until the next attempt has ended (or `limit`
  // passes) and says whether the tier is up again. Others never wait (admit fails them).
  [[nodiscard]] bool await_attempt(std::chrono::milliseconds limit);
  [[nodiscard]] TierHealth health() const;
  [[nodiscard]] TierState state() const;

 private:
  void run();

  Connect connect_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  ReconnectMachine machine_;
  std::uint64_t attempts_ended_ = 0;
  bool stop_ = false;
  std::thread thread_;  // last: started after everything it uses exists
};

}  // namespace snaptier::rdma_detail
