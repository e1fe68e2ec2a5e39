// Compute side of the RDMA pool: a Tier whose bytes live in a memory node's registered pool and
// move with one-sided RDMA READ/WRITE over one RC queue pair. Caller buffers are not registered,
// so data is staged through one registered bounce buffer, cut into slots: each work request in
// flight owns one slot.
//
// Depth: a request takes the free slots it can use (at least one, at most every slot), posts one
// chunk per slot as one chained list (one doorbell) and reposts a slot as soon as its chunk
// completed and was copied out, so a large request keeps up to kMaxInFlight READs or WRITEs in
// flight. A request that holds several slots hands one back at each completion while another
// caller waits for a slot, so a demand fault behind a long prefetch waits for one completion,
// not for the prefetch. Completions come in order on an RC queue pair; whichever waiter finds
// nobody polling the CQ polls it for everyone (leader/follower), files what it finds by wr_id
// and wakes the others: a lone caller polls its own completions with no hand-off. A completion
// nobody waits for (a request abandoned after a failure) is dropped.
//
// Failure model: every completion is awaited with a deadline. A timeout or an error completion
// moves the QP to the error state (flushing anything still in flight, so no late DMA can land in
// a slot) and hands the tier to its Reconnector (reconnect.hpp): a background thread connects a
// new QP with backoff while every other read/write/allocate fails at once with Errc::unavailable
// naming the state; the requests that were in flight on the failed QP, and those already admitted
// and queued, wait for the first attempt and are retried once if the pool is the same. Device,
// PD, CQ and bounce buffer are kept.
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <spdlog/spdlog.h>

#include "rdma/arguments.hpp"
#include "rdma/reconnect.hpp"
#include "rdma/verbs.hpp"
#include "snaptier/rdma.hpp"
#include "tiers/posix_util.hpp"

namespace snaptier {
namespace {

using namespace rdma_detail;

using Clock = std::chrono::steady_clock;

// kMaxInFlight (arguments.hpp) is both the send queue's depth and the most slots a bounce
// buffer is cut into: one work request in flight per slot.
// A waiter polling the CQ comes back this often, so it sees a failure another waiter reported.
constexpr std::chrono::milliseconds kPollSlice{10};
// One reconnect attempt is a few control-plane round trips and RTR's neighbour resolution
// (about 1 s on rxe); a memory node slower than this is not waited for.
constexpr std::chrono::milliseconds kAttemptBound{5000};

Result<void> check_grant(const RdmaPoolGrant& grant);

class RdmaTier final : public Tier {
 public:
  RdmaTier(Device device, CompletionQueue cq, detail::UniqueMapping bounce, MrPtr bounce_mr,
           QpPtr qp, std::shared_ptr<RdmaPoolClient> pool, RdmaPoolGrant grant, int timeout_ms,
           std::uint32_t max_in_flight, RdmaReconnectOptions reconnect_options)
      : pool_(std::move(pool)),
        device_(std::move(device)),
        cq_(std::move(cq)),
        bounce_(std::move(bounce)),
        bounce_mr_(std::move(bounce_mr)),
        qp_(std::move(qp)),
        grant_(std::move(grant)),
        timeout_(std::chrono::milliseconds(timeout_ms)),
        capacity_(grant_.pool_size),
        epoch_(grant_.epoch) {
    grant_endpoint_qpn_.store(grant_.endpoint.qpn);
    const std::uint64_t pages = bounce_.size() / detail::kTierPage;
    slot_count_ = static_cast<std::uint32_t>(std::clamp<std::uint64_t>(pages, 1, std::min(max_in_flight, kMaxInFlight)));
    slot_bytes_ = pages / slot_count_ * detail::kTierPage;
    const std::uint64_t max_msg = device_.port_attr.max_msg_sz;
    chunk_bytes_ = max_msg > 0 ? std::min<std::uint64_t>(slot_bytes_, max_msg) : slot_bytes_;
    for (std::uint32_t slot = slot_count_; slot > 0; --slot) free_slots_.push_back(slot - 1);
    // A first attempt that comes late is not worth holding the request for.
    if (reconnect_options.initial_backoff <= kAttemptBound) {
      reconnect_wait_ = reconnect_options.initial_backoff + kAttemptBound;
    }
    reconnector_ = std::make_unique<Reconnector>(reconnect_options, [this] { return this->reconnect(); });
  }

