// The one rendering of a restore's result, and the owners of what a restore leaves on disk and
// in the process table (include/snaptier/restore_mechanism.hpp).
#include <spdlog/spdlog.h>

#include "mechanism/criu_steps.hpp"
#include "snaptier/restore_mechanism.hpp"

namespace snaptier::mechanism {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json tier_map(const std::map<TierKind, std::uint64_t>& m) {
  json j = json::object();
  for (const auto& [tier, n] : m) j[std::string(to_string(tier))] = n;
  return j;
}

template <class T>
void put(json& j, const char* key, const std::optional<T>& value) {
  if (value) j[key] = *value;
}

}  // namespace

void RestoreResult::fail_with(const Error& e) {
  ok = false;
  error = e.what();
}

json to_json(const RestoreResult& r) {
  json j{{"snapshot", r.snapshot}, {"variant", r.variant}, {"function", r.function}, {"policy", r.policy},
         {"mechanism", r.mechanism}, {"host", r.host}, {"ok", r.ok},
         {"error", r.error ? json(*r.error) : json(nullptr)}, {"missing", r.missing ? json(*r.missing) : json(nullptr)},
         {"answer_ok", r.answer_ok}, {"problems", r.problems},
         {"digest_ok", r.digest_ok ? json(*r.digest_ok) : json(nullptr)}, {"zero_pages", r.zero_pages},
         {"snapshot_pages", r.snapshot_pages}, {"snapshot_bytes_per_tier", tier_map(r.snapshot_bytes_per_tier)},
         {"cold_tier", r.cold_tier ? json(*r.cold_tier) : json(nullptr)}};
  put(j, "digest", r.digest);
  if (r.materialize) j["materialize"] = {{"ms", r.materialize->ms}, {"pages", r.materialize->pages}, {"bytes", r.materialize->bytes}};
  if (r.remote) {
    j["remote"] = {{"host", r.remote->host}, {"address", r.remote->address}, {"port", r.remote->port},
                   {"images_bytes", r.remote->images_bytes}, {"prepare_ms", r.remote->prepare_ms}, {"peer", r.remote->peer}};
  }
  if (r.in_place) j["in_place"] = inplace::to_json(*r.in_place);
  put(j, "restore_ms", r.restore_ms);
  put(j, "first_response_ms", r.first_response_ms);
  put(j, "invoke_ms", r.invoke_ms);
  put(j, "warm_invoke_ms", r.warm_invoke_ms);
  put(j, "bare_restore_ms", r.bare_restore_ms);
  put(j, "limit_error", r.limit_error);
  put(j, "local_memory_bytes", r.local_memory_bytes);
  put(j, "local_anonymous_bytes", r.local_anonymous_bytes);
  put(j, "cxl_mapped_bytes", r.cxl_mapped_bytes);
  put(j, "mapped_cow_bytes", r.mapped_cow_bytes);
  put(j, "pages_mapped_in_place", r.pages_mapped_in_place);
  put(j, "cow_copies_after_first_response", r.cow_copies_after_first_response);
  if (r.faults) {
    j["faults"] = *r.faults ? json{{"total", (*r.faults)->total}, {"read", (*r.faults)->read}, {"write", (*r.faults)->write},
                                   {"zero", (*r.faults)->zero}, {"service_ms", (*r.faults)->service_ms},
                                   {"per_tier", tier_map((*r.faults)->per_tier)}}
                            : json(nullptr);
  }
  if (r.bytes_moved_per_tier) j["bytes_moved_per_tier"] = tier_map(*r.bytes_moved_per_tier);
  put(j, "pages_prefetched", r.pages_prefetched);
  put(j, "pages_copied_before_resume", r.pages_copied_before_resume);
  put(j, "pages_background", r.pages_background);
  put(j, "prefetch_ms", r.prefetch_ms);
  put(j, "faults_after_digest", r.faults_after_digest);
  put(j, "lazy_pages", r.lazy_pages);
  if (r.server) {
    j["server"] = {{"error", r.server->error ? json(*r.server->error) : json(nullptr)},
                   {"drained_pages", r.server->drained_pages}};
  }
  if (r.instance) j["instance"] = {{"pid", r.instance->pid}, {"socket", r.instance->socket}};
  return j;
}

Result<WorkDir> WorkDir::create(fs::path path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  fs::create_directories(path, ec);
  if (ec) return fail(Errc::io, "create " + path.string() + ": " + ec.message());
  return WorkDir(std::move(path));
}

WorkDir::WorkDir(WorkDir&& other) noexcept
    : path_(std::exchange(other.path_, fs::path())), keep_(std::exchange(other.keep_, false)) {}

WorkDir& WorkDir::operator=(WorkDir&& other) noexcept {
  if (this != &other) {
    WorkDir dropped(std::move(*this));
    path_ = std::exchange(other.path_, fs::path());
    keep_ = std::exchange(other.keep_, false);
  }
  return *this;
}

WorkDir::~WorkDir() {
  if (path_.empty() || keep_) return;
  std::error_code ec;
  fs::remove_all(path_, ec);
  if (ec) spdlog::warn("could not remove {}: {}", path_.string(), ec.message());
}

void RestoredTree::kill() noexcept { kill_tree(std::exchange(root_, 0)); }

}  // namespace snaptier::mechanism
