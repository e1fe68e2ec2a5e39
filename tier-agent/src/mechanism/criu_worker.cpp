#include "mechanism/criu_worker.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <set>

#include "criu/pb_message.hpp"
#include "criu/schema.hpp"

namespace snaptier::mechanism {

namespace fs = std::filesystem;
namespace schema = criu::schema;
using Clock = std::chrono::steady_clock;
using detail::UniqueFd;
using std::chrono::milliseconds;

namespace {
// Bounded: CRIU replies once the tree is restored (or has failed), and exits right after.
constexpr milliseconds kExitAfterReply{5'000};
// Far above any reply CRIU sends (a pid and an error message).
constexpr std::size_t kMaxReply = 64 * 1024;
// How often a worker's exit is looked for on a kernel without pidfds.
constexpr milliseconds kExitPollWithoutPidfd{20};
// Half-restored tasks are stopped and killed; they exit at once.
constexpr milliseconds kOrphanKillGrace{2'000};
}  // namespace

std::vector<std::byte> encode_restore_request(const CriuRestoreRequest& request, int images_dir_fd, int work_dir_fd) {
  criu::pb::Message opts(schema::criu_opts::kSpec);
  opts.set_signed(schema::criu_opts::images_dir_fd, images_dir_fd);
  opts.set_signed(schema::criu_opts::log_level, request.log_level);
  opts.set_string(schema::criu_opts::log_file, request.log_file);
  opts.set_signed(schema::criu_opts::work_dir_fd, work_dir_fd);
  if (request.lazy_pages) opts.set_unsigned(schema::criu_opts::lazy_pages, 1);
  if (request.leave_stopped) opts.set_unsigned(schema::criu_opts::leave_stopped, 1);
  criu::pb::Message req(schema::criu_req::kSpec);
  req.set_unsigned(schema::criu_req::type, schema::kRpcRestore);
  req.set_bytes(schema::criu_req::opts, criu::pb::encode(opts));
  return criu::pb::encode(req);
}

Result<CriuRestoreReply> decode_restore_reply(std::span<const std::byte> packet) {
  auto resp = criu::pb::decode(schema::criu_resp::kSpec, packet);
  if (!resp) return fail(Errc::corrupt, "criu's reply: " + resp.error().message);
  const std::uint64_t type = resp->scalar_or(schema::criu_resp::type, 0);
  CriuRestoreReply reply;
  reply.success = resp->scalar_or(schema::criu_resp::success, 0) != 0;
  if (auto message = resp->bytes(schema::criu_resp::cr_errmsg)) {
    reply.message.assign(reinterpret_cast<const char*>(message->data()), message->size());
  }
  reply.cr_errno = static_cast<int>(resp->signed_value(schema::criu_resp::cr_errno).value_or(0));
  // CRIU answers a request it could not read with an EMPTY reply carrying the reason.
  if (type != schema::kRpcRestore) {
    return fail(Errc::corrupt, "criu replied with type " + std::to_string(type) + " to a restore" +
                                   (reply.message.empty() ? std::string() : ": " + reply.message));
  }
  if (auto restore = resp->bytes(schema::criu_resp::restore)) {
    auto r = criu::pb::decode(schema::criu_restore_resp::kSpec, *restore);
    if (!r) return fail(Errc::corrupt, "criu's restore reply: " + r.error().message);
    reply.pid = static_cast<pid_t>(r->signed_value(schema::criu_restore_resp::pid).value_or(-1));
  }
  if (reply.success && reply.pid <= 0) return fail(Errc::corrupt, "criu reported a restore without the restored pid");
  return reply;
}

Result<CriuWorker> CriuWorker::start(const std::string& criu, const fs::path& log, proc::SpawnOptions options) {
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
    return fail_errno(Errc::io, "socketpair for criu swrk", errno);
  }
  UniqueFd ours(pair[0]), theirs(pair[1]);
  struct stat far_end{};
  if (::fstat(theirs.get(), &far_end) != 0) return fail_errno(Errc::io, "fstat criu swrk socket", errno);
  options.log_file = log;
  options.pass_fds = {theirs.get()};
  auto child = proc::spawn({criu, "swrk", "3"}, options);
  if (!child) return tl::unexpected(child.error());
  // A mount namespace of its own (the instance's socket directory mounted in it) holds only
  // what this worker starts; ours, when it has none, holds everything.
  ino_t private_ns = proc::mount_namespace_of(child->pid());
  if (private_ns == proc::mount_namespace_of(::getpid())) private_ns = 0;
  return CriuWorker(std::move(*child), std::move(ours), far_end.st_ino, private_ns, log);
}

// As run_criu words a failed `criu restore`: "criu restore failed (<how>); end of <log>:\n<tail>".
// What CRIU says before its log is set up (a bad option, an images directory it cannot open)
// goes to the worker's own output: its tail follows when there is one.
Error CriuWorker::failed(Errc code, const std::string& how, const fs::path& log_tail_of) const {
  std::string text = "criu restore failed (" + how + "); end of " + log_tail_of.string() + ":\n" +
                     proc::read_tail(log_tail_of, 1500);
  if (std::string early = proc::read_tail(output_, 1000); !early.empty()) {
    text += "\nend of " + output_.string() + ":\n" + early;
  }
  return Error{code, std::move(text)};
}

std::size_t CriuWorker::end_orphans() {
  std::set<pid_t> found;
  for (pid_t pid : proc::holders_of_socket(socket_inode_)) found.insert(pid);
  for (pid_t pid : proc::processes_in_mount_namespace(mount_namespace_)) found.insert(pid);
  for (pid_t pid : found) (void)proc::kill_tree(pid, kOrphanKillGrace);
  return found.size();
}

Error CriuWorker::worker_gone(std::string_view when, const fs::path& log_tail_of) {
  std::string how = "still running, killed";
  if (auto status = child_.wait(kExitAfterReply)) {
    if (status->signal != 0) {
      how = "killed by signal " + std::to_string(status->signal);
    } else if (!status->timed_out) {
      how = "exit " + std::to_string(status->exit_code);
    }
  }
  if (const std::size_t n = end_orphans(); n > 0) {
    how += "; killed the " + std::to_string(n) + (n == 1 ? " process" : " processes") +
           " it had forked and left half restored";
  }
  return failed(Errc::io, "criu swrk " + std::string(when) + ": " + how, log_tail_of);
}

Result<pid_t> CriuWorker::restore(const CriuRestoreRequest& request, milliseconds timeout, const fs::path& log_tail_of) {
  if (used_) return fail(Errc::invalid_argument, "criu swrk: one restore per worker");
  used_ = true;
  UniqueFd images_dir(::open(request.images_dir.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!images_dir) return fail_errno(Errc::io, "open images dir " + request.images_dir.string(), errno);
  UniqueFd work_dir(::open(request.work_dir.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!work_dir) return fail_errno(Errc::io, "open work dir " + request.work_dir.string(), errno);
  const std::vector<std::byte> packet = encode_restore_request(request, images_dir.get(), work_dir.get());
  ssize_t sent;
  do {
    sent = ::send(socket_.get(), packet.data(), packet.size(), MSG_NOSIGNAL);
  } while (sent < 0 && errno == EINTR);
  if (sent != static_cast<ssize_t>(packet.size())) return tl::unexpected(worker_gone("was gone before the request", log_tail_of));

  // The reply, or the worker's end: the tasks it forks hold its socket until they are almost
  // restored, so a worker that dies mid-restore leaves the socket open and only its exit tells.
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) {
      const auto killed = child_.wait(milliseconds(0));  // it and the tree it was making
      const std::size_t n = (killed ? killed->descendants_killed : 0) + end_orphans();
      return tl::unexpected(failed(Errc::timeout,
                                   "timed out after " + std::to_string(timeout.count()) + " ms; killed with the " +
                                       std::to_string(n) + (n == 1 ? " process" : " processes") + " it had started",
                                   log_tail_of));
    }
    const int exit_fd = child_.exit_fd();
    pollfd p[2] = {{socket_.get(), POLLIN, 0}, {exit_fd, POLLIN, 0}};
    const long long bound = exit_fd >= 0 ? 1'000 : kExitPollWithoutPidfd.count();
    const int n = ::poll(p, exit_fd >= 0 ? 2 : 1, static_cast<int>(std::min<long long>(left, bound)));
    if (n < 0 && errno != EINTR) return fail_errno(Errc::io, "poll criu swrk socket", errno);
    if (n > 0 || (exit_fd < 0 && child_.try_wait())) break;
  }
  std::vector<std::byte> reply(kMaxReply);
  ssize_t got;
  do {
    got = ::recv(socket_.get(), reply.data(), reply.size(), MSG_TRUNC | MSG_DONTWAIT);
  } while (got < 0 && errno == EINTR);
  // Nothing queued (EAGAIN) with the worker gone, or the socket's end (0): no reply will come.
  if (got <= 0) return tl::unexpected(worker_gone("exited without replying", log_tail_of));
  if (static_cast<std::size_t>(got) > reply.size()) {
    return tl::unexpected(failed(Errc::corrupt, "criu swrk sent a reply of " + std::to_string(got) + " bytes", log_tail_of));
  }
  reply.resize(static_cast<std::size_t>(got));
  auto decoded = decode_restore_reply(reply);
  // It has replied: it exits now (a restored tree is detached, reparented to our subreaper).
  const auto status = child_.wait(kExitAfterReply);
  if (!decoded) return tl::unexpected(failed(decoded.error().code, decoded.error().message, log_tail_of));
  if (!decoded->success) {
    std::string why = "criu: " + (decoded->message.empty() ? std::string("no reason given") : decoded->message);
    if (decoded->cr_errno != 0) why += std::string(", ") + std::strerror(decoded->cr_errno);
    return tl::unexpected(failed(Errc::io, why, log_tail_of));
  }
  if (status && status->timed_out) {
    return tl::unexpected(failed(Errc::timeout,
                                 "criu swrk restored pid " + std::to_string(decoded->pid) + " but did not exit within " +
                                     std::to_string(kExitAfterReply.count()) + " ms; killed with what it had started",
                                 log_tail_of));
  }
  return decoded->pid;
}

}  // namespace snaptier::mechanism
