// Finding the dax device behind a character device path (libdaxctl) and lending its physical
// range to the snaptier_cow module (tier-agent/kmod/snaptier_cow/).
#pragma once

#include <filesystem>

#include "snaptier/error.hpp"
#include "snaptier/in_place.hpp"

namespace snaptier::inplace {

// The dax device whose character device is `path` (matched by major:minor).
[[nodiscard]] Result<DaxDevice> find_dax_device(const std::filesystem::path& path);

// Sets /dev/snaptier-cow's range to the device's (a no-op when it already is). Errc::unsupported
// when the module is not loaded or the device is not one physical range; Errc::unavailable when
// the module serves another range that is still mapped.
[[nodiscard]] Result<std::filesystem::path> lend_to_cow_device(const DaxDevice& device);

}  // namespace snaptier::inplace
