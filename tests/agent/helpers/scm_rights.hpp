// Passing a file descriptor over a Unix socket (SCM_RIGHTS), as CRIU's restorer and Firecracker
// hand their userfaultfds to a handler. Async-signal-safe enough for a forked child.
#pragma once

#include <poll.h>
#include <sys/socket.h>

#include <cstddef>
#include <cstring>

namespace snaptier::testing {

// Sends `len` bytes of `data` (at least one byte) with `fd` attached; fd < 0 sends no fd.
// Returns sendmsg's result.
inline ssize_t send_with_fd(int sock, int fd, const void* data, std::size_t len) {
  iovec iov{const_cast<void*>(data), len};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (fd >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
  }
  return ::sendmsg(sock, &msg, MSG_NOSIGNAL);
}

// Waits up to `timeout_ms` for a message of exactly `len` bytes and returns the fd that came
// with it (-1 if none, or on timeout / short read).
inline int receive_with_fd(int sock, void* data, std::size_t len, int timeout_ms) {
  pollfd p{sock, POLLIN, 0};
  if (::poll(&p, 1, timeout_ms) != 1) return -1;
  iovec iov{data, len};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  if (::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) != static_cast<ssize_t>(len)) return -1;
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  if (c == nullptr || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) return -1;
  int fd = -1;
  std::memcpy(&fd, CMSG_DATA(c), sizeof(int));
  return fd;
}

}  // namespace snaptier::testing
