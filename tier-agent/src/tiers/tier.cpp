#include "snaptier/tier.hpp"

#include <string>

namespace snaptier {

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
