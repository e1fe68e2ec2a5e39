// ServingLoop: one thread, one epoll set over the fault engines of many lazy-pages servers.
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <ctime>
#include <map>
#include <mutex>
#include <set>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>

#include "core/unique_fd.hpp"
#include "snaptier/lazy_pages.hpp"

namespace snaptier::lazy {

using detail::UniqueFd;

namespace {
constexpr std::uint64_t kWakeKey = 0;
constexpr std::chrono::milliseconds kHousekeeping{10};

std::uint64_t now_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<std::uint64_t>(ts.tv_nsec);
}
}  // namespace

struct ServingLoop::Impl {
  struct Handed {
    std::shared_ptr<LazyPagesServer> server;
    Done done;
  };

  UniqueFd epoll;
  UniqueFd wake;  // eventfd: a server handed over, or the loop is ending
  std::uint64_t spin_ns = 0;

  mutable std::mutex mutex;  // guards incoming, ending, stats
  std::vector<Handed> incoming;
  bool ending = false;
  ServingLoopStats stats;

  std::thread thread;  // last: started after, joined before, everything it uses

  void poke() const {
    const std::uint64_t one = 1;
    (void)!::write(wake.get(), &one, sizeof one);
  }

  static void finish(Handed& h) {
    LazyPagesReport report = h.server->end_serving();
    if (h.done) h.done(std::move(report));
  }

  void loop() {
    std::map<std::uint64_t, Handed> serving;
    std::uint64_t next_key = kWakeKey + 1;
    auto housekeeping_due = std::chrono::steady_clock::now();
    std::uint64_t last_fault_ns = 0;
    for (;;) {
      std::vector<Handed> arrived;
      bool end_now = false;
      {
        std::lock_guard lock(mutex);
        arrived.swap(incoming);
        end_now = ending;
      }
      for (Handed& h : arrived) {
        const std::uint64_t key = next_key++;
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = key;
        if (::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, h.server->serve_fd(), &ev) != 0) {
          // Not watchable: end it now (its remaining pages installed) rather than never serve it.
          spdlog::warn("serving loop: epoll_ctl ADD failed (errno {}); ending that server", errno);
          finish(h);
          continue;
        }
        serving.emplace(key, std::move(h));
      }
      if (!arrived.empty()) {
        std::lock_guard lock(mutex);
        stats.most_at_once = std::max<std::uint64_t>(stats.most_at_once, serving.size());
      }
      if (end_now) {
        for (auto& [key, h] : serving) {
          (void)::epoll_ctl(epoll.get(), EPOLL_CTL_DEL, h.server->serve_fd(), nullptr);
          finish(h);
        }
        return;
      }

      const bool urgent = std::any_of(serving.begin(), serving.end(),
                                      [](const auto& kv) { return kv.second.server->serve_work_pending(); });
      epoll_event events[64];
      int n = 0;
      if (!urgent && spin_ns > 0 && last_fault_ns != 0) {
        // The task that just faulted usually faults again within microseconds: look again
        // without sleeping for a moment (FaultEngineOptions::spin_after_fault).
        const std::uint64_t until = last_fault_ns + spin_ns;
        while ((n = ::epoll_wait(epoll.get(), events, 64, 0)) == 0 && now_ns() < until) ::sched_yield();
      }
      if (n == 0) n = ::epoll_wait(epoll.get(), events, 64, urgent ? 0 : static_cast<int>(kHousekeeping.count()));
      if (n < 0) {
        if (errno != EINTR) spdlog::warn("serving loop: epoll_wait failed (errno {})", errno);
        n = 0;
      }
      std::set<std::uint64_t> ready;
      for (int i = 0; i < n; ++i) {
        if (events[i].data.u64 == kWakeKey) {
          std::uint64_t count = 0;
          (void)!::read(wake.get(), &count, sizeof count);
        } else {
          ready.insert(events[i].data.u64);
        }
      }
      const auto now = std::chrono::steady_clock::now();
      const bool housekeeping = now >= housekeeping_due;
      if (housekeeping) housekeeping_due = now + kHousekeeping;
      std::vector<std::uint64_t> over;
      for (auto& [key, h] : serving) {
        if (!housekeeping && !ready.contains(key) && !h.server->serve_work_pending()) continue;
        const std::uint64_t before = h.server->faults_served();
        if (h.server->serve_round()) over.push_back(key);
        if (h.server->faults_served() != before) last_fault_ns = now_ns();
      }
      for (std::uint64_t key : over) {
        auto it = serving.find(key);
        (void)::epoll_ctl(epoll.get(), EPOLL_CTL_DEL, it->second.server->serve_fd(), nullptr);
        finish(it->second);
        serving.erase(it);
      }
      std::lock_guard lock(mutex);
      ++stats.rounds;
    }
  }
};

ServingLoop::ServingLoop(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::shared_ptr<ServingLoop>> ServingLoop::start(std::chrono::microseconds spin_after_fault) {
  auto impl = std::make_unique<Impl>();
  impl->epoll = UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
  if (!impl->epoll) return fail_errno(Errc::io, "epoll_create1", errno);
  impl->wake = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!impl->wake) return fail_errno(Errc::io, "eventfd", errno);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kWakeKey;
  if (::epoll_ctl(impl->epoll.get(), EPOLL_CTL_ADD, impl->wake.get(), &ev) != 0) {
    return fail_errno(Errc::io, "epoll_ctl ADD eventfd", errno);
  }
  impl->spin_ns = static_cast<std::uint64_t>(std::max<std::int64_t>(spin_after_fault.count(), 0)) * 1000;
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->loop(); });
  return std::shared_ptr<ServingLoop>(new ServingLoop(std::move(impl)));
}

ServingLoop::~ServingLoop() {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->ending = true;
  }
  impl_->poke();
  if (impl_->thread.joinable()) impl_->thread.join();
}

Result<void> ServingLoop::serve(std::shared_ptr<LazyPagesServer> server, Done done) {
  if (!server) return fail(Errc::invalid_argument, "ServingLoop::serve: no server");
  {
    std::lock_guard lock(impl_->mutex);
    if (impl_->ending) return fail(Errc::unavailable, "the serving loop is ending");
    impl_->incoming.push_back(Impl::Handed{std::move(server), std::move(done)});
    ++impl_->stats.servers_served;
  }
  impl_->poke();
  return {};
}

ServingLoopStats ServingLoop::stats() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->stats;
}

std::thread::id ServingLoop::thread_id() const noexcept { return impl_->thread.get_id(); }

}  // namespace snaptier::lazy