  // A tier whose memory node did not answer when it was built: it starts reconnecting at once
  // (and, once its attempts run out, keeps probing as a down tier), so a memory node that comes
  // up after this host is used without a restart.
  void start_disconnected(std::string why) {
    {
      std::lock_guard lock(qp_mutex_);
      qp_ok_ = false;
    }
    reconnector_->report_failure(std::move(why));
  }

  std::string_view name() const noexcept override { return "rdma"; }
  TierKind kind() const noexcept override { return TierKind::rdma; }
  TierCaps caps() const noexcept override {
    return TierCaps{.byte_addressable = false, .shared = true, .remote = true, .persistent = false};
  }

  Result<Extent> allocate(std::uint64_t length) override {
    if (auto ok = reconnector_->admit("rdma: allocate"); !ok) return tl::unexpected(ok.error());
    const std::uint64_t epoch = epoch_.load();
    const std::uint64_t capacity = capacity_.load();
    if (length > capacity) {
      return fail(Errc::no_space, "rdma: allocate " + std::to_string(length) +
                                      " bytes: the pool has " + std::to_string(capacity));
    }
    auto extent = pool_->allocate(length);
    if (!extent) return extent;
    // The pool decides offsets; one outside the grant would only fail later, on the wire.
    if (!detail::check_access("rdma", *extent, 0, 0, 0, capacity) || extent->length < length) {
      (void)pool_->release(*extent);
      return fail(Errc::protocol, "rdma: the memory node returned extent {" +
                                      std::to_string(extent->offset) + ", " +
                                      std::to_string(extent->length) + "} outside its pool of " +
                                      std::to_string(capacity) + " bytes");
    }
    {
      std::lock_guard lock(replaced_mutex_);
      // The pool changed while the control plane answered: the extent may be of either pool.
      if (epoch_.load() != epoch) {
        (void)pool_->release(*extent);
        return fail(Errc::unavailable, "rdma: allocate: the memory node's pool changed meanwhile (epoch " +
                                           std::to_string(epoch) + " -> " + std::to_string(epoch_.load()) + ")");
      }
      if (pool_replaced_) since_replaced_.emplace(extent->offset, extent->length);
    }
    used_.fetch_add(extent->length, std::memory_order_relaxed);
    return extent;
  }

  Result<void> release(Extent extent) override {
    bool tracked = false;
    {
      std::lock_guard lock(replaced_mutex_);
      if (pool_replaced_) {
        // An extent of the pool that is gone: the new pool may have given that range to someone
        // else, whose extent a release would free. Nothing of ours is there to give back.
        const auto it = since_replaced_.find(extent.offset);
        if (it == since_replaced_.end() || it->second != extent.length) return {};
        tracked = true;
      }
    }
    // Allowed while reconnecting: the pool is reached over the control plane, not the QP.
    auto ok = pool_->release(extent);
    if (ok) {
      subtract_used(extent.length);
      if (tracked) {
        std::lock_guard lock(replaced_mutex_);
        since_replaced_.erase(extent.offset);
      }
    }
    return ok;
  }

  Result<void> read(Extent extent, std::uint64_t offset, std::span<std::byte> out) override {
    auto ok = transfer(IBV_WR_RDMA_READ, extent, offset, out.size(), out.data(), nullptr);
    if (ok) {
      reads_.fetch_add(1, std::memory_order_relaxed);
      bytes_read_.fetch_add(out.size(), std::memory_order_relaxed);
    }
    return ok;
  }

  Result<void> write(Extent extent, std::uint64_t offset, std::span<const std::byte> in) override {
    auto ok = transfer(IBV_WR_RDMA_WRITE, extent, offset, in.size(), nullptr, in.data());
    if (ok) {
      writes_.fetch_add(1, std::memory_order_relaxed);
      bytes_written_.fetch_add(in.size(), std::memory_order_relaxed);
    }
    return ok;
  }

  TierStats stats() const override {
    return TierStats{.capacity_bytes = capacity_.load(), .used_bytes = used_.load(),
                     .reads = reads_.load(), .writes = writes_.load(),
                     .bytes_read = bytes_read_.load(), .bytes_written = bytes_written_.load()};
  }

