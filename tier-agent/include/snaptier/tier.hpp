// The one interface placement policies use to reach memory. A policy asks a Tier for its
// capabilities and moves extents; it never touches a device, a file or a queue pair itself.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "snaptier/error.hpp"

namespace snaptier {

enum class TierKind : std::uint8_t { local = 1, file = 2, cxl = 3, rdma = 4 };

[[nodiscard]] std::string_view to_string(TierKind kind) noexcept;
[[nodiscard]] Result<TierKind> tier_kind_from_string(std::string_view name);

struct TierCaps {
  bool byte_addressable = false;  // map() returns a pointer usable with plain loads
  bool shared = false;            // several hosts see the same bytes (CXL multi-headed, RDMA pool)
  bool remote = false;            // reached over a network
  bool persistent = false;        // survives an agent restart
};

// A contiguous range inside one tier. `offset` is tier-specific (file offset, region offset,
// remote pool offset) and meaningful only to the tier that allocated it.
struct Extent {
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  friend bool operator==(const Extent&, const Extent&) = default;
};

struct TierStats {
  std::uint64_t capacity_bytes = 0;
  std::uint64_t used_bytes = 0;
  std::uint64_t reads = 0;
  std::uint64_t writes = 0;
  std::uint64_t bytes_read = 0;
  std::uint64_t bytes_written = 0;
};

// Whether a tier can serve now. Local tiers are always up; a remote tier (rdma) loses its
// connection and gets it back (docs/rdma.md, "Reconnection").
enum class TierState : std::uint8_t {
  up,            // serving
  reconnecting,  // a connection failed; attempts with backoff are under way
  down,          // attempts ran out; probed again now and then and on demand
};
[[nodiscard]] std::string_view to_string(TierState state) noexcept;

struct TierHealth {
  TierState state = TierState::up;
  std::uint64_t since_unix_ms = 0;  // when the tier left `up` (0 while up)
  std::uint32_t attempt = 0;        // connection attempts made since then
  std::string last_error;           // why it left `up`, then the last attempt's error
  std::uint64_t next_attempt_unix_ms = 0;  // 0: none scheduled (up, or an attempt is running)
};

// Every implementation may be called from any number of threads at once (each tier locks its own
// allocation state; reads and writes of disjoint extents never wait for each other except on rdma,
// whose one QP serialises them).
class Tier {
 public:
  virtual ~Tier() = default;
  Tier() = default;
  Tier(const Tier&) = delete;
  Tier& operator=(const Tier&) = delete;

  [[nodiscard]] virtual std::string_view name() const noexcept = 0;
  [[nodiscard]] virtual TierKind kind() const noexcept = 0;
  [[nodiscard]] virtual TierCaps caps() const noexcept = 0;

  // Extents are page aligned (4 KiB) unless a tier documents a larger alignment.
  [[nodiscard]] virtual Result<Extent> allocate(std::uint64_t length) = 0;
  [[nodiscard]] virtual Result<void> release(Extent extent) = 0;

  // Copy bytes [offset, offset + out.size()) of `extent` into `out`, and the reverse.
  // Out-of-range access is Errc::invalid_argument, never a crash.
  [[nodiscard]] virtual Result<void> read(Extent extent, std::uint64_t offset,
                                          std::span<std::byte> out) = 0;
  [[nodiscard]] virtual Result<void> write(Extent extent, std::uint64_t offset,
                                           std::span<const std::byte> in) = 0;

  // Byte-addressable tiers return a pointer to the extent's first byte; others nullptr.
  [[nodiscard]] virtual const std::byte* map(Extent /*extent*/) const noexcept { return nullptr; }

  [[nodiscard]] virtual TierStats stats() const = 0;

  [[nodiscard]] virtual TierHealth health() const { return {}; }

  // Identifies the storage behind this tier's extents; it changes exactly when their contents
  // were lost (an RDMA pool created afresh). 0: the tier does not track it, or does not know yet
  // (never connected). Snapshots record it per tier, and a mismatch marks them lost.
  [[nodiscard]] virtual std::uint64_t epoch() const noexcept { return 0; }
};

// A fresh epoch for storage made anew: random, nonzero and below 2^53, so that it is exact in
// any JSON reader (schema: Epoch).
[[nodiscard]] std::uint64_t new_epoch();

}  // namespace snaptier
