// The rdma tier's reconnection state machine, with a scripted connector instead of verbs: the
// backoff schedule, giving up (down), probing again, recovery, and that requests during a
// reconnect fail at once instead of waiting. The real QP path is covered in rdma_test (guests).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "rdma/reconnect.hpp"

namespace snaptier::rdma_detail {
namespace {

using namespace std::chrono_literals;
using Clock = ReconnectMachine::Clock;

RdmaReconnectOptions options(std::chrono::milliseconds initial, std::chrono::milliseconds max, std::uint32_t attempts,
                             std::chrono::milliseconds down_retry) {
  return RdmaReconnectOptions{.initial_backoff = initial, .max_backoff = max, .max_attempts = attempts,
                              .down_retry = down_retry};
}

TEST(ReconnectMachineTest, BackoffDoublesUpToTheCapThenTheTierIsDown) {
  ReconnectMachine m(options(100ms, 1000ms, 6, 30s));
  const auto t0 = Clock::now();
  EXPECT_EQ(m.state(), TierState::up);
  EXPECT_FALSE(m.due());
  EXPECT_FALSE(m.start_attempt(t0));

  m.failed("completion timeout", t0, 1'000'000);
  EXPECT_EQ(m.state(), TierState::reconnecting);
  ASSERT_TRUE(m.due());
  EXPECT_EQ(*m.due() - t0, 100ms);  // the first attempt after initial_backoff
  EXPECT_FALSE(m.start_attempt(t0));

  auto now = *m.due();
  const std::vector<std::chrono::milliseconds> expected{100ms, 200ms, 400ms, 800ms, 1000ms};
  for (std::size_t k = 0; k < expected.size(); ++k) {
    ASSERT_TRUE(m.start_attempt(now)) << k;
    EXPECT_FALSE(m.start_attempt(now)) << "one attempt at a time";
    EXPECT_FALSE(m.due());
    m.attempt_failed("connect refused " + std::to_string(k), now);
    EXPECT_EQ(m.state(), TierState::reconnecting);
    ASSERT_TRUE(m.due());
    EXPECT_EQ(*m.due() - now, expected[k]) << "after failure " << k + 1;
    EXPECT_FALSE(m.start_attempt(*m.due() - 1ms)) << "not before the backoff ends";
    now = *m.due();
  }
  ASSERT_TRUE(m.start_attempt(now));
  m.attempt_failed("still refused", now);
  EXPECT_EQ(m.state(), TierState::down);
  EXPECT_EQ(m.attempt(), 6u);
  EXPECT_EQ(m.last_error(), "still refused");
  EXPECT_EQ(*m.due() - now, 30s);

  const TierHealth health = m.health(now, 2'000'000);
  EXPECT_EQ(health.state, TierState::down);
  EXPECT_EQ(health.since_unix_ms, 1'000'000u);
  EXPECT_EQ(health.attempt, 6u);
  EXPECT_EQ(health.next_attempt_unix_ms, 2'030'000u);
  EXPECT_NE(m.describe(now).find("still refused"), std::string::npos);
  EXPECT_NE(m.describe(now).find("down since"), std::string::npos);
}

TEST(ReconnectMachineTest, DemandWhileDownProbesSoonerButNotInATightLoop) {
  ReconnectMachine m(options(100ms, 1000ms, 1, 60s));
  const auto t0 = Clock::now();
  m.failed("x", t0, 1);
  const auto t1 = t0 + 100ms;
  ASSERT_TRUE(m.start_attempt(t1));
  m.attempt_failed("y", t1);
  ASSERT_EQ(m.state(), TierState::down);
  EXPECT_EQ(*m.due() - t1, 60s);
  m.demand(t1 + 10ms);
  EXPECT_EQ(*m.due() - t1, 1000ms) << "no sooner than max_backoff after the last attempt";
  m.demand(t1 + 5s);
  EXPECT_EQ(*m.due() - t1, 1000ms) << "an earlier due time stays";
}

TEST(ReconnectMachineTest, SuccessClearsTheEpisodeAndLateFailuresDoNotRestartIt) {
  ReconnectMachine m(options(100ms, 1000ms, 3, 10s));
  const auto t0 = Clock::now();
  m.failed("first", t0, 5);
  m.failed("second, from a request that raced the first", t0, 6);
  EXPECT_EQ(m.last_error(), "first");
  ASSERT_TRUE(m.start_attempt(t0 + 100ms));
  m.attempt_succeeded(t0 + 100ms);
  EXPECT_EQ(m.state(), TierState::up);
  EXPECT_EQ(m.attempt(), 0u);
  const TierHealth health = m.health(t0, 7);
  EXPECT_EQ(health.state, TierState::up);
  EXPECT_EQ(health.since_unix_ms, 0u);
  EXPECT_TRUE(health.last_error.empty());
  m.failed("again", t0, 8);
  EXPECT_EQ(m.state(), TierState::reconnecting);
  EXPECT_EQ(m.health(t0, 8).since_unix_ms, 8u);
}

// The attempt swaps the new QP in before it reports success; a request can use (and break) the
// new QP in between. That failure must not be lost, or the tier would be up with no QP.
TEST(ReconnectMachineTest, AFailureDuringAnAttemptIsTheNewConnectionsFailure) {
  ReconnectMachine m(options(100ms, 1000ms, 5, 10s));
  const auto t0 = Clock::now();
  m.failed("timeout", t0, 1);
  ASSERT_TRUE(m.start_attempt(t0 + 100ms));
  m.failed("remote access error on the new QP", t0 + 150ms, 2);
  m.attempt_succeeded(t0 + 200ms);
  EXPECT_EQ(m.state(), TierState::reconnecting);
  EXPECT_EQ(m.last_error(), "remote access error on the new QP");
  ASSERT_TRUE(m.due());
  EXPECT_EQ(*m.due() - (t0 + 200ms), 100ms);
  const auto t1 = *m.due();
  ASSERT_TRUE(m.start_attempt(t1));
  m.attempt_succeeded(t1);
  EXPECT_EQ(m.state(), TierState::up);
}

TEST(ReconnectMachineTest, OptionsAreChecked) {
  EXPECT_TRUE(check(RdmaReconnectOptions{}));
  EXPECT_FALSE(check(options(0ms, 10ms, 1, 1s)));
  EXPECT_FALSE(check(options(100ms, 10ms, 1, 1s)));
  EXPECT_FALSE(check(options(10ms, 10ms, 0, 1s)));
  EXPECT_FALSE(check(options(10ms, 10ms, 1, 0ms)));
}

// A connector that fails until told otherwise, counting its calls.
class ScriptedConnector {
 public:
  Result<void> operator()() {
    ++calls_;
    if (block_.load()) std::this_thread::sleep_for(300ms);  // a slow, bounded connect
    if (succeed_.load()) return {};
    return fail(Errc::unavailable, "memory node does not answer");
  }
  std::atomic<int> calls_{0};
  std::atomic<bool> succeed_{false};
  std::atomic<bool> block_{false};
};

bool wait_for(const std::function<bool()>& condition, std::chrono::milliseconds limit) {
  const auto deadline = Clock::now() + limit;
  while (Clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(2ms);
  }
  return condition();
}

TEST(ReconnectorTest, RequestsFailFastWhileReconnectingAndServeAgainOnceTheNodeAnswers) {
  auto connector = std::make_shared<ScriptedConnector>();
  Reconnector reconnector(options(10ms, 40ms, 1000, 1s), [connector] { return (*connector)(); });
  ASSERT_TRUE(reconnector.admit("rdma: read"));
  EXPECT_EQ(connector->calls_.load(), 0) << "nothing happens while up";

  reconnector.report_failure("no completion within 5000 ms");
  ASSERT_TRUE(wait_for([&] { return connector->calls_.load() >= 4; }, 2s)) << "retries in the background";
  const auto start = Clock::now();
  auto refused = reconnector.admit("rdma: RDMA READ");
  EXPECT_LT(Clock::now() - start, 50ms);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::unavailable);
  EXPECT_NE(refused.error().message.find("reconnecting since"), std::string::npos) << refused.error().message;
  EXPECT_NE(refused.error().message.find("memory node does not answer"), std::string::npos) << refused.error().message;
  EXPECT_EQ(reconnector.health().state, TierState::reconnecting);
  EXPECT_GE(reconnector.health().attempt, 4u);

