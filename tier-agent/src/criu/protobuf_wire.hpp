// A minimal, bounds-checked protobuf wire-format reader (no library, no recursion).
//
// Only what CRIU's proto2 images use: varint (0), fixed64 (1), length-delimited (2) and
// fixed32 (5). Groups (3, 4) are long deprecated and rejected. Nested messages are read by
// handing the length-delimited payload to another WireReader, so nesting depth is whatever the
// caller's code spells out (one level for mm_entry.vmas), never driven by the input.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace snaptier::criu::wire {

enum class WireType : std::uint8_t { varint = 0, fixed64 = 1, length_delimited = 2, fixed32 = 5 };

struct Field {
  std::uint32_t number = 0;
  WireType type = WireType::varint;
  std::uint64_t value = 0;                // varint, fixed64, fixed32
  std::span<const std::byte> bytes;       // length_delimited payload
  std::size_t offset = 0;                 // of the tag, within the message
};

// Reads fields one by one. On malformed input next() returns false and error() says why;
// at the end of the message it returns false with error() empty.
class WireReader {
 public:
  explicit WireReader(std::span<const std::byte> data) noexcept : data_(data) {}

  [[nodiscard]] bool next(Field& out);
  [[nodiscard]] const std::string& error() const noexcept { return error_; }
  [[nodiscard]] bool failed() const noexcept { return !error_.empty(); }
  [[nodiscard]] std::size_t offset() const noexcept { return pos_; }

  // Reads one varint at pos; nullopt if it runs past the end or is longer than 10 bytes / 64 bits.
  [[nodiscard]] static std::optional<std::uint64_t> read_varint(std::span<const std::byte> data,
                                                                std::size_t& pos) noexcept;

 private:
  bool fail(std::string message);

  std::span<const std::byte> data_;
  std::size_t pos_ = 0;
  std::string error_;
};

[[nodiscard]] constexpr std::int64_t zigzag_decode(std::uint64_t v) noexcept {
  return static_cast<std::int64_t>((v >> 1) ^ (~(v & 1) + 1));
}

[[nodiscard]] const char* wire_type_name(WireType t) noexcept;

}  // namespace snaptier::criu::wire
