// Compute side of the RDMA pool: a Tier whose bytes live in a memory node's registered pool and
// move with one-sided RDMA READ/WRITE over one RC queue pair. Caller buffers are not registered,
// so data is staged through one registered bounce buffer; requests larger than it are chunked.
//
// Failure model: every completion is awaited with a deadline. A timeout or an error completion
// moves the QP to the error state (flushing anything still in flight, so no late DMA can land in
// the bounce buffer) and hands the tier to its Reconnector (reconnect.hpp): a background thread
// connects a new QP with backoff while every other read/write/allocate fails at once with
// Errc::unavailable naming the state; the request that failed, and those already admitted and
// queued behind it, wait for the first attempt and are retried once if the pool is the same.
// Device, PD, CQ and bounce buffer are kept.
//
// Concurrency: any number of threads may call every member at once. One WR is in flight at a
// time (io_mutex_ guards the QP, the bounce buffer and the CQ), so a completion is only ever
// polled by the caller that posted it, and one of another id (a request abandoned after a
// timeout) is dropped, never handed to a later caller.
#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>

#include <spdlog/spdlog.h>

#include "rdma/arguments.hpp"
#include "rdma/reconnect.hpp"
#include "rdma/verbs.hpp"
#include "snaptier/rdma.hpp"
#include "tiers/posix_util.hpp"

namespace snaptier {
namespace {

using namespace rdma_detail;

constexpr std::uint32_t kSendQueueDepth = 16;
// One reconnect attempt is a few control-plane round trips and RTR's neighbour resolution
// (about 1 s on rxe); a memory node slower than this is not waited for.
constexpr std::chrono::milliseconds kAttemptBound{5000};

Result<void> check_grant(const RdmaPoolGrant& grant);

class RdmaTier final : public Tier {
 public:
  RdmaTier(Device device, CompletionQueue cq, detail::UniqueMapping bounce, MrPtr bounce_mr,
           QpPtr qp, std::shared_ptr<RdmaPoolClient> pool, RdmaPoolGrant grant, int timeout_ms,
           RdmaReconnectOptions reconnect_options)
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
    const std::uint64_t max_msg = device_.port_attr.max_msg_sz;
    chunk_bytes_ = max_msg > 0 ? std::min<std::uint64_t>(bounce_.size(), max_msg) : bounce_.size();
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
      std::lock_guard lock(io_mutex_);
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

  // One pass over the chunks; `broke` says whether this call found the QP failing. `epoch` is the
  // pool the request was admitted for: one that changed while it queued is not written or read.
  Result<void> transfer_once(const char* op, ibv_wr_opcode opcode, Extent extent, std::uint64_t offset,
                             std::uint64_t size, std::byte* read_into, const std::byte* write_from,
                             std::uint64_t epoch, bool& broke) {
    std::lock_guard lock(io_mutex_);
    // A caller queued behind the request that failed finds the QP gone. It was admitted while
    // the tier was up, so it is treated like that request: it waits for the first attempt and
    // runs once more, instead of failing every request of a burst for one broken completion.
    if (!qp_ok_) {
      broke = true;
      if (auto refused = reconnector_->admit(op); !refused) return refused;
      return fail(Errc::unavailable, std::string(op) + ": the queue pair to the memory node failed; reconnecting");
    }
    if (epoch_.load() != epoch) {
      return fail(Errc::unavailable, std::string(op) + ": the memory node's pool changed (epoch " +
                                         std::to_string(epoch) + " -> " + std::to_string(epoch_.load()) +
                                         ") while the request waited");
    }
    std::uint64_t done = 0;
    while (done < size) {
      const std::uint64_t chunk = std::min(size - done, chunk_bytes_);
      const std::uint64_t pool_offset = extent.offset + offset + done;
      if (write_from != nullptr) std::memcpy(bounce_.data(), write_from + done, chunk);
      if (auto ok = post_and_wait(opcode, pool_offset, static_cast<std::uint32_t>(chunk)); !ok) {
        broke = !qp_ok_;
        return ok;
      }
      if (read_into != nullptr) std::memcpy(read_into + done, bounce_.data(), chunk);
      done += chunk;
    }
    return {};
  }

