// CRIU image parsers: framing, the messages we need, and cross-file checks.
// Formats from criu 4.1.1: images/{inventory,pstree,mm,vma,pagemap}.proto,
// criu/include/magic.h, criu/image.c (img_check_magic), criu/protobuf.c (do_pb_read_one),
// criu/pagemap.c (init_compat_pagemap_entry, page offsets). Written from the formats, not
// from CRIU's code.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <limits>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "core/unique_fd.hpp"
#include "criu/protobuf_wire.hpp"
#include "snaptier/criu_images.hpp"

namespace snaptier::criu {
namespace {

using wire::Field;
using wire::WireReader;
using wire::WireType;

std::string hex(std::uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// One framed entry of an image: its message bytes and where its length prefix starts.
struct RawEntry {
  std::span<const std::byte> bytes;
  std::size_t offset = 0;
};

std::uint32_t load_u32le(std::span<const std::byte> data, std::size_t pos) {
  std::uint32_t v = 0;
  for (std::size_t i = 0; i < 4; ++i)
    v |= static_cast<std::uint32_t>(static_cast<std::uint8_t>(data[pos + i])) << (8 * i);
  return v;
}

// Checks the magic(s) and splits the rest into [u32 length][message] entries.
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

// Decoding context of one message: produces "file: entry N (msg) at offset X: ..." errors.
class Ctx {
 public:
  Ctx(std::string_view file, std::size_t index, std::size_t offset, const char* message)
      : file_(file), index_(index), offset_(offset), message_(message) {}

  [[nodiscard]] tl::unexpected<Error> error(const std::string& what) const {
    return fail(Errc::corrupt, std::string(file_) + ": entry " + std::to_string(index_) + " (" + message_ +
                                   ") at offset " + std::to_string(offset_) + ": " + what);
  }
  [[nodiscard]] Ctx nested(const char* message, std::size_t sub_index) const {
    Ctx c = *this;
    c.prefix_ = prefix_ + message + "[" + std::to_string(sub_index) + "] ";
    return c;
  }
  [[nodiscard]] tl::unexpected<Error> field_error(const Field& f, const char* field,
                                                  const std::string& what) const {
    return error(prefix_ + "field " + std::to_string(f.number) + " (" + field + ") at message offset " +
                 std::to_string(f.offset) + ": " + what);
  }
  [[nodiscard]] tl::unexpected<Error> missing(const char* field, std::uint32_t number) const {
    return error(prefix_ + "missing required field " + std::to_string(number) + " (" + field + ")");
  }
  [[nodiscard]] tl::unexpected<Error> wire_error(const WireReader& r) const { return error(prefix_ + r.error()); }

 private:
  std::string_view file_;
  std::size_t index_;
  std::size_t offset_;
  const char* message_;
  std::string prefix_;
};

Result<std::uint64_t> want_varint(const Ctx& ctx, const Field& f, const char* field) {
  if (f.type != WireType::varint)
    return ctx.field_error(f, field, std::string("expected varint, got ") + wire::wire_type_name(f.type));
  return f.value;
}

Result<std::uint64_t> get_u64(const Ctx& ctx, const Field& f, const char* field) {
  return want_varint(ctx, f, field);
}

Result<std::uint32_t> get_u32(const Ctx& ctx, const Field& f, const char* field) {
  auto v = want_varint(ctx, f, field);
  if (!v) return tl::unexpected(v.error());
  if (*v > std::numeric_limits<std::uint32_t>::max())
    return ctx.field_error(f, field, "value " + std::to_string(*v) + " does not fit uint32");
  return static_cast<std::uint32_t>(*v);
}

Result<bool> get_bool(const Ctx& ctx, const Field& f, const char* field) {
  auto v = want_varint(ctx, f, field);
  if (!v) return tl::unexpected(v.error());
  return *v != 0;  // protobuf: any non-zero varint is true
}

Result<std::int32_t> get_i32(const Ctx& ctx, const Field& f, const char* field) {
  auto v = want_varint(ctx, f, field);
  if (!v) return tl::unexpected(v.error());
  const auto s = static_cast<std::int64_t>(*v);  // int32 is sign-extended to 64 bits on the wire
  if (s < std::numeric_limits<std::int32_t>::min() || s > std::numeric_limits<std::int32_t>::max())
    return ctx.field_error(f, field, "value " + std::to_string(s) + " does not fit int32");
  return static_cast<std::int32_t>(s);
}

Result<std::int64_t> get_sint64(const Ctx& ctx, const Field& f, const char* field) {
  auto v = want_varint(ctx, f, field);
  if (!v) return tl::unexpected(v.error());
  return wire::zigzag_decode(*v);
}

// A repeated scalar varint field: one element per occurrence, or packed (length-delimited).
template <class T>
Result<void> append_repeated(const Ctx& ctx, const Field& f, const char* field, std::vector<T>& out) {
  if (f.type == WireType::varint) {
    if (f.value > std::numeric_limits<T>::max())
      return ctx.field_error(f, field, "value " + std::to_string(f.value) + " out of range");
    out.push_back(static_cast<T>(f.value));
    return {};
  }
  if (f.type != WireType::length_delimited)
    return ctx.field_error(f, field, std::string("expected varint or packed, got ") + wire::wire_type_name(f.type));
  std::size_t pos = 0;
  while (pos < f.bytes.size()) {
    const std::size_t at = pos;
    const auto v = WireReader::read_varint(f.bytes, pos);
    if (!v) return ctx.field_error(f, field, "bad packed varint at payload offset " + std::to_string(at));
    if (*v > std::numeric_limits<T>::max())
      return ctx.field_error(f, field, "value " + std::to_string(*v) + " out of range");
    out.push_back(static_cast<T>(*v));
  }
  return {};
}

// Assigns a decoded value or returns its error from the enclosing function.
#define SNAPTIER_CRIU_TRY(dst, expr)                   \
  do {                                                 \
    auto _r = (expr);                                  \
    if (!_r) return tl::unexpected(std::move(_r.error())); \
    dst = std::move(*_r);                              \
  } while (0)

#define SNAPTIER_CRIU_TRY_VOID(expr)                   \
  do {                                                 \
    auto _r = (expr);                                  \
    if (!_r) return tl::unexpected(std::move(_r.error())); \
  } while (0)

Result<InventoryEntry> decode_inventory(const Ctx& ctx, std::span<const std::byte> msg) {
  InventoryEntry e;
  bool have_version = false;
  WireReader r(msg);
  Field f;
  while (r.next(f)) {
    switch (f.number) {
      case 1: SNAPTIER_CRIU_TRY(e.img_version, get_u32(ctx, f, "img_version")); have_version = true; break;
      case 2: SNAPTIER_CRIU_TRY(e.fdinfo_per_id, get_bool(ctx, f, "fdinfo_per_id")); break;
      case 4: SNAPTIER_CRIU_TRY(e.ns_per_id, get_bool(ctx, f, "ns_per_id")); break;
      case 5: SNAPTIER_CRIU_TRY(e.root_cg_set, get_u32(ctx, f, "root_cg_set")); break;
      case 6: SNAPTIER_CRIU_TRY(e.lsmtype, get_u32(ctx, f, "lsmtype")); break;
      case 8: SNAPTIER_CRIU_TRY(e.dump_uptime, get_u64(ctx, f, "dump_uptime")); break;
      case 9: SNAPTIER_CRIU_TRY(e.pre_dump_mode, get_u32(ctx, f, "pre_dump_mode")); break;
      default: break;  // root_ids, plugins, ... : skipped
    }
  }
  if (r.failed()) return ctx.wire_error(r);
  if (!have_version) return ctx.missing("img_version", 1);
  return e;
}

Result<PstreeEntry> decode_pstree(const Ctx& ctx, std::span<const std::byte> msg) {
  PstreeEntry e;
  unsigned seen = 0;
  WireReader r(msg);
  Field f;
  while (r.next(f)) {
    switch (f.number) {
      case 1: SNAPTIER_CRIU_TRY(e.pid, get_u32(ctx, f, "pid")); seen |= 1u; break;
      case 2: SNAPTIER_CRIU_TRY(e.ppid, get_u32(ctx, f, "ppid")); seen |= 2u; break;
      case 3: SNAPTIER_CRIU_TRY(e.pgid, get_u32(ctx, f, "pgid")); seen |= 4u; break;
      case 4: SNAPTIER_CRIU_TRY(e.sid, get_u32(ctx, f, "sid")); seen |= 8u; break;
      case 5: SNAPTIER_CRIU_TRY_VOID(append_repeated(ctx, f, "threads", e.threads)); break;
      default: break;
    }
  }
  if (r.failed()) return ctx.wire_error(r);
  static constexpr const char* kNames[] = {"pid", "ppid", "pgid", "sid"};
  for (std::uint32_t i = 0; i < 4; ++i)
    if ((seen & (1u << i)) == 0) return ctx.missing(kNames[i], i + 1);
  return e;
}

Result<VmaEntry> decode_vma(const Ctx& ctx, std::span<const std::byte> msg) {
  VmaEntry v;
  unsigned seen = 0;
  WireReader r(msg);
  Field f;
  while (r.next(f)) {
    switch (f.number) {
      case 1: SNAPTIER_CRIU_TRY(v.start, get_u64(ctx, f, "start")); break;
      case 2: SNAPTIER_CRIU_TRY(v.end, get_u64(ctx, f, "end")); break;
      case 3: SNAPTIER_CRIU_TRY(v.pgoff, get_u64(ctx, f, "pgoff")); break;
      case 4: SNAPTIER_CRIU_TRY(v.shmid, get_u64(ctx, f, "shmid")); break;
      case 5: SNAPTIER_CRIU_TRY(v.prot, get_u32(ctx, f, "prot")); break;
      case 6: SNAPTIER_CRIU_TRY(v.flags, get_u32(ctx, f, "flags")); break;
      case 7: SNAPTIER_CRIU_TRY(v.status, get_u32(ctx, f, "status")); break;
      case 8: SNAPTIER_CRIU_TRY(v.fd, get_sint64(ctx, f, "fd")); break;
      case 9: SNAPTIER_CRIU_TRY(v.madv, get_u64(ctx, f, "madv")); break;
      case 10: SNAPTIER_CRIU_TRY(v.fdflags, get_u32(ctx, f, "fdflags")); break;
      default: break;
    }
    if (f.number >= 1 && f.number <= 8) seen |= 1u << (f.number - 1);
  }
  if (r.failed()) return ctx.wire_error(r);
  static constexpr const char* kNames[] = {"start", "end", "pgoff", "shmid", "prot", "flags", "status", "fd"};
  for (std::uint32_t i = 0; i < 8; ++i)
    if ((seen & (1u << i)) == 0) return ctx.missing(kNames[i], i + 1);
  return v;
}

Result<MmEntry> decode_mm(const Ctx& ctx, std::span<const std::byte> msg) {
  MmEntry m;
  std::uint32_t seen = 0;
  WireReader r(msg);
  Field f;
  std::uint64_t* const addrs[] = {&m.mm_start_code, &m.mm_end_code,  &m.mm_start_data, &m.mm_end_data,
                                  &m.mm_start_stack, &m.mm_start_brk, &m.mm_brk,        &m.mm_arg_start,
                                  &m.mm_arg_end,     &m.mm_env_start, &m.mm_env_end};
  static constexpr const char* kNames[] = {"mm_start_code", "mm_end_code",  "mm_start_data", "mm_end_data",
                                           "mm_start_stack", "mm_start_brk", "mm_brk",        "mm_arg_start",
                                           "mm_arg_end",     "mm_env_start", "mm_env_end",    "exe_file_id"};
  while (r.next(f)) {
    if (f.number >= 1 && f.number <= 11) {
      SNAPTIER_CRIU_TRY(*addrs[f.number - 1], get_u64(ctx, f, kNames[f.number - 1]));
      seen |= 1u << (f.number - 1);
      continue;
    }
    switch (f.number) {
      case 12: SNAPTIER_CRIU_TRY(m.exe_file_id, get_u32(ctx, f, "exe_file_id")); seen |= 1u << 11; break;
      case 13: SNAPTIER_CRIU_TRY_VOID(append_repeated(ctx, f, "mm_saved_auxv", m.mm_saved_auxv)); break;
      case 14: {
        if (f.type != WireType::length_delimited)
          return ctx.field_error(f, "vmas", std::string("expected a message, got ") + wire::wire_type_name(f.type));
        VmaEntry v;
        SNAPTIER_CRIU_TRY(v, decode_vma(ctx.nested("vmas", m.vmas.size()), f.bytes));
        m.vmas.push_back(v);
        break;
      }
      case 15: SNAPTIER_CRIU_TRY(m.dumpable, get_i32(ctx, f, "dumpable")); break;
      case 17: SNAPTIER_CRIU_TRY(m.thp_disabled, get_bool(ctx, f, "thp_disabled")); break;
      default: break;  // aios (16), future fields
    }
  }
  if (r.failed()) return ctx.wire_error(r);
  for (std::uint32_t i = 0; i < 12; ++i)
    if ((seen & (1u << i)) == 0) return ctx.missing(kNames[i], i + 1);
  return m;
}

Result<std::uint32_t> decode_pagemap_head(const Ctx& ctx, std::span<const std::byte> msg) {
  std::optional<std::uint32_t> id;
  WireReader r(msg);
  Field f;
  while (r.next(f))
    if (f.number == 1) SNAPTIER_CRIU_TRY(id, get_u32(ctx, f, "pages_id"));
  if (r.failed()) return ctx.wire_error(r);
  if (!id) return ctx.missing("pages_id", 1);
  return *id;
}

Result<PagemapEntry> decode_pagemap_entry(const Ctx& ctx, std::span<const std::byte> msg) {
  PagemapEntry e;
  bool have_vaddr = false, have_compat = false;
  std::uint32_t compat_nr_pages = 0;
  std::optional<std::uint64_t> nr_pages;
  std::optional<bool> in_parent;
  std::optional<std::uint32_t> flags;
  WireReader r(msg);
  Field f;
  while (r.next(f)) {
    switch (f.number) {
      case 1: SNAPTIER_CRIU_TRY(e.vaddr, get_u64(ctx, f, "vaddr")); have_vaddr = true; break;
      case 2: SNAPTIER_CRIU_TRY(compat_nr_pages, get_u32(ctx, f, "nr_pages")); have_compat = true; break;
      case 3: SNAPTIER_CRIU_TRY(in_parent, get_bool(ctx, f, "in_parent")); break;
      case 4: SNAPTIER_CRIU_TRY(flags, get_u32(ctx, f, "flags")); break;
      case 5: SNAPTIER_CRIU_TRY(nr_pages, get_u64(ctx, f, "nr_pages (64-bit)")); break;
      default: break;
    }
  }
  if (r.failed()) return ctx.wire_error(r);
  if (!have_vaddr) return ctx.missing("vaddr", 1);
  if (!have_compat) return ctx.missing("nr_pages", 2);
  // As CRIU normalizes entries of older images (init_compat_pagemap_entry).
  e.flags = flags.value_or(0);
  if (in_parent.value_or(false))
    e.flags |= kPeParent;
  else if (!flags)
    e.flags = kPePresent;
  e.nr_pages = nr_pages.value_or(compat_nr_pages);
  return e;
}

}  // namespace

bool VmaEntry::can_be_lazy() const noexcept {
  constexpr std::uint32_t kMapPrivate = 0x02, kMapAnonymous = 0x20, kMapLocked = 0x2000,
                          kMapHugetlb = 0x40000;  // x86-64 / generic values
  auto is = [this](std::uint32_t bits) { return (status & bits) == bits; };
  return (flags & kMapAnonymous) && (flags & kMapPrivate) && !(flags & kMapLocked) && !(flags & kMapHugetlb) &&
         !is(kVmaAreaVdso) && !is(kVmaAreaVvar) && !is(kVmaAreaVsyscall);
}

const Task* Checkpoint::find(std::uint32_t pid) const noexcept {
  for (const auto& t : tasks)
    if (t.pstree.pid == pid) return &t;
  return nullptr;
}

Result<InventoryEntry> parse_inventory(std::span<const std::byte> image, std::string_view name) {
  auto entries = split_image(image, name, kInventoryMagic, /*has_head_magic=*/false);
  if (!entries) return tl::unexpected(entries.error());
  if (entries->size() != 1)
    return fail(Errc::corrupt, std::string(name) + ": " + std::to_string(entries->size()) +
                                   " entries, expected exactly one inventory_entry");
  const auto& raw = entries->front();
  return decode_inventory(Ctx(name, 0, raw.offset, "inventory_entry"), raw.bytes);
}

Result<std::vector<PstreeEntry>> parse_pstree(std::span<const std::byte> image, std::string_view name) {
  auto entries = split_image(image, name, kPstreeMagic, true);
  if (!entries) return tl::unexpected(entries.error());
  std::vector<PstreeEntry> out;
  out.reserve(entries->size());
  for (std::size_t i = 0; i < entries->size(); ++i) {
    const auto& raw = (*entries)[i];
    auto e = decode_pstree(Ctx(name, i, raw.offset, "pstree_entry"), raw.bytes);
    if (!e) return tl::unexpected(e.error());
    out.push_back(std::move(*e));
  }
  return out;
}

Result<MmEntry> parse_mm(std::span<const std::byte> image, std::string_view name) {
  auto entries = split_image(image, name, kMmMagic, true);
  if (!entries) return tl::unexpected(entries.error());
  if (entries->size() != 1)
    return fail(Errc::corrupt, std::string(name) + ": " + std::to_string(entries->size()) +
                                   " entries, expected exactly one mm_entry");
  const auto& raw = entries->front();
  return decode_mm(Ctx(name, 0, raw.offset, "mm_entry"), raw.bytes);
}

Result<Pagemap> parse_pagemap(std::span<const std::byte> image, std::string_view name) {
  auto entries = split_image(image, name, kPagemapMagic, true);
  if (!entries) return tl::unexpected(entries.error());
  if (entries->empty()) return fail(Errc::corrupt, std::string(name) + ": no pagemap_head");
  Pagemap pm;
  {
    const auto& raw = entries->front();
    SNAPTIER_CRIU_TRY(pm.pages_id, decode_pagemap_head(Ctx(name, 0, raw.offset, "pagemap_head"), raw.bytes));
  }
  constexpr std::uint64_t kMaxPages = std::numeric_limits<std::uint64_t>::max() / kPageSize;
  std::uint64_t next_offset = 0;
  std::uint64_t prev_end = 0;
  pm.entries.reserve(entries->size() - 1);
  for (std::size_t i = 1; i < entries->size(); ++i) {
    const auto& raw = (*entries)[i];
    const Ctx ctx(name, i, raw.offset, "pagemap_entry");
    PagemapEntry e;
    SNAPTIER_CRIU_TRY(e, decode_pagemap_entry(ctx, raw.bytes));
    const std::string where = "vaddr " + hex(e.vaddr) + " nr_pages " + std::to_string(e.nr_pages);
    if (e.vaddr % kPageSize != 0) return ctx.error(where + ": vaddr is not page aligned");
    if (e.nr_pages == 0) return ctx.error(where + ": no pages");
    if (e.nr_pages > kMaxPages || e.vaddr > std::numeric_limits<std::uint64_t>::max() - e.nr_pages * kPageSize + 1)
      return ctx.error(where + ": range wraps past the end of the address space");
    if (i > 1 && e.vaddr < prev_end)
      return ctx.error(where + ": overlaps or precedes the previous entry (ends at " + hex(prev_end) + ")");
    if (e.present() && e.in_parent()) return ctx.error(where + ": both PE_PRESENT and PE_PARENT");
    if (e.present()) {
      e.data_offset = next_offset;
      if (e.nr_pages > kMaxPages - pm.present_pages)
        return ctx.error(where + ": present pages overflow");
      pm.present_pages += e.nr_pages;
      next_offset = pm.present_pages * kPageSize;
    }
    prev_end = e.vaddr + (e.nr_pages * kPageSize - 1);  // inclusive end, no overflow at the top
    prev_end = prev_end == std::numeric_limits<std::uint64_t>::max() ? prev_end : prev_end + 1;
    pm.entries.push_back(e);
  }
  return pm;
}

Result<std::vector<std::byte>> read_image_file(const std::filesystem::path& path) {
  detail::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    const int err = errno;
    return fail_errno(err == ENOENT ? Errc::not_found : Errc::io, "open " + path.string(), err);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    const int err = errno;
    return fail_errno(Errc::io, "stat " + path.string(), err);
  }
  if (!S_ISREG(st.st_mode)) return fail(Errc::corrupt, path.string() + ": not a regular file");
  if (static_cast<std::uint64_t>(st.st_size) > kMaxMetadataImageBytes)
    return fail(Errc::corrupt, path.string() + ": " + std::to_string(st.st_size) +
                                   " bytes, more than a metadata image may have (" +
                                   std::to_string(kMaxMetadataImageBytes) + ")");
  std::vector<std::byte> data(static_cast<std::size_t>(st.st_size));
  std::size_t got = 0;
  while (got < data.size()) {
    const ssize_t n = ::read(fd.get(), data.data() + got, data.size() - got);
    if (n < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      return fail_errno(Errc::io, "read " + path.string(), err);
    }
    if (n == 0) break;  // shrank under us: parse what is there
    got += static_cast<std::size_t>(n);
  }
  data.resize(got);
  return data;
}

namespace {

Result<void> check_vmas(const MmEntry& mm, const std::string& name) {
  std::uint64_t prev_end = 0;
  for (std::size_t i = 0; i < mm.vmas.size(); ++i) {
    const auto& v = mm.vmas[i];
    const std::string where = name + ": vma " + std::to_string(i) + " [" + hex(v.start) + ", " + hex(v.end) + ")";
    if (v.start % kPageSize != 0 || v.end % kPageSize != 0)
      return fail(Errc::corrupt, where + " is not page aligned");
    if (v.start >= v.end) return fail(Errc::corrupt, where + " is empty or inverted");
    if (i > 0 && v.start < prev_end)
      return fail(Errc::corrupt, where + " overlaps or precedes the previous vma (ends at " + hex(prev_end) + ")");
    prev_end = v.end;
  }
  return {};
}

// Every byte of [start, end) must lie in some VMA; VMAs are sorted and disjoint.
Result<void> check_covered(const std::vector<VmaEntry>& vmas, const PagemapEntry& e, const std::string& name,
                           std::size_t index, const std::string& mm_name) {
  const std::uint64_t end = e.end();  // parse_pagemap ruled out wrap-around except ending at 2^64
  std::uint64_t cur = e.vaddr;
  // First VMA whose end is above cur.
  std::size_t i = 0;
  while (i < vmas.size() && vmas[i].end <= cur) ++i;
  while (true) {
    if (i >= vmas.size() || vmas[i].start > cur)
      return fail(Errc::corrupt, name + ": entry " + std::to_string(index) + " (vaddr " + hex(e.vaddr) +
                                     ", nr_pages " + std::to_string(e.nr_pages) + "): address " + hex(cur) +
                                     " is outside every vma of " + mm_name);
    cur = vmas[i].end;
    if (end != 0 && cur >= end) return {};
    if (end == 0 && cur == 0) return {};  // reached the top of the address space
    ++i;
  }
}

Result<std::uint64_t> regular_file_size(const std::filesystem::path& p) {
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) {
    const int err = errno;
    return fail_errno(err == ENOENT ? Errc::not_found : Errc::io, "stat " + p.string(), err);
  }
  if (!S_ISREG(st.st_mode)) return fail(Errc::corrupt, p.string() + ": not a regular file");
  return static_cast<std::uint64_t>(st.st_size);
}

}  // namespace

