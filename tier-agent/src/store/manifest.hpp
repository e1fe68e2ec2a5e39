// The binary manifest of a snapshot (layout in docs/cxl-directory.md, "Manifest"): everything
// get() returns plus the tier extents the snapshot owns. Checksummed end to end with CRC32C.
#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include "snaptier/error.hpp"
#include "snaptier/store.hpp"

namespace snaptier {

struct OwnedExtent {
  TierKind tier = TierKind::local;
  Extent extent;
};

struct Manifest {
  Snapshot snapshot;
  std::vector<OwnedExtent> extents;
};

[[nodiscard]] std::vector<std::byte> encode_manifest(const Manifest& manifest);
// Errc::corrupt for a bad magic, checksum, truncation or trailing bytes.
[[nodiscard]] Result<Manifest> decode_manifest(std::span<const std::byte> bytes);

}  // namespace snaptier
