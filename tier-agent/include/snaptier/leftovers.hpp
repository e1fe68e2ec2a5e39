// What an agent that was killed (SIGKILL, OOM, a crash) leaves on its host, ended by the next
// agent before it serves anything: CRIU processes working in its work_dir (a `criu restore`
// or `criu lazy-pages` of a restore in flight), restored trees that were still stopped or
// waiting for pages (their lazy-pages server died with the agent: left alone they stay
// stopped forever, or run on with pages that will never come), function instances it started,
// and the work_dir folders of those operations.
//
// The work_dir is the record: every process the agent starts or restores carries a path in one
// of its operation folders (restores/, snapshots/, serve/) in its command line (criu's -D/-W,
// start-function's and the runtime's --socket), and each restore writes its tree's root pid
// into restores/<name>/pid. A restore that finished with
// `keep` has removed its images/ folder; its instance is left running.
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <string>
#include <vector>

namespace snaptier::leftovers {

struct SweepReport {
  std::vector<std::string> killed;      // "pid N (what)": each process sent SIGKILL
  std::vector<std::string> removed;     // folders removed from work_dir
  std::vector<std::string> kept;        // instances of `keep` restores left running
  std::vector<std::string> problems;    // what could not be ended or removed
};

// Bounded (a few seconds at most: SIGKILL, then a wait for the processes to vanish). `self` is
// never killed (nor any process of its own pid namespace that is an ancestor of it).
[[nodiscard]] SweepReport sweep(const std::filesystem::path& work_dir, pid_t self);

}  // namespace snaptier::leftovers
