// The control-plane server. One I/O thread runs every socket operation asynchronously, so a slow
// or stalled client costs a timer and a buffer, never a thread; handlers (which touch tiers and
// files and may block) run on a small worker pool and post their reply back to the I/O thread.
#include <sys/stat.h>

#include <atomic>
#include <algorithm>
#include <array>
#include <filesystem>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/write.hpp>
#include <mutex>
#include <thread>
#include <unordered_map>

#include <spdlog/spdlog.h>

#include "control/sha256.hpp"
#include "snaptier/control.hpp"

namespace snaptier::control {

namespace asio = boost::asio;
using boost::system::error_code;
using tcp = asio::ip::tcp;
using unix_stream = asio::local::stream_protocol;
using Clock = asio::steady_timer::clock_type;

class ConnectionBase {
 public:
  virtual ~ConnectionBase() = default;
  virtual void close() = 0;
  virtual void close_when_idle() = 0;
};

class ControlServer::Impl {
 public:
  Impl(ServerOptions options, CommandHandler handler)
      : options_(std::move(options)), handler_(std::move(handler)), workers_(std::max<std::size_t>(1, options_.worker_threads)) {}

  ~Impl() {
    if (io_thread_.joinable()) {
      io_.stop();
      io_thread_.join();
    }
  }

  Result<void> bind();
  void run() {
    io_thread_ = std::thread([this] {
      // A handler throwing on the I/O thread would be a bug; keep serving rather than die.
      for (;;) {
        try {
          io_.run();
          return;
        } catch (const std::exception& e) {
          spdlog::error("control: unexpected exception on the I/O thread: {}", e.what());
        }
      }
    });
  }
  bool stop(std::chrono::milliseconds grace);

  // Called by connections (I/O thread only).
  void register_connection(ConnectionBase* connection, std::weak_ptr<ConnectionBase> weak) {
    connections_.emplace(connection, std::move(weak));
    open_connections_.store(connections_.size());
  }
  void unregister_connection(ConnectionBase* connection) {
    connections_.erase(connection);
    open_connections_.store(connections_.size());
  }

  const ServerOptions& options() const noexcept { return options_; }
  const CommandHandler& handler() const noexcept { return handler_; }
  asio::io_context& io() noexcept { return io_; }
  asio::thread_pool& workers() noexcept { return workers_; }
  std::atomic<std::size_t>& in_flight() noexcept { return in_flight_; }
  bool stopping() const noexcept { return stopping_.load(); }

  std::optional<std::uint16_t> tcp_port() const noexcept { return tcp_port_; }
  std::optional<std::filesystem::path> unix_path() const { return unix_path_; }

 private:
  Result<void> bind_unix(const std::filesystem::path& path);
  Result<void> bind_tcp(const NetAddress& address);
  template <class Acceptor>
  void accept(Acceptor& acceptor, bool requires_token);
  template <class Socket>
  void start_connection(Socket socket, bool requires_token);

  // Declaration order is destruction order in reverse: the worker pool joins before the
  // io_context (whose queued handlers own connections) goes away.
  ServerOptions options_;
  CommandHandler handler_;
  std::atomic<std::size_t> in_flight_{0};
  std::atomic<std::size_t> open_connections_{0};
  std::atomic<bool> stopping_{false};
  std::optional<std::uint16_t> tcp_port_;
  std::optional<std::filesystem::path> unix_path_;
  asio::io_context io_;
  std::optional<unix_stream::acceptor> unix_acceptor_;
  std::optional<tcp::acceptor> tcp_acceptor_;
  asio::steady_timer accept_retry_{io_};
  std::unordered_map<ConnectionBase*, std::weak_ptr<ConnectionBase>> connections_;
  asio::thread_pool workers_;
  std::thread io_thread_;
};

namespace {

// One client connection. Strictly request/response: the next frame is read only after the
// previous response is written, so a connection holds at most one request in flight.
template <class Socket>
class Connection final : public ConnectionBase, public std::enable_shared_from_this<Connection<Socket>> {
 public:
  Connection(ControlServer::Impl& server, Socket socket, bool requires_token)
      : server_(server),
        socket_(std::move(socket)),
        deadline_(server.io()),
        request_timer_(server.io()),
        requires_token_(requires_token) {}

  void start() { read_frame(); }

  void close() override {
    if (closed_) return;
    closed_ = true;
    error_code ignored;
    socket_.shutdown(Socket::shutdown_both, ignored);
    socket_.close(ignored);
    deadline_.cancel();
    request_timer_.cancel();
    server_.unregister_connection(this);
  }

