// SHA-256 (FIPS 180-4), self-contained: the guest image has no OpenSSL headers and we need only
// a content digest for snapshot.read and a fixed-length form of tokens for constant-time compare.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace snaptier::control::detail {

class Sha256 {
 public:
  using Digest = std::array<std::uint8_t, 32>;

  Sha256() noexcept;
  void update(std::span<const std::byte> data) noexcept;
  void update(std::string_view text) noexcept { update(std::as_bytes(std::span(text.data(), text.size()))); }
  [[nodiscard]] Digest finish() noexcept;  // the object must not be updated afterwards

  [[nodiscard]] static std::string hex(const Digest& digest);

 private:
  void compress(const std::uint8_t* block) noexcept;

  std::array<std::uint32_t, 8> state_;
  std::array<std::uint8_t, 64> buffer_{};
  std::size_t buffered_ = 0;
  std::uint64_t total_bytes_ = 0;
};

// Compares two secrets without a data-dependent early exit: both sides are hashed to the same
// length first, so neither the content nor the length of the expected token leaks by timing.
[[nodiscard]] bool constant_time_equal(std::string_view a, std::string_view b) noexcept;

}  // namespace snaptier::control::detail
