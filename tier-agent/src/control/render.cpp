// tierctl's human output. Reads results defensively (value() with defaults): a newer agent may
// add fields, and rendering must never throw on a result it only partly understands.
#include <cctype>
#include <cstdio>
#include <iomanip>
#include <ctime>
#include <algorithm>
#include <string>
#include <vector>
#include <sstream>

#include "core/utc_time.hpp"
#include "snaptier/control.hpp"

namespace snaptier::control {

using nlohmann::json;

namespace {

std::string human_bytes(std::uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024 && unit < 4) {
    value /= 1024;
    ++unit;
  }
  char text[32];
  if (unit == 0) {
    std::snprintf(text, sizeof text, "%llu B", static_cast<unsigned long long>(bytes));
  } else {
    std::snprintf(text, sizeof text, "%.1f %s", value, kUnits[unit]);
  }
  return text;
}

std::uint64_t u64(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_number_unsigned() ? it->get<std::uint64_t>() : 0;
}

std::string str(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end()) return "-";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_null()) return "-";
  return it->dump();
}

std::string yes_no(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() && it->get<bool>() ? "yes" : "no";
}

std::string tiers_summary(const json& bytes_per_tier) {
  if (!bytes_per_tier.is_object() || bytes_per_tier.empty()) return "-";
  std::string text;
  for (auto it = bytes_per_tier.begin(); it != bytes_per_tier.end(); ++it) {
    if (!text.empty()) text += ", ";
    text += it.key() + " " + human_bytes(it->is_number_unsigned() ? it->get<std::uint64_t>() : 0);
  }
  return text;
}