  // Graceful stop: a connection waiting for its next frame goes now; one with a request in
  // flight goes right after its response is written.
  void close_when_idle() override {
    if (!request_pending_ && !writing_) close();
  }

 private:
  // One timer bounds whatever the connection is waiting on from the peer (the rest of a frame,
  // or the peer reading our response). Re-arming moves the expiry, which makes a stale wakeup
  // harmless: it sees an expiry in the future and does nothing.
  void arm_deadline(std::chrono::milliseconds timeout, const char* what) {
    deadline_.expires_after(timeout);
    deadline_.async_wait([self = this->shared_from_this(), what](const error_code& ec) {
      if (ec || self->closed_) return;
      if (self->deadline_.expiry() <= Clock::now()) {
        spdlog::info("control: closing connection: no progress while {} for {} ms", what,
                     self->server_.options().idle_timeout.count());
        self->close();
      }
    });
  }
  void disarm_deadline() { deadline_.expires_at(Clock::time_point::max()); }

  void read_frame() {
    if (closed_) return;
    if (server_.stopping()) return close();
    arm_deadline(server_.options().idle_timeout, "waiting for a request frame");
    asio::async_read(socket_, asio::buffer(header_), [self = this->shared_from_this()](const error_code& ec, std::size_t) {
      self->on_header(ec);
    });
  }

  void on_header(const error_code& ec) {
    if (ec) return close();  // peer closed, reset, or we timed it out
    std::uint32_t length = decode_frame_length(std::span<const std::byte, kFrameHeaderBytes>(header_));
    if (length > server_.options().max_frame_bytes) {
      // The stream cannot be resynchronized cheaply and the peer is misbehaving: answer, close.
      spdlog::info("control: rejecting a {}-byte frame (limit {})", length, server_.options().max_frame_bytes);
      return respond(Response{std::nullopt, tl::unexpected(Error{Errc::invalid_argument,
                                  "frame of " + std::to_string(length) + " bytes exceeds the limit of " +
                                      std::to_string(server_.options().max_frame_bytes)})},
                     /*close_after=*/true);
    }
    body_.assign(length, '\0');
    if (length == 0) return on_body({});
    asio::async_read(socket_, asio::buffer(body_), [self = this->shared_from_this()](const error_code& ec, std::size_t) {
      self->on_body(ec);
    });
  }

  void on_body(const error_code& ec) {
    if (ec) return close();
    disarm_deadline();
    auto request = parse_request(body_);
    body_.clear();
    if (!request) {
      return respond(Response{request.error().id, tl::unexpected(request.error().error)}, /*close_after=*/false);
    }
    if (requires_token_ && !detail::constant_time_equal(request->token, server_.options().token)) {
      // Close after answering: a peer that does not know the token has nothing more to say.
      Error error{Errc::permission_denied, request->token.empty() ? "a token is required on TCP"
                                                                  : "invalid token"};
      return respond(Response{request->id, tl::unexpected(std::move(error))}, /*close_after=*/true);
    }
    dispatch(std::move(*request));
  }

  void dispatch(Request request) {
    request_pending_ = true;
    const std::uint64_t sequence = ++sequence_;
    const std::uint64_t id = request.id;
    const auto limit = is_long_running(request.command) ? server_.options().long_request_timeout
                                                        : server_.options().request_timeout;
    request_timer_.expires_after(limit);
    request_timer_.async_wait([self = this->shared_from_this(), sequence, id, limit](const error_code& ec) {
      if (ec || !self->request_pending_ || self->sequence_ != sequence) return;
      self->request_pending_ = false;
      spdlog::warn("control: request {} exceeded {} ms", id, limit.count());
      self->respond(Response{id, tl::unexpected(Error{Errc::timeout, "request did not finish within " +
                                                                        std::to_string(limit.count()) + " ms"})},
                    /*close_after=*/false);
    });

    server_.in_flight().fetch_add(1);
    asio::post(server_.workers(), [self = this->shared_from_this(), sequence, id, command = std::move(request.command)] {
      Result<nlohmann::json> outcome = fail(Errc::io, "handler did not run");
      try {
        outcome = self->server_.handler()(command);
      } catch (const std::exception& e) {
        // Handlers return errors as values; an exception here is a bug, reported, not fatal.
        spdlog::error("control: handler for {} threw: {}", op_name(command), e.what());
        outcome = fail(Errc::io, std::string("internal error: ") + e.what());
      }
      asio::post(self->server_.io(), [self, sequence, id, outcome = std::move(outcome)]() mutable {
        self->server_.in_flight().fetch_sub(1);
        if (!self->request_pending_ || self->sequence_ != sequence) return;  // timed out already
        self->request_pending_ = false;
        self->request_timer_.cancel();
        self->respond(Response{id, std::move(outcome)}, /*close_after=*/false);
      });
    });
  }

