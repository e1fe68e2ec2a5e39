// Whether this process may create a userfaultfd with `features`: without root (CAP_SYS_PTRACE)
// it may only when vm.unprivileged_userfaultfd is 1, and never with UFFD_FEATURE_EVENT_FORK.
// Tests that restore through a real uffd skip with the reason when it may not.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <optional>
#include <string>

#include "snaptier/fault_engine.hpp"

namespace snaptier::testing {

inline std::optional<std::string> userfaultfd_unavailable(std::uint64_t features = 0) {
  auto probe = create_userfaultfd(features);
  if (!probe) return "userfaultfd unavailable to this user (without root it needs vm.unprivileged_userfaultfd=1): " +
                     probe.error().what();
  ::close(*probe);
  return std::nullopt;
}

}  // namespace snaptier::testing