  connector->succeed_ = true;
  ASSERT_TRUE(wait_for([&] { return reconnector.state() == TierState::up; }, 2s));
  EXPECT_TRUE(reconnector.admit("rdma: read"));
  const int calls = connector->calls_.load();
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(connector->calls_.load(), calls) << "no attempts once up";
}

TEST(ReconnectorTest, GivesUpAfterMaxAttemptsAndAProbeOnDemandBringsItBack) {
  auto connector = std::make_shared<ScriptedConnector>();
  Reconnector reconnector(options(5ms, 20ms, 3, 60s), [connector] { return (*connector)(); });
  reconnector.report_failure("transport retry counter exceeded");
  ASSERT_TRUE(wait_for([&] { return reconnector.state() == TierState::down; }, 2s));
  EXPECT_EQ(connector->calls_.load(), 3);
  EXPECT_EQ(reconnector.health().attempt, 3u);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(connector->calls_.load(), 3) << "down: the next probe is down_retry away";

  connector->succeed_ = true;
  auto refused = reconnector.admit("rdma: allocate");  // asks for a probe, still fails at once
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message.find("down since"), std::string::npos) << refused.error().message;
  ASSERT_TRUE(wait_for([&] { return reconnector.state() == TierState::up; }, 2s));
  EXPECT_EQ(connector->calls_.load(), 4);
}

