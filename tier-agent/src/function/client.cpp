// The client side of the function wire protocol: one framed-JSON request/response per
// connection (like workloads/runtime/function_protocol.py's call()), every step bounded by
// one deadline.
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <string>
#include <thread>

#include "core/try.hpp"
#include "core/unique_fd.hpp"
#include "snaptier/function.hpp"

namespace snaptier::function {
namespace {

using Clock = std::chrono::steady_clock;
using detail::UniqueFd;
using nlohmann::json;

struct Deadline {
  Clock::time_point at;
  std::chrono::milliseconds total;
  std::string what;  // "<socket>" for messages

  [[nodiscard]] tl::unexpected<Error> expired(std::string_view step) const {
    return fail(Errc::timeout, what + ": timed out after " + std::to_string(total.count()) + " ms (" +
                                   std::string(step) + ")");
  }
  // Waits until fd has `events` or the deadline passes (Errc::timeout).
  [[nodiscard]] Result<void> wait(int fd, short events, std::string_view step) const {
    for (;;) {
      const auto now = Clock::now();
      if (now >= at) return expired(step);
      const auto ms = std::chrono::ceil<std::chrono::milliseconds>(at - now).count();
      pollfd pfd{fd, events, 0};
      const int r = ::poll(&pfd, 1, static_cast<int>(std::min<long long>(ms, INT_MAX)));
      if (r > 0) return {};  // ready, or an error/hangup the next call will report
      if (r < 0 && errno != EINTR) return fail_errno(Errc::io, what + ": poll", errno);
    }
  }
};

Result<void> connect_unix(int fd, const std::filesystem::path& path, const Deadline& deadline) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  const std::string& text = path.native();
  if (text.empty() || text.size() >= sizeof(addr.sun_path)) {
    return fail(Errc::invalid_argument, "socket path '" + text + "' is empty or longer than " +
                                            std::to_string(sizeof(addr.sun_path) - 1) + " bytes");
  }
  std::memcpy(addr.sun_path, text.c_str(), text.size() + 1);
  for (;;) {
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0) return {};
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EINPROGRESS) {
      if (auto ready = deadline.wait(fd, POLLOUT, "connecting"); !ready) return tl::unexpected(ready.error());
      int so_error = 0;
      socklen_t len = sizeof(so_error);
      if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &len) != 0) so_error = errno;
      if (so_error != 0) return fail_errno(Errc::io, "connect " + text, so_error);
      return {};
    }
    if (err == EAGAIN) {  // a non-blocking Unix socket whose listener's backlog is full: retry
      const auto now = Clock::now();
      if (now >= deadline.at) return deadline.expired("connecting: listen backlog full");
      std::this_thread::sleep_for(std::min<Clock::duration>(std::chrono::milliseconds(2), deadline.at - now));
      continue;
    }
    return fail_errno(Errc::io, "connect " + text, err);
  }
}

Result<void> send_all(int fd, std::string_view data, const Deadline& deadline) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(static_cast<std::size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (auto ready = deadline.wait(fd, POLLOUT, "sending the request"); !ready) return tl::unexpected(ready.error());
      continue;
    }
    return fail_errno(Errc::io, deadline.what + ": send", n < 0 ? errno : EPIPE);
  }
  return {};
}

// Reads up to `count` bytes; fewer only if the peer closed the connection.
Result<std::size_t> recv_exact(int fd, char* data, std::size_t count, const Deadline& deadline) {
  std::size_t got = 0;
  while (got < count) {
    const ssize_t n = ::recv(fd, data + got, count - got, 0);
    if (n > 0) {
      got += static_cast<std::size_t>(n);
      continue;
    }
    if (n == 0) break;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (auto ready = deadline.wait(fd, POLLIN, "waiting for the response"); !ready) return tl::unexpected(ready.error());
      continue;
    }
    return fail_errno(Errc::io, deadline.what + ": recv", errno);
  }
  return got;
}

std::string preview(std::string_view bytes) {
  constexpr std::size_t kMax = 80;
  std::string text;
  for (const char c : bytes.substr(0, kMax)) text += (c >= 0x20 && c < 0x7f) ? c : '.';
  return bytes.size() > kMax ? text + "..." : text;
}

}  // namespace