// Left-aligned columns sized to their widest cell.
std::string table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> widths;
  for (const auto& row : rows) {
    widths.resize(std::max(widths.size(), row.size()));
    for (std::size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  std::ostringstream out;
  for (const auto& row : rows) {
    std::string line;
    for (std::size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(widths[i] - row[i].size() + 2, ' ');
    }
    out << line << "\n";
  }
  return out.str();
}

std::string render_status(const json& r) {
  std::ostringstream out;
  out << "host:         " << str(r, "host") << "\n"
      << "role:         " << str(r, "role") << "\n"
      << "default tier: " << str(r, "default_tier") << "\n"
      << "snapshots:    " << str(r, "snapshots") << "\n";
  if (auto it = r.find("store_error"); it != r.end()) out << "store error:  " << str(*it, "message") << "\n";
  std::vector<std::vector<std::string>> rows{{"TIER", "STATE", "CAPACITY", "USED", "READS", "WRITES", "SOURCE / ERROR"}};
  for (const auto& tier : r.value("tiers", json::array())) {
    const json stats = tier.value("stats", json::object());
    std::string source = str(tier, "source");
    if (auto error = tier.find("error"); error != tier.end()) source += ": " + str(*error, "message");
    const bool up = tier.value("up", false);
    // Agents from before tier states report only "up".
    std::string state = tier.contains("state") ? str(tier, "state") : (up ? "up" : "down");
    if (auto reconnect = tier.find("reconnect"); reconnect != tier.end() && reconnect->is_object()) {
      source += "; " + state + " since " + detail::utc_time(u64(*reconnect, "since_unix_ms")) + ", attempt " +
                std::to_string(u64(*reconnect, "attempt"));
      if (reconnect->contains("next_attempt_unix_ms")) {
        source += ", next " + detail::utc_time(u64(*reconnect, "next_attempt_unix_ms"));
      }
      source += ": " + str(*reconnect, "last_error");
    }
    if (state != "up") std::transform(state.begin(), state.end(), state.begin(), ::toupper);
    rows.push_back({str(tier, "kind"), state, up ? human_bytes(u64(stats, "capacity_bytes")) : "-",
                    up ? human_bytes(u64(stats, "used_bytes")) : "-", up ? std::to_string(u64(stats, "reads")) : "-",
                    up ? std::to_string(u64(stats, "writes")) : "-", source});
  }
  out << "\n" << table(rows);
  if (auto in_place = r.find("in_place"); in_place != r.end()) {
    out << "\nin place:     ";
    if (auto d = in_place->find("device"); d != in_place->end()) {
      out << str(*d, "name") << " (" << str(*d, "mode") << ", " << human_bytes(u64(*d, "size_bytes")) << ", align "
          << human_bytes(u64(*d, "align_bytes")) << ", " << u64(*d, "ranges") << " physical range(s)): ";
    }
    out << (in_place->value("can_map", false) ? "yes, mapped from " + str(*in_place, "file")
                                              : "no (" + str(*in_place, "reason") + ")")
        << "\n";
  }
  if (auto pool = r.find("rdma_pool"); pool != r.end()) {
    if (pool->value("up", false)) {
      const json stats = pool->value("stats", json::object());
      out << "\nrdma pool: " << human_bytes(u64(stats, "used_bytes")) << " of "
          << human_bytes(u64(stats, "capacity_bytes")) << " lent, epoch " << u64(*pool, "epoch") << "\n";
      if (pool->contains("origin")) out << "           " << str(*pool, "origin") << "\n";
    } else {
      out << "\nrdma pool: DOWN: " << str(pool->value("error", json::object()), "message") << "\n";
    }
  }
  return out.str();
}

std::string render_info(const json& r) {
  std::ostringstream out;
  out << "id:          " << str(r, "id") << "\n"
      << "owner:       " << str(r, "owner_host") << "\n"
      << "pages:       " << u64(r, "pages") << " (" << u64(r, "zero_pages") << " zero, " << u64(r, "hot_pages")
      << " hot)\n"
      << "tiers:       " << tiers_summary(r.value("bytes_per_tier", json::object())) << "\n"
      << "published:   " << yes_no(r, "published") << "\n";
  if (r.contains("lost")) out << "LOST:        " << str(r, "lost") << "\n";
  if (r.contains("vaddr_first")) {
    char range[64];
    std::snprintf(range, sizeof range, "0x%llx - 0x%llx", static_cast<unsigned long long>(u64(r, "vaddr_first")),
                  static_cast<unsigned long long>(u64(r, "vaddr_last")));
    out << "vaddr:       " << range << "\n";
  }
  const json blobs = r.value("blobs", json::object());
  out << "metadata:    ";
  if (blobs.empty()) out << "-";
  bool first = true;
  for (auto it = blobs.begin(); it != blobs.end(); ++it) {
    out << (first ? "" : ", ") << it.key() << " (" << human_bytes(it->is_number_unsigned() ? it->get<std::uint64_t>() : 0)
        << ")";
    first = false;
  }
  out << "\n";
  return out.str();
}

std::string ms_or_dash(const json& j, const char* key) {
  if (!j.contains(key) || !j[key].is_number()) return "-";
  std::ostringstream out;
  out << std::fixed << std::setprecision(0) << j[key].get<double>();
  return out.str();
}

std::string render_burst(const json& r) {
  const json b = r.value("burst", json::object());
  std::ostringstream out;
  out << "burst of " << u64(b, "instances") << " x " << str(r, "snapshot") << " on " << str(r, "host") << " with "
      << str(r, "policy") << ": " << u64(b, "ok") << " ok, " << u64(b, "failed") << " failed, " << u64(b, "busy")
      << " busy; first answer " << ms_or_dash(b, "first_answer_ms") << " ms, last " << ms_or_dash(b, "last_answer_ms")
      << " ms; local anonymous memory " << (u64(b, "local_anonymous_bytes_sum") >> 20) << " MiB summed\n";
  std::vector<std::vector<std::string>> rows{{"#", "OK", "ANSWERED AT MS", "FIRST RESPONSE MS", "FAULTS", "ANON MIB", "ERROR"}};
  for (const auto& i : r.value("instances", json::array())) {
    const bool busy = i.value("busy", false);
    rows.push_back({std::to_string(u64(i, "index")), busy ? "busy" : (i.value("ok", false) ? "ok" : "FAILED"),
                    ms_or_dash(i, "answered_at_ms"), ms_or_dash(i, "first_response_ms"),
                    i.contains("faults") && i["faults"].is_object() ? std::to_string(u64(i["faults"], "total")) : "-",
                    std::to_string(u64(i, "local_anonymous_bytes") >> 20),
                    i.value("ok", false) ? "" : str(i, "error")});
  }
  return out.str() + table(rows);
}

}  // namespace

