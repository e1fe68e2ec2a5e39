#include "snaptier/leftovers.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "snaptier/process.hpp"

namespace snaptier::leftovers {

namespace fs = std::filesystem;

namespace {

// A restore's tree is created by criu at most this long before criu writes its pid file (the
// agent's own bound on one operation is 900 s by default).
constexpr std::chrono::seconds kMaxRestoreDuration{3600};
constexpr std::chrono::seconds kGoneTimeout{5};

struct Proc {
  pid_t pid = 0;
  pid_t ppid = 0;
  char state = '?';
  bool ns_init = false;        // pid 1 of a pid namespace below ours
  std::string pidns;           // readlink of /proc/PID/ns/pid
  std::vector<std::string> argv;
  double start_unix = 0;       // when the process was created
};

double boot_unix() {
  std::ifstream in("/proc/stat");
  std::string key;
  double value = 0;
  while (in >> key) {
    if (key == "btime" && in >> value) return value;
    in.ignore(1 << 20, '\n');
  }
  return 0;
}

std::optional<Proc> read_proc(pid_t pid, double boot) {
  const fs::path dir = "/proc/" + std::to_string(pid);
  Proc p;
  p.pid = pid;
  {
    const std::string stat = proc::read_proc_file(dir / "stat");
    const auto close = stat.rfind(')');
    if (close == std::string::npos) return std::nullopt;
    std::istringstream fields(stat.substr(close + 2));
    std::vector<std::string> f;
    for (std::string x; fields >> x;) f.push_back(x);
    if (f.size() < 20) return std::nullopt;
    p.state = f[0].empty() ? '?' : f[0][0];
    p.ppid = static_cast<pid_t>(std::stol(f[1]));
    // Field 22 of stat (index 19 after the comm): start time in clock ticks since boot.
    p.start_unix = boot + std::stod(f[19]) / static_cast<double>(::sysconf(_SC_CLK_TCK));
  }
  {
    std::istringstream in(proc::read_proc_file(dir / "status"));
    for (std::string line; std::getline(in, line);) {
      if (line.rfind("NSpid:", 0) == 0) {
        std::istringstream ids(line.substr(6));
        std::vector<long> ns;
        for (long id; ids >> id;) ns.push_back(id);
        p.ns_init = ns.size() > 1 && ns.back() == 1;
      }
    }
  }
  {
    const std::string raw = proc::read_proc_file(dir / "cmdline");
    std::string arg;
    for (char c : raw) {
      if (c == '\0') {
        p.argv.push_back(arg);
        arg.clear();
      } else {
        arg += c;
      }
    }
    if (!arg.empty()) p.argv.push_back(arg);
  }
  std::error_code ec;
  p.pidns = fs::read_symlink(dir / "ns" / "pid", ec).string();
  return p;
}

std::map<pid_t, Proc> all_processes() {
  std::map<pid_t, Proc> out;
  const double boot = boot_unix();
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator("/proc", ec)) {
    const std::string name = entry.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(name));
    if (auto p = read_proc(pid, boot)) out[pid] = std::move(*p);
  }
  return out;
}

bool starts_under(const std::string& text, std::size_t from, const std::string& root) {
  return text.compare(from, root.size(), root) == 0 && text.size() > from + root.size() && text[from + root.size()] == '/';
}

// "ROOT/..." or "--option=ROOT/..." for one of `roots`.
bool names_path_under(const Proc& p, const std::vector<std::string>& roots) {
  for (const auto& arg : p.argv) {
    for (const auto& root : roots) {
      if (starts_under(arg, 0, root)) return true;
      for (auto at = arg.find('='); at != std::string::npos; at = arg.find('=', at + 1)) {
        if (starts_under(arg, at + 1, root)) return true;
      }
    }
  }
  return false;
}

std::string describe(const Proc& p) {
  std::string what = p.argv.empty() ? "?" : fs::path(p.argv[0]).filename().string();
  for (std::size_t i = 1; i < p.argv.size() && i < 3; ++i) what += " " + p.argv[i];
  return "pid " + std::to_string(p.pid) + " (" + what + (p.state == 'T' || p.state == 't' ? ", stopped" : "") + ")";
}

// The root of what must die with `p`: the init of its pid namespace when that namespace is
// below ours (the kernel ends the rest of it), else the process itself.
pid_t kill_target(const std::map<pid_t, Proc>& procs, const Proc& p, const std::string& own_ns) {
  if (p.pidns == own_ns) return p.pid;
  const Proc* top = &p;
  for (int depth = 0; depth < 4096 && !top->ns_init; ++depth) {
    auto parent = procs.find(top->ppid);
    if (parent == procs.end() || parent->second.pidns != p.pidns) break;
    top = &parent->second;
  }
  return top->ns_init ? top->pid : p.pid;
}

