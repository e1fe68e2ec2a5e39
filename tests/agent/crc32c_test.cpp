// CRC32C: the SSE4.2 path (three interleaved streams joined by shifts) against a bitwise
// reference, at every length around its block boundaries and at every alignment.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "cxl/crc32c.hpp"

namespace snaptier {
namespace {

std::uint32_t reference(std::span<const std::byte> data, std::uint32_t crc = 0) {
  std::uint32_t c = ~crc;
  for (std::byte b : data) {
    c ^= static_cast<std::uint32_t>(b);
    for (int bit = 0; bit < 8; ++bit) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
  }
  return ~c;
}

TEST(Crc32cTest, MatchesTheBitwiseDefinitionAtEveryLengthAndAlignment) {
  std::vector<std::byte> data(3 * 4096 + 64);
  std::mt19937 rng(3);
  for (auto& b : data) b = static_cast<std::byte>(rng());
  // 0..9000 bytes covers no block, one (3 x 1360), two and partial ones; plus a tail each time.
  for (std::size_t length = 0; length <= 9000; length += (length < 64 || length % 1360 < 16) ? 1 : 37) {
    for (std::size_t offset : {0, 1, 7}) {
      const auto part = std::span<const std::byte>(data).subspan(offset, length);
      ASSERT_EQ(crc32c(part), reference(part)) << "length " << length << " offset " << offset;
    }
  }
  const auto page = std::span<const std::byte>(data).first(4096);
  EXPECT_EQ(crc32c(page, 0xDEADBEEF), reference(page, 0xDEADBEEF));
}

}  // namespace
}  // namespace snaptier
