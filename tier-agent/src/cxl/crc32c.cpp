#include "cxl/crc32c.hpp"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace snaptier {
namespace {

constexpr std::array<std::uint32_t, 256> make_table() {
  std::array<std::uint32_t, 256> table{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int bit = 0; bit < 8; ++bit) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    table[i] = c;
  }
  return table;
}
constexpr auto kTable = make_table();

std::uint32_t update_table(const unsigned char* p, std::size_t n, std::uint32_t c) noexcept {
  while (n-- > 0) c = kTable[(c ^ *p++) & 0xFFu] ^ (c >> 8);
  return c;
}

#if defined(__x86_64__)
// _mm_crc32_u64 has a latency of 3 cycles but issues every cycle: three independent streams over
// adjacent kStream-byte chunks keep it busy, and their CRCs are joined by shifting (appending
// kStream zero bytes, a linear map applied with a table). 3 x 1360 bytes covers 4080 of a 4 KiB
// page, so a page costs two shifts and a 16-byte tail.
constexpr std::size_t kStream = 1360;

using ShiftTable = std::array<std::array<std::uint32_t, 256>, 4>;

__attribute__((target("sse4.2"))) ShiftTable make_shift_table() noexcept {
  std::array<std::uint32_t, 32> basis{};  // the register 1 << i after kStream zero bytes
  for (std::size_t i = 0; i < basis.size(); ++i) {
    std::uint64_t c = std::uint64_t{1} << i;
    for (std::size_t k = 0; k < kStream; k += 8) c = _mm_crc32_u64(c, 0);
    basis[i] = static_cast<std::uint32_t>(c);
  }
  ShiftTable table{};
  for (std::size_t byte = 0; byte < 4; ++byte) {
    for (std::uint32_t b = 0; b < 256; ++b) {
      std::uint32_t out = 0;
      for (std::size_t bit = 0; bit < 8; ++bit) {
        if ((b >> bit) & 1u) out ^= basis[byte * 8 + bit];
      }
      table[byte][b] = out;
    }
  }
  return table;
}

std::uint32_t shift(const ShiftTable& t, std::uint32_t c) noexcept {
  return t[0][c & 0xFFu] ^ t[1][(c >> 8) & 0xFFu] ^ t[2][(c >> 16) & 0xFFu] ^ t[3][c >> 24];
}

std::uint64_t load64(const unsigned char* p) noexcept {
  std::uint64_t word;
  std::memcpy(&word, p, 8);
  return word;
}

__attribute__((target("sse4.2"))) std::uint32_t update_sse42(const unsigned char* p,
                                                              std::size_t n,
                                                              std::uint32_t c) noexcept {
  static const ShiftTable kShift = make_shift_table();
  while (n >= 3 * kStream) {
    std::uint64_t a = c, b = 0, d = 0;
    for (std::size_t i = 0; i < kStream; i += 8) {
      a = _mm_crc32_u64(a, load64(p + i));
      b = _mm_crc32_u64(b, load64(p + kStream + i));
      d = _mm_crc32_u64(d, load64(p + 2 * kStream + i));
    }
    c = shift(kShift, shift(kShift, static_cast<std::uint32_t>(a)) ^ static_cast<std::uint32_t>(b)) ^
        static_cast<std::uint32_t>(d);
    p += 3 * kStream;
    n -= 3 * kStream;
  }
  std::uint64_t c64 = c;
  while (n >= 8) {
    c64 = _mm_crc32_u64(c64, load64(p));
    p += 8;
    n -= 8;
  }
  c = static_cast<std::uint32_t>(c64);
  while (n-- > 0) c = _mm_crc32_u8(c, *p++);
  return c;
}
#endif

}  // namespace

bool crc32c_uses_hardware() noexcept {
#if defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("sse4.2");
  return has;
#else
  return false;
#endif
}

std::uint32_t crc32c(std::span<const std::byte> data, std::uint32_t crc) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(data.data());
  std::uint32_t c = ~crc;
#if defined(__x86_64__)
  if (crc32c_uses_hardware()) return ~update_sse42(p, data.size(), c);
#endif
  return ~update_table(p, data.size(), c);
}

}  // namespace snaptier
