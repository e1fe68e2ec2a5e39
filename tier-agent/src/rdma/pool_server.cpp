// Memory-node side of the RDMA pool: one registered mapping (a pool file that outlives the
// agent, or anonymous memory; see pool_storage.hpp), a first-fit allocator over it whose table
// is persisted with the file, and one responder QP per connected client. The server never posts work: clients
// reach the pool with one-sided READ/WRITE, so the data path costs this host no CPU.
#include <sys/mman.h>

#include <cerrno>
#include <mutex>
#include <vector>

#include "rdma/arguments.hpp"
#include "rdma/pool_storage.hpp"
#include "rdma/verbs.hpp"
#include "snaptier/rdma.hpp"
#include "tiers/posix_util.hpp"

namespace snaptier {
namespace {

using namespace rdma_detail;

// Responder QPs are cheap but not free (kernel memory, and on real NICs ICM). A responder QP
// never learns that its client went away (it sends nothing on its own), so restarted clients
// would leak one QP each: QPs in the error state are reaped on every accept, and at the cap the
// oldest connection is evicted (its client's next operation fails with unavailable and the
// client reconnects) rather than refusing new clients forever.
constexpr std::size_t kMaxClientQps = 256;

class RdmaPoolServerImpl final : public RdmaPoolServer {
 public:
  RdmaPoolServerImpl(Device device, CompletionQueue cq, PoolStorage pool, MrPtr mr)
      : device_(std::move(device)), cq_(std::move(cq)), pool_(std::move(pool)), mr_(std::move(mr)) {}

  Result<RdmaPoolGrant> accept(const RdmaEndpoint& client) override {
    if (auto gid = gid_from_hex(client.gid); !gid) return tl::unexpected(gid.error());
    std::lock_guard lock(mutex_);
    reap_dead_qps();
    if (qps_.size() >= kMaxClientQps) qps_.erase(qps_.begin());
    auto qp = create_rc_qp(device_, cq_.cq.get(), /*max_send_wr=*/1);
    if (!qp) return tl::unexpected(qp.error());
    const std::uint32_t psn = random_psn();
    // The responder side needs the remote rights; the MR's own rights still bound what a
    // client can touch (only this pool, through its rkey).
    if (auto ok = qp_to_init(qp->get(), device_,
                             IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ |
                                 IBV_ACCESS_REMOTE_WRITE);
        !ok) {
      return tl::unexpected(ok.error());
    }
    if (auto ok = qp_to_rtr(qp->get(), device_, client); !ok) return tl::unexpected(ok.error());
    // RTS is not needed to answer READs, but a responder in RTS can also send ACK/NAKs on
    // every provider, and it keeps both ends symmetrical.
    if (auto ok = qp_to_rts(qp->get(), device_, psn); !ok) return tl::unexpected(ok.error());

    RdmaPoolGrant grant{.endpoint = local_endpoint(device_, qp->get(), psn),
                        .remote_addr = reinterpret_cast<std::uintptr_t>(pool_.data()),
                        .rkey = mr_->rkey,
                        .pool_size = pool_.size(),
                        .epoch = pool_.epoch()};
    qps_.push_back(std::move(*qp));
    return grant;
  }

  Result<Extent> allocate(std::uint64_t length) override {
    std::lock_guard lock(mutex_);
    return pool_.allocate(length);
  }

  Result<void> release(Extent extent) override {
    std::lock_guard lock(mutex_);
    return pool_.release(extent);
  }

  TierStats stats() const override {
    std::lock_guard lock(mutex_);
    // One-sided traffic never reaches this CPU: reads/writes are counted by the clients.
    return TierStats{.capacity_bytes = pool_.size(), .used_bytes = pool_.used_bytes()};
  }

  RdmaPoolState state() const override {
    std::lock_guard lock(mutex_);
    return RdmaPoolState{.epoch = pool_.epoch(), .path = pool_.path(), .origin = pool_.origin()};
  }

 private:
  void reap_dead_qps() {
    std::erase_if(qps_, [](const QpPtr& qp) {
      const ibv_qp_state state = qp_state(qp.get());
      return state == IBV_QPS_ERR;
    });
  }

  // Declaration order is destruction order reversed: QPs go before the MR they reach, the MR
  // before the mapping it pins, everything before the device.
  Device device_;
  CompletionQueue cq_;
  PoolStorage pool_;
  MrPtr mr_;
  mutable std::mutex mutex_;
  std::vector<QpPtr> qps_;
};

}  // namespace

Result<std::unique_ptr<RdmaPoolServer>> make_rdma_pool_server(const RdmaDeviceOptions& options,
                                                              const RdmaPoolOptions& pool_options) {
  if (auto ok = check_pool_arguments(pool_options); !ok) return tl::unexpected(ok.error());
  // The device first: without one, nothing may touch the pool file (a host without a NIC must
  // not reset another configuration's pool).
  auto device = open_device(options);
  if (!device) return tl::unexpected(device.error());
  auto cq = create_completion_queue(*device, /*depth=*/64, /*with_channel=*/false);
  if (!cq) return tl::unexpected(cq.error());

  auto pool = PoolStorage::open(pool_options.path, pool_options.pool_size);
  if (!pool) return tl::unexpected(pool.error());
  const std::uint64_t size = pool->size();
  // Fewer, larger pages mean fewer translation entries on a real NIC; a hint only.
  (void)::madvise(pool->data(), size, MADV_HUGEPAGE);

  errno = 0;
  MrPtr mr(ibv_reg_mr(device->pd.get(), pool->data(), size,
                      IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE));
  if (!mr) {
    const int err = errno != 0 ? errno : ENOMEM;
    return fail_errno(Errc::no_space,
                      "rdma pool: ibv_reg_mr of " + std::to_string(size) + " bytes on " +
                          device->name + (err == ENOMEM || err == EPERM
                                              ? " (pinning needs RLIMIT_MEMLOCK >= pool size, or root)"
                                              : ""),
                      err);
  }
  return std::unique_ptr<RdmaPoolServer>(
      new RdmaPoolServerImpl(std::move(*device), std::move(*cq), std::move(*pool), std::move(mr)));
}

}  // namespace snaptier
