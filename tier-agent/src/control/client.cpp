// The synchronous control-plane client. Every step runs as an Asio async operation on a private
// io_context driven by run_for(timeout): if the step has not completed by then the socket is
// closed, which is the only portable way to bound connect/read/write on a blocking socket.
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <functional>
#include <algorithm>
#include <array>
#include <optional>
#include <variant>
#include <mutex>

#include "snaptier/control.hpp"

namespace snaptier::control {

namespace asio = boost::asio;
using boost::system::error_code;
using tcp = asio::ip::tcp;
using unix_stream = asio::local::stream_protocol;

class ControlClient::Impl {
 public:
  explicit Impl(ClientOptions options) : options_(std::move(options)) {}

  Result<void> connect() {
    if (const auto* unix_endpoint = std::get_if<UnixEndpoint>(&options_.endpoint)) {
      auto& socket = socket_.emplace<unix_stream::socket>(io_);
      return run(options_.connect_timeout, "connect to " + describe(), [&](auto done) {
        socket.async_connect(unix_stream::endpoint(unix_endpoint->path.string()),
                             [done](const error_code& ec) { done(ec); });
      });
    }
    const auto& address = std::get<NetAddress>(options_.endpoint);
    auto& socket = socket_.emplace<tcp::socket>(io_);
    tcp::resolver resolver(io_);
    tcp::resolver::results_type endpoints;
    auto resolved = run(options_.connect_timeout, "resolve " + address.host, [&](auto done) {
      resolver.async_resolve(address.host, std::to_string(address.port),
                             [done, &endpoints](const error_code& ec, tcp::resolver::results_type results) {
                               endpoints = std::move(results);
                               done(ec);
                             });
    }, [&resolver] { resolver.cancel(); });
    if (!resolved) return resolved;
    auto connected = run(options_.connect_timeout, "connect to " + describe(), [&](auto done) {
      asio::async_connect(socket, endpoints, [done](const error_code& ec, const tcp::endpoint&) { done(ec); });
    });
    if (connected) {
      error_code ignored;
      socket.set_option(tcp::no_delay(true), ignored);  // small request/response frames
    }
    return connected;
  }

  Result<void> send(std::span<const std::byte> bytes) {
    if (!connected()) return fail(Errc::unavailable, "not connected to " + describe());
    return with_socket([&](auto& socket) {
      return run(options_.io_timeout, "send to " + describe(), [&](auto done) {
        asio::async_write(socket, asio::buffer(bytes.data(), bytes.size()),
                          [done](const error_code& ec, std::size_t) { done(ec); });
      });
    });
  }

  Result<std::string> receive_frame() {
    if (!connected()) return fail(Errc::unavailable, "not connected to " + describe());
    std::array<std::byte, kFrameHeaderBytes> header{};
    std::string body;
    const auto deadline = std::chrono::steady_clock::now() + options_.io_timeout;
    auto remaining = [&] {
      return std::max(std::chrono::milliseconds(1), std::chrono::duration_cast<std::chrono::milliseconds>(
                                                        deadline - std::chrono::steady_clock::now()));
    };
    auto got_header = with_socket([&](auto& socket) {
      return run(remaining(), "receive from " + describe(), [&](auto done) {
        asio::async_read(socket, asio::buffer(header), [done](const error_code& ec, std::size_t) { done(ec); });
      });
    });
    if (!got_header) return tl::unexpected(got_header.error());
    std::uint32_t length = decode_frame_length(std::span<const std::byte, kFrameHeaderBytes>(header));
    if (length > options_.max_frame_bytes) {
      close();
      return fail(Errc::protocol, "response frame of " + std::to_string(length) + " bytes exceeds the limit of " +
                                      std::to_string(options_.max_frame_bytes));
    }
    body.assign(length, '\0');
    if (length == 0) return body;
    auto got_body = with_socket([&](auto& socket) {
      return run(remaining(), "receive from " + describe(), [&](auto done) {
        asio::async_read(socket, asio::buffer(body), [done](const error_code& ec, std::size_t) { done(ec); });
      });
    });
    if (!got_body) return tl::unexpected(got_body.error());
    return body;
  }

  void close() noexcept {
    cancel_socket();
    socket_.emplace<std::monostate>();
  }

  void cancel_socket() noexcept {
    error_code ignored;
    std::visit(
        [&](auto& socket) {
          if constexpr (!std::is_same_v<std::decay_t<decltype(socket)>, std::monostate>) socket.close(ignored);
        },
        socket_);
  }

  [[nodiscard]] bool connected() const noexcept { return !std::holds_alternative<std::monostate>(socket_); }
  [[nodiscard]] const ClientOptions& options() const noexcept { return options_; }
  [[nodiscard]] std::string describe() const { return to_string(options_.endpoint); }

 private:
  template <class F>
  Result<void> with_socket(F&& f) {
    if (auto* unix_socket = std::get_if<unix_stream::socket>(&socket_)) return f(*unix_socket);
    if (auto* tcp_socket = std::get_if<tcp::socket>(&socket_)) return f(*tcp_socket);
    return fail(Errc::unavailable, "not connected to " + describe());
  }