  // One signalled WR on the bounce buffer, then its completion. Called with io_mutex_ held, so
  // at most one WR is in flight and the bounce buffer has one user.
  Result<void> post_and_wait(ibv_wr_opcode opcode, std::uint64_t pool_offset, std::uint32_t length) {
    const std::uint64_t wr_id = ++next_wr_id_;
    ibv_sge sge{.addr = reinterpret_cast<std::uintptr_t>(bounce_.data()), .length = length,
                .lkey = bounce_mr_->lkey};
    ibv_send_wr wr{};
    wr.wr_id = wr_id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = opcode;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr.rdma.remote_addr = grant_.remote_addr + pool_offset;
    wr.wr.rdma.rkey = grant_.rkey;
    ibv_send_wr* bad = nullptr;

    const auto what = [&] {
      return std::string("rdma: RDMA ") + (opcode == IBV_WR_RDMA_READ ? "READ" : "WRITE") +
             " of " + std::to_string(length) + " bytes at pool offset " +
             std::to_string(pool_offset) + " (memory node qpn " +
             std::to_string(grant_.endpoint.qpn) + ")";
    };
    if (int rc = ibv_post_send(qp_.get(), &wr, &bad); rc != 0) {
      const int err = rc > 0 ? rc : (errno != 0 ? errno : EIO);
      auto error = fail_errno(Errc::unavailable, what() + ": ibv_post_send", err);
      mark_broken(error.value().message);
      return error;
    }
    auto wc = wait_completion(cq_, wr_id, std::chrono::steady_clock::now() + timeout_);
    if (!wc) {
      const Errc code = wc.error().code == Errc::timeout ? Errc::timeout : Errc::unavailable;
      std::string message = what() + ": " + wc.error().message;
      if (code == Errc::timeout) {
        message = what() + ": no completion within " + std::to_string(timeout_.count()) +
                  " ms (memory node unreachable?)";
      }
      mark_broken(message);
      return fail(code, message);
    }
    if (wc->status != IBV_WC_SUCCESS) {
      std::string message = what() + ": " + ibv_wc_status_str(wc->status) + " (status " +
                            std::to_string(static_cast<int>(wc->status)) + ", vendor_err " +
                            std::to_string(wc->vendor_err) + ")";
      mark_broken(message);
      return fail(Errc::unavailable, std::move(message));
    }
    return {};
  }

  // Saturating: releases of extents counted before a pool change must not wrap the count.
  void subtract_used(std::uint64_t length) {
    std::uint64_t used = used_.load(std::memory_order_relaxed);
    while (!used_.compare_exchange_weak(used, used - std::min(used, length), std::memory_order_relaxed)) {
    }
  }

  // Called with io_mutex_ held.
  void mark_broken(const std::string& reason) {
    qp_to_error(qp_.get());  // flush in-flight work; nothing may DMA into the bounce buffer later
    qp_ok_ = false;
    spdlog::warn("{}; reconnecting", reason);
    reconnector_->report_failure(reason);
  }

  // One reconnection attempt, on the Reconnector's thread: a new QP on the same device, CQ and
  // bounce buffer, and a new grant. Every step is bounded (control-plane timeouts, RTR's
  // neighbour resolution); io_mutex_ is taken only to swap the QP in.
  Result<void> reconnect() {
    auto qp = create_rc_qp(device_, cq_.cq.get(), kSendQueueDepth);
    if (!qp) return tl::unexpected(qp.error());
    if (auto ok = qp_to_init(qp->get(), device_, 0); !ok) return ok;
    const std::uint32_t psn = random_psn();
    auto grant = pool_->connect(local_endpoint(device_, qp->get(), psn));
    if (!grant) return tl::unexpected(grant.error());
    if (auto ok = check_grant(*grant); !ok) return ok;
    if (auto ok = qp_to_rtr(qp->get(), device_, grant->endpoint); !ok) return ok;
    if (auto ok = qp_to_rts(qp->get(), device_, psn); !ok) return ok;
    std::lock_guard lock(io_mutex_);
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
    capacity_.store(grant_.pool_size);
    epoch_.store(grant_.epoch);
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
  std::uint64_t chunk_bytes_ = 0;

  mutable std::mutex io_mutex_;  // guards qp_, grant_, qp_ok_, the bounce buffer, next_wr_id_
  std::uint64_t next_wr_id_ = 0;
  bool qp_ok_ = true;
  std::atomic<std::uint64_t> capacity_;
  std::atomic<std::uint64_t> epoch_;
  std::atomic<std::uint64_t> used_{0};
  std::atomic<std::uint64_t> reads_{0}, writes_{0}, bytes_read_{0}, bytes_written_{0};
  // Set once the tier reconnected to a pool of another epoch: from then on only the extents
  // allocated since (offset -> length) may be read, written or released.
  std::mutex replaced_mutex_;  // taken after io_mutex_ when both are held
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
  auto cq = create_completion_queue(*device, static_cast<int>(kSendQueueDepth) * 2,
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

  auto qp = create_rc_qp(*device, cq->cq.get(), kSendQueueDepth);
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
                                                       RdmaPoolGrant{}, options.timeout_ms, reconnect));
    tier->start_disconnected("the memory node did not answer when the tier was built: " + grant.error().what());
    return std::unique_ptr<Tier>(std::move(tier));
  }
  if (auto ok = check_grant(*grant); !ok) return tl::unexpected(ok.error());
  if (auto ok = qp_to_rtr(qp->get(), *device, grant->endpoint); !ok) return tl::unexpected(ok.error());
  if (auto ok = qp_to_rts(qp->get(), *device, psn); !ok) return tl::unexpected(ok.error());

  return std::unique_ptr<Tier>(new RdmaTier(std::move(*device), std::move(*cq), std::move(bounce),
                                            std::move(bounce_mr), std::move(*qp), std::move(pool),
                                            *grant, options.timeout_ms, reconnect));
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
