// make_agent(): from a validated AgentConfig to running tiers, a store and (memory nodes) a pool.
// Devices are the part of a config most likely to be wrong on a given machine, so a tier that
// cannot come up is logged and reported by status instead of keeping the agent down.
#include <algorithm>
#include <map>
#include <spdlog/spdlog.h>

#include "agent/rdma_wiring.hpp"
#include "snaptier/agent.hpp"
#include "snaptier/cxl_directory.hpp"
#include "snaptier/in_place.hpp"
#include "snaptier/snapshot_store.hpp"
#include "snaptier/tiers.hpp"

namespace snaptier {

namespace {

struct CxlParts {
  std::shared_ptr<CxlDirectory> directory;
  std::shared_ptr<Tier> tier;
  inplace::Backing backing;
};

Result<CxlParts> build_cxl(const CxlTierConfig& config, const std::string& host) {
  auto region = MappedRegion::open(config.path);
  if (!region) return tl::unexpected(region.error());
  auto access = make_direct_region_access(*region);
  auto layout = read_cxl_layout(*access);
  if (!layout && layout.error().code == Errc::not_found) {
    if (!config.format) {
      return fail(Errc::unavailable, config.path.string() +
                                         " has no directory yet and [tiers.cxl] format = false (the host "
                                         "with format = true formats it)");
    }
    CxlFormatOptions options;
    options.host_count = config.host_count;
    layout = format_cxl_region(*access, options);
    if (!layout) return tl::unexpected(layout.error());
    spdlog::info("tier cxl: formatted {} for {} hosts", config.path.string(), config.host_count);
  } else if (!layout) {
    return tl::unexpected(layout.error());
  }
  CxlAttachOptions attach;
  attach.host_index = config.host_index;
  attach.host_name = host;
  auto directory = CxlDirectory::attach(access, attach);
  if (!directory) return tl::unexpected(directory.error());
  auto tier = make_cxl_tier(*directory);
  if (!tier) return tl::unexpected(tier.error());
  inplace::Backing backing = inplace::describe_backing(config.path, (*region)->is_device_dax());
  spdlog::info("tier cxl: {} attached as host {} ({}, cache write-back: {}, {})", config.path.string(),
               config.host_index, (*region)->is_device_dax() ? "device dax" : "regular file",
               cache_writeback_method(), inplace::describe(backing));
  return CxlParts{*directory, std::shared_ptr<Tier>(std::move(*tier)), std::move(backing)};
}

void record(std::vector<TierSlot>& slots, TierKind kind, std::string source, Result<std::shared_ptr<Tier>> tier) {
  if (tier) {
    spdlog::info("tier {}: up ({})", control::tier_kind_name(kind), source);
    slots.push_back(TierSlot{kind, std::move(source), std::move(*tier), std::nullopt});
  } else {
    spdlog::error("tier {}: skipped: {} ({})", control::tier_kind_name(kind), tier.error().what(), source);
    slots.push_back(TierSlot{kind, std::move(source), nullptr, tier.error()});
  }
}

template <class T>
Result<std::shared_ptr<Tier>> shared(Result<std::unique_ptr<T>> tier) {
  if (!tier) return tl::unexpected(tier.error());
  return std::shared_ptr<Tier>(std::move(*tier));
}

}  // namespace

Result<std::unique_ptr<Agent>> make_agent(const AgentConfig& config) {
  AgentParts parts;
  parts.host = config.host;
  parts.role = config.role;

  std::error_code ec;
  std::filesystem::create_directories(config.state_dir, ec);
  if (ec) return fail(Errc::io, "create state_dir " + config.state_dir.string() + ": " + ec.message());

  std::shared_ptr<CxlDirectory> cxl_directory;
  std::optional<inplace::Backing> in_place;
  if (config.local) {
    record(parts.tiers, TierKind::local, "DRAM",
           shared(make_local_tier(config.local->capacity)));
  }
  if (config.file) {
    record(parts.tiers, TierKind::file, config.file->dir.string(),
           shared(make_file_tier(config.file->dir, config.file->capacity)));
  }
  if (config.cxl) {
    auto cxl = build_cxl(*config.cxl, config.host);
    if (cxl) {
      cxl_directory = cxl->directory;
      in_place = cxl->backing;
    }
    record(parts.tiers, TierKind::cxl, config.cxl->path.string(),  // in-place support: status "in_place"
           cxl ? Result<std::shared_ptr<Tier>>(cxl->tier) : tl::unexpected(cxl.error()));
  }
  if (config.rdma) {
    record(parts.tiers, TierKind::rdma, "memnode " + config.rdma->memnode.to_string(),
           agent_detail::build_rdma_tier(*config.rdma));
  }

  StoreOptions store;
  store.host_name = config.host;
  store.state_dir = config.state_dir;
  store.cxl_directory = cxl_directory;
  store.page_cache_bytes = config.store.page_cache_bytes;
  for (const auto& slot : parts.tiers) {
    if (slot.tier) store.tiers.emplace(slot.kind, slot.tier);
  }
  auto built_store = make_snapshot_store(std::move(store));
  if (!built_store) return fail(built_store.error().code, "snapshot store: " + built_store.error().message);
  parts.store = std::shared_ptr<SnapshotStore>(std::move(*built_store));

  if (config.memnode) {
    auto pool = agent_detail::build_rdma_pool(*config.memnode);
    if (pool) {
      spdlog::info("rdma pool: {} bytes registered on {}, epoch {}; {}", config.memnode->pool_size,
                   config.memnode->device.empty() ? "the first device" : config.memnode->device,
                   (*pool)->state().epoch, (*pool)->state().origin);
      parts.pool = std::move(*pool);
    } else {
      spdlog::error("rdma pool: down: {}", pool.error().what());
      parts.pool_problem = pool.error();
    }
  }
  if (config.functions) {
    std::map<TierKind, TierCaps> up;
    for (const auto& slot : parts.tiers) {
      if (slot.tier) up.emplace(slot.kind, slot.tier->caps());
    }
    parts.functions = std::make_shared<FunctionService>(config.host, *config.functions, parts.store, std::move(up));
    parts.functions->set_peers(config.peers, config.control.token);
    if (in_place) parts.functions->set_in_place_backing(*in_place);
  }
  parts.in_place = in_place;
  parts.peers = config.peers;
  parts.peer_token = config.control.token;
  parts.cxl_directory = cxl_directory;
  if (cxl_directory && config.cxl->announce_interval.count() > 0) {
    parts.cxl_announcer = std::make_shared<CxlAnnouncer>(cxl_directory, config.cxl->announce_interval);
  }
  return std::make_unique<Agent>(std::move(parts));
}

}  // namespace snaptier
