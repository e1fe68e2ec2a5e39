#include "criu/pb_message.hpp"

#include <cstdio>
#include <limits>

#include "snaptier/criu_images.hpp"

namespace snaptier::criu::pb {

using wire::Field;
using wire::WireReader;
using wire::WireType;

namespace {

std::string hex(std::uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::uint32_t load_u32le(std::span<const std::byte> data, std::size_t pos) {
  std::uint32_t v = 0;
  for (std::size_t i = 0; i < 4; ++i)
    v |= static_cast<std::uint32_t>(static_cast<std::uint8_t>(data[pos + i])) << (8 * i);
  return v;
}

void append_u32le(std::vector<std::byte>& out, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xff));
}

tl::unexpected<Error> field_error(const Field& f, const FieldSpec& spec, const std::string& what) {
  return fail(Errc::corrupt, "field " + std::to_string(f.number) + " (" + spec.name + ") at message offset " +
                                 std::to_string(f.offset) + ": " + what);
}

// One occurrence of a known field against its spec.
Result<void> check(const Field& f, const FieldSpec& spec) {
  switch (spec.kind) {
    case Kind::string:
      if (f.type != WireType::length_delimited)
        return field_error(f, spec, std::string("expected a string, got ") + wire::wire_type_name(f.type));
      return {};
    case Kind::message:
      if (f.type != WireType::length_delimited)
        return field_error(f, spec, std::string("expected a message, got ") + wire::wire_type_name(f.type));
      return {};
    case Kind::repeated_u32:
    case Kind::repeated_u64: {
      const std::uint64_t max = spec.kind == Kind::repeated_u32 ? std::numeric_limits<std::uint32_t>::max()
                                                                : std::numeric_limits<std::uint64_t>::max();
      if (f.type == WireType::varint) {
        if (f.value > max) return field_error(f, spec, "value " + std::to_string(f.value) + " out of range");
        return {};
      }
      if (f.type != WireType::length_delimited)
        return field_error(f, spec, std::string("expected varint or packed, got ") + wire::wire_type_name(f.type));
      std::size_t pos = 0;
      while (pos < f.bytes.size()) {
        const std::size_t at = pos;
        const auto v = WireReader::read_varint(f.bytes, pos);
        if (!v) return field_error(f, spec, "bad packed varint at payload offset " + std::to_string(at));
        if (*v > max) return field_error(f, spec, "value " + std::to_string(*v) + " out of range");
      }
      return {};
    }
    default: break;
  }
  if (f.type != WireType::varint)
    return field_error(f, spec, std::string("expected varint, got ") + wire::wire_type_name(f.type));
  switch (spec.kind) {
    case Kind::u32:
      if (f.value > std::numeric_limits<std::uint32_t>::max())
        return field_error(f, spec, "value " + std::to_string(f.value) + " does not fit uint32");
      return {};
    case Kind::i32: {
      const auto s = static_cast<std::int64_t>(f.value);  // int32 is sign-extended to 64 bits on the wire
      if (s < std::numeric_limits<std::int32_t>::min() || s > std::numeric_limits<std::int32_t>::max())
        return field_error(f, spec, "value " + std::to_string(s) + " does not fit int32");
      return {};
    }
    case Kind::sint32: {
      const std::int64_t s = wire::zigzag_decode(f.value);
      if (s < std::numeric_limits<std::int32_t>::min() || s > std::numeric_limits<std::int32_t>::max())
        return field_error(f, spec, "value " + std::to_string(s) + " does not fit sint32");
      return {};
    }
    default: return {};
  }
}

}  // namespace

const FieldSpec* MessageSpec::find(std::uint32_t number) const noexcept {
  for (const auto& f : fields)
    if (f.number == number) return &f;
  return nullptr;
}

const Value* Message::first(const FieldSpec& f) const noexcept {
  for (const auto& v : values_)
    if (v.number == f.number) return &v;
  return nullptr;
}

std::optional<std::uint64_t> Message::scalar(const FieldSpec& f) const noexcept {
  const Value* v = first(f);
  if (v == nullptr || v->type == WireType::length_delimited) return std::nullopt;
  return v->scalar;
}

std::optional<std::int64_t> Message::signed_value(const FieldSpec& f) const noexcept {
  auto raw = scalar(f);
  if (!raw) return std::nullopt;
  if (f.kind == Kind::sint32 || f.kind == Kind::sint64) return wire::zigzag_decode(*raw);
  return static_cast<std::int64_t>(*raw);
}

std::optional<std::span<const std::byte>> Message::bytes(const FieldSpec& f) const noexcept {
  const Value* v = first(f);
  if (v == nullptr || v->type != WireType::length_delimited) return std::nullopt;
  return std::span<const std::byte>(v->bytes);
}

std::vector<std::uint64_t> Message::repeated(const FieldSpec& f) const {
  std::vector<std::uint64_t> out;
  for (const auto& v : values_) {
    if (v.number != f.number) continue;
    if (v.type == WireType::varint) {
      out.push_back(v.scalar);
      continue;
    }
    std::size_t pos = 0;
    while (pos < v.bytes.size()) {
      auto x = WireReader::read_varint(v.bytes, pos);
      if (!x) break;  // decode() checked it
      out.push_back(*x);
    }
  }
  return out;
}

Value& Message::slot(const FieldSpec& f, WireType type) {
  for (auto& v : values_) {
    if (v.number == f.number) {
      v.type = type;
      v.bytes.clear();
      v.scalar = 0;
      return v;
    }
  }
  // Ascending field order, as protobuf-c writes: a new field goes before the first higher one.
  auto at = values_.begin();
  while (at != values_.end() && at->number < f.number) ++at;
  return *values_.insert(at, Value{f.number, type, 0, {}});
}

