// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), SSE4.2 when the CPU has it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace snaptier {

// Chaining: crc32c(b, crc32c(a)) == crc32c(a ++ b).
[[nodiscard]] std::uint32_t crc32c(std::span<const std::byte> data, std::uint32_t crc = 0) noexcept;
[[nodiscard]] inline std::uint32_t crc32c(std::string_view text, std::uint32_t crc = 0) noexcept {
  return crc32c(std::as_bytes(std::span(text.data(), text.size())), crc);
}
[[nodiscard]] bool crc32c_uses_hardware() noexcept;

}  // namespace snaptier