  // Runs one async step to completion or until `timeout`; on timeout or error the connection
  // is closed (its stream position is unknown, so it cannot be reused).
  template <class Start>
  Result<void> run(std::chrono::milliseconds timeout, const std::string& what, Start&& start,
                   const std::function<void()>& cancel = {}) {
    bool done = false;
    error_code result;
    start([&done, &result](const error_code& ec) {
      done = true;
      result = ec;
    });
    io_.restart();
    io_.run_for(timeout);
    if (!done) {
      // Abort the operation, let it complete (so nothing refers to this stack frame), and only
      // then drop the socket object.
      if (cancel) cancel();
      cancel_socket();
      io_.restart();
      io_.run();
      close();
      return fail(Errc::timeout, what + " timed out after " + std::to_string(timeout.count()) + " ms");
    }
    if (result) {
      close();
      if (result == asio::error::eof || result == asio::error::connection_reset ||
          result == asio::error::broken_pipe) {
        return fail(Errc::unavailable, what + ": connection closed by peer");
      }
      return fail(Errc::unavailable, what + ": " + result.message());
    }
    return {};
  }

  ClientOptions options_;
  asio::io_context io_;
  std::variant<std::monostate, unix_stream::socket, tcp::socket> socket_;
};

ControlClient::ControlClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ControlClient::ControlClient(ControlClient&&) noexcept = default;
ControlClient& ControlClient::operator=(ControlClient&&) noexcept = default;
ControlClient::~ControlClient() = default;

Result<ControlClient> ControlClient::connect(const ClientOptions& options) {
  auto impl = std::make_unique<Impl>(options);
  if (auto ok = impl->connect(); !ok) return tl::unexpected(ok.error());
  return ControlClient(std::move(impl));
}

Result<void> ControlClient::send_bytes(std::span<const std::byte> bytes) { return impl_->send(bytes); }

Result<void> ControlClient::send_frame(std::string_view payload) {
  if (payload.size() > impl_->options().max_frame_bytes) {
    return fail(Errc::invalid_argument, "request of " + std::to_string(payload.size()) +
                                            " bytes exceeds the frame limit of " +
                                            std::to_string(impl_->options().max_frame_bytes));
  }
  std::string frame = encode_frame(payload);
  return impl_->send(std::as_bytes(std::span(frame.data(), frame.size())));
}

Result<std::string> ControlClient::receive_frame() { return impl_->receive_frame(); }

void ControlClient::close() noexcept { impl_->close(); }

Result<Response> ControlClient::call(const Command& command) {
  const std::uint64_t id = next_id_++;
  if (auto sent = send_frame(encode_request(Request{id, impl_->options().token, command})); !sent) {
    return tl::unexpected(sent.error());
  }
  auto frame = receive_frame();
  if (!frame) return tl::unexpected(frame.error());
  auto response = parse_response(*frame);
  if (!response) {
    impl_->close();
    return tl::unexpected(response.error());
  }
  // A null id means the server could not read our envelope; otherwise it must echo ours.
  if (response->id && *response->id != id) {
    impl_->close();
    return fail(Errc::protocol, "response id " + std::to_string(*response->id) + " does not match request id " +
                                    std::to_string(id));
  }
  return response;
}

Result<nlohmann::json> ControlClient::call_ok(const Command& command) {
  auto response = call(command);
  if (!response) return tl::unexpected(response.error());
  return std::move(response->outcome);
}

Result<nlohmann::json> call_peer(const std::string& peer, const ClientOptions& options, const Command& command) {
  auto client = ControlClient::connect(options);
  if (!client) return fail(Errc::unavailable, "cannot reach " + peer + ": " + client.error().message);
  auto reply = client->call_ok(command);
  if (!reply) return fail(reply.error().code, peer + ": " + reply.error().message);
  return reply;
}

namespace {

class ControlRdmaPoolClient final : public RdmaPoolClient {
 public:
  explicit ControlRdmaPoolClient(ClientOptions options) : options_(std::move(options)) {}

  Result<RdmaPoolGrant> connect(const RdmaEndpoint& local) override {
    auto result = call(RdmaConnect{local});
    if (!result) return tl::unexpected(result.error());
    return decode_grant(*result);
  }

  Result<Extent> allocate(std::uint64_t length) override {
    auto result = call(RdmaAlloc{length});
    if (!result) return tl::unexpected(result.error());
    return decode_extent(*result);
  }

  Result<void> release(Extent extent) override {
    auto result = call(RdmaFree{extent});
    if (!result) return tl::unexpected(result.error());
    return {};
  }

 private:
  // One connection per call. Pool calls are rare (a few per snapshot), and the memory node
  // closes idle connections: a kept connection would fail its next call after any pause.
  // Requests are never retried: rdma.alloc is not idempotent, and a retry after a lost
  // response would leak pool memory.
  Result<nlohmann::json> call(const Command& command) {
    std::lock_guard lock(mutex_);
    auto client = ControlClient::connect(options_);
    if (!client) return tl::unexpected(client.error());
    auto response = client->call(command);
    if (!response) return tl::unexpected(response.error());
    return std::move(response->outcome);
  }

  ClientOptions options_;
  std::mutex mutex_;
};

}  // namespace

std::shared_ptr<RdmaPoolClient> make_control_rdma_pool_client(ClientOptions options) {
  return std::make_shared<ControlRdmaPoolClient>(std::move(options));
}

}  // namespace snaptier::control