  TierHealth health() const override { return reconnector_->health(); }
  std::uint64_t epoch() const noexcept override { return epoch_.load(); }

 private:
  // The request that finds the QP broken waits for the first reconnect attempt and, if the
  // memory node answers with the same pool, runs once more: READ and WRITE are idempotent, and a
  // memory node whose agent restarted (every QP gone, the pool kept) costs that request one
  // completion timeout instead of an error. Requests that arrive meanwhile fail at once.
  Result<void> transfer(ibv_wr_opcode opcode, Extent extent, std::uint64_t offset,
                        std::uint64_t size, std::byte* read_into, const std::byte* write_from) {
    if (auto ok = detail::check_access("rdma", extent, offset, size, 0, capacity_.load()); !ok) {
      return ok;
    }
    const char* op = opcode == IBV_WR_RDMA_READ ? "rdma: RDMA READ" : "rdma: RDMA WRITE";
    if (auto ok = reconnector_->admit(op); !ok) return ok;
    if (auto ok = check_current(op, extent); !ok) return ok;
    const std::uint64_t epoch = epoch_.load();
    bool broke = false;
    auto first = transfer_once(op, opcode, extent, offset, size, read_into, write_from, epoch, broke);
    if (first || !broke) return first;
    if (!reconnector_->await_attempt(reconnect_wait_)) return first;
    if (epoch_.load() != epoch) {
      return fail(first.error().code, first.error().message + "; the memory node came back with a new pool (epoch " +
                                          std::to_string(epoch_.load()) + "): not retried");
    }
    bool broke_again = false;
    auto second = transfer_once(op, opcode, extent, offset, size, read_into, write_from, epoch, broke_again);
    if (!second) {
      return fail(second.error().code, second.error().message + " (after reconnecting; first: " +
                                           first.error().message + ")");
    }
    spdlog::info("{} of {} bytes served after reconnecting", op, size);
    return second;
  }

  // After the tier reconnected to a new pool, only extents allocated since are in it.
  Result<void> check_current(const char* op, Extent extent) {
    std::lock_guard lock(replaced_mutex_);
    if (!pool_replaced_) return {};
    auto it = since_replaced_.upper_bound(extent.offset);
    if (it != since_replaced_.begin()) {
      --it;
      if (extent.offset - it->first <= it->second && extent.length <= it->second - (extent.offset - it->first)) {
        return {};
      }
    }
    return fail(Errc::unavailable, std::string(op) + ": extent {" + std::to_string(extent.offset) + ", " +
                                       std::to_string(extent.length) +
                                       "} belongs to an earlier pool of the memory node (now epoch " +
                                       std::to_string(epoch_.load()) + "): its contents are lost");
  }

  // A chunk of a request on the wire: its slot and where its bytes go in the caller's buffer.
  struct Chunk {
    std::uint64_t wr_id = 0;
    std::uint32_t slot = 0;
    std::uint64_t done = 0;  // offset in the request
    std::uint32_t length = 0;
    Clock::time_point posted;
  };

  // What one request holds while it runs: its slots and the wr_ids it awaits. Destroyed on every
  // way out; it returns early with chunks on the wire only once their QP is in the error state
  // (or gone), so its slots can be reused at once.
  class Flight {
   public:
    explicit Flight(RdmaTier& tier) : tier_(tier) {}
    Flight(const Flight&) = delete;
    Flight& operator=(const Flight&) = delete;
    ~Flight() {
      {
        std::lock_guard lock(tier_.cq_mutex_);
        for (const Chunk& chunk : in_flight) {
          tier_.awaited_.erase(chunk.wr_id);
          tier_.completed_.erase(chunk.wr_id);
        }
      }
      for (const Chunk& chunk : in_flight) idle.push_back(chunk.slot);
      tier_.give_back_slots(idle);
    }
    std::vector<std::uint32_t> idle;  // slots held, not on the wire
    std::deque<Chunk> in_flight;      // in posting order, which is completion order

   private:
    RdmaTier& tier_;
  };