// The live process a pid file names, if it is the one that was written there (not a later
// process that reused the pid): created before the file was written, and not long before.
std::optional<pid_t> recorded_pid(const fs::path& pid_file, const std::map<pid_t, Proc>& procs) {
  std::ifstream in(pid_file);
  long pid = 0;
  if (!(in >> pid) || pid <= 0) return std::nullopt;
  auto it = procs.find(static_cast<pid_t>(pid));
  if (it == procs.end() || it->second.state == 'Z') return std::nullopt;
  struct stat st {};
  if (::stat(pid_file.c_str(), &st) != 0) return std::nullopt;
  const double written_unix = static_cast<double>(st.st_mtim.tv_sec) + st.st_mtim.tv_nsec / 1e9;
  // btime has a resolution of one second.
  const double start = it->second.start_unix;
  if (start > written_unix + 2 || start < written_unix - static_cast<double>(kMaxRestoreDuration.count())) {
    return std::nullopt;
  }
  return static_cast<pid_t>(pid);
}

bool gone(pid_t pid) {
  if (::kill(pid, 0) != 0) return errno == ESRCH;
  const std::string stat = proc::read_proc_file("/proc/" + std::to_string(pid) + "/stat");
  const auto close = stat.rfind(')');
  return close != std::string::npos && close + 2 < stat.size() && stat[close + 2] == 'Z';
}

}  // namespace

SweepReport sweep(const fs::path& work_dir, pid_t self) {
  SweepReport report;
  std::error_code ec;
  const fs::path root = fs::absolute(work_dir, ec).lexically_normal();
  if (ec || !fs::is_directory(root, ec)) return report;
  std::string root_text = root.string();
  while (root_text.size() > 1 && root_text.back() == '/') root_text.pop_back();

  const auto procs = all_processes();
  const auto me = procs.find(self);
  const std::string own_ns = me != procs.end() ? me->second.pidns : std::string();
  std::set<pid_t> spare{self};
  for (pid_t up = self; procs.contains(up) && up > 1;) {  // our own ancestors
    up = procs.at(up).ppid;
    spare.insert(up);
  }

  // 1. The folders of operations in flight when the agent died, and their recorded trees.
  std::set<pid_t> targets;
  std::set<std::string> kept_namespaces;
  std::vector<fs::path> remove;
  for (const char* kind : {"restores", "snapshots", "serve"}) {
    for (const auto& entry : fs::directory_iterator(root / kind, ec)) {
      if (!entry.is_directory()) continue;
      const fs::path dir = entry.path();
      // A restore's tree is in DIR/pid, a profiling restore's in DIR/profile/pid.
      std::optional<pid_t> tree;
      for (const fs::path& pid_file : {dir / "pid", dir / "profile" / "pid"}) {
        if (!tree) tree = recorded_pid(pid_file, procs);
      }
      const bool finished_and_kept = std::string(kind) == "restores" && !fs::exists(dir / "images") && tree;
      if (finished_and_kept) {
        kept_namespaces.insert(procs.at(*tree).pidns);
        spare.insert(*tree);
        report.kept.push_back(describe(procs.at(*tree)) + " of " + dir.filename().string());
        continue;
      }
      if (tree) targets.insert(kill_target(procs, procs.at(*tree), own_ns));
      remove.push_back(dir);
    }
  }
  // 2. Every other process that names a path in the folders the agent's operations make:
  //    criu restore / lazy-pages / dump (-D, -W), start-function and the function runtime
  //    (--socket, --ready, --log), and the restored copies of those instances (criu restores
  //    their command lines). Only those folders, not all of work_dir: a work_dir set to a
  //    shared directory such as /tmp must not make every process naming it a target.
  const std::vector<std::string> roots{root_text + "/restores", root_text + "/snapshots", root_text + "/serve"};
  for (const auto& [pid, p] : procs) {
    if (spare.contains(pid) || p.state == 'Z' || kept_namespaces.contains(p.pidns)) continue;
    if (!names_path_under(p, roots)) continue;
    const pid_t target = kill_target(procs, p, own_ns);
    if (!spare.contains(target)) targets.insert(target);
  }

  for (pid_t pid : targets) {
    auto it = procs.find(pid);
    if (::kill(pid, SIGKILL) == 0) {
      report.killed.push_back(it != procs.end() ? describe(it->second) : "pid " + std::to_string(pid));
    } else if (errno != ESRCH) {
      report.problems.push_back("kill pid " + std::to_string(pid) + ": " + std::strerror(errno));
    }
  }
  const auto deadline = std::chrono::steady_clock::now() + kGoneTimeout;
  for (pid_t pid : targets) {
    while (!gone(pid) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (!gone(pid)) report.problems.push_back("pid " + std::to_string(pid) + " survived SIGKILL for 5 s");
  }
  for (const fs::path& dir : remove) {
    fs::remove_all(dir, ec);
    if (ec) {
      report.problems.push_back("remove " + dir.string() + ": " + ec.message());
    } else {
      report.removed.push_back(dir.string());
    }
  }
  return report;
}

}  // namespace snaptier::leftovers
