// Thin RAII layer over libibverbs shared by the pool server and the rdma tier. Everything here
// returns Result; nothing throws, nothing blocks without a deadline.
#pragma once

#include <infiniband/verbs.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "snaptier/error.hpp"
#include "snaptier/rdma.hpp"

namespace snaptier::rdma_detail {

// unique_ptr deleter calling a verbs destroy function; its int result is ignored because a
// destructor has nobody to report to (the kernel reclaims the object with the fd anyway).
template <class T, auto Destroy>
struct VerbsDeleter {
  void operator()(T* object) const noexcept {
    if (object != nullptr) (void)Destroy(object);
  }
};

using ContextPtr = std::unique_ptr<ibv_context, VerbsDeleter<ibv_context, &ibv_close_device>>;
using PdPtr = std::unique_ptr<ibv_pd, VerbsDeleter<ibv_pd, &ibv_dealloc_pd>>;
using MrPtr = std::unique_ptr<ibv_mr, VerbsDeleter<ibv_mr, &ibv_dereg_mr>>;
using CqPtr = std::unique_ptr<ibv_cq, VerbsDeleter<ibv_cq, &ibv_destroy_cq>>;
using QpPtr = std::unique_ptr<ibv_qp, VerbsDeleter<ibv_qp, &ibv_destroy_qp>>;
using ChannelPtr =
    std::unique_ptr<ibv_comp_channel, VerbsDeleter<ibv_comp_channel, &ibv_destroy_comp_channel>>;

// An opened device with one protection domain and the facts a connection needs. Members are
// declared so that the PD is destroyed before the context.
struct Device {
  ContextPtr context;
  PdPtr pd;
  std::string name;
  int port = 1;
  int gid_index = 0;
  ibv_port_attr port_attr{};
  ibv_device_attr device_attr{};
  ibv_gid gid{};
  std::uint32_t gid_type = 0;  // enum ibv_gid_type; IBV_GID_TYPE_IB when unknown
  int rd_atomic = 1;           // outstanding RDMA READs per QP, both directions

  [[nodiscard]] bool is_ethernet() const noexcept {
    return port_attr.link_layer == IBV_LINK_LAYER_ETHERNET;
  }
};

// Opens `options.device` (or the first device), queries port and GID, allocates a PD. Fails
// with unavailable if there is no device or the port is not ACTIVE, invalid_argument if the GID
// slot is empty (the message lists the populated slots).
[[nodiscard]] Result<Device> open_device(const RdmaDeviceOptions& options);

// A CQ with a completion channel so that a waiter can sleep in poll(2) with a deadline instead
// of spinning (under QEMU TCG a spinning thread steals the CPU the emulated NIC runs on).
struct CompletionQueue {
  ChannelPtr channel;  // destroyed after the CQ (reverse member order)
  CqPtr cq;
  bool armed = false;
};
[[nodiscard]] Result<CompletionQueue> create_completion_queue(const Device& device, int depth,
                                                              bool with_channel);

// Polls `queue` until at least one completion is there or `deadline` passes: spins briefly (real
// NICs answer in a few microseconds), then sleeps on the channel. Fills `out` with up to
// out.size() completions of any work requests, whatever their status, and returns how many
// (0: the deadline passed). Which request a completion belongs to is the caller's business.
[[nodiscard]] Result<std::size_t> poll_completions(CompletionQueue& queue, std::span<ibv_wc> out,
                                                   std::chrono::steady_clock::time_point deadline);

// An RC QP in RESET state whose send and receive work complete on `cq`.
[[nodiscard]] Result<QpPtr> create_rc_qp(const Device& device, ibv_cq* cq,
                                         std::uint32_t max_send_wr);
// RESET -> INIT with the given remote access rights.
[[nodiscard]] Result<void> qp_to_init(ibv_qp* qp, const Device& device, unsigned access_flags);
// INIT -> RTR towards `remote` (GRH with remote GID and our sgid_index on RoCE).
[[nodiscard]] Result<void> qp_to_rtr(ibv_qp* qp, const Device& device, const RdmaEndpoint& remote);
// RTR -> RTS with our send PSN and bounded retries.
[[nodiscard]] Result<void> qp_to_rts(ibv_qp* qp, const Device& device, std::uint32_t local_psn);
// Any state -> ERR: flushes outstanding work so that nothing lands in our buffers later.
void qp_to_error(ibv_qp* qp) noexcept;
// The QP's current state, or IBV_QPS_UNKNOWN if it cannot be queried.
[[nodiscard]] ibv_qp_state qp_state(ibv_qp* qp) noexcept;

[[nodiscard]] RdmaEndpoint local_endpoint(const Device& device, const ibv_qp* qp,
                                          std::uint32_t psn);
[[nodiscard]] std::uint32_t random_psn();

[[nodiscard]] std::string gid_to_hex(const ibv_gid& gid);
[[nodiscard]] Result<ibv_gid> gid_from_hex(std::string_view hex);
[[nodiscard]] int mtu_bytes(ibv_mtu mtu) noexcept;
[[nodiscard]] std::string_view gid_type_name(std::uint32_t gid_type) noexcept;
[[nodiscard]] std::string_view port_state_name(ibv_port_state state) noexcept;

// The queue-pair parameters both sides use; docs/rdma.md explains the choices.
inline constexpr std::uint8_t kQpTimeout = 14;   // 4.096 us * 2^14 = 67 ms per attempt
inline constexpr std::uint8_t kQpRetryCount = 7;
inline constexpr std::uint8_t kQpRnrRetry = 7;   // never matters for one-sided ops
inline constexpr std::uint8_t kQpMinRnrTimer = 12;
inline constexpr std::uint8_t kGrhHopLimit = 64;
inline constexpr int kMaxRdAtomic = 16;

}  // namespace snaptier::rdma_detail
