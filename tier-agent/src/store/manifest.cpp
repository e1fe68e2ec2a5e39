#include "store/manifest.hpp"

#include <bit>
#include <cstring>
#include <string>

#include "cxl/crc32c.hpp"

namespace snaptier {
namespace {

static_assert(std::endian::native == std::endian::little, "manifests are little-endian");

constexpr char kMagic[8] = {'S', 'N', 'A', 'P', 'M', 'A', 'N', '1'};
// Version 2 appends the tier epochs after the page table. Manifests without epochs are still
// written as version 1, which agents from before epochs can read.
constexpr std::uint32_t kVersion = 2;
constexpr std::uint32_t kVersionWithoutEpochs = 1;
constexpr std::size_t kHeaderSize = 24;  // magic, version, flags, body length
constexpr std::uint32_t kFlagPublished = 1;

class Writer {
 public:
  template <class T>
  void put(T value) {
    const auto* p = reinterpret_cast<const std::byte*>(&value);
    out_.insert(out_.end(), p, p + sizeof value);
  }
  void put_bytes(std::span<const std::byte> bytes) {
    put<std::uint64_t>(bytes.size());
    out_.insert(out_.end(), bytes.begin(), bytes.end());
  }
  void put_string(const std::string& s) { put_bytes(std::as_bytes(std::span(s.data(), s.size()))); }
  std::vector<std::byte>& bytes() { return out_; }

 private:
  std::vector<std::byte> out_;
};

class Reader {
 public:
  explicit Reader(std::span<const std::byte> in) : in_(in) {}
  template <class T>
  bool get(T& value) {
    if (in_.size() - pos_ < sizeof value) return false;
    std::memcpy(&value, in_.data() + pos_, sizeof value);
    pos_ += sizeof value;
    return true;
  }
  bool get_span(std::span<const std::byte>& out) {
    std::uint64_t n = 0;
    if (!get(n) || in_.size() - pos_ < n) return false;
    out = in_.subspan(pos_, n);
    pos_ += n;
    return true;
  }
  bool get_string(std::string& s) {
    std::span<const std::byte> raw;
    if (!get_span(raw)) return false;
    s.assign(reinterpret_cast<const char*>(raw.data()), raw.size());
    return true;
  }
  [[nodiscard]] std::size_t remaining() const { return in_.size() - pos_; }

