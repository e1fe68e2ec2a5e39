// The tier a benchmark reads, opened from its command line: one set of options and one place
// that knows the backends, shared by tier_bench and install_bench.
#pragma once

#include <CLI/CLI.hpp>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "snaptier/control.hpp"
#include "snaptier/cxl_directory.hpp"
#include "snaptier/rdma.hpp"
#include "snaptier/tiers.hpp"

namespace snaptier::bench {

namespace fs = std::filesystem;

// Where an rdma tier finds its memory node: the same settings as the agent's [tiers.rdma].
struct RdmaTarget {
  std::string memnode;  // ADDR:PORT of the memory node's control plane
  std::string token;
  std::string device;
  int gid_index = 1;
  std::uint32_t max_in_flight = 16;
};

struct TierTarget {
  std::string tier = "local";
  std::string path;  // file: directory; cxl: devdax device or region file; empty: scratch
  std::uint32_t host_index = 0;
  bool format_region = false;
  RdmaTarget rdma;
};

inline void add_tier_options(CLI::App& app, TierTarget& target) {
  app.add_option("--tier", target.tier, "local | file | cxl | rdma")
      ->check(CLI::IsMember({"local", "file", "cxl", "rdma"}));
  app.add_option("--path", target.path, "file: directory; cxl: devdax device or region file (default: a temp file)");
  app.add_option("--host-index", target.host_index, "cxl: this host's slot in the region");
  app.add_flag("--format", target.format_region, "cxl: format the region first (destroys its directory)");
  app.add_option("--memnode", target.rdma.memnode, "rdma: ADDR:PORT of a memory node's control plane");
  app.add_option("--token", target.rdma.token, "rdma: the memory node's control token");
  app.add_option("--device", target.rdma.device, "rdma: device name (default: the first)");
  app.add_option("--gid-index", target.rdma.gid_index, "rdma: GID index (RoCEv2 over IPv4: 1)");
  app.add_option("--rdma-depth", target.rdma.max_in_flight, "rdma: work requests in flight (1..16)")
      ->check(CLI::Range(1, 16));
}

// Everything a tier needs to stay alive while it is benchmarked (a CXL tier holds its directory;
// a tier on scratch storage removes it when it goes).
struct OpenedTier {
  OpenedTier() = default;
  OpenedTier(const OpenedTier&) = delete;
  OpenedTier& operator=(const OpenedTier&) = delete;
  OpenedTier(OpenedTier&&) = default;
  OpenedTier& operator=(OpenedTier&&) = default;
  ~OpenedTier() {
    tier.reset();
    directory.reset();
    if (!scratch.empty()) {
      std::error_code ignored;
      fs::remove_all(scratch, ignored);
    }
  }
  TierKind kind = TierKind::local;
  std::unique_ptr<Tier> tier;
  std::shared_ptr<CxlDirectory> directory;
  std::string note;
  fs::path scratch;
};

// Opens the tier for a working set of `size` bytes (file and cxl on scratch storage when no path
// is given).
inline Result<std::unique_ptr<OpenedTier>> open_tier(const TierTarget& target, std::uint64_t size,
                                                     const std::string& program) {
  auto kind = tier_kind_from_string(target.tier);
  if (!kind) return tl::unexpected(kind.error());
  auto opened = std::make_unique<OpenedTier>();
  opened->kind = *kind;
  const std::uint64_t capacity = size + (1ull << 20);
  std::string path = target.path;
  bool format_region = target.format_region;
  if (path.empty() && (*kind == TierKind::file || *kind == TierKind::cxl)) {
    opened->scratch = fs::temp_directory_path() / (program + "-" + std::to_string(::getpid()));
    std::error_code ec;
    fs::create_directories(opened->scratch, ec);
    if (ec) return fail(Errc::io, "create " + opened->scratch.string() + ": " + ec.message());
    if (*kind == TierKind::file) {
      path = opened->scratch.string();
    } else {
      path = (opened->scratch / "region.cxl").string();
      std::ofstream(path).close();
      fs::resize_file(path, size + (8ull << 20), ec);  // data + superblock, slots and a small log
      if (ec) return fail(Errc::io, "size " + path + ": " + ec.message());
      format_region = true;
    }
  }
  switch (*kind) {
    case TierKind::local: {
      auto tier = make_local_tier(capacity);
      if (!tier) return tl::unexpected(tier.error());
      opened->tier = std::move(*tier);
      opened->note = "anonymous DRAM";
      return opened;
    }
    case TierKind::file: {
      auto tier = make_file_tier(path, capacity);
      if (!tier) return tl::unexpected(tier.error());
      opened->tier = std::move(*tier);
      opened->note = "pread from the page cache (warm after fill)";
      return opened;
    }
    case TierKind::cxl: {
      auto region = MappedRegion::open(path);
      if (!region) return tl::unexpected(region.error());
      auto access = make_direct_region_access(*region);
      if (format_region) {
        auto layout = format_cxl_region(*access, CxlFormatOptions{.host_count = 1, .log_entries_per_host = 64,
                                                                  .overwrite_existing = true});
        if (!layout) return tl::unexpected(layout.error());
      }
      auto directory =
          CxlDirectory::attach(access, CxlAttachOptions{.host_index = target.host_index, .host_name = "bench"});
      if (!directory) return tl::unexpected(directory.error());
      auto tier = make_cxl_tier(*directory);
      if (!tier) return tl::unexpected(tier.error());
      const std::string what = (*region)->is_device_dax() ? "devdax" : "regular file standing in for devdax";
      opened->tier = std::move(*tier);
      opened->directory = *directory;
      opened->note = what + ", invalidate (" + std::string(cache_writeback_method()) + " family) + load per read";
      return opened;
    }
    case TierKind::rdma: {
      if (target.rdma.memnode.empty()) {
        return fail(Errc::invalid_argument, "--tier rdma needs --memnode ADDR:PORT (and --token)");
      }
      auto address = parse_net_address(target.rdma.memnode);
      if (!address) return tl::unexpected(address.error());
      control::ClientOptions memnode;
      memnode.endpoint = *address;
      memnode.token = target.rdma.token;
      RdmaDeviceOptions device;
      device.device = target.rdma.device;
      device.gid_index = target.rdma.gid_index;
      device.max_in_flight = target.rdma.max_in_flight;
      auto tier = make_rdma_tier(device, control::make_control_rdma_pool_client(std::move(memnode)));
      if (!tier) return tl::unexpected(tier.error());
      opened->tier = std::move(*tier);
      opened->note = "one-sided RDMA READ from memory node " + target.rdma.memnode +
                     " via a 1 MiB bounce buffer, up to " + std::to_string(target.rdma.max_in_flight) +
                     " READs in flight";
      return opened;
    }
  }
  return fail(Errc::unsupported, "unknown tier");
}

}  // namespace snaptier::bench
