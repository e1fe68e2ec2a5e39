#include <atomic>
#include <condition_variable>
#include <mutex>
#include <stop_token>
#include <thread>

#include "snaptier/cxl_directory.hpp"

namespace snaptier {

struct CxlAnnouncer::State {
  std::shared_ptr<CxlDirectory> directory;
  std::chrono::milliseconds interval;
  std::atomic<std::uint64_t> refreshes{0};
  mutable std::mutex mutex;  // guards last_error; the thread waits on `wake` with it
  std::condition_variable_any wake;
  std::optional<Error> last_error;
  std::jthread thread;  // last: stopped and joined before the members it uses go

  void run(std::stop_token stop) {
    std::unique_lock lock(mutex);
    while (!wake.wait_for(lock, stop, interval, [&] { return stop.stop_requested(); })) {
      lock.unlock();
      auto ok = directory->refresh();
      lock.lock();
      last_error = ok ? std::nullopt : std::optional<Error>(ok.error());
      refreshes.fetch_add(1, std::memory_order_relaxed);
    }
  }
};

CxlAnnouncer::CxlAnnouncer(std::shared_ptr<CxlDirectory> directory, std::chrono::milliseconds interval)
    : state_(std::make_unique<State>()) {
  state_->directory = std::move(directory);
  state_->interval = interval;
  state_->thread = std::jthread([state = state_.get()](std::stop_token stop) { state->run(stop); });
}

CxlAnnouncer::~CxlAnnouncer() {
  state_->thread.request_stop();  // wakes the wait (condition_variable_any is stop-aware)
  state_->thread.join();
}

std::uint64_t CxlAnnouncer::refreshes() const noexcept { return state_->refreshes.load(std::memory_order_relaxed); }

std::optional<Error> CxlAnnouncer::last_error() const {
  std::lock_guard lock(state_->mutex);
  return state_->last_error;
}

}  // namespace snaptier