 private:
  std::span<const std::byte> in_;
  std::size_t pos_ = 0;
};

bool valid_kind(std::uint8_t k) { return k >= 1 && k <= 4; }

}  // namespace

std::vector<std::byte> encode_manifest(const Manifest& m) {
  const Snapshot& s = m.snapshot;
  Writer w;
  for (char c : kMagic) w.put(c);
  const bool epochs = !s.info.tier_epochs.empty();
  w.put(epochs ? kVersion : kVersionWithoutEpochs);
  w.put<std::uint32_t>(s.info.published ? kFlagPublished : 0);
  w.put<std::uint64_t>(0);  // body length, patched below
  w.put_string(s.info.id);
  w.put_string(s.info.owner_host);
  w.put(s.info.created_unix_ns);
  w.put(s.info.page_count);
  w.put(s.info.zero_pages);
  w.put<std::uint32_t>(static_cast<std::uint32_t>(s.info.bytes_per_tier.size()));
  for (const auto& [kind, bytes] : s.info.bytes_per_tier) {
    w.put(static_cast<std::uint8_t>(kind));
    w.put(bytes);
  }
  w.put<std::uint32_t>(static_cast<std::uint32_t>(m.extents.size()));
  for (const auto& e : m.extents) {
    w.put(static_cast<std::uint8_t>(e.tier));
    w.put(e.extent.offset);
    w.put(e.extent.length);
  }
  w.put<std::uint32_t>(static_cast<std::uint32_t>(s.blobs.size()));
  for (const auto& [name, blob] : s.blobs) {
    w.put_string(name);
    w.put_bytes(blob);
  }
  w.put<std::uint64_t>(s.pages.size());
  for (const auto& p : s.pages) {
    w.put(p.vaddr);
    w.put(static_cast<std::uint8_t>(p.tier));
    w.put(p.location);
    w.put(p.flags);
    w.put(p.touch_order);
    w.put(p.crc32c);
  }
  if (epochs) {
    w.put<std::uint32_t>(static_cast<std::uint32_t>(s.info.tier_epochs.size()));
    for (const auto& [kind, epoch] : s.info.tier_epochs) {
      w.put(static_cast<std::uint8_t>(kind));
      w.put(epoch);
    }
  }
  auto& out = w.bytes();
  const std::uint64_t body = out.size() - kHeaderSize;
  std::memcpy(out.data() + 16, &body, sizeof body);
  const std::uint32_t crc = crc32c(out);
  w.put(crc);
  return std::move(out);
}

Result<Manifest> decode_manifest(std::span<const std::byte> bytes) {
  auto corrupt = [](const std::string& why) { return fail(Errc::corrupt, "manifest: " + why); };
  if (bytes.size() < kHeaderSize + 4) return corrupt("truncated (" + std::to_string(bytes.size()) + " bytes)");
  if (std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0) return corrupt("bad magic");
  Reader header(bytes.subspan(8));
  std::uint32_t version = 0, flags = 0;
  std::uint64_t body = 0;
  (void)header.get(version);
  (void)header.get(flags);
  (void)header.get(body);
  if (version != kVersion && version != kVersionWithoutEpochs) {
    return fail(Errc::unsupported, "manifest version " + std::to_string(version));
  }
  if (body > bytes.size() - kHeaderSize - 4) return corrupt("truncated (body length beyond the end)");
  if (body != bytes.size() - kHeaderSize - 4) return corrupt("trailing bytes after the checksum");
  std::uint32_t stored = 0;
  std::memcpy(&stored, bytes.data() + kHeaderSize + body, sizeof stored);
  if (crc32c(bytes.first(kHeaderSize + body)) != stored) return corrupt("checksum mismatch");

  Manifest m;
  Snapshot& s = m.snapshot;
  s.info.published = (flags & kFlagPublished) != 0;
  Reader r(bytes.subspan(kHeaderSize, body));
  std::uint32_t n32 = 0;
  std::uint64_t n64 = 0;
  if (!r.get_string(s.info.id) || !r.get_string(s.info.owner_host) ||
      !r.get(s.info.created_unix_ns) || !r.get(s.info.page_count) || !r.get(s.info.zero_pages) ||
      !r.get(n32)) {
    return corrupt("truncated header fields");
  }
  for (std::uint32_t i = 0; i < n32; ++i) {
    std::uint8_t kind = 0;
    std::uint64_t value = 0;
    if (!r.get(kind) || !r.get(value) || !valid_kind(kind)) return corrupt("bad tier byte counts");
    s.info.bytes_per_tier[static_cast<TierKind>(kind)] = value;
  }
  if (!r.get(n32) || n32 > r.remaining() / 17) return corrupt("bad extent count");
  m.extents.resize(n32);
  for (auto& e : m.extents) {
    std::uint8_t kind = 0;
    if (!r.get(kind) || !r.get(e.extent.offset) || !r.get(e.extent.length) || !valid_kind(kind)) {
      return corrupt("bad extent");
    }
    e.tier = static_cast<TierKind>(kind);
  }
  if (!r.get(n32)) return corrupt("truncated blob count");
  for (std::uint32_t i = 0; i < n32; ++i) {
    std::string name;
    std::span<const std::byte> blob;
    if (!r.get_string(name) || !r.get_span(blob)) return corrupt("truncated blob");
    s.blobs[name].assign(blob.begin(), blob.end());
  }
  constexpr std::size_t kPageRecord = 8 + 1 + 8 + 4 + 4 + 4;
  if (!r.get(n64) || n64 > r.remaining() / kPageRecord || n64 != s.info.page_count) {
    return corrupt("bad page count");
  }
  s.pages.resize(n64);
  for (auto& p : s.pages) {
    std::uint8_t kind = 0;
    (void)(r.get(p.vaddr) && r.get(kind) && r.get(p.location) && r.get(p.flags) &&
           r.get(p.touch_order) && r.get(p.crc32c));
    if (!valid_kind(kind)) return corrupt("bad page tier");
    p.tier = static_cast<TierKind>(kind);
  }
  if (version >= 2) {
    if (!r.get(n32) || n32 > r.remaining() / 9) return corrupt("bad tier epoch count");
    for (std::uint32_t i = 0; i < n32; ++i) {
      std::uint8_t kind = 0;
      std::uint64_t epoch = 0;
      if (!r.get(kind) || !r.get(epoch) || !valid_kind(kind)) return corrupt("bad tier epoch");
      s.info.tier_epochs[static_cast<TierKind>(kind)] = epoch;
    }
  }
  if (r.remaining() != 0) return corrupt("unexpected bytes after the page table");
  return m;
}

}  // namespace snaptier