  std::byte* slot_data(std::uint32_t slot) noexcept { return bounce_.data() + std::uint64_t{slot} * slot_bytes_; }

  // Between 1 and `wanted` slots: waits (bounded: two completion timeouts, enough for a slot's
  // holder to time out and give it back) for the first, then takes what is free.
  Result<std::vector<std::uint32_t>> take_slots(std::uint64_t wanted) {
    const auto bound = 2 * timeout_;
    std::unique_lock lock(slot_mutex_);
    ++slot_waiters_;
    const bool got = slot_cv_.wait_for(lock, bound, [&] { return !free_slots_.empty(); });
    --slot_waiters_;
    if (!got) {
      return fail(Errc::timeout, "no bounce-buffer slot came free within " + std::to_string(bound.count()) + " ms");
    }
    std::vector<std::uint32_t> slots;
    while (!free_slots_.empty() && slots.size() < wanted) {
      slots.push_back(free_slots_.back());
      free_slots_.pop_back();
    }
    return slots;
  }

  void give_back_slots(std::vector<std::uint32_t>& slots) {
    if (slots.empty()) return;
    {
      std::lock_guard lock(slot_mutex_);
      free_slots_.insert(free_slots_.end(), slots.begin(), slots.end());
    }
    slots.clear();
    slot_cv_.notify_all();
  }

  bool someone_waits_for_a_slot() {
    std::lock_guard lock(slot_mutex_);
    return slot_waiters_ > 0;
  }

  // One pass over the chunks; `broke` says whether this call found the QP failing. `epoch` is the
  // pool the request was admitted for: one that changed while it queued is not written or read.
  Result<void> transfer_once(const char* op, ibv_wr_opcode opcode, Extent extent, std::uint64_t offset,
                             std::uint64_t size, std::byte* read_into, const std::byte* write_from,
                             std::uint64_t epoch, bool& broke) {
    const std::uint64_t chunks = (size + chunk_bytes_ - 1) / chunk_bytes_;
    auto slots = take_slots(std::max<std::uint64_t>(chunks, 1));
    if (!slots) return fail(slots.error().code, std::string(op) + ": " + slots.error().message);
    Flight flight(*this);
    flight.idle = std::move(*slots);
    std::uint64_t generation = 0;  // the QP this request's chunks go to; 0 until the first post
    std::uint64_t posted = 0;
    for (;;) {
      std::array<Chunk, kMaxInFlight> batch;
      std::size_t count = 0;
      while (posted < size && !flight.idle.empty()) {
        Chunk& chunk = batch[count++];
        chunk.slot = flight.idle.back();
        flight.idle.pop_back();
        chunk.done = posted;
        chunk.length = static_cast<std::uint32_t>(std::min(size - posted, chunk_bytes_));
        if (write_from != nullptr) std::memcpy(slot_data(chunk.slot), write_from + posted, chunk.length);
        posted += chunk.length;
      }
      if (count > 0) {
        auto sent = post(op, opcode, extent.offset + offset, std::span(batch.data(), count), epoch, generation, broke);
        // Posted or not, the chunks are the flight's: a failed post broke the QP (nothing lands later).
        flight.in_flight.insert(flight.in_flight.end(), batch.begin(), batch.begin() + static_cast<long>(count));
        if (!sent) return sent;
      }
      if (flight.in_flight.empty()) return {};
      const Chunk front = flight.in_flight.front();
      if (auto done = await_chunk(op, opcode, extent.offset + offset, front, generation, broke); !done) return done;
      if (read_into != nullptr) std::memcpy(read_into + front.done, slot_data(front.slot), front.length);
      flight.in_flight.pop_front();
      flight.idle.push_back(front.slot);
      // Share the slots with a caller that waits for one, keeping one to go on with.
      if (flight.idle.size() + flight.in_flight.size() > 1 && someone_waits_for_a_slot()) {
        std::vector<std::uint32_t> spare{flight.idle.back()};
        flight.idle.pop_back();
        give_back_slots(spare);
      }
    }
  }

  std::string describe(ibv_wr_opcode opcode, std::uint64_t pool_offset, std::uint64_t length) const {
    return std::string("rdma: RDMA ") + (opcode == IBV_WR_RDMA_READ ? "READ" : "WRITE") + " of " +
           std::to_string(length) + " bytes at pool offset " + std::to_string(pool_offset) +
           " (memory node qpn " + std::to_string(grant_endpoint_qpn_.load()) + ")";
  }

