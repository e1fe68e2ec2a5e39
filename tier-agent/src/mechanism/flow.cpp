// The restore flow around a mechanism (include/snaptier/restore_mechanism.hpp): what every
// restore does to the restored copy, whatever brought it back.
#include <spdlog/spdlog.h>

#include "inplace/inplace.hpp"
#include "mechanism/criu_steps.hpp"
#include "snaptier/process.hpp"
#include "snaptier/restore_mechanism.hpp"

namespace snaptier::mechanism {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {
double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}
}  // namespace

void run_restore(RestoreMechanism& mechanism, const Invocation& invocation, RestoreResult& out) {
  auto failed = [&](const Error& e) {
    out.fail_with(e);
    spdlog::warn("restore {} ({}): {}", out.snapshot, out.policy, e.what());
  };
  std::error_code ec;
  if (!mechanism.private_socket_dir()) fs::create_directories(invocation.dumped_socket.parent_path(), ec);

  // 1. Images on local storage, daemons up. Not part of the timed restore.
  if (auto ok = mechanism.prepare(out); !ok) return failed(ok.error());

  // 2. The restore itself.
  const auto t0 = Clock::now();
  auto root = mechanism.restore();
  if (!root) return failed(root.error());
  RestoredTree tree(*root);  // killed on every return below unless kept
  out.restore_ms = ms_between(t0, Clock::now());

  // 3. Invoke and check the copy through its socket: CRIU bound it in the instance's own
  // directory (RestoreContext::socket_dir); without one, at the dumped path, moved aside.
  fs::path socket = mechanism.dir() / kInstanceDir / invocation.dumped_socket.filename();
  if (!mechanism.private_socket_dir()) {
    fs::create_directories(socket.parent_path(), ec);
    fs::rename(invocation.dumped_socket, socket, ec);
    if (ec) {
      return failed(Error{Errc::io, "move " + invocation.dumped_socket.string() + " to " + socket.string() + ": " + ec.message()});
    }
  }
  auto invoked = function::invoke_example(socket, invocation.spec, std::min(invocation.timeout, milliseconds(300'000)));
  const auto t_first = Clock::now();
  mechanism.at_first_response();
  if (invocation.at_first_answer) invocation.at_first_answer(invoked.has_value());
  out.local_memory_bytes = rss_bytes(tree.root());
  const inplace::MemoryUse memory = inplace::measure(tree.root(), mechanism.mapped_backing());
  out.local_anonymous_bytes = memory.local_anonymous_bytes;
  out.cxl_mapped_bytes = memory.cxl_mapped_bytes;
  out.mapped_cow_bytes = memory.mapped_cow_bytes;
  out.pages_mapped_in_place = mechanism.pages_mapped_in_place();
  if (invoked) {
    out.first_response_ms = ms_between(t0, t_first);
    out.invoke_ms = invoked->round_trip_ms;
    out.problems = invoked->problems;
    out.answer_ok = invoked->problems.empty();
    auto after = function::digest(socket, invocation.timeout);
    if (after) {
      out.digest_ok = *after == invocation.expected_digest;
      out.digest = *after;
    } else {
      out.problems.push_back("digest: " + after.error().message);
    }
    // The warm half of the limit. A function may keep state between requests, so a different
    // second answer is reported, not a failed restore: the first answer and the digest are the checks.
    if (out.answer_ok && out.digest_ok == true) {
      auto warm = function::invoke_example(socket, invocation.spec, std::min(invocation.timeout, milliseconds(300'000)));
      if (!warm) {
        out.limit_error = "warm invoke: " + warm.error().message;
      } else if (!warm->problems.empty()) {
        out.limit_error = "warm invoke answered differently: " + warm->problems.front();
      } else {
        out.warm_invoke_ms = warm->round_trip_ms;
      }
      if (warm && out.pages_mapped_in_place.value_or(0) > 0 && !mechanism.mapped_backing().empty()) {
        const inplace::MemoryUse later = inplace::measure(tree.root(), mechanism.mapped_backing());
        const std::uint64_t grown = later.mapped_cow_bytes > memory.mapped_cow_bytes ? later.mapped_cow_bytes - memory.mapped_cow_bytes : 0;
        out.cow_copies_after_first_response = grown / kPageSize;
      }
    }
  } else {
    out.problems.push_back("invoke: " + invoked.error().message);
  }

  // 4. Done with it (or leave it running, with every page installed).
  bool kept = false;
  if (invocation.keep && proc::is_running(tree.root())) {
    kept = true;
    out.instance = KeptInstance{tree.release(), socket.string()};
  } else {
    tree.kill();
  }
  mechanism.finish(kept, out);
  out.ok = out.answer_ok && out.digest_ok == true && out.problems.empty();
  if (!out.ok && !out.error) out.error = out.problems.empty() ? "restore failed" : out.problems.front();
}

Result<double> run_bare_restore(RestoreMechanism& mechanism) {
  RestoreResult scratch;
  if (auto ok = mechanism.prepare(scratch); !ok) return tl::unexpected(ok.error());
  const auto t0 = Clock::now();
  auto root = mechanism.restore();
  if (!root) return tl::unexpected(root.error());
  const double ms = ms_between(t0, Clock::now());
  RestoredTree(*root).kill();
  mechanism.finish(false, scratch);
  return ms;
}

}  // namespace snaptier::mechanism