Result<json> call(const std::filesystem::path& socket, const json& request, std::chrono::milliseconds timeout) {
  // Clamped so that now() + timeout cannot overflow.
  timeout = std::clamp<std::chrono::milliseconds>(timeout, std::chrono::milliseconds(0), std::chrono::hours(24 * 365));
  const Deadline deadline{Clock::now() + timeout, timeout, socket.string()};
  if (!request.is_object()) return fail(Errc::invalid_argument, "a request must be a JSON object");
  std::string frame(4, '\0');
  try {
    frame += request.dump();  // strict: a string that is not UTF-8 is refused, not mangled
  } catch (const json::exception& e) {
    return fail(Errc::invalid_argument, "request is not serializable: " + std::string(e.what()));
  }
  const std::size_t payload_size = frame.size() - 4;
  if (payload_size > kMaxFrameBytes) {
    return fail(Errc::invalid_argument, "request of " + std::to_string(payload_size) +
                                            " bytes exceeds the frame limit of " + std::to_string(kMaxFrameBytes));
  }
  for (int i = 0; i < 4; ++i) frame[static_cast<std::size_t>(i)] = static_cast<char>((payload_size >> (24 - 8 * i)) & 0xff);

  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return fail_errno(Errc::io, "socket(AF_UNIX)", errno);
  if (auto connected = connect_unix(fd.get(), socket, deadline); !connected) return tl::unexpected(connected.error());
  if (auto sent = send_all(fd.get(), frame, deadline); !sent) return tl::unexpected(sent.error());

  unsigned char header[4];
  SNAPTIER_TRY(header_bytes, recv_exact(fd.get(), reinterpret_cast<char*>(header), sizeof(header), deadline));
  if (header_bytes == 0) return fail(Errc::protocol, deadline.what + ": instance closed the connection without a response");
  if (header_bytes < sizeof(header)) {
    return fail(Errc::protocol, deadline.what + ": connection closed inside a frame header (" +
                                    std::to_string(header_bytes) + " of 4 bytes)");
  }
  const std::uint32_t size = (std::uint32_t{header[0]} << 24) | (std::uint32_t{header[1]} << 16) |
                             (std::uint32_t{header[2]} << 8) | std::uint32_t{header[3]};
  if (size > kMaxFrameBytes) {
    return fail(Errc::protocol, deadline.what + ": frame of " + std::to_string(size) + " bytes exceeds the limit of " +
                                    std::to_string(kMaxFrameBytes) + " bytes");
  }
  std::string payload(size, '\0');
  SNAPTIER_TRY(payload_bytes, recv_exact(fd.get(), payload.data(), size, deadline));
  if (payload_bytes < size) {
    return fail(Errc::protocol, deadline.what + ": connection closed inside a frame (" + std::to_string(payload_bytes) +
                                    " of " + std::to_string(size) + " bytes)");
  }
  json response = json::parse(payload, nullptr, /*allow_exceptions=*/false);
  if (response.is_discarded()) {
    return fail(Errc::protocol, deadline.what + ": response is not JSON (or not UTF-8): '" + preview(payload) + "'");
  }
  if (!response.is_object()) {
    return fail(Errc::protocol, deadline.what + ": response must be a JSON object, got '" + preview(payload) + "'");
  }
  return response;
}

Result<InvokeResult> invoke_example(const std::filesystem::path& socket, const FunctionSpec& spec,
                                    std::chrono::milliseconds timeout) {
  if (!spec.example_input.is_object()) {
    return fail(Errc::invalid_argument, spec.name + " has no [example] input");
  }
  const json request = {{"id", 1}, {"input", spec.example_input}};
  const auto started = Clock::now();
  SNAPTIER_TRY(response, call(socket, request, timeout));
  InvokeResult result;
  result.round_trip_ms = std::chrono::duration<double, std::milli>(Clock::now() - started).count();
  const auto ok = response.find("ok");
  if (ok == response.end() || !ok->is_boolean() || !ok->get<bool>()) {
    const auto error = response.find("error");
    std::string reason = error == response.end() ? std::string("(no error given)")
                         : error->is_string()     ? error->get<std::string>()
                                                  : error->dump();
    result.problems.push_back("ok is false: " + reason);
  } else if (const auto id = response.find("id"); id == response.end() || !python_equal(*id, request["id"])) {
    result.problems.push_back("id is " + (id == response.end() ? std::string("missing") : id->dump()) + ", expected 1");
  } else if (const auto output = response.find("output"); output == response.end() || !output->is_object()) {
    result.problems.push_back("response has no output object");
  } else {
    result.problems = check_expect(*output, spec.expect);
  }
  result.response = std::move(response);
  return result;
}

Result<std::string> digest(const std::filesystem::path& socket, std::chrono::milliseconds timeout) {
  SNAPTIER_TRY(response, call(socket, json{{"id", "digest"}, {"op", "digest"}}, timeout));
  const auto ok = response.find("ok");
  if (ok == response.end() || !ok->is_boolean() || !ok->get<bool>()) {
    const auto error = response.find("error");
    return fail(Errc::protocol, socket.string() + ": digest failed: " +
                                    (error != response.end() && error->is_string() ? error->get<std::string>()
                                                                                   : response.dump()));
  }
  const auto output = response.find("output");
  if (output != response.end() && output->is_object()) {
    const auto sha = output->find("sha256");
    if (sha != output->end() && sha->is_string()) {
      const auto& text = sha->get_ref<const std::string&>();
      if (text.size() == 64 && std::all_of(text.begin(), text.end(), [](char c) {
            return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
          })) {
        return text;
      }
    }
  }
  return fail(Errc::protocol, socket.string() + ": digest response has no output.sha256 of 64 hex digits: " +
                                  response.dump(-1, ' ', false, json::error_handler_t::replace));
}

}  // namespace snaptier::function