  // Posts `batch` as one chained list of signalled WRs on the QP of `generation` (the current one
  // on a request's first post). Every chunk is awaited before it is posted, so a poller files its
  // completion however fast it comes.
  Result<void> post(const char* op, ibv_wr_opcode opcode, std::uint64_t request_offset, std::span<Chunk> batch,
                    std::uint64_t epoch, std::uint64_t& generation, bool& broke) {
    std::lock_guard lock(qp_mutex_);
    // A caller queued behind the request that failed finds the QP gone. It was admitted while
    // the tier was up, so it is treated like that request: it waits for the first attempt and
    // runs once more, instead of failing every request of a burst for one broken completion.
    if (!qp_ok_ || (generation != 0 && generation != generation_)) {
      broke = true;
      if (auto refused = reconnector_->admit(op); !refused) return refused;
      return fail(Errc::unavailable, std::string(op) + ": the queue pair to the memory node failed; reconnecting");
    }
    if (epoch_.load() != epoch) {
      return fail(Errc::unavailable, std::string(op) + ": the memory node's pool changed (epoch " +
                                         std::to_string(epoch) + " -> " + std::to_string(epoch_.load()) +
                                         ") while the request waited");
    }
    generation = generation_;
    std::array<ibv_sge, kMaxInFlight> sges{};
    std::array<ibv_send_wr, kMaxInFlight> wrs{};
    for (std::size_t i = 0; i < batch.size(); ++i) {
      Chunk& chunk = batch[i];
      chunk.wr_id = ++next_wr_id_;
      sges[i] = ibv_sge{.addr = reinterpret_cast<std::uintptr_t>(slot_data(chunk.slot)), .length = chunk.length,
                        .lkey = bounce_mr_->lkey};
      ibv_send_wr& wr = wrs[i];
      wr.wr_id = chunk.wr_id;
      wr.sg_list = &sges[i];
      wr.num_sge = 1;
      wr.opcode = opcode;
      wr.send_flags = IBV_SEND_SIGNALED;
      wr.wr.rdma.remote_addr = grant_.remote_addr + request_offset + chunk.done;
      wr.wr.rdma.rkey = grant_.rkey;
      wr.next = i + 1 < batch.size() ? &wrs[i + 1] : nullptr;
    }
    {
      std::lock_guard cq_lock(cq_mutex_);
      for (const Chunk& chunk : batch) awaited_.insert(chunk.wr_id);
    }
    const auto now = Clock::now();
    for (Chunk& chunk : batch) chunk.posted = now;
    ibv_send_wr* bad = nullptr;
    if (int rc = ibv_post_send(qp_.get(), wrs.data(), &bad); rc != 0) {
      const int err = rc > 0 ? rc : (errno != 0 ? errno : EIO);
      auto error = fail_errno(Errc::unavailable,
                              describe(opcode, request_offset + batch.front().done, batch.front().length) +
                                  " (one of " + std::to_string(batch.size()) + " posted together): ibv_post_send",
                              err);
      // Some WRs of the list may be on the wire: the error state flushes them.
      mark_broken_locked(error.value().message);
      broke = true;
      return error;
    }
    return {};
  }

