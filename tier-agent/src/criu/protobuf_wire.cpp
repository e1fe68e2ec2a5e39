#include "criu/protobuf_wire.hpp"

#include <utility>

namespace snaptier::criu::wire {

const char* wire_type_name(WireType t) noexcept {
  switch (t) {
    case WireType::varint: return "varint";
    case WireType::fixed64: return "fixed64";
    case WireType::length_delimited: return "length-delimited";
    case WireType::fixed32: return "fixed32";
  }
  return "?";
}

std::optional<std::uint64_t> WireReader::read_varint(std::span<const std::byte> data,
                                                     std::size_t& pos) noexcept {
  std::uint64_t value = 0;
  for (unsigned i = 0; i < 10; ++i) {
    if (pos >= data.size()) return std::nullopt;
    const auto b = static_cast<std::uint8_t>(data[pos++]);
    if (i == 9 && b > 1) return std::nullopt;  // bits beyond 64
    value |= static_cast<std::uint64_t>(b & 0x7f) << (7 * i);
    if ((b & 0x80) == 0) return value;
  }
  return std::nullopt;  // an 11th byte would be needed
}

bool WireReader::fail(std::string message) {
  error_ = std::move(message);
  pos_ = data_.size();
  return false;
}

bool WireReader::next(Field& out) {
  if (!error_.empty() || pos_ >= data_.size()) return false;
  const std::size_t tag_offset = pos_;
  const auto tag = read_varint(data_, pos_);
  if (!tag) return fail("bad tag varint at offset " + std::to_string(tag_offset));
  const std::uint64_t number = *tag >> 3;
  const auto type = static_cast<unsigned>(*tag & 7);
  if (number == 0 || number > 0x1fffffff)
    return fail("invalid field number " + std::to_string(number) + " at offset " +
                std::to_string(tag_offset));
  out = Field{};
  out.number = static_cast<std::uint32_t>(number);
  out.offset = tag_offset;
  switch (type) {
    case 0: {
      const std::size_t at = pos_;
      const auto v = read_varint(data_, pos_);
      if (!v)
        return fail("field " + std::to_string(number) + ": bad varint at offset " + std::to_string(at));
      out.type = WireType::varint;
      out.value = *v;
      return true;
    }
    case 1:
    case 5: {
      const std::size_t width = type == 1 ? 8 : 4;
      if (data_.size() - pos_ < width)
        return fail("field " + std::to_string(number) + ": fixed" + std::to_string(width * 8) +
                    " runs past the end at offset " + std::to_string(pos_));
      std::uint64_t v = 0;
      for (std::size_t i = 0; i < width; ++i)
        v |= static_cast<std::uint64_t>(static_cast<std::uint8_t>(data_[pos_ + i])) << (8 * i);
      pos_ += width;
      out.type = type == 1 ? WireType::fixed64 : WireType::fixed32;
      out.value = v;
      return true;
    }
    case 2: {
      const std::size_t at = pos_;
      const auto len = read_varint(data_, pos_);
      if (!len)
        return fail("field " + std::to_string(number) + ": bad length varint at offset " +
                    std::to_string(at));
      if (*len > data_.size() - pos_)
        return fail("field " + std::to_string(number) + ": length " + std::to_string(*len) +
                    " at offset " + std::to_string(at) + " runs past the end (" +
                    std::to_string(data_.size() - pos_) + " bytes left)");
      out.type = WireType::length_delimited;
      out.bytes = data_.subspan(pos_, static_cast<std::size_t>(*len));
      pos_ += static_cast<std::size_t>(*len);
      return true;
    }
    default:
      return fail("field " + std::to_string(number) + ": unsupported wire type " + std::to_string(type) +
                  " at offset " + std::to_string(tag_offset));
  }
}

}  // namespace snaptier::criu::wire
