// The agent's admission of function operations: a bound, busy beyond it (never a queue), a
// snapshot id never re-taken while restores read it, and slots that come back.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "agent/admission.hpp"

namespace snaptier::agent_detail {
namespace {

TEST(AdmissionTest, BeyondTheBoundIsBusyAndAReleasedSlotIsUsableAgain) {
  Admission admission(3);
  std::vector<Admission::Ticket> held;
  for (int i = 0; i < 3; ++i) {
    auto t = admission.restore("fn");
    ASSERT_TRUE(t) << t.error().what();
    held.push_back(std::move(*t));
  }
  EXPECT_EQ(admission.in_flight(), 3u);
  auto over = admission.restore("other");
  ASSERT_FALSE(over);
  EXPECT_EQ(over.error().code, Errc::busy);
  EXPECT_NE(over.error().message.find("max_operations"), std::string::npos) << "says which bound: " << over.error().message;
  EXPECT_FALSE(admission.snapshot("other")) << "snapshots count against the same bound";
  held.pop_back();
  EXPECT_EQ(admission.in_flight(), 2u);
  EXPECT_TRUE(admission.restore("other"));  // a temporary: released at once
  EXPECT_EQ(admission.in_flight(), 2u);
}

TEST(AdmissionTest, ASnapshotIsNeverRetakenWhileItsRestoresRun) {
  Admission admission(8);
  auto restoring = admission.restore("fn");
  ASSERT_TRUE(restoring);
  auto retake = admission.snapshot("fn");
  ASSERT_FALSE(retake);
  EXPECT_EQ(retake.error().code, Errc::busy);
  EXPECT_TRUE(admission.snapshot("another-fn")) << "other ids are not held up";
  restoring->release();
  auto taking = admission.snapshot("fn");
  ASSERT_TRUE(taking) << taking.error().what();
  auto read_while_taking = admission.restore("fn");
  ASSERT_FALSE(read_while_taking);
  EXPECT_EQ(read_while_taking.error().code, Errc::busy);
  EXPECT_FALSE(admission.snapshot("fn")) << "two snapshots of one id at once";
}

TEST(AdmissionTest, MovedTicketsReleaseOnceAndConcurrentCallersNeverExceedTheBound) {
  Admission admission(4);
  {
    auto t = admission.restore("fn");
    ASSERT_TRUE(t);
    Admission::Ticket moved = std::move(*t);
    Admission::Ticket again;
    again = std::move(moved);
    EXPECT_EQ(admission.in_flight(), 1u);
  }
  EXPECT_EQ(admission.in_flight(), 0u);

  std::atomic<int> inside{0}, most{0}, busy{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&] {
      for (int round = 0; round < 200; ++round) {
        auto t = admission.restore("fn");
        if (!t) {
          ++busy;
          continue;
        }
        const int now = ++inside;
        int seen = most.load();
        while (now > seen && !most.compare_exchange_weak(seen, now)) {
        }
        std::this_thread::yield();
        --inside;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_LE(most.load(), 4);
  EXPECT_EQ(admission.in_flight(), 0u);
  EXPECT_TRUE(admission.snapshot("fn")) << "every restore released its hold on the id";
}

}  // namespace
}  // namespace snaptier::agent_detail
