#include "rdma/reconnect.hpp"

#include <algorithm>
#include <ctime>

#include <fmt/format.h>

#include "core/utc_time.hpp"

namespace snaptier::rdma_detail {
namespace {

using std::chrono::milliseconds;

std::uint64_t unix_ms_now() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
}

}  // namespace

Result<void> check(const RdmaReconnectOptions& o) {
  if (o.initial_backoff.count() <= 0 || o.max_backoff < o.initial_backoff || o.down_retry.count() <= 0 ||
      o.max_attempts == 0) {
    return fail(Errc::invalid_argument,
                fmt::format("rdma reconnect: need initial_backoff > 0, max_backoff >= initial_backoff, "
                            "down_retry > 0 and max_attempts >= 1 (got {} ms, {} ms, {} ms, {})",
                            o.initial_backoff.count(), o.max_backoff.count(), o.down_retry.count(),
                            o.max_attempts));
  }
  return {};
}

void ReconnectMachine::failed(std::string why, Clock::time_point now, std::uint64_t now_unix_ms) {
  if (state_ != TierState::up) {
    if (running_ && !failed_while_running_) failed_while_running_ = std::move(why);
    return;
  }
  state_ = TierState::reconnecting;
  attempt_ = 0;
  since_unix_ms_ = now_unix_ms;
  last_error_ = std::move(why);
  // Not at once: a peer that just failed a request rarely answers a millisecond later, and
  // the pause keeps a flapping link from turning into a reconnect storm.
  next_ = now + options_.initial_backoff;
  last_end_ = now;
}

bool ReconnectMachine::start_attempt(Clock::time_point now) {
  if (state_ == TierState::up || running_ || now < next_) return false;
  running_ = true;
  ++attempt_;
  return true;
}

void ReconnectMachine::attempt_succeeded(Clock::time_point now) {
  if (failed_while_running_) {
    std::string why = std::move(*failed_while_running_);
    failed_while_running_.reset();
    attempt_failed(std::move(why), now);
    return;
  }
  running_ = false;
  state_ = TierState::up;
  attempt_ = 0;
  since_unix_ms_ = 0;
  last_error_.clear();
}

milliseconds ReconnectMachine::backoff_after(std::uint32_t failures) const noexcept {
  // initial * 2^(failures - 1), capped; the shift is bounded so that it cannot overflow.
  const std::uint32_t doublings = std::min<std::uint32_t>(failures > 0 ? failures - 1 : 0, 30);
  const auto delay = options_.initial_backoff.count() * (std::int64_t{1} << doublings);
  return milliseconds(std::min<std::int64_t>(delay, options_.max_backoff.count()));
}

void ReconnectMachine::attempt_failed(std::string why, Clock::time_point now) {
  running_ = false;
  failed_while_running_.reset();
  last_error_ = std::move(why);
  last_end_ = now;
  if (attempt_ >= options_.max_attempts) {
    state_ = TierState::down;
    next_ = now + options_.down_retry;
  } else {
    next_ = now + backoff_after(attempt_);
  }
}

void ReconnectMachine::demand(Clock::time_point now) {
  if (state_ != TierState::down || running_) return;
  next_ = std::min(next_, std::max(now, last_end_ + options_.max_backoff));
}

std::optional<ReconnectMachine::Clock::time_point> ReconnectMachine::due() const noexcept {
  if (state_ == TierState::up || running_) return std::nullopt;
  return next_;
}

TierHealth ReconnectMachine::health(Clock::time_point now, std::uint64_t now_unix_ms) const {
  TierHealth health{.state = state_, .since_unix_ms = since_unix_ms_, .attempt = attempt_, .last_error = last_error_};
  if (auto when = due()) {
    const auto ahead = std::max<std::int64_t>(0, std::chrono::duration_cast<milliseconds>(*when - now).count());
    health.next_attempt_unix_ms = now_unix_ms + static_cast<std::uint64_t>(ahead);
  }
  return health;
}

std::string ReconnectMachine::describe(Clock::time_point now) const {
  std::string next;
  if (running_) {
    next = "an attempt is running";
  } else if (auto when = due()) {
    next = fmt::format("next in {} ms",
                       std::max<std::int64_t>(0, std::chrono::duration_cast<milliseconds>(*when - now).count()));
  }
  return fmt::format("{} since {} (attempt {}{}{}): {}", to_string(state_), detail::utc_time(since_unix_ms_), attempt_,
                     next.empty() ? "" : ", ", next, last_error_);
}

Reconnector::Reconnector(RdmaReconnectOptions options, Connect connect)
    : connect_(std::move(connect)), machine_(options), thread_([this] { run(); }) {}

Reconnector::~Reconnector() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

Result<void> Reconnector::admit(std::string_view what) {
  std::lock_guard lock(mutex_);
  if (machine_.state() == TierState::up) return {};
  const auto now = ReconnectMachine::Clock::now();
  if (machine_.state() == TierState::down) {
    machine_.demand(now);
    wake_.notify_all();
  }
  return fail(Errc::unavailable, std::string(what) + ": the connection to the memory node is " + machine_.describe(now));
}

void Reconnector::report_failure(std::string why) {
  {
    std::lock_guard lock(mutex_);
    machine_.failed(std::move(why), ReconnectMachine::Clock::now(), unix_ms_now());
  }
  wake_.notify_all();
}

bool Reconnector::await_attempt(std::chrono::milliseconds limit) {
  std::unique_lock lock(mutex_);
  const std::uint64_t seen = attempts_ended_;
  wake_.wait_for(lock, limit, [&] { return stop_ || attempts_ended_ != seen || machine_.state() == TierState::up; });
  return machine_.state() == TierState::up;
}

TierHealth Reconnector::health() const {
  std::lock_guard lock(mutex_);
  return machine_.health(ReconnectMachine::Clock::now(), unix_ms_now());
}

TierState Reconnector::state() const {
  std::lock_guard lock(mutex_);
  return machine_.state();
}

void Reconnector::run() {
  std::unique_lock lock(mutex_);
  while (!stop_) {
    const auto due = machine_.due();
    if (!due) {
      wake_.wait(lock);
      continue;
    }
    if (!machine_.start_attempt(ReconnectMachine::Clock::now())) {
      wake_.wait_until(lock, *due);
      continue;
    }
    lock.unlock();
    Result<void> connected = connect_();
    lock.lock();
    if (connected) {
      machine_.attempt_succeeded(ReconnectMachine::Clock::now());
    } else {
      machine_.attempt_failed(connected.error().what(), ReconnectMachine::Clock::now());
    }
    ++attempts_ended_;
    wake_.notify_all();
  }
}

}  // namespace snaptier::rdma_detail