  void respond(const Response& response, bool close_after) {
    if (closed_) return;
    out_ = encode_frame(encode_response(response));
    writing_ = true;
    arm_deadline(server_.options().idle_timeout, "writing a response");
    asio::async_write(socket_, asio::buffer(out_),
                      [self = this->shared_from_this(), close_after](const error_code& ec, std::size_t) {
                        self->writing_ = false;
                        if (ec || close_after) return self->close();
                        self->disarm_deadline();
                        // A timed-out handler may still be running; its late result is dropped by
                        // the sequence check, so the connection can take the next request now.
                        self->read_frame();
                      });
  }

  ControlServer::Impl& server_;
  Socket socket_;
  asio::steady_timer deadline_;
  asio::steady_timer request_timer_;
  const bool requires_token_;
  std::array<std::byte, kFrameHeaderBytes> header_{};
  std::string body_;
  std::string out_;
  std::uint64_t sequence_ = 0;
  bool request_pending_ = false;
  bool writing_ = false;
  bool closed_ = false;
};

}  // namespace

template <class Socket>
void ControlServer::Impl::start_connection(Socket socket, bool requires_token) {
  if (connections_.size() >= options_.max_connections) {
    spdlog::warn("control: refusing a connection: {} connections open (limit)", connections_.size());
    error_code ignored;
    socket.close(ignored);
    return;
  }
  auto connection = std::make_shared<Connection<Socket>>(*this, std::move(socket), requires_token);
  register_connection(connection.get(), connection);
  connection->start();
}

template <class Acceptor>
void ControlServer::Impl::accept(Acceptor& acceptor, bool requires_token) {
  acceptor.async_accept([this, &acceptor, requires_token](const error_code& ec, typename Acceptor::protocol_type::socket socket) {
    if (ec == asio::error::operation_aborted || stopping_.load() || !acceptor.is_open()) return;
    if (ec) {
      // Typically EMFILE: back off instead of spinning on a failing accept.
      spdlog::warn("control: accept failed: {}", ec.message());
      accept_retry_.expires_after(std::chrono::milliseconds(100));
      accept_retry_.async_wait([this, &acceptor, requires_token](const error_code& wait_ec) {
        if (!wait_ec) accept(acceptor, requires_token);
      });
      return;
    }
    start_connection(std::move(socket), requires_token);
    accept(acceptor, requires_token);
  });
}

Result<void> ControlServer::Impl::bind_unix(const std::filesystem::path& path) {
  std::error_code fs_ec;
  if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path(), fs_ec);
  if (fs_ec) return fail(Errc::io, "create directory " + path.parent_path().string() + ": " + fs_ec.message());

  auto status = std::filesystem::symlink_status(path, fs_ec);
  if (!fs_ec && std::filesystem::exists(status)) {
    if (!std::filesystem::is_socket(status)) {
      return fail(Errc::already_exists, path.string() + " exists and is not a socket; refusing to replace it");
    }
    // A socket file is left behind by a crashed agent; a live one answers connect().
    unix_stream::socket probe(io_);
    error_code connect_ec;
    probe.connect(unix_stream::endpoint(path.string()), connect_ec);
    if (!connect_ec) return fail(Errc::already_exists, "another agent is serving on " + path.string());
    std::filesystem::remove(path, fs_ec);
  }

  error_code ec;
  unix_acceptor_.emplace(io_);
  unix_acceptor_->open(unix_stream(), ec);
  if (!ec) unix_acceptor_->bind(unix_stream::endpoint(path.string()), ec);
  if (ec) return fail(Errc::io, "bind unix socket " + path.string() + ": " + ec.message());
  // The socket file's mode is the only access control on this listener (no token).
  if (::chmod(path.c_str(), 0600) != 0) return fail_errno(Errc::io, "chmod 0600 " + path.string(), errno);
  unix_acceptor_->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return fail(Errc::io, "listen on " + path.string() + ": " + ec.message());
  unix_path_ = path;
  return {};
}

