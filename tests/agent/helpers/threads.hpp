// This process's threads, as /proc/self/task lists them (tests check that a component's
// threads are gone when it is).
#pragma once

#include <unistd.h>

#include <cstddef>
#include <filesystem>

namespace snaptier::testing {

inline std::size_t thread_count() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
  return n;
}

// The count once it is `want`, or after 2 s. A joined thread stays listed a moment after
// pthread_join returns (the kernel wakes the joiner before it releases the thread); on a slow
// machine (a 1-vCPU TCG guest) the check after a join sees it.
inline std::size_t thread_count_settled(std::size_t want) {
  std::size_t n = thread_count();
  for (int i = 0; i < 200 && n != want; ++i) {
    ::usleep(10'000);
    n = thread_count();
  }
  return n;
}

}  // namespace snaptier::testing
