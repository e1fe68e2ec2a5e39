// The agent's side of the function protocol (docs/functions.md): function folders, starting an
// instance with workloads/bin/start-function, and framed-JSON calls on its Unix socket.
// Mirrors workloads/runtime/function_folder.py, function_protocol.py and workloads/bin/invoke.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "snaptier/error.hpp"

namespace snaptier::function {

// The frame limit of the protocol (the runtime's default --max-frame-bytes).
inline constexpr std::size_t kMaxFrameBytes = 16 * 1024 * 1024;

struct FunctionSpec {
  std::string name;                 // folder name (function.toml's `name` if it has one, as the runtime does)
  std::filesystem::path dir;        // absolute
  std::string description;
  nlohmann::json example_input;     // [example] input, TOML -> JSON (object); null if the folder has none
  nlohmann::json expect;            // [example.expect] (object, maybe empty)
  nlohmann::json config;            // [config] (object, maybe empty): what init(config) gets
};
// Parses function.toml with toml++. Errc::not_found (no folder / no function.toml),
// Errc::invalid_argument (TOML syntax with file:line:column, or a key of the wrong type).
// TOML dates and times become ISO 8601 strings.
[[nodiscard]] Result<FunctionSpec> load_spec(const std::filesystem::path& function_dir);
// Names of the folders with a function.toml, sorted. Errc::not_found if the dir is missing.
[[nodiscard]] Result<std::vector<std::string>> list_functions(const std::filesystem::path& workloads_dir);

struct Instance {
  pid_t pid = 0;                     // host-side pid of the instance (the pid namespace's init): what criu dump -t takes
  std::filesystem::path socket;
  std::filesystem::path ready_file;
  double init_ms = 0;
  double startup_ms = 0;
};
// Runs `<workloads_dir>/bin/start-function <dir> --pidns --socket <work_dir>/instance.sock
// --ready <work_dir>/ready --log <work_dir>/start.log --timeout S` (S = timeout rounded up to
// seconds; start-function's own output goes to <work_dir>/start-function.log) and parses the
// ready file (JSON). Errors carry the log tail. The instance is detached (own session, own pid
// namespace): stop it with stop() or kill(pid, SIGKILL).
[[nodiscard]] Result<Instance> start(const std::filesystem::path& workloads_dir, const FunctionSpec& spec,
                                     const std::filesystem::path& work_dir, std::chrono::milliseconds timeout);
// Addition: SIGKILL the instance's pid (with --pidns its whole namespace dies), wait until it is
// gone (Errc::timeout otherwise) and remove its socket file (the starter owns the path).
[[nodiscard]] Result<void> stop(const Instance& instance, std::chrono::milliseconds timeout);

// One request/response over the framed-JSON Unix socket (4-byte big-endian length + JSON object)
// on a fresh connection, closed afterwards. Connect, send and receive all bounded by `timeout`
// (total). Errc::timeout; Errc::io (no socket, refused, reset); Errc::protocol (the instance
// closed without a response, a cut frame, a frame over kMaxFrameBytes, not JSON, not an object);
// Errc::invalid_argument (request not serializable or too big, socket path too long).
[[nodiscard]] Result<nlohmann::json> call(const std::filesystem::path& socket, const nlohmann::json& request,
                                          std::chrono::milliseconds timeout);

struct InvokeResult {
  nlohmann::json response;
  double round_trip_ms = 0;            // connect to response, as the client saw it
  std::vector<std::string> problems;   // "ok is false: <error>", "output.checksum = 5, expected 7", missing fields...
};
// Sends {"id": 1, "input": spec.example_input} and checks the response against spec.expect.
// An answer that is wrong is problems, not an error; errors are call()'s, or invalid_argument
// when the spec has no example input.
[[nodiscard]] Result<InvokeResult> invoke_example(const std::filesystem::path& socket, const FunctionSpec& spec,
                                                  std::chrono::milliseconds timeout);
// Problems with `output` against [example.expect], as `invoke --check` (function_folder.py's
// check_expected) finds them: every expected key must be present and equal by Python's `==`
// (so 1 == 1.0 == true, 64-bit hex strings compare as strings and never equal a number, tables
// and arrays compare whole: an extra key in a nested output object is a mismatch).
[[nodiscard]] std::vector<std::string> check_expect(const nlohmann::json& output, const nlohmann::json& expect);
// Python's `a == b` for JSON values (the comparison check_expect uses).
[[nodiscard]] bool python_equal(const nlohmann::json& a, const nlohmann::json& b);
// The "digest" op's sha256 (64 hex digits). Errc::protocol if the instance answers ok=false or
// without a sha256.
[[nodiscard]] Result<std::string> digest(const std::filesystem::path& socket, std::chrono::milliseconds timeout);

}  // namespace snaptier::function
