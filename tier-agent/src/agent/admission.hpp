// Admission of function operations: at most `max` in flight per agent, and a snapshot id is
// either being (re)taken or being restored, never both (a re-snapshot replaces the pages the
// restores read). Beyond either rule a request is refused with Errc::busy at once, never
// queued: a burst larger than the bound gets "busy" replies, not an unbounded backlog.
// Safe to call from any thread.
#pragma once

#include <cstddef>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include "snaptier/error.hpp"

namespace snaptier::agent_detail {

class Admission {
 public:
  explicit Admission(std::size_t max_operations) : max_(max_operations) {}
  Admission(const Admission&) = delete;
  Admission& operator=(const Admission&) = delete;

  // Held for the length of one operation; releases its slot when destroyed.
  class Ticket {
   public:
    Ticket() = default;
    Ticket(Ticket&& other) noexcept { *this = std::move(other); }
    Ticket& operator=(Ticket&& other) noexcept;
    Ticket(const Ticket&) = delete;
    Ticket& operator=(const Ticket&) = delete;
    ~Ticket() { release(); }
    void release() noexcept;

   private:
    friend class Admission;
    Ticket(Admission* owner, std::string id, bool snapshot) : owner_(owner), id_(std::move(id)), snapshot_(snapshot) {}
    Admission* owner_ = nullptr;
    std::string id_;
    bool snapshot_ = false;
  };

  // A restore (or one instance of a burst, or a criu-remote source) reading snapshot `id`.
  [[nodiscard]] Result<Ticket> restore(const std::string& id);
  // A snapshot taking (or replacing) `id`, or a delete of it.
  [[nodiscard]] Result<Ticket> snapshot(const std::string& id);

  [[nodiscard]] std::size_t in_flight() const;
  [[nodiscard]] std::size_t max() const noexcept { return max_; }

 private:
  void release(const std::string& id, bool snapshot) noexcept;
  [[nodiscard]] Result<void> check_room_locked() const;

  const std::size_t max_;
  mutable std::mutex mutex_;
  std::size_t in_flight_ = 0;
  std::map<std::string, std::size_t> restoring_;  // id -> restores reading it
  std::set<std::string> snapshotting_;              // ids being taken
};

}  // namespace snaptier::agent_detail
