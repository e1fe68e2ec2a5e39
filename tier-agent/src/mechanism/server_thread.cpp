#include "mechanism/server_thread.hpp"

namespace snaptier::mechanism {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

Result<std::unique_ptr<ServerThread>> ServerThread::start(lazy::LazyPagesOptions options) {
  std::unique_ptr<ServerThread> self(new ServerThread());
  options.stop = &self->state_->stop;  // the state outlives the server: both die with `self`, thread joined first
  options.on_resumed = [state = self->state_, then = std::move(options.on_resumed)] {
    state->resumed.store(true);
    if (then) then();
  };
  auto bound = lazy::LazyPagesServer::bind(std::move(options));
  if (!bound) return tl::unexpected(bound.error());
  self->server_ = std::move(*bound);
  ServerThread* raw = self.get();
  self->thread_ = std::thread([raw] {
    raw->report_ = raw->server_->run();
    raw->state_->done.store(true);
  });
  return self;
}

ServerThread::~ServerThread() { (void)finish(kStopGrace); }

bool ServerThread::wait_resumed(milliseconds timeout) const {
  const auto deadline = Clock::now() + timeout;
  while (!state_->resumed.load() && !state_->done.load() && Clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(1));
  }
  return state_->resumed.load();
}

const lazy::LazyPagesReport& ServerThread::finish(milliseconds grace) {
  if (!thread_.joinable()) return report_;
  const auto deadline = Clock::now() + grace;
  while (!state_->done.load() && Clock::now() < deadline) std::this_thread::sleep_for(milliseconds(5));
  state_->stop.store(true);
  thread_.join();
  return report_;
}

}  // namespace snaptier::mechanism
