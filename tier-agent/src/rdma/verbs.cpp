#include "rdma/verbs.hpp"

#include <fcntl.h>
#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>

#include "rdma/arguments.hpp"

namespace snaptier::rdma_detail {
namespace {

using DeviceList = std::unique_ptr<ibv_device*, decltype([](ibv_device** list) noexcept {
                                     if (list != nullptr) ibv_free_device_list(list);
                                   })>;

// Verbs calls report failure either as -1 with errno (older style) or as a positive errno
// value (ibv_modify_qp, ibv_post_send, ibv_query_*); this turns either into an errno.
int verbs_errno(int rc) noexcept {
  if (rc > 0) return rc;
  return errno != 0 ? errno : EIO;
}

bool gid_is_zero(const ibv_gid& gid) noexcept {
  return std::all_of(std::begin(gid.raw), std::end(gid.raw), [](std::uint8_t b) { return b == 0; });
}

constexpr std::uint32_t kGidTypeUnknown = 0xffffffffu;

}  // namespace

std::string gid_to_hex(const ibv_gid& gid) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(32);
  for (std::uint8_t byte : gid.raw) {
    hex.push_back(kDigits[byte >> 4]);
    hex.push_back(kDigits[byte & 0xf]);
  }
  return hex;
}

Result<ibv_gid> gid_from_hex(std::string_view hex) {
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  ibv_gid gid{};
  if (hex.size() != 32) {
    return fail(Errc::invalid_argument,
                "gid \"" + std::string(hex) + "\": expected 32 hexadecimal digits");
  }
  for (std::size_t i = 0; i < 16; ++i) {
    const int high = nibble(hex[2 * i]);
    const int low = nibble(hex[2 * i + 1]);
    if (high < 0 || low < 0) {
      return fail(Errc::invalid_argument,
                  "gid \"" + std::string(hex) + "\": expected 32 hexadecimal digits");
    }
    gid.raw[i] = static_cast<std::uint8_t>((high << 4) | low);
  }
  return gid;
}

int mtu_bytes(ibv_mtu mtu) noexcept {
  switch (mtu) {
    case IBV_MTU_256: return 256;
    case IBV_MTU_512: return 512;
    case IBV_MTU_1024: return 1024;
    case IBV_MTU_2048: return 2048;
    case IBV_MTU_4096: return 4096;
  }
  return 0;
}

std::string_view gid_type_name(std::uint32_t gid_type) noexcept {
  switch (gid_type) {
    case IBV_GID_TYPE_IB: return "IB";
    case IBV_GID_TYPE_ROCE_V1: return "RoCEv1";
    case IBV_GID_TYPE_ROCE_V2: return "RoCEv2";
    default: return "unknown";
  }
}

std::string_view port_state_name(ibv_port_state state) noexcept {
  switch (state) {
    case IBV_PORT_NOP: return "NOP";
    case IBV_PORT_DOWN: return "DOWN";
    case IBV_PORT_INIT: return "INIT";
    case IBV_PORT_ARMED: return "ARMED";
    case IBV_PORT_ACTIVE: return "ACTIVE";
    case IBV_PORT_ACTIVE_DEFER: return "ACTIVE_DEFER";
  }
  return "unknown";
}

