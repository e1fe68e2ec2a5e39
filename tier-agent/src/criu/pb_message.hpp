// A decoded protobuf message that can be written back: every field in wire order, the ones the
// schema does not know kept verbatim, so a rewrite of one field leaves the rest of CRIU's
// message as CRIU wrote it. decode() checks the fields a MessageSpec (criu/schema.hpp) knows:
// wire type, value range, required presence. encode(decode(x)) == x for the canonical encoding
// CRIU (protobuf-c) writes. Plus the image framing both directions use: [head magic][magic]
// then repeated [u32 little-endian length][message].
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "criu/protobuf_wire.hpp"
#include "snaptier/error.hpp"

namespace snaptier::criu::pb {

// How a known field is checked and read. Repeated scalars (packed or not) are `repeated_u32` /
// `repeated_u64`; a repeated message is `message` occurring several times.
enum class Kind : std::uint8_t { u32, u64, boolean, i32, sint32, sint64, string, message, repeated_u32, repeated_u64 };

struct FieldSpec {
  std::uint32_t number = 0;
  const char* name = "";
  Kind kind = Kind::u64;
  bool required = false;
};

struct MessageSpec {
  const char* name = "";
  std::span<const FieldSpec> fields;
  [[nodiscard]] const FieldSpec* find(std::uint32_t number) const noexcept;
};

struct Value {
  std::uint32_t number = 0;
  wire::WireType type = wire::WireType::varint;
  std::uint64_t scalar = 0;       // varint / fixed values, as on the wire (zigzag not undone)
  std::vector<std::byte> bytes;   // length-delimited payload
  friend bool operator==(const Value&, const Value&) = default;
};

class Message {
 public:
  explicit Message(const MessageSpec& spec) : spec_(&spec) {}

  [[nodiscard]] const MessageSpec& spec() const noexcept { return *spec_; }
  [[nodiscard]] const std::vector<Value>& values() const noexcept { return values_; }
  [[nodiscard]] std::vector<Value>& values() noexcept { return values_; }

  [[nodiscard]] bool has(const FieldSpec& f) const noexcept { return first(f) != nullptr; }
  // The first occurrence's raw value (decode() checked its type and range).
  [[nodiscard]] std::optional<std::uint64_t> scalar(const FieldSpec& f) const noexcept;
  [[nodiscard]] std::uint64_t scalar_or(const FieldSpec& f, std::uint64_t fallback) const noexcept {
    return scalar(f).value_or(fallback);
  }
  [[nodiscard]] std::optional<std::int64_t> signed_value(const FieldSpec& f) const noexcept;  // i32/sint*
  [[nodiscard]] std::optional<std::span<const std::byte>> bytes(const FieldSpec& f) const noexcept;
  // Every element of a repeated scalar field, packed or not.
  [[nodiscard]] std::vector<std::uint64_t> repeated(const FieldSpec& f) const;

  // Replace the first occurrence (or append): scalars as the wire holds them for f.kind.
  void set_unsigned(const FieldSpec& f, std::uint64_t v);
  void set_signed(const FieldSpec& f, std::int64_t v);
  void set_bytes(const FieldSpec& f, std::span<const std::byte> payload);
  void set_string(const FieldSpec& f, std::string_view text);
  void erase(const FieldSpec& f);

  friend bool operator==(const Message& a, const Message& b) { return a.spec_ == b.spec_ && a.values_ == b.values_; }

 private:
  [[nodiscard]] const Value* first(const FieldSpec& f) const noexcept;
  Value& slot(const FieldSpec& f, wire::WireType type);

  const MessageSpec* spec_;
  std::vector<Value> values_;
};

// Errc::corrupt with "field N (name) at message offset X: ...", "missing required field N
// (name)" or the wire reader's message; callers prefix file, entry and offset.
[[nodiscard]] Result<Message> decode(const MessageSpec& spec, std::span<const std::byte> bytes);
[[nodiscard]] std::vector<std::byte> encode(const Message& message);
void append_varint(std::vector<std::byte>& out, std::uint64_t v);

// ---- Image framing ----------------------------------------------------------------------------

struct RawEntry {
  std::span<const std::byte> bytes;
  std::size_t offset = 0;  // of its length prefix in the file
};
// Checks the magic(s) and splits the rest into entries (Errc::corrupt naming `name`).
[[nodiscard]] Result<std::vector<RawEntry>> split_image(std::span<const std::byte> data, std::string_view name,
                                                        std::uint32_t image_magic, bool has_head_magic);
// The inverse of split_image.
[[nodiscard]] std::vector<std::byte> join_image(std::uint32_t image_magic, bool has_head_magic,
                                                std::span<const std::vector<std::byte>> entries);

}  // namespace snaptier::criu::pb
