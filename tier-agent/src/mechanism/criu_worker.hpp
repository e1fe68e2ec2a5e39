// A `criu swrk` worker started ahead of its restore: CRIU's RPC mode (the one libcriu uses),
// over a SOCK_SEQPACKET socketpair whose far end is the worker's fd 3. Loading criu (exec and
// the dynamic linking of its ~20 libraries) costs about 2 ms natively; a worker started while
// the restore is prepared pays it before the timed restore instead of inside it. The request is
// the same restore `criu restore -d --lazy-pages [--leave-stopped]` does (RPC restores are
// always detached), its log in the work directory as with the command line.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/unique_fd.hpp"
#include "snaptier/error.hpp"
#include "snaptier/process.hpp"

namespace snaptier::mechanism {

struct CriuRestoreRequest {
  std::filesystem::path images_dir;
  std::filesystem::path work_dir;        // CRIU's cwd: its log and the lazy-pages socket
  std::string log_file = "restore.log";  // in work_dir
  int log_level = 2;
  bool lazy_pages = false;
  bool leave_stopped = false;
};

// The wire form of a RESTORE request (criu_req with its criu_opts). Both directories go as the
// requesting process's descriptors (CRIU opens /proc/<peer>/fd/<n>): criu 4.1.1 readlink()s the
// images directory's path, so a plain path (criu_opts.images_dir) fails there.
[[nodiscard]] std::vector<std::byte> encode_restore_request(const CriuRestoreRequest& request, int images_dir_fd,
                                                            int work_dir_fd);

struct CriuRestoreReply {
  bool success = false;
  pid_t pid = -1;       // the restored root (success only)
  int cr_errno = 0;     // CRIU's errno for the failure, 0 if it gave none
  std::string message;  // cr_errmsg, if any
};
// A criu_resp to a RESTORE; Errc::corrupt for anything else (another type, bad wire data, a
// success without a pid).
[[nodiscard]] Result<CriuRestoreReply> decode_restore_reply(std::span<const std::byte> packet);

class CriuWorker {
 public:
  // `criu swrk 3` with `options` (its mount namespace, if any, is the restored tree's), its
  // output appended to `log`. Returns once it is spawned; it waits for the request.
  [[nodiscard]] static Result<CriuWorker> start(const std::string& criu, const std::filesystem::path& log,
                                                proc::SpawnOptions options = {});

  CriuWorker(CriuWorker&&) noexcept = default;
  CriuWorker& operator=(CriuWorker&&) noexcept = default;
  ~CriuWorker() = default;  // an unused or stuck worker is killed with what it made (proc::Child)

  // The restore, within `timeout`: the restored root's pid. A failure reads as run_criu's
  // ("criu restore failed (<what CRIU said, or how the worker ended>); end of <log>: <tail>");
  // on a timeout the worker is killed with every process below it; a worker that dies without
  // replying fails the restore as soon as it has exited, and the tasks it had forked are killed.
  // One request per worker.
  [[nodiscard]] Result<pid_t> restore(const CriuRestoreRequest& request, std::chrono::milliseconds timeout,
                                      const std::filesystem::path& log_tail_of);

  [[nodiscard]] pid_t pid() const noexcept { return child_.pid(); }

 private:
  CriuWorker(proc::Child child, detail::UniqueFd socket, ino_t socket_inode, ino_t mount_namespace,
             std::filesystem::path output)
      : child_(std::move(child)),
        socket_(std::move(socket)),
        socket_inode_(socket_inode),
        mount_namespace_(mount_namespace),
        output_(std::move(output)) {}
  [[nodiscard]] Error failed(Errc code, const std::string& how, const std::filesystem::path& log_tail_of) const;
  [[nodiscard]] Error worker_gone(std::string_view when, const std::filesystem::path& log_tail_of);
  // Kills what the worker forked and left (a worker that died mid-restore leaves its tasks
  // reparented and waiting for it forever): every process still holding its end of the socket
  // (CRIU's tasks until just before the restorer) and every process in its private mount
  // namespace (all of them, the restorer phase too). How many.
  std::size_t end_orphans();

  proc::Child child_;
  detail::UniqueFd socket_;
  ino_t socket_inode_ = 0;     // of the worker's end (its fd 3), which the tasks it forks inherit
  ino_t mount_namespace_ = 0;  // the worker's own, 0 if it runs in ours
  std::filesystem::path output_;  // the worker's stdout and stderr
  bool used_ = false;
};

}  // namespace snaptier::mechanism