Result<void> ControlServer::Impl::bind_tcp(const NetAddress& address) {
  error_code ec;
  tcp::endpoint endpoint;
  auto ip = asio::ip::make_address(address.host, ec);
  if (!ec) {
    endpoint = tcp::endpoint(ip, address.port);
  } else {
    tcp::resolver resolver(io_);
    auto results = resolver.resolve(address.host, std::to_string(address.port), ec);
    if (ec || results.empty()) return fail(Errc::invalid_argument, "cannot resolve listen address " + address.to_string());
    endpoint = results.begin()->endpoint();
  }
  tcp_acceptor_.emplace(io_);
  tcp_acceptor_->open(endpoint.protocol(), ec);
  if (!ec) tcp_acceptor_->set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) tcp_acceptor_->bind(endpoint, ec);
  if (!ec) tcp_acceptor_->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return fail(Errc::io, "listen on tcp " + address.to_string() + ": " + ec.message());
  tcp_port_ = tcp_acceptor_->local_endpoint().port();
  return {};
}

Result<void> ControlServer::Impl::bind() {
  if (!options_.unix_socket && !options_.tcp_listen) {
    return fail(Errc::invalid_argument, "control server needs a unix socket or a tcp address");
  }
  if (options_.tcp_listen && options_.token.empty()) {
    return fail(Errc::invalid_argument, "a TCP listener requires a token");
  }
  if (options_.unix_socket) {
    if (auto ok = bind_unix(*options_.unix_socket); !ok) return ok;
    accept(*unix_acceptor_, /*requires_token=*/false);
  }
  if (options_.tcp_listen) {
    if (auto ok = bind_tcp(*options_.tcp_listen); !ok) return ok;
    accept(*tcp_acceptor_, /*requires_token=*/true);
  }
  return {};
}

bool ControlServer::Impl::stop(std::chrono::milliseconds grace) {
  if (!io_thread_.joinable()) return true;
  stopping_.store(true);
  asio::post(io_, [this] {
    error_code ignored;
    if (unix_acceptor_) unix_acceptor_->close(ignored);
    if (tcp_acceptor_) tcp_acceptor_->close(ignored);
    accept_retry_.cancel();
    // Copy: closing a connection unregisters it from the map being iterated.
    auto snapshot = connections_;
    for (auto& [raw, weak] : snapshot) {
      if (auto connection = weak.lock()) connection->close_when_idle();
    }
  });
  const auto give_up = std::chrono::steady_clock::now() + grace;
  while ((in_flight_.load() > 0 || open_connections_.load() > 0) && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const bool clean = in_flight_.load() == 0;
  asio::post(io_, [this] {
    auto snapshot = connections_;
    for (auto& [raw, weak] : snapshot) {
      if (auto connection = weak.lock()) connection->close();
    }
  });
  // Let the closes run, then end the loop.
  asio::post(io_, [this] { io_.stop(); });
  io_thread_.join();
  if (unix_path_) {
    std::error_code ignored;
    std::filesystem::remove(*unix_path_, ignored);
  }
  if (clean) workers_.join();
  return clean;
}

ControlServer::ControlServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ControlServer::~ControlServer() {
  if (impl_) (void)impl_->stop(std::chrono::milliseconds(0));
}

Result<std::unique_ptr<ControlServer>> ControlServer::start(ServerOptions options, CommandHandler handler) {
  if (!handler) return fail(Errc::invalid_argument, "control server needs a handler");
  if (options.max_frame_bytes < 64) return fail(Errc::invalid_argument, "max_frame_bytes is too small");
  auto impl = std::make_unique<Impl>(std::move(options), std::move(handler));
  if (auto ok = impl->bind(); !ok) return tl::unexpected(ok.error());
  impl->run();
  if (impl->unix_path()) spdlog::info("control: serving on unix:{}", impl->unix_path()->string());
  if (impl->tcp_port()) spdlog::info("control: serving on tcp port {}", *impl->tcp_port());
  return std::unique_ptr<ControlServer>(new ControlServer(std::move(impl)));
}

std::optional<std::uint16_t> ControlServer::tcp_port() const noexcept { return impl_->tcp_port(); }
std::optional<std::filesystem::path> ControlServer::unix_socket() const { return impl_->unix_path(); }
bool ControlServer::stop(std::chrono::milliseconds grace) { return impl_->stop(grace); }

}  // namespace snaptier::control
