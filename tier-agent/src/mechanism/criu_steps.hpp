// Steps of running CRIU that the mechanisms and the snapshot side share: a bounded criu run
// with its log's tail in the error, the pid file, the lazy-pages socket, killing a tree.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "snaptier/error.hpp"
#include "snaptier/process.hpp"

namespace snaptier::mechanism {

[[nodiscard]] Result<pid_t> read_pid_file(const std::filesystem::path& path);
// VmRSS of `pid`, 0 if it is gone.
[[nodiscard]] std::uint64_t rss_bytes(pid_t pid);
[[nodiscard]] std::uint64_t thread_count(pid_t pid);  // its Threads:, 0 if gone
// SIGKILL to a restored tree: its root (the init of its pid namespace, which takes the rest
// of the namespace with it) and every process below it wherever it is (proc::kill_tree), then
// a bounded wait for each to exit.
void kill_tree(pid_t root) noexcept;
[[nodiscard]] std::string tail_of(const std::filesystem::path& log);
// `argv` run to completion within `timeout`; a failure names `what` and ends with the log's tail.
// On a timeout criu is killed with every process below it (proc::Child::wait): for a restore,
// the tasks it had created, which otherwise run on.
[[nodiscard]] Result<void> run_criu(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                                    const std::filesystem::path& log, std::string_view what,
                                    const proc::SpawnOptions& options = {});
// Before every `criu restore` of the agent, run or sent to a worker: the images in `images_dir`
// are checked (criu::check_pages_files: a short pages file is refused, Errc::corrupt, and criu
// never runs).
[[nodiscard]] Result<void> check_images_before_restore(const std::filesystem::path& images_dir, std::string_view what);
// check_images_before_restore, then run_criu.
[[nodiscard]] Result<void> run_criu_restore(const std::filesystem::path& images_dir, const std::vector<std::string>& argv,
                                            std::chrono::milliseconds timeout, const std::filesystem::path& log,
                                            std::string_view what, const proc::SpawnOptions& options = {});
// Spawn options for a `criu restore` whose restored function binds its socket in `socket_dir`
// (where the dumped instance had it): the restore runs in a mount namespace of its own with
// `instance_dir` mounted there, so the socket appears in `instance_dir` and concurrent
// instances of one snapshot never see each other's. Both directories are created.
[[nodiscard]] Result<proc::SpawnOptions> instance_socket_mount(const std::filesystem::path& instance_dir,
                                                            const std::filesystem::path& socket_dir);
// Until `path` is a socket, `daemon` exits (an error with its log's tail) or `timeout` runs out.
[[nodiscard]] Result<void> wait_for_socket(const std::filesystem::path& path, proc::Child& daemon,
                                           std::chrono::milliseconds timeout, const std::filesystem::path& log);
[[nodiscard]] std::string to_hex(std::span<const std::byte> bytes);
[[nodiscard]] Result<std::vector<std::byte>> from_hex(const std::string& text);
// Is something listening on TCP `port` (any address)? From /proc/net/tcp{,6}: connecting to
// find out would use up the page server's one connection.
[[nodiscard]] bool tcp_listening(std::uint16_t port);

}  // namespace snaptier::mechanism
