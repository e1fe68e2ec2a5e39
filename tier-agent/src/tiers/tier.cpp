#include "snaptier/tier.hpp"

#include <random>
#include <string>

namespace snaptier {

std::uint64_t new_epoch() {
  std::random_device device;
  std::uint64_t epoch = 0;
  while (epoch == 0) {
    epoch = ((static_cast<std::uint64_t>(device()) << 32) ^ device()) & ((std::uint64_t{1} << 53) - 1);
  }
  return epoch;
}

std::string_view to_string(TierKind kind) noexcept {
  switch (kind) {
    case TierKind::local: return "local";
    case TierKind::file: return "file";
    case TierKind::cxl: return "cxl";
    case TierKind::rdma: return "rdma";
  }
  return "unknown";
}

std::string_view to_string(TierState state) noexcept {
  switch (state) {
    case TierState::up: return "up";
    case TierState::reconnecting: return "reconnecting";
    case TierState::down: return "down";
  }
  return "unknown";
}

Result<TierKind> tier_kind_from_string(std::string_view name) {
  for (TierKind kind : {TierKind::local, TierKind::file, TierKind::cxl, TierKind::rdma}) {
    if (name == to_string(kind)) return kind;
  }
  return fail(Errc::invalid_argument,
              "unknown tier '" + std::string(name) + "' (expected local, file, cxl or rdma)");
}

}  // namespace snaptier