  // Waits for `chunk`'s completion, polling the CQ for every waiter while nobody else does.
  Result<void> await_chunk(const char* op, ibv_wr_opcode opcode, std::uint64_t request_offset, const Chunk& chunk,
                           std::uint64_t generation, bool& broke) {
    const auto deadline = chunk.posted + timeout_;
    const auto what = [&] { return describe(opcode, request_offset + chunk.done, chunk.length); };
    std::unique_lock lock(cq_mutex_);
    for (;;) {
      if (auto it = completed_.find(chunk.wr_id); it != completed_.end()) {
        const ibv_wc wc = it->second;
        completed_.erase(it);
        awaited_.erase(chunk.wr_id);
        lock.unlock();
        if (wc.status == IBV_WC_SUCCESS) return {};
        std::string message = what() + ": " + ibv_wc_status_str(wc.status) + " (status " +
                              std::to_string(static_cast<int>(wc.status)) + ", vendor_err " +
                              std::to_string(wc.vendor_err) + ")";
        mark_broken(generation, message);
        broke = true;
        return fail(Errc::unavailable, std::move(message));
      }
      if (failed_generation_ >= generation) {
        broke = true;
        return fail(Errc::unavailable, std::string(op) + ": the queue pair failed while " +
                                           std::to_string(chunk.length) + " bytes were in flight (" +
                                           failure_reason_ + ")");
      }
      const auto now = Clock::now();
      if (now >= deadline) {
        lock.unlock();
        std::string message = what() + ": no completion within " + std::to_string(timeout_.count()) +
                              " ms (memory node unreachable?)";
        mark_broken(generation, message);
        broke = true;
        return fail(Errc::timeout, std::move(message));
      }
      if (polling_) {
        cq_cv_.wait_until(lock, deadline);
        continue;
      }
      polling_ = true;
      lock.unlock();
      std::array<ibv_wc, kMaxInFlight> wcs{};
      auto got = poll_completions(cq_, wcs, std::min(deadline, now + kPollSlice));
      lock.lock();
      polling_ = false;
      if (got) {
        for (std::size_t i = 0; i < *got; ++i) {
          if (awaited_.contains(wcs[i].wr_id)) completed_.emplace(wcs[i].wr_id, wcs[i]);
        }
      }
      cq_cv_.notify_all();
      if (!got) {
        lock.unlock();
        std::string message = what() + ": " + got.error().message;
        mark_broken(generation, message);
        broke = true;
        return fail(Errc::unavailable, std::move(message));
      }
    }
  }

  // Saturating: releases of extents counted before a pool change must not wrap the count.
  void subtract_used(std::uint64_t length) {
    std::uint64_t used = used_.load(std::memory_order_relaxed);
    while (!used_.compare_exchange_weak(used, used - std::min(used, length), std::memory_order_relaxed)) {
    }
  }

  // Breaks the QP of `generation` unless it is already broken or replaced.
  void mark_broken(std::uint64_t generation, const std::string& reason) {
    std::lock_guard lock(qp_mutex_);
    if (generation != generation_ || !qp_ok_) return;
    mark_broken_locked(reason);
  }

  // Called with qp_mutex_ held.
  void mark_broken_locked(const std::string& reason) {
    qp_to_error(qp_.get());  // flush in-flight work; nothing may DMA into the bounce buffer later
    qp_ok_ = false;
    {
      std::lock_guard cq_lock(cq_mutex_);
      failed_generation_ = generation_;
      failure_reason_ = reason;
    }
    cq_cv_.notify_all();
    spdlog::warn("{}; reconnecting", reason);
    reconnector_->report_failure(reason);
  }

  // One reconnection attempt, on the Reconnector's thread: a new QP on the same device, CQ and
  // bounce buffer, and a new grant. Every step is bounded (control-plane timeouts, RTR's
  // neighbour resolution); qp_mutex_ is taken only to swap the QP in.
  Result<void> reconnect() {
    auto qp = create_rc_qp(device_, cq_.cq.get(), kMaxInFlight);
    if (!qp) return tl::unexpected(qp.error());
    if (auto ok = qp_to_init(qp->get(), device_, 0); !ok) return ok;
    const std::uint32_t psn = random_psn();
    auto grant = pool_->connect(local_endpoint(device_, qp->get(), psn));
    if (!grant) return tl::unexpected(grant.error());
    if (auto ok = check_grant(*grant); !ok) return ok;
    if (auto ok = qp_to_rtr(qp->get(), device_, grant->endpoint); !ok) return ok;
    if (auto ok = qp_to_rts(qp->get(), device_, psn); !ok) return ok;
    std::lock_guard lock(qp_mutex_);
    const std::uint64_t old_epoch = epoch_.load();
    // Epoch 0: the tier never reached a pool (it started disconnected): nothing to lose.
    if (old_epoch != 0 && grant->epoch != old_epoch) {
      // A new pool: nothing this tier allocated exists there any more.
      spdlog::warn("rdma: the memory node's pool changed (epoch {} -> {}): its earlier contents are lost",
                   old_epoch, grant->epoch);
      std::lock_guard replaced(replaced_mutex_);
      pool_replaced_ = true;
      since_replaced_.clear();
      used_.store(0);
      epoch_.store(grant->epoch);
    }
    qp_ = std::move(*qp);  // the old QP (in the error state) is destroyed here
    grant_ = *grant;
    grant_endpoint_qpn_.store(grant_.endpoint.qpn);
    capacity_.store(grant_.pool_size);
    epoch_.store(grant_.epoch);
    ++generation_;
    qp_ok_ = true;
    spdlog::info("rdma: reconnected to the memory node (qpn {}, pool epoch {})", grant_.endpoint.qpn, grant_.epoch);
    return {};
  }

