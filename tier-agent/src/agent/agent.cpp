// Request handlers: each op is a typed command in, a JSON result (docs/schema/control.schema.json)
// out. Files named in requests are on this agent's host; paths are absolute (checked at the edge).
#include "snaptier/agent.hpp"

#include <climits>
#include <algorithm>
#include <map>
#include <string>
#include <vector>
#include <fstream>

#include <spdlog/spdlog.h>

#include "agent/posix_file.hpp"
#include "control/sha256.hpp"

namespace snaptier {

using nlohmann::json;
using namespace agent_detail;

namespace {

// Metadata blobs (CRIU images, profiles) are small next to page data; the cap keeps one request
// from pulling an arbitrary file into the agent's memory.
constexpr std::uint64_t kMaxBlobBytes = 256ull << 20;
// Pages written per pwritev; well under IOV_MAX.
constexpr std::size_t kPagesPerWrite = 256;

json encode_info(const SnapshotInfo& info) {
  json bytes_per_tier = json::object();
  for (const auto& [kind, bytes] : info.bytes_per_tier) bytes_per_tier[std::string(control::tier_kind_name(kind))] = bytes;
  json result{{"id", info.id},
              {"owner_host", info.owner_host},
              {"created_unix_ns", info.created_unix_ns},
              {"pages", info.page_count},
              {"zero_pages", info.zero_pages},
              {"bytes_per_tier", bytes_per_tier},
              {"published", info.published}};
  if (!info.tier_epochs.empty()) {
    json epochs = json::object();
    for (const auto& [kind, epoch] : info.tier_epochs) epochs[std::string(control::tier_kind_name(kind))] = epoch;
    result["tier_epochs"] = std::move(epochs);
  }
  if (info.lost) result["lost"] = *info.lost;
  return result;
}

json encode_caps(const TierCaps& caps) {
  return json{{"byte_addressable", caps.byte_addressable},
              {"shared", caps.shared},
              {"remote", caps.remote},
              {"persistent", caps.persistent}};
}

json encode_stats(const TierStats& stats) {
  return json{{"capacity_bytes", stats.capacity_bytes}, {"used_bytes", stats.used_bytes},
              {"reads", stats.reads},                   {"writes", stats.writes},
              {"bytes_read", stats.bytes_read},         {"bytes_written", stats.bytes_written}};
}

json encode_error(const Error& error) {
  return json{{"code", control::errc_name(error.code)}, {"message", error.message}};
}

// The tier's state and, unless it is up, since when and why (TierStatus in the schema).
void encode_health(json& entry, const TierHealth& health) {
  entry["state"] = std::string(to_string(health.state));
  if (health.state == TierState::up) return;
  json reconnect{{"since_unix_ms", health.since_unix_ms}, {"attempt", health.attempt},
                 {"last_error", health.last_error}};
  if (health.next_attempt_unix_ms != 0) reconnect["next_attempt_unix_ms"] = health.next_attempt_unix_ms;
  entry["reconnect"] = std::move(reconnect);
}

Result<std::vector<std::byte>> read_blob(const std::string& name, const std::filesystem::path& path) {
  auto mapping = ReadOnlyMapping::open(path);
  if (!mapping) return fail(mapping.error().code, "metadata \"" + name + "\": " + mapping.error().message);
  if (mapping->bytes().size() > kMaxBlobBytes) {
    return fail(Errc::invalid_argument, "metadata \"" + name + "\": " + path.string() + " is larger than " +
                                            std::to_string(kMaxBlobBytes) + " bytes");
  }
  return std::vector<std::byte>(mapping->bytes().begin(), mapping->bytes().end());
}

}  // namespace

Agent::Agent(AgentParts parts) : parts_(std::move(parts)) {
  if (!parts_.default_tier) {
    for (TierKind kind : {TierKind::cxl, TierKind::local, TierKind::file, TierKind::rdma}) {
      auto slot = std::find_if(parts_.tiers.begin(), parts_.tiers.end(),
                               [&](const TierSlot& s) { return s.kind == kind && s.tier; });
      if (slot != parts_.tiers.end()) {
        parts_.default_tier = kind;
        break;
      }
    }
  }
}

Result<nlohmann::json> Agent::handle(const control::Command& command) {
  using namespace control;
  return std::visit(
      [this](const auto& c) -> Result<json> {
        using T = std::decay_t<decltype(c)>;
        if constexpr (std::is_same_v<T, Ping>) {
          return json{{"pong", true}, {"host", parts_.host}};
        } else if constexpr (std::is_same_v<T, Status>) {
          return status();
        } else if constexpr (std::is_same_v<T, SnapshotPut>) {
          return put(c);
        } else if constexpr (std::is_same_v<T, SnapshotList>) {
          return list();
        } else if constexpr (std::is_same_v<T, SnapshotInfoQuery>) {
          return info(c);
        } else if constexpr (std::is_same_v<T, SnapshotRead>) {
          return read(c);
        } else if constexpr (std::is_same_v<T, SnapshotDelete>) {
          return remove(c);
        } else if constexpr (std::is_same_v<T, RdmaConnect>) {
          auto pool = require_pool();
          if (!pool) return tl::unexpected(pool.error());
          auto grant = (*pool)->accept(c.client);
          if (!grant) return tl::unexpected(grant.error());
          return encode_grant(*grant);
        } else if constexpr (std::is_same_v<T, RdmaAlloc>) {
          auto pool = require_pool();
          if (!pool) return tl::unexpected(pool.error());
          auto extent = (*pool)->allocate(c.length);
          if (!extent) return tl::unexpected(extent.error());
          return encode_extent(*extent);
        } else if constexpr (std::is_same_v<T, RdmaFree>) {
          auto pool = require_pool();
          if (!pool) return tl::unexpected(pool.error());
          if (auto ok = (*pool)->release(c.extent); !ok) return tl::unexpected(ok.error());
          return json::object();
        } else if constexpr (std::is_same_v<T, FunctionSnapshot> || std::is_same_v<T, FunctionRestore>) {
          if (c.host && *c.host != parts_.host) {
            T local = c;
            local.host.reset();
            return forward(*c.host, local);
          }
          auto service = require_functions();
          if (!service) return tl::unexpected(service.error());
          if constexpr (std::is_same_v<T, FunctionSnapshot>) {
            return (*service)->snapshot(c);
          } else {
            return (*service)->restore(c);
          }
        } else if constexpr (std::is_same_v<T, FunctionServeLazy>) {
          auto service = require_functions();
          if (!service) return tl::unexpected(service.error());
          return (*service)->serve_lazy(c);
        } else if constexpr (std::is_same_v<T, FunctionInstances>) {
          auto service = require_functions();
          if (!service) return tl::unexpected(service.error());
          return (*service)->instances();
        } else if constexpr (std::is_same_v<T, FunctionKill>) {
          auto service = require_functions();
          if (!service) return tl::unexpected(service.error());
          return (*service)->kill(c);
        }
      },
      command);
}

Result<FunctionService*> Agent::require_functions() {
  if (!parts_.functions) {
    return fail(Errc::unsupported, "this agent (" + parts_.host + ") has no [functions] section in its config");
  }
  return parts_.functions.get();
}

Result<nlohmann::json> Agent::forward(const std::string& host, control::Command command) {
  auto peer = parts_.peers.find(host);
  if (peer == parts_.peers.end()) {
    std::string known;
    for (const auto& [name, address] : parts_.peers) known += (known.empty() ? "" : ", ") + name;
    return fail(Errc::not_found, "host '" + host + "' is not a peer of " + parts_.host +
                                     (known.empty() ? " (no [peers] configured)" : " (peers: " + known + ")"));
  }
  control::ClientOptions options;
  options.endpoint = peer->second;
  options.token = parts_.peer_token;
  options.connect_timeout = std::chrono::milliseconds(10'000);
  options.io_timeout = std::chrono::milliseconds(900'000);  // the peer bounds the operation itself
  return control::call_peer(host + " (" + peer->second.to_string() + ")", options, command);
}

Result<SnapshotStore*> Agent::require_store() {
  if (!parts_.store) return fail(Errc::unsupported, "this agent (" + parts_.host + ") has no snapshot store");
  return parts_.store.get();
}

Result<RdmaPoolServer*> Agent::require_pool() {
  if (parts_.pool) return parts_.pool.get();
  if (parts_.pool_problem) {
    return fail(Errc::unavailable, "the RDMA pool of " + parts_.host + " is down: " + parts_.pool_problem->what());
  }
  return fail(Errc::unsupported, parts_.host + " is not a memory node (rdma.* ops need role = \"memnode\")");
}

Result<void> Agent::detach() {
  parts_.cxl_announcer.reset();  // a refresh after the detach would announce a detached slot
  if (!parts_.cxl_directory) return {};
  return parts_.cxl_directory->detach();
}

Result<json> Agent::status() {
  json tiers = json::array();
  for (const auto& slot : parts_.tiers) {
    json entry{{"kind", control::tier_kind_name(slot.kind)}, {"source", slot.source}};
    if (slot.tier) {
      entry["name"] = std::string(slot.tier->name());
      entry["up"] = true;
      entry["caps"] = encode_caps(slot.tier->caps());
      entry["stats"] = encode_stats(slot.tier->stats());
      encode_health(entry, slot.tier->health());
      if (const std::uint64_t epoch = slot.tier->epoch(); epoch != 0) entry["epoch"] = epoch;
    } else {
      entry["up"] = false;
      entry["state"] = std::string(to_string(TierState::down));
      if (slot.problem) entry["error"] = encode_error(*slot.problem);
    }
    tiers.push_back(std::move(entry));
  }
  json result{{"host", parts_.host}, {"role", to_string(parts_.role)}, {"tiers", tiers}};
  if (parts_.in_place) result["in_place"] = inplace::to_json(*parts_.in_place);
  result["default_tier"] = parts_.default_tier ? json(control::tier_kind_name(*parts_.default_tier)) : json(nullptr);
  if (parts_.store) {
    auto snapshots = parts_.store->list();
    if (snapshots) {
      result["snapshots"] = snapshots->size();
    } else {
      // Status must work when something is broken: report it instead of failing.
      result["snapshots"] = nullptr;
      result["store_error"] = encode_error(snapshots.error());
    }
  } else {
    result["snapshots"] = nullptr;
  }
  if (parts_.functions) result["policies"] = parts_.functions->policies();
  if (parts_.pool) {
    const RdmaPoolState pool = parts_.pool->state();
    result["rdma_pool"] = json{{"up", true},
                               {"stats", encode_stats(parts_.pool->stats())},
                               {"epoch", pool.epoch},
                               {"path", pool.path.string()},
                               {"origin", pool.origin}};
  } else if (parts_.pool_problem) {
    result["rdma_pool"] = json{{"up", false}, {"error", encode_error(*parts_.pool_problem)}};
  }
  return result;
}

Result<json> Agent::put(const control::SnapshotPut& put) {
  auto store = require_store();
  if (!store) return tl::unexpected(store.error());

  std::optional<TierKind> tier = put.tier ? put.tier : parts_.default_tier;
  if (!tier) return fail(Errc::unavailable, "no tier is up on " + parts_.host + " to place the snapshot on");
  auto slot = std::find_if(parts_.tiers.begin(), parts_.tiers.end(), [&](const TierSlot& s) { return s.kind == *tier; });
  if (slot == parts_.tiers.end()) {
    return fail(Errc::invalid_argument, "tier " + std::string(control::tier_kind_name(*tier)) +
                                            " is not configured on " + parts_.host);
  }
  if (!slot->tier) {
    return fail(Errc::unavailable, "tier " + std::string(control::tier_kind_name(*tier)) + " is down: " +
                                       (slot->problem ? slot->problem->what() : std::string("unknown reason")));
  }

  auto data = ReadOnlyMapping::open(put.data_path);
  if (!data) return tl::unexpected(data.error());
  const std::uint64_t size = data->bytes().size();
  if (size == 0) return fail(Errc::invalid_argument, put.data_path.string() + " is empty: a snapshot needs pages");
  if (size % kPageSize != 0) {
    return fail(Errc::invalid_argument, put.data_path.string() + " is " + std::to_string(size) +
                                            " bytes, not a multiple of the page size " + std::to_string(kPageSize));
  }
  const std::uint64_t page_count = size / kPageSize;
  if (put.base_vaddr > UINT64_MAX - size) return fail(Errc::invalid_argument, "base_vaddr + size overflows");

  Snapshot snapshot;
  snapshot.info.id = put.id;
  snapshot.pages.resize(page_count);
  for (std::uint64_t i = 0; i < page_count; ++i) snapshot.pages[i].vaddr = put.base_vaddr + i * kPageSize;
  for (const auto& [name, path] : put.metadata) {
    auto blob = read_blob(name, path);
    if (!blob) return tl::unexpected(blob.error());
    snapshot.blobs.emplace(name, std::move(*blob));
  }

  auto info = (*store)->put(std::move(snapshot), data->bytes(), PlacementRequest{*tier, {}});
  if (!info) return tl::unexpected(info.error());
  spdlog::info("snapshot.put {}: {} pages ({} zero) on {}", put.id, info->page_count, info->zero_pages,
               control::tier_kind_name(*tier));
  return encode_info(*info);
}

Result<json> Agent::list() {
  auto store = require_store();
  if (!store) return tl::unexpected(store.error());
  auto snapshots = (*store)->list();
  if (!snapshots) return tl::unexpected(snapshots.error());
  json items = json::array();
  for (const auto& info : *snapshots) items.push_back(encode_info(info));
  return json{{"snapshots", items}};
}

Result<json> Agent::info(const control::SnapshotInfoQuery& query) {
  auto store = require_store();
  if (!store) return tl::unexpected(store.error());
  auto snapshot = (*store)->get(query.id);
  if (!snapshot) return tl::unexpected(snapshot.error());
  json result = encode_info(snapshot->info);
  json blobs = json::object();
  for (const auto& [name, bytes] : snapshot->blobs) blobs[name] = bytes.size();
  result["blobs"] = blobs;
  std::uint64_t hot = 0;
  std::uint64_t checksummed = 0;
  json pages_per_tier = json::object();
  for (const auto& page : snapshot->pages) {
    if (page.flags & page_hot) ++hot;
    if (page.flags & page_checksummed) ++checksummed;
    if (!(page.flags & page_zero)) {
      auto& count = pages_per_tier[std::string(control::tier_kind_name(page.tier))];
      count = count.is_null() ? 1 : count.get<std::uint64_t>() + 1;
    }
  }
  result["pages_per_tier"] = pages_per_tier;
  // Where the stored bytes lie, so that tools outside the agent (the testbed's fault injection)
  // can find one snapshot's pages in a tier without parsing the store's binary layout: runs of
  // consecutive non-zero pages on one tier at adjacent offsets.
  json extents = json::array();
  for (std::size_t i = 0; i < snapshot->pages.size(); ++i) {
    const PageEntry& page = snapshot->pages[i];
    if (page.flags & page_zero) continue;
    const std::string tier(control::tier_kind_name(page.tier));
    if (!extents.empty()) {
      json& last = extents.back();
      if (last["tier"] == tier && last["offset"].get<std::uint64_t>() + last["bytes"].get<std::uint64_t>() == page.location &&
          last["first_page"].get<std::uint64_t>() + last["pages"].get<std::uint64_t>() == i) {
        last["pages"] = last["pages"].get<std::uint64_t>() + 1;
        last["bytes"] = last["bytes"].get<std::uint64_t>() + kPageSize;
        continue;
      }
    }
    extents.push_back(json{{"tier", tier}, {"offset", page.location}, {"bytes", kPageSize}, {"first_page", i}, {"pages", 1}});
  }
  result["extents"] = extents;
  result["hot_pages"] = hot;
  result["checksummed_pages"] = checksummed;
  if (!snapshot->pages.empty()) {
    result["vaddr_first"] = snapshot->pages.front().vaddr;
    result["vaddr_last"] = snapshot->pages.back().vaddr;
  }
  return result;
}

Result<json> Agent::read(const control::SnapshotRead& read) {
  auto store = require_store();
  if (!store) return tl::unexpected(store.error());
  auto snapshot = (*store)->get(read.id);
  if (!snapshot) return tl::unexpected(snapshot.error());

  // Written to a temporary name and renamed at the end, so the output path never holds a
  // half-written snapshot.
  std::filesystem::path partial = read.output_path;
  partial += ".partial-" + std::to_string(::getpid());
  UniqueFd fd(::open(partial.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0) return fail_errno(Errc::io, "create " + partial.string(), errno);
  auto discard = [&](Error error) {
    fd.reset();
    std::error_code ignored;
    std::filesystem::remove(partial, ignored);
    return tl::unexpected(std::move(error));
  };

  control::detail::Sha256 digest;
  std::uint64_t mapped_pages = 0;
  std::uint64_t copied_pages = 0;
  std::uint64_t offset = 0;
  // Staging is needed only for pages on tiers that cannot be mapped (file, rdma); pages on
  // byte-addressable tiers (cxl, local) go from their mapping straight into the write.
  std::vector<std::byte> staging(kPagesPerWrite * kPageSize);
  std::vector<iovec> iov;
  iov.reserve(kPagesPerWrite);
  const auto& pages = snapshot->pages;
  for (std::size_t first = 0; first < pages.size(); first += kPagesPerWrite) {
    const std::size_t count = std::min(kPagesPerWrite, pages.size() - first);
    iov.clear();
    for (std::size_t i = 0; i < count;) {
      // Verified by the store: in place for mapped tiers (written straight from the mapping),
      // else in the staging slots.
      auto run = (*store)->read_pages(*snapshot, first + i, count - i, std::span(staging).subspan(i * kPageSize));
      if (!run) return discard(run.error());
      if (!run->zero) (run->in_place ? mapped_pages : copied_pages) += run->pages;
      digest.update(std::span(run->data, run->pages * kPageSize));
      iov.push_back(iovec{const_cast<std::byte*>(run->data), run->pages * kPageSize});
      i += run->pages;
    }
    if (auto ok = pwritev_all(fd.get(), iov, offset, partial); !ok) return discard(ok.error());
    offset += count * kPageSize;
  }
  fd.reset();
  std::error_code ec;
  std::filesystem::rename(partial, read.output_path, ec);
  if (ec) return discard(Error{Errc::io, "rename " + partial.string() + " to " + read.output_path.string() + ": " + ec.message()});

  return json{{"id", read.id},
              {"path", read.output_path.string()},
              {"bytes", offset},
              {"pages", pages.size()},
              {"mapped_pages", mapped_pages},
              {"copied_pages", copied_pages},
              {"sha256", control::detail::Sha256::hex(digest.finish())}};
}

Result<json> Agent::remove(const control::SnapshotDelete& remove) {
  auto store = require_store();
  if (!store) return tl::unexpected(store.error());
  // Restores here may be using the pages in place (CXL): they end before the space is freed.
  std::shared_ptr<void> hold;
  if (parts_.functions) {
    auto held = parts_.functions->hold_for_delete(remove.id);
    if (!held) return tl::unexpected(held.error());
    hold = std::move(*held);
  }
  if (auto ok = (*store)->remove(remove.id); !ok) return tl::unexpected(ok.error());
  spdlog::info("snapshot.delete {}", remove.id);
  return json{{"id", remove.id}, {"deleted", true}};
}

control::ServerOptions server_options(const AgentConfig& config) {
  const ControlConfig& control = config.control;
  const std::size_t function_operations = config.functions ? config.functions->max_operations : 0;
  control::ServerOptions options;
  options.unix_socket = control.unix_socket;
  options.tcp_listen = control.tcp_listen;
  options.token = control.token;
  options.max_frame_bytes = control.max_frame_bytes;
  options.request_timeout = control.request_timeout;
  options.idle_timeout = control.idle_timeout;
  // Function operations hold a worker for minutes, up to [functions] max_operations of them
  // at once; a few more stay free for the short ops (status, instances) meanwhile.
  options.worker_threads = function_operations + 4;
  return options;
}

}  // namespace snaptier