Result<Checkpoint> load_checkpoint(const std::filesystem::path& dir) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    const int err = errno;
    return fail_errno(err == ENOENT ? Errc::not_found : Errc::io, "checkpoint directory " + dir.string(), err);
  }
  if (!S_ISDIR(st.st_mode)) return fail(Errc::invalid_argument, dir.string() + " is not a directory");

  Checkpoint cp;
  cp.dir = dir;
  {
    auto data = read_image_file(dir / "inventory.img");
    if (!data) return tl::unexpected(data.error());
    SNAPTIER_CRIU_TRY(cp.inventory, parse_inventory(*data, "inventory.img"));
    if (cp.inventory.img_version != 1 && cp.inventory.img_version != 2)
      return fail(Errc::unsupported, "inventory.img: img_version " + std::to_string(cp.inventory.img_version) +
                                         " (known: 1, 2)");
  }
  std::vector<PstreeEntry> tree;
  {
    auto data = read_image_file(dir / "pstree.img");
    if (!data) return tl::unexpected(data.error());
    SNAPTIER_CRIU_TRY(tree, parse_pstree(*data, "pstree.img"));
  }
  if (tree.empty()) return fail(Errc::corrupt, "pstree.img: no tasks");
  std::unordered_set<std::uint32_t> pids;
  for (std::size_t i = 0; i < tree.size(); ++i)
    if (!pids.insert(tree[i].pid).second)
      return fail(Errc::corrupt, "pstree.img: entry " + std::to_string(i) + ": pid " + std::to_string(tree[i].pid) +
                                     " appears twice");
  if (pids.count(tree[0].ppid) != 0)
    return fail(Errc::corrupt, "pstree.img: entry 0 (the root) has its parent " + std::to_string(tree[0].ppid) +
                                   " inside the tree");
  for (std::size_t i = 1; i < tree.size(); ++i)
    if (pids.count(tree[i].ppid) == 0)
      return fail(Errc::corrupt, "pstree.img: entry " + std::to_string(i) + " (pid " + std::to_string(tree[i].pid) +
                                     "): parent " + std::to_string(tree[i].ppid) + " is not in the tree");

  std::unordered_map<std::uint32_t, std::uint32_t> pages_owner;  // pages_id -> pid
  for (auto& entry : tree) {
    Task task;
    task.pstree = std::move(entry);
    const std::string pid = std::to_string(task.pstree.pid);
    const std::string mm_name = "mm-" + pid + ".img";
    const std::string pm_name = "pagemap-" + pid + ".img";
    auto mm_data = read_image_file(dir / mm_name);
    auto pm_data = read_image_file(dir / pm_name);
    const bool mm_missing = !mm_data && mm_data.error().code == Errc::not_found;
    const bool pm_missing = !pm_data && pm_data.error().code == Errc::not_found;
    if (mm_missing && pm_missing) {  // a task without memory (zombie)
      cp.tasks.push_back(std::move(task));
      continue;
    }
    if (mm_missing != pm_missing)
      return fail(Errc::corrupt, "task " + pid + ": " + (mm_missing ? mm_name : pm_name) + " is missing but " +
                                     (mm_missing ? pm_name : mm_name) + " exists");
    if (!mm_data) return tl::unexpected(mm_data.error());
    if (!pm_data) return tl::unexpected(pm_data.error());

    MmEntry mm;
    SNAPTIER_CRIU_TRY(mm, parse_mm(*mm_data, mm_name));
    SNAPTIER_CRIU_TRY_VOID(check_vmas(mm, mm_name));
    Pagemap pm;
    SNAPTIER_CRIU_TRY(pm, parse_pagemap(*pm_data, pm_name));
    for (std::size_t i = 0; i < pm.entries.size(); ++i)
      SNAPTIER_CRIU_TRY_VOID(check_covered(mm.vmas, pm.entries[i], pm_name, i + 1, mm_name));

    auto [it, fresh] = pages_owner.emplace(pm.pages_id, task.pstree.pid);
    if (!fresh)
      return fail(Errc::corrupt, pm_name + ": pages_id " + std::to_string(pm.pages_id) + " is also used by task " +
                                     std::to_string(it->second));
    task.pages_path = dir / ("pages-" + std::to_string(pm.pages_id) + ".img");
    auto size = regular_file_size(task.pages_path);
    if (!size) {
      if (size.error().code != Errc::not_found || pm.present_pages != 0) {
        if (size.error().code == Errc::not_found)
          return fail(Errc::corrupt, pm_name + ": " + std::to_string(pm.present_pages) + " present pages but " +
                                         task.pages_path.filename().string() + " is missing");
        return tl::unexpected(size.error());
      }
      size = 0;
    }
    if (*size != pm.present_bytes())
      return fail(Errc::corrupt, task.pages_path.filename().string() + ": " + std::to_string(*size) + " bytes, but " +
                                     pm_name + " has " + std::to_string(pm.present_pages) + " present pages (" +
                                     std::to_string(pm.present_bytes()) + " bytes)");
    task.pages_file_bytes = *size;
    task.mm = std::move(mm);
    task.pagemap = std::move(pm);
    cp.tasks.push_back(std::move(task));
  }
  return cp;
}

}  // namespace snaptier::criu