  std::shared_ptr<RdmaPoolClient> pool_;
  // Declaration order is destruction order reversed: the QP goes first (no more DMA), then the
  // bounce MR, the mapping it pins, the CQ, and last the PD and device context.
  Device device_;
  CompletionQueue cq_;
  detail::UniqueMapping bounce_;
  MrPtr bounce_mr_;
  QpPtr qp_;
  RdmaPoolGrant grant_;
  std::chrono::milliseconds timeout_;
  // How long the failing request waits for the first reconnect attempt: the attempt's start
  // (initial backoff) plus a bound on its connection setup (control plane, RTR).
  std::chrono::milliseconds reconnect_wait_{0};
  std::uint32_t slot_count_ = 1;
  std::uint64_t slot_bytes_ = 0;
  std::uint64_t chunk_bytes_ = 0;  // one WR: a slot, or less where the port's messages are smaller

  // Lock order: qp_mutex_, then cq_mutex_; slot_mutex_ is never held with another.
  std::mutex qp_mutex_;  // guards qp_, grant_, qp_ok_, generation_, next_wr_id_
  std::uint64_t next_wr_id_ = 0;
  std::uint64_t generation_ = 1;  // the QP's number: one more at each reconnect
  bool qp_ok_ = true;
  std::atomic<std::uint32_t> grant_endpoint_qpn_{0};  // for messages, read without qp_mutex_

  std::mutex slot_mutex_;
  std::condition_variable slot_cv_;
  std::vector<std::uint32_t> free_slots_;
  int slot_waiters_ = 0;