void Message::set_unsigned(const FieldSpec& f, std::uint64_t v) { slot(f, WireType::varint).scalar = v; }

void Message::set_signed(const FieldSpec& f, std::int64_t v) {
  const auto u = static_cast<std::uint64_t>(v);
  slot(f, WireType::varint).scalar =
      (f.kind == Kind::sint32 || f.kind == Kind::sint64) ? (u << 1) ^ static_cast<std::uint64_t>(v >> 63) : u;
}

void Message::set_bytes(const FieldSpec& f, std::span<const std::byte> payload) {
  slot(f, WireType::length_delimited).bytes.assign(payload.begin(), payload.end());
}

void Message::set_string(const FieldSpec& f, std::string_view text) {
  set_bytes(f, std::as_bytes(std::span(text.data(), text.size())));
}

void Message::erase(const FieldSpec& f) {
  std::erase_if(values_, [&](const Value& v) { return v.number == f.number; });
}

Result<Message> decode(const MessageSpec& spec, std::span<const std::byte> bytes) {
  Message m(spec);
  std::uint64_t seen = 0;  // bit i: spec.fields[i] occurred (specs have < 64 fields)
  WireReader r(bytes);
  Field f;
  while (r.next(f)) {
    if (const FieldSpec* known = spec.find(f.number)) {
      if (auto ok = check(f, *known); !ok) return tl::unexpected(ok.error());
      seen |= std::uint64_t{1} << (known - spec.fields.data());
    }
    Value v{f.number, f.type, f.value, {}};
    if (f.type == WireType::length_delimited) v.bytes.assign(f.bytes.begin(), f.bytes.end());
    m.values().push_back(std::move(v));
  }
  if (r.failed()) return fail(Errc::corrupt, r.error());
  for (std::size_t i = 0; i < spec.fields.size(); ++i) {
    const FieldSpec& s = spec.fields[i];
    if (s.required && (seen & (std::uint64_t{1} << i)) == 0)
      return fail(Errc::corrupt, "missing required field " + std::to_string(s.number) + " (" + s.name + ")");
  }
  return m;
}

void append_varint(std::vector<std::byte>& out, std::uint64_t v) {
  do {
    auto b = static_cast<std::uint8_t>(v & 0x7f);
    v >>= 7;
    if (v != 0) b |= 0x80;
    out.push_back(static_cast<std::byte>(b));
  } while (v != 0);
}

std::vector<std::byte> encode(const Message& message) {
  std::vector<std::byte> out;
  for (const auto& v : message.values()) {
    append_varint(out, (std::uint64_t{v.number} << 3) | static_cast<std::uint64_t>(v.type));
    switch (v.type) {
      case WireType::varint: append_varint(out, v.scalar); break;
      case WireType::fixed64:
      case WireType::fixed32: {
        const int width = v.type == WireType::fixed64 ? 8 : 4;
        for (int i = 0; i < width; ++i) out.push_back(static_cast<std::byte>((v.scalar >> (8 * i)) & 0xff));
        break;
      }
      case WireType::length_delimited:
        append_varint(out, v.bytes.size());
        out.insert(out.end(), v.bytes.begin(), v.bytes.end());
        break;
    }
  }
  return out;
}

Result<std::vector<RawEntry>> split_image(std::span<const std::byte> data, std::string_view name,
                                          std::uint32_t image_magic, bool has_head_magic) {
  std::size_t pos = 0;
  if (has_head_magic) {
    if (data.size() < 4) return fail(Errc::corrupt, std::string(name) + ": truncated head magic (" +
                                                        std::to_string(data.size()) + " bytes)");
    const std::uint32_t head = load_u32le(data, 0);
    if (head != kImgCommonMagic)
      return fail(Errc::corrupt, std::string(name) + ": head magic " + hex(head) + " is not IMG_COMMON_MAGIC " +
                                     hex(kImgCommonMagic) +
                                     (head == kImgServiceMagic ? " (this is a service image)" : ""));
    pos = 4;
  }
  if (data.size() - pos < 4)
    return fail(Errc::corrupt, std::string(name) + ": truncated image magic at offset " + std::to_string(pos));
  const std::uint32_t magic = load_u32le(data, pos);
  if (magic != image_magic)
    return fail(Errc::corrupt, std::string(name) + ": image magic " + hex(magic) + ", expected " + hex(image_magic));
  pos += 4;

  std::vector<RawEntry> entries;
  while (pos < data.size()) {
    const std::size_t at = pos;
    if (data.size() - pos < 4)
      return fail(Errc::corrupt, std::string(name) + ": entry " + std::to_string(entries.size()) +
                                     ": truncated length prefix at offset " + std::to_string(at) + " (" +
                                     std::to_string(data.size() - pos) + " bytes left)");
    const std::uint32_t len = load_u32le(data, pos);
    pos += 4;
    if (len > data.size() - pos)
      return fail(Errc::corrupt, std::string(name) + ": entry " + std::to_string(entries.size()) +
                                     " at offset " + std::to_string(at) + ": length " + std::to_string(len) +
                                     " runs past the end of the file (" + std::to_string(data.size() - pos) +
                                     " bytes left)");
    entries.push_back(RawEntry{data.subspan(pos, len), at});
    pos += len;
  }
  return entries;
}

std::vector<std::byte> join_image(std::uint32_t image_magic, bool has_head_magic,
                                  std::span<const std::vector<std::byte>> entries) {
  std::vector<std::byte> out;
  if (has_head_magic) append_u32le(out, kImgCommonMagic);
  append_u32le(out, image_magic);
  for (const auto& e : entries) {
    append_u32le(out, static_cast<std::uint32_t>(e.size()));
    out.insert(out.end(), e.begin(), e.end());
  }
  return out;
}

}  // namespace snaptier::criu::pb