Result<Device> open_device(const RdmaDeviceOptions& options) {
  if (auto ok = check_device_arguments(options); !ok) return tl::unexpected(ok.error());

  int count = 0;
  errno = 0;
  DeviceList list(ibv_get_device_list(&count));
  if (!list) {
    return fail_errno(Errc::unavailable, "rdma: ibv_get_device_list", errno != 0 ? errno : ENODEV);
  }
  if (count <= 0) {
    return fail(Errc::unavailable,
                "rdma: no RDMA device (for Soft-RoCE: modprobe rdma_rxe; rdma link add rxe0 type "
                "rxe netdev eth0)");
  }
  ibv_device* chosen = nullptr;
  std::string names;
  for (int i = 0; i < count; ++i) {
    const char* name = ibv_get_device_name(list.get()[i]);
    const std::string_view view = name != nullptr ? name : "";
    if (!names.empty()) names += ", ";
    names += view;
    if (chosen == nullptr && (options.device.empty() || view == options.device)) {
      chosen = list.get()[i];
    }
  }
  if (chosen == nullptr) {
    return fail(Errc::not_found,
                "rdma: device \"" + options.device + "\" not found (devices: " + names + ")");
  }

  Device device;
  device.name = ibv_get_device_name(chosen);
  device.port = options.port;
  device.gid_index = options.gid_index;
  errno = 0;
  device.context.reset(ibv_open_device(chosen));
  if (!device.context) {
    return fail_errno(Errc::unavailable, "rdma: ibv_open_device(" + device.name + ")",
                      errno != 0 ? errno : ENODEV);
  }
  list.reset();  // the opened context does not depend on the list

  ibv_context* context = device.context.get();
  if (int rc = ibv_query_device(context, &device.device_attr); rc != 0) {
    return fail_errno(Errc::io, "rdma: ibv_query_device(" + device.name + ")", verbs_errno(rc));
  }
  if (options.port > device.device_attr.phys_port_cnt) {
    return fail(Errc::invalid_argument,
                "rdma: " + device.name + " has " +
                    std::to_string(device.device_attr.phys_port_cnt) + " port(s), not port " +
                    std::to_string(options.port));
  }
  const auto port = static_cast<std::uint8_t>(options.port);
  if (int rc = ibv_query_port(context, port, &device.port_attr); rc != 0) {
    return fail_errno(Errc::io, "rdma: ibv_query_port(" + device.name + ")", verbs_errno(rc));
  }
  if (device.port_attr.state != IBV_PORT_ACTIVE) {
    return fail(Errc::unavailable,
                "rdma: port " + std::to_string(options.port) + " of " + device.name + " is " +
                    std::string(port_state_name(device.port_attr.state)) +
                    ", not ACTIVE (for rxe: is its netdev up?)");
  }
  if (options.gid_index >= device.port_attr.gid_tbl_len) {
    return fail(Errc::invalid_argument,
                "rdma: gid_index " + std::to_string(options.gid_index) + " is beyond the GID table (" +
                    std::to_string(device.port_attr.gid_tbl_len) + " entries) of " + device.name);
  }
  if (int rc = ibv_query_gid(context, port, options.gid_index, &device.gid); rc != 0) {
    return fail_errno(Errc::io, "rdma: ibv_query_gid(" + device.name + ", " +
                                    std::to_string(options.gid_index) + ")",
                      verbs_errno(rc));
  }
  if (gid_is_zero(device.gid)) {
    // A RoCE GID slot is empty until the netdev has an address of that family; say which slots
    // are populated so that gid_index can be fixed from the message alone.
    std::string populated;
    const int scan = std::min(device.port_attr.gid_tbl_len, 16);
    for (int i = 0; i < scan; ++i) {
      ibv_gid other{};
      if (ibv_query_gid(context, port, i, &other) == 0 && !gid_is_zero(other)) {
        if (!populated.empty()) populated += ", ";
        populated += std::to_string(i);
      }
    }
    return fail(Errc::invalid_argument,
                "rdma: GID " + std::to_string(options.gid_index) + " of " + device.name +
                    " port " + std::to_string(options.port) + " is empty (populated: " +
                    (populated.empty() ? std::string("none") : populated) +
                    "; RoCEv2 over IPv4 needs an IPv4 address on the netdev)");
  }
  device.gid_type = kGidTypeUnknown;
  ibv_gid_entry entry{};
  if (ibv_query_gid_ex(context, port, static_cast<std::uint32_t>(options.gid_index), &entry, 0) ==
      0) {
    device.gid_type = entry.gid_type;
  } else if (!device.is_ethernet()) {
    device.gid_type = IBV_GID_TYPE_IB;
  }
  device.rd_atomic = std::clamp(
      std::min(device.device_attr.max_qp_rd_atom, device.device_attr.max_qp_init_rd_atom), 1,
      kMaxRdAtomic);

  errno = 0;
  device.pd.reset(ibv_alloc_pd(context));
  if (!device.pd) {
    return fail_errno(Errc::io, "rdma: ibv_alloc_pd(" + device.name + ")",
                      errno != 0 ? errno : ENOMEM);
  }
  return device;
}

Result<CompletionQueue> create_completion_queue(const Device& device, int depth,
                                                bool with_channel) {
  CompletionQueue queue;
  if (with_channel) {
    errno = 0;
    queue.channel.reset(ibv_create_comp_channel(device.context.get()));
    if (!queue.channel) {
      return fail_errno(Errc::io, "rdma: ibv_create_comp_channel", errno != 0 ? errno : ENOMEM);
    }
    // Non-blocking so that a spurious wake-up can never park us in ibv_get_cq_event.
    const int flags = ::fcntl(queue.channel->fd, F_GETFL);
    if (flags < 0 || ::fcntl(queue.channel->fd, F_SETFL, flags | O_NONBLOCK) < 0) {
      return fail_errno(Errc::io, "rdma: fcntl(completion channel, O_NONBLOCK)", errno);
    }
  }
  errno = 0;
  queue.cq.reset(ibv_create_cq(device.context.get(), depth, nullptr, queue.channel.get(), 0));
  if (!queue.cq) {
    return fail_errno(Errc::io, "rdma: ibv_create_cq(" + std::to_string(depth) + ")",
                      errno != 0 ? errno : ENOMEM);
  }
  return queue;
}

