#include "mechanism/server_thread.hpp"

namespace snaptier::mechanism {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

void ServerThread::State::end(lazy::LazyPagesReport r) {
  {
    std::lock_guard lock(mutex);
    report = std::move(r);
    done = true;
  }
  ended.notify_all();
}

bool ServerThread::State::wait_done(milliseconds timeout) const {
  std::unique_lock lock(mutex);
  return ended.wait_for(lock, timeout, [this] { return done; });
}

Result<std::unique_ptr<ServerThread>> ServerThread::start(lazy::LazyPagesOptions options,
                                                          std::shared_ptr<lazy::ServingLoop> loop) {
  std::unique_ptr<ServerThread> self(new ServerThread());
  options.stop = &self->state_->stop;  // the state outlives the server: the server holds no other reference
  options.on_resumed = [state = self->state_, then = std::move(options.on_resumed)] {
    state->resumed.store(true);
    if (then) then();
  };
  auto bound = lazy::LazyPagesServer::bind(std::move(options));
  if (!bound) return tl::unexpected(bound.error());
  self->server_ = std::move(*bound);
  self->thread_ = std::thread([server = self->server_, state = self->state_, loop = std::move(loop)] {
    if (!loop) {
      state->end(server->run());
      return;
    }
    if (auto over = server->run_until_resumed()) {
      state->end(std::move(*over));
      return;
    }
    if (auto handed = loop->serve(server, [state](lazy::LazyPagesReport r) { state->end(std::move(r)); }); !handed) {
      state->end(server->serve_rest());  // the loop is ending: serve on this thread
    }
  });
  return self;
}

ServerThread::~ServerThread() { (void)finish(kStopGrace); }

bool ServerThread::done() const {
  std::lock_guard lock(state_->mutex);
  return state_->done;
}

bool ServerThread::wait_resumed(milliseconds timeout) const {
  const auto deadline = Clock::now() + timeout;
  while (!state_->resumed.load() && !done() && Clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(1));
  }
  return state_->resumed.load();
}

const lazy::LazyPagesReport& ServerThread::finish(milliseconds grace) {
  if (finished_) return final_;
  finished_ = true;
  if (!state_->wait_done(grace)) {
    state_->stop.store(true);
    if (!state_->wait_done(kEndBound)) {
      // The thread and the loop hold what they use (the server, the state): let them end later.
      final_.error = Error{Errc::timeout, "the lazy-pages server did not end within " +
                                              std::to_string(kEndBound.count()) + " ms of being stopped"};
      thread_.detach();
      return final_;
    }
  }
  thread_.join();
  if (!final_.error) {
    std::lock_guard lock(state_->mutex);
    final_ = state_->report;
  }
  return final_;
}

}  // namespace snaptier::mechanism
