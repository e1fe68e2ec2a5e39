#include "agent/admission.hpp"

#include <utility>

namespace snaptier::agent_detail {

Admission::Ticket& Admission::Ticket::operator=(Ticket&& other) noexcept {
  if (this != &other) {
    release();
    owner_ = std::exchange(other.owner_, nullptr);
    id_ = std::move(other.id_);
    snapshot_ = other.snapshot_;
  }
  return *this;
}

void Admission::Ticket::release() noexcept {
  if (auto* owner = std::exchange(owner_, nullptr)) owner->release(id_, snapshot_);
}

Result<void> Admission::check_room_locked() const {
  if (in_flight_ >= max_) {
    return fail(Errc::busy, "busy: " + std::to_string(in_flight_) + " function operations in flight, the bound ([functions] max_operations) is " +
                                std::to_string(max_) + "; retry later");
  }
  return {};
}

Result<Admission::Ticket> Admission::restore(const std::string& id) {
  std::lock_guard lock(mutex_);
  if (auto room = check_room_locked(); !room) return tl::unexpected(room.error());
  if (snapshotting_.contains(id)) return fail(Errc::busy, "busy: snapshot '" + id + "' is being taken; retry once it is stored");
  ++in_flight_;
  ++restoring_[id];
  return Ticket(this, id, false);
}

Result<Admission::Ticket> Admission::snapshot(const std::string& id) {
  std::lock_guard lock(mutex_);
  if (auto room = check_room_locked(); !room) return tl::unexpected(room.error());
  if (snapshotting_.contains(id)) return fail(Errc::busy, "busy: snapshot '" + id + "' is already being taken");
  if (auto it = restoring_.find(id); it != restoring_.end()) {
    return fail(Errc::busy, "busy: " + std::to_string(it->second) + " restore(s) of '" + id +
                                "' in flight read the pages a new snapshot or a delete would replace; retry once they end");
  }
  ++in_flight_;
  snapshotting_.insert(id);
  return Ticket(this, id, true);
}

std::size_t Admission::in_flight() const {
  std::lock_guard lock(mutex_);
  return in_flight_;
}

void Admission::release(const std::string& id, bool snapshot) noexcept {
  std::lock_guard lock(mutex_);
  if (in_flight_ > 0) --in_flight_;
  if (snapshot) {
    snapshotting_.erase(id);
  } else if (auto it = restoring_.find(id); it != restoring_.end() && --it->second == 0) {
    restoring_.erase(it);
  }
}

}  // namespace snaptier::agent_detail