  std::mutex cq_mutex_;  // guards everything below up to the counters, and cq_'s polling
  std::condition_variable cq_cv_;
  bool polling_ = false;                            // a waiter polls the CQ for everyone
  std::unordered_set<std::uint64_t> awaited_;       // wr_ids some request waits for
  std::unordered_map<std::uint64_t, ibv_wc> completed_;
  std::uint64_t failed_generation_ = 0;             // QPs up to this one are in the error state
  std::string failure_reason_;
  std::atomic<std::uint64_t> capacity_;
  std::atomic<std::uint64_t> epoch_;
  std::atomic<std::uint64_t> used_{0};
  std::atomic<std::uint64_t> reads_{0}, writes_{0}, bytes_read_{0}, bytes_written_{0};
  // Set once the tier reconnected to a pool of another epoch: from then on only the extents
  // allocated since (offset -> length) may be read, written or released.
  std::mutex replaced_mutex_;  // taken after qp_mutex_ when both are held
  bool pool_replaced_ = false;
  std::map<std::uint64_t, std::uint64_t> since_replaced_;
  // Last: destroyed first, so that its thread never runs reconnect() on a dying tier.
  std::unique_ptr<Reconnector> reconnector_;
};

// What a grant must satisfy before a QP is connected to it.
Result<void> check_grant(const RdmaPoolGrant& grant) {
  if (grant.pool_size == 0) {
    return fail(Errc::protocol, "rdma tier: the memory node granted an empty pool");
  }
  if (grant.remote_addr + grant.pool_size < grant.remote_addr) {
    return fail(Errc::protocol, "rdma tier: the granted pool wraps the address space");
  }
  return {};
}

}  // namespace

Result<std::unique_ptr<Tier>> make_rdma_tier(const RdmaDeviceOptions& options,
                                             std::shared_ptr<RdmaPoolClient> pool,
                                             RdmaReconnectOptions reconnect) {
  if (auto ok = check_tier_arguments(options, pool.get(), reconnect); !ok) return tl::unexpected(ok.error());
  const std::uint64_t bounce_size = detail::round_up(options.bounce_bytes, detail::kTierPage);

  auto device = open_device(options);
  if (!device) return tl::unexpected(device.error());
  auto cq = create_completion_queue(*device, static_cast<int>(kMaxInFlight) * 2,
                                    /*with_channel=*/true);
  if (!cq) return tl::unexpected(cq.error());

  void* data = ::mmap(nullptr, bounce_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
  if (data == MAP_FAILED) return fail_errno(Errc::no_space, "rdma tier: mmap bounce buffer", errno);
  detail::UniqueMapping bounce(data, bounce_size);
  errno = 0;
  MrPtr bounce_mr(ibv_reg_mr(device->pd.get(), data, bounce_size, IBV_ACCESS_LOCAL_WRITE));
  if (!bounce_mr) {
    return fail_errno(Errc::io, "rdma tier: ibv_reg_mr(bounce buffer, " +
                                    std::to_string(bounce_size) + " bytes)",
                      errno != 0 ? errno : ENOMEM);
  }

  auto qp = create_rc_qp(*device, cq->cq.get(), kMaxInFlight);
  if (!qp) return tl::unexpected(qp.error());
  // The initiator grants no remote rights: nobody may READ/WRITE into this host.
  if (auto ok = qp_to_init(qp->get(), *device, 0); !ok) return tl::unexpected(ok.error());
  const std::uint32_t psn = random_psn();

  auto grant = pool->connect(local_endpoint(*device, qp->get(), psn));
  if (!grant) {
    const Errc code = grant.error().code;
    // A memory node that is not up yet (or not reachable yet) is a passing fault: the tier is
    // built down and reconnects by itself. Anything else (bad token, bad config) is an error.
    if (code != Errc::unavailable && code != Errc::timeout && code != Errc::io) return tl::unexpected(grant.error());
    spdlog::warn("rdma: the memory node did not answer ({}); the tier starts down and keeps trying",
                 grant.error().what());
    auto tier = std::unique_ptr<RdmaTier>(new RdmaTier(std::move(*device), std::move(*cq), std::move(bounce),
                                                       std::move(bounce_mr), std::move(*qp), std::move(pool),
                                                       RdmaPoolGrant{}, options.timeout_ms, options.max_in_flight,
                                                       reconnect));
    tier->start_disconnected("the memory node did not answer when the tier was built: " + grant.error().what());
    return std::unique_ptr<Tier>(std::move(tier));
  }
  if (auto ok = check_grant(*grant); !ok) return tl::unexpected(ok.error());
  if (auto ok = qp_to_rtr(qp->get(), *device, grant->endpoint); !ok) return tl::unexpected(ok.error());
  if (auto ok = qp_to_rts(qp->get(), *device, psn); !ok) return tl::unexpected(ok.error());

  return std::unique_ptr<Tier>(new RdmaTier(std::move(*device), std::move(*cq), std::move(bounce),
                                            std::move(bounce_mr), std::move(*qp), std::move(pool),
                                            *grant, options.timeout_ms, options.max_in_flight, reconnect));
}

bool rdma_support_built() noexcept { return true; }

bool rdma_devices_present() {
  int count = 0;
  ibv_device** list = ibv_get_device_list(&count);
  if (list == nullptr) return false;
  ibv_free_device_list(list);
  return count > 0;
}

Result<RdmaDeviceInfo> query_rdma_device(const RdmaDeviceOptions& options) {
  auto device = open_device(options);
  if (!device) return tl::unexpected(device.error());
  return RdmaDeviceInfo{
      .name = device->name,
      .port = device->port,
      .gid_index = device->gid_index,
      .gid = gid_to_hex(device->gid),
      .gid_type = std::string(gid_type_name(device->gid_type)),
      .link_layer = device->is_ethernet() ? "Ethernet" : "InfiniBand",
      .port_state = std::string(port_state_name(device->port_attr.state)),
      .active_mtu_bytes = mtu_bytes(device->port_attr.active_mtu),
      .max_msg_bytes = device->port_attr.max_msg_sz,
  };
}

}  // namespace snaptier