Result<std::size_t> poll_completions(CompletionQueue& queue, std::span<ibv_wc> out,
                                     std::chrono::steady_clock::time_point deadline) {
  using Clock = std::chrono::steady_clock;
  if (out.empty()) return std::size_t{0};
  // Long enough to catch a hardware completion without a syscall, short enough not to matter
  // when the peer is emulated (hundreds of microseconds per round trip).
  const auto spin_until = std::min(deadline, Clock::now() + std::chrono::microseconds(50));
  for (;;) {
    const int polled = ibv_poll_cq(queue.cq.get(), static_cast<int>(out.size()), out.data());
    if (polled < 0) return fail(Errc::io, "rdma: ibv_poll_cq failed (" + std::to_string(polled) + ")");
    if (polled > 0) return static_cast<std::size_t>(polled);
    const auto now = Clock::now();
    if (now >= deadline) return std::size_t{0};
    if (now < spin_until || !queue.channel) continue;
    if (!queue.armed) {
      // Arm, then poll once more: a completion that arrived before arming raises no event.
      if (int rc = ibv_req_notify_cq(queue.cq.get(), 0); rc != 0) {
        return fail_errno(Errc::io, "rdma: ibv_req_notify_cq", verbs_errno(rc));
      }
      queue.armed = true;
      continue;
    }
    const auto remaining =
        std::chrono::ceil<std::chrono::milliseconds>(deadline - now).count();
    pollfd pfd{.fd = queue.channel->fd, .events = POLLIN, .revents = 0};
    const int ready = ::poll(&pfd, 1, static_cast<int>(std::clamp<long long>(remaining, 1, 60'000)));
    if (ready < 0) {
      if (errno == EINTR) continue;
      return fail_errno(Errc::io, "rdma: poll(completion channel)", errno);
    }
    if (ready == 0) continue;  // the loop head sees the deadline
    ibv_cq* event_cq = nullptr;
    void* event_context = nullptr;
    if (ibv_get_cq_event(queue.channel.get(), &event_cq, &event_context) == 0) {
      // Acknowledge at once: ibv_destroy_cq waits for every event to be acknowledged.
      ibv_ack_cq_events(event_cq, 1);
      queue.armed = false;
    } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      return fail_errno(Errc::io, "rdma: ibv_get_cq_event", errno);
    }
  }
}

Result<QpPtr> create_rc_qp(const Device& device, ibv_cq* cq, std::uint32_t max_send_wr) {
  ibv_qp_init_attr attr{};
  attr.send_cq = cq;
  attr.recv_cq = cq;
  attr.qp_type = IBV_QPT_RC;
  attr.sq_sig_all = 0;  // every WR we post asks for its completion explicitly
  attr.cap.max_send_wr = max_send_wr;
  attr.cap.max_recv_wr = 1;  // one-sided traffic consumes no receives; 0 upsets some providers
  attr.cap.max_send_sge = 1;
  attr.cap.max_recv_sge = 1;
  attr.cap.max_inline_data = 0;
  errno = 0;
  QpPtr qp(ibv_create_qp(device.pd.get(), &attr));
  if (!qp) {
    return fail_errno(Errc::io, "rdma: ibv_create_qp(RC) on " + device.name,
                      errno != 0 ? errno : ENOMEM);
  }
  return qp;
}

Result<void> qp_to_init(ibv_qp* qp, const Device& device, unsigned access_flags) {
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_INIT;
  attr.pkey_index = 0;
  attr.port_num = static_cast<std::uint8_t>(device.port);
  attr.qp_access_flags = access_flags;
  const int mask = IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
  if (int rc = ibv_modify_qp(qp, &attr, mask); rc != 0) {
    return fail_errno(Errc::io, "rdma: modify QP " + std::to_string(qp->qp_num) + " to INIT",
                      verbs_errno(rc));
  }
  return {};
}

Result<void> qp_to_rtr(ibv_qp* qp, const Device& device, const RdmaEndpoint& remote) {
  auto remote_gid = gid_from_hex(remote.gid);
  if (!remote_gid) return tl::unexpected(remote_gid.error());
  if (remote.qpn > 0xffffff || remote.psn > 0xffffff) {
    return fail(Errc::invalid_argument, "rdma: remote qpn/psn exceed 24 bits");
  }
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_RTR;
  // Both sides derive the path MTU from their own port; on one L2 segment (and on rxe, whose
  // active_mtu follows the netdev MTU) they agree.
  attr.path_mtu = device.port_attr.active_mtu;
  attr.dest_qp_num = remote.qpn;
  attr.rq_psn = remote.psn;
  attr.max_dest_rd_atomic = static_cast<std::uint8_t>(device.rd_atomic);
  attr.min_rnr_timer = kQpMinRnrTimer;
  attr.ah_attr.dlid = remote.lid;
  attr.ah_attr.sl = 0;
  attr.ah_attr.src_path_bits = 0;
  attr.ah_attr.port_num = static_cast<std::uint8_t>(device.port);
  // RoCE has no LIDs: every packet carries a GRH addressed by GID. On InfiniBand a GRH is only
  // needed across subnets, i.e. when the peer gave us a GID at all.
  attr.ah_attr.is_global = (device.is_ethernet() || !gid_is_zero(*remote_gid)) ? 1 : 0;
  if (attr.ah_attr.is_global != 0) {
    attr.ah_attr.grh.dgid = *remote_gid;
    attr.ah_attr.grh.sgid_index = static_cast<std::uint8_t>(device.gid_index);
    attr.ah_attr.grh.hop_limit = kGrhHopLimit;
    attr.ah_attr.grh.traffic_class = 0;
    attr.ah_attr.grh.flow_label = 0;
  }
  const int mask = IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                   IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
  if (int rc = ibv_modify_qp(qp, &attr, mask); rc != 0) {
    // On RoCE the kernel resolves the peer's MAC from its GID here (ARP/ND): an unreachable
    // peer shows up as one of these after the neighbour timeout (~1 s), and is a peer problem.
    const int err = verbs_errno(rc);
    const bool unreachable =
        err == ETIMEDOUT || err == EHOSTUNREACH || err == ENETUNREACH || err == EADDRNOTAVAIL;
    return fail_errno(unreachable ? Errc::unavailable : Errc::io,
                      "rdma: modify QP " + std::to_string(qp->qp_num) + " to RTR (remote qpn " +
                          std::to_string(remote.qpn) + ", gid " + remote.gid +
                          (unreachable ? "; peer unreachable" : "") + ")",
                      err);
  }
  return {};
}

Result<void> qp_to_rts(ibv_qp* qp, const Device& device, std::uint32_t local_psn) {
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_RTS;
  attr.timeout = kQpTimeout;
  attr.retry_cnt = kQpRetryCount;
  attr.rnr_retry = kQpRnrRetry;
  attr.sq_psn = local_psn & 0xffffff;
  attr.max_rd_atomic = static_cast<std::uint8_t>(device.rd_atomic);
  const int mask = IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                   IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC;
  if (int rc = ibv_modify_qp(qp, &attr, mask); rc != 0) {
    return fail_errno(Errc::io, "rdma: modify QP " + std::to_string(qp->qp_num) + " to RTS",
                      verbs_errno(rc));
  }
  return {};
}

void qp_to_error(ibv_qp* qp) noexcept {
  if (qp == nullptr) return;
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_ERR;
  (void)ibv_modify_qp(qp, &attr, IBV_QP_STATE);
}

ibv_qp_state qp_state(ibv_qp* qp) noexcept {
  ibv_qp_attr attr{};
  ibv_qp_init_attr init{};
  if (qp == nullptr || ibv_query_qp(qp, &attr, IBV_QP_STATE, &init) != 0) return IBV_QPS_UNKNOWN;
  return attr.qp_state;
}

RdmaEndpoint local_endpoint(const Device& device, const ibv_qp* qp, std::uint32_t psn) {
  return RdmaEndpoint{.gid = gid_to_hex(device.gid), .qpn = qp->qp_num, .psn = psn & 0xffffff,
                      .lid = device.port_attr.lid};
}

std::uint32_t random_psn() {
  thread_local std::mt19937 engine{std::random_device{}()};
  return static_cast<std::uint32_t>(engine()) & 0xffffff;
}

}  // namespace snaptier::rdma_detail