TEST(ReconnectorTest, ConcurrentRequestsDuringASlowAttemptNeverWait) {
  auto connector = std::make_shared<ScriptedConnector>();
  connector->block_ = true;
  Reconnector reconnector(options(5ms, 5ms, 1000, 1s), [connector] { return (*connector)(); });
  reconnector.report_failure("error completion");
  ASSERT_TRUE(wait_for([&] { return connector->calls_.load() >= 1; }, 1s));
  std::atomic<int> slow{0}, admitted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 50; ++i) {
        const auto start = Clock::now();
        if (reconnector.admit("rdma: read")) ++admitted;
        if (Clock::now() - start > 50ms) ++slow;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(slow.load(), 0);
  EXPECT_EQ(admitted.load(), 0);
}

TEST(ReconnectorTest, TheFailingRequestWaitsForOneAttemptOnly) {
  auto connector = std::make_shared<ScriptedConnector>();
  Reconnector reconnector(options(20ms, 5s, 1000, 60s), [connector] { return (*connector)(); });
  reconnector.report_failure("timeout");
  auto start = Clock::now();
  EXPECT_FALSE(reconnector.await_attempt(3s)) << "the node does not answer";
  EXPECT_LT(Clock::now() - start, 1s) << "returns when the attempt ends, not at the limit";
  EXPECT_EQ(connector->calls_.load(), 1);

  connector->succeed_ = true;
  start = Clock::now();
  EXPECT_TRUE(reconnector.await_attempt(3s));
  EXPECT_EQ(reconnector.state(), TierState::up);
  EXPECT_LT(Clock::now() - start, 1s) << "the second attempt came after 20 ms x 2";

  connector->succeed_ = false;
  connector->block_ = true;
  reconnector.report_failure("timeout again");
  start = Clock::now();
  EXPECT_FALSE(reconnector.await_attempt(100ms)) << "bounded by the limit when the attempt is slow";
  EXPECT_LT(Clock::now() - start, 250ms);
}

TEST(ReconnectorTest, DestructionDuringAnAttemptWaitsForItAndReturns) {
  auto connector = std::make_shared<ScriptedConnector>();
  connector->block_ = true;
  const auto start = Clock::now();
  {
    Reconnector reconnector(options(5ms, 5ms, 1000, 1s), [connector] { return (*connector)(); });
    reconnector.report_failure("x");
    ASSERT_TRUE(wait_for([&] { return connector->calls_.load() >= 1; }, 1s));
  }
  EXPECT_LT(Clock::now() - start, 2s);
  const int calls = connector->calls_.load();
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(connector->calls_.load(), calls);
}

}  // namespace
}  // namespace snaptier::rdma_detail