std::string render_result(const Command& command, const json& r) {
  return std::visit(
      [&](const auto& c) -> std::string {
        using T = std::decay_t<decltype(c)>;
        if constexpr (std::is_same_v<T, Ping>) {
          return "pong from " + str(r, "host") + "\n";
        } else if constexpr (std::is_same_v<T, Status>) {
          return render_status(r);
        } else if constexpr (std::is_same_v<T, SnapshotPut>) {
          return "stored " + str(r, "id") + ": " + std::to_string(u64(r, "pages")) + " pages (" +
                 std::to_string(u64(r, "zero_pages")) + " zero) on " +
                 tiers_summary(r.value("bytes_per_tier", json::object())) + ", published: " + yes_no(r, "published") +
                 "\n";
        } else if constexpr (std::is_same_v<T, SnapshotList>) {
          std::vector<std::vector<std::string>> rows{{"ID", "OWNER", "PAGES", "ZERO", "TIERS", "PUBLISHED", "STATE"}};
          std::string lost;
          for (const auto& info : r.value("snapshots", json::array())) {
            const bool is_lost = info.contains("lost");
            rows.push_back({str(info, "id"), str(info, "owner_host"), std::to_string(u64(info, "pages")),
                            std::to_string(u64(info, "zero_pages")),
                            tiers_summary(info.value("bytes_per_tier", json::object())), yes_no(info, "published"),
                            is_lost ? "LOST" : "ok"});
            if (is_lost) lost += "  " + str(info, "id") + ": " + str(info, "lost") + "\n";
          }
          if (rows.size() == 1) return "no snapshots\n";
          return table(rows) + (lost.empty() ? "" : "lost (not restorable):\n" + lost);
        } else if constexpr (std::is_same_v<T, SnapshotInfoQuery>) {
          return render_info(r);
        } else if constexpr (std::is_same_v<T, SnapshotRead>) {
          return "wrote " + std::to_string(u64(r, "bytes")) + " bytes (" + std::to_string(u64(r, "pages")) +
                 " pages, " + std::to_string(u64(r, "mapped_pages")) + " straight from mapped tiers) to " +
                 str(r, "path") + "\nsha256 " + str(r, "sha256") + "\n";
        } else if constexpr (std::is_same_v<T, SnapshotDelete>) {
          return "deleted " + str(r, "id") + "\n";
        } else if constexpr (std::is_same_v<T, FunctionSnapshot>) {
          std::ostringstream out;
          const json profile = r.value("profile", json::object());
          out << "snapshot " << str(r, "id") << " of " << str(r, "function") << " on " << str(r, "host") << ": "
              << u64(r, "pages") << " pages (" << u64(r, "zero_pages") << " zero), profile: " << u64(profile, "hot")
              << " hot (" << u64(profile, "written") << " written, " << u64(profile, "read_only") << " read-only), "
              << u64(profile, "cold") << " cold\n";
          for (const auto& v : r.value("variants", json::array())) {
            out << "  " << str(v, "id") << " (" << str(v, "placement") << ", cold pages in " << str(v, "cold_tier")
                << "): " << tiers_summary(v.value("bytes_per_tier", json::object()))
                << (yes_no(v, "published") == "yes" ? "" : ", private to this host") << "\n";
          }
          for (const auto& s : r.value("skipped", json::array())) {
            out << "  no " << str(s, "placement") << " copy: " << str(s, "reason") << "\n";
          }
          return out.str();
        } else if constexpr (std::is_same_v<T, FunctionRestore>) {
          if (r.contains("burst")) return render_burst(r);
          std::ostringstream out;
          const bool ok = r.value("ok", false);
          out << (ok ? "ok" : "FAILED") << ": " << str(r, "snapshot") << " restored on " << str(r, "host") << " with "
              << str(r, "policy") << " (cold pages in " << str(r, "cold_tier") << ")";
          if (r.contains("restore_ms") && r["restore_ms"].is_number()) {
            out << ", restore " << r["restore_ms"].get<double>() << " ms";
          }
          if (r.contains("first_response_ms") && r["first_response_ms"].is_number()) {
            out << ", first response " << r["first_response_ms"].get<double>() << " ms";
          }
          if (r.contains("faults") && r["faults"].is_object()) out << ", " << u64(r["faults"], "total") << " faults";
          out << "\n";
          if (!ok) out << "  error: " << str(r, "error") << "\n";
          return out.str();
        } else if constexpr (std::is_same_v<T, FunctionInstances>) {
          std::vector<std::vector<std::string>> rows{{"ID", "SNAPSHOT", "POLICY", "PID", "ALIVE", "SOCKET"}};
          for (const auto& i : r.value("instances", json::array())) {
            rows.push_back({str(i, "id"), str(i, "snapshot"), str(i, "policy"), std::to_string(u64(i, "pid")),
                            yes_no(i, "alive"), str(i, "socket")});
          }
          return (rows.size() == 1 ? std::string("no instances left running\n") : table(rows)) + std::to_string(u64(r, "operations")) +
                 " function operation(s) in flight on " + str(r, "host") + " (bound " + std::to_string(u64(r, "max_operations")) + ")\n";
        } else if constexpr (std::is_same_v<T, FunctionKill>) {
          return str(r, "instance") + (yes_no(r, "killed") == "yes" ? " killed\n" : " had already exited; forgotten\n");
        } else {
          return r.dump(2) + "\n";
        }
      },
      command);
}

}  // namespace snaptier::control
