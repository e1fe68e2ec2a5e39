// CRIU image parsers: framing, the messages we need, and cross-file checks.
// Formats from criu 4.1.1: images/{inventory,pstree,mm,vma,pagemap}.proto,
// criu/include/magic.h, criu/image.c (img_check_magic), criu/protobuf.c (do_pb_read_one),
// criu/pagemap.c (init_compat_pagemap_entry, page offsets). Written from the formats, not
// from CRIU's code.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <limits>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "core/unique_fd.hpp"
#include "criu/pb_message.hpp"
#include "criu/protobuf_wire.hpp"
#include "criu/schema.hpp"
#include "criu/image_access.hpp"
#include "snaptier/criu_images.hpp"

namespace snaptier::criu {
namespace {


std::string hex(std::uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

using pb::RawEntry;
using pb::split_image;

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
  // A message checked against its schema, errors in this context.
  [[nodiscard]] Result<pb::Message> decode(const pb::MessageSpec& spec, std::span<const std::byte> msg) const {
    auto m = pb::decode(spec, msg);
    if (!m) return error(prefix_ + m.error().message);
    return m;
  }

 private:
  std::string_view file_;
  std::size_t index_;
  std::size_t offset_;
  const char* message_;
  std::string prefix_;
};

// Values of fields decode() has checked against their kind.
std::uint32_t u32(const pb::Message& m, const pb::FieldSpec& f) { return static_cast<std::uint32_t>(m.scalar_or(f, 0)); }
template <class T>
std::optional<T> opt(const pb::Message& m, const pb::FieldSpec& f) {
  auto v = m.scalar(f);
  if (!v) return std::nullopt;
  if constexpr (std::is_same_v<T, bool>) {
    return *v != 0;  // protobuf: any non-zero varint is true
  } else {
    return static_cast<T>(*v);
  }
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
  namespace s = schema::inventory;
  auto m = ctx.decode(s::kSpec, msg);
  if (!m) return tl::unexpected(m.error());
  InventoryEntry e;
  e.img_version = u32(*m, s::img_version);
  e.fdinfo_per_id = opt<bool>(*m, s::fdinfo_per_id);
  e.ns_per_id = opt<bool>(*m, s::ns_per_id);
  e.root_cg_set = opt<std::uint32_t>(*m, s::root_cg_set);
  e.lsmtype = opt<std::uint32_t>(*m, s::lsmtype);
  e.dump_uptime = opt<std::uint64_t>(*m, s::dump_uptime);
  e.pre_dump_mode = opt<std::uint32_t>(*m, s::pre_dump_mode);
  return e;
}

Result<PstreeEntry> decode_pstree(const Ctx& ctx, std::span<const std::byte> msg) {
  namespace s = schema::pstree;
  auto m = ctx.decode(s::kSpec, msg);
  if (!m) return tl::unexpected(m.error());
  PstreeEntry e;
  e.pid = u32(*m, s::pid);
  e.ppid = u32(*m, s::ppid);
  e.pgid = u32(*m, s::pgid);
  e.sid = u32(*m, s::sid);
  for (std::uint64_t t : m->repeated(s::threads)) e.threads.push_back(static_cast<std::uint32_t>(t));
  return e;
}

}  // namespace

VmaEntry vma_from_message(const pb::Message& m) {
  namespace s = schema::vma;
  VmaEntry v;
  v.start = m.scalar_or(s::start, 0);
  v.end = m.scalar_or(s::end, 0);
  v.pgoff = m.scalar_or(s::pgoff, 0);
  v.shmid = m.scalar_or(s::shmid, 0);
  v.prot = u32(m, s::prot);
  v.flags = u32(m, s::flags);
  v.status = u32(m, s::status);
  v.fd = m.signed_value(s::fd).value_or(-1);
  v.madv = opt<std::uint64_t>(m, s::madv);
  v.fdflags = opt<std::uint32_t>(m, s::fdflags);
  return v;
}

PagemapEntry pagemap_entry_from_message(const pb::Message& m) {
  namespace s = schema::pagemap_entry;
  PagemapEntry e;
  e.vaddr = m.scalar_or(s::vaddr, 0);
  const auto flags = opt<std::uint32_t>(m, s::flags);
  // As CRIU normalizes entries of older images (init_compat_pagemap_entry).
  e.flags = flags.value_or(0);
  if (opt<bool>(m, s::in_parent).value_or(false))
    e.flags |= kPeParent;
  else if (!flags)
    e.flags = kPePresent;
  e.nr_pages = m.scalar(s::nr_pages64).value_or(m.scalar_or(s::nr_pages, 0));
  return e;
}

namespace {

Result<MmEntry> decode_mm(const Ctx& ctx, std::span<const std::byte> msg) {
  namespace s = schema::mm;
  auto m = ctx.decode(s::kSpec, msg);
  if (!m) return tl::unexpected(m.error());
  MmEntry e;
  std::uint64_t* const addrs[] = {&e.mm_start_code, &e.mm_end_code,  &e.mm_start_data, &e.mm_end_data,
                                  &e.mm_start_stack, &e.mm_start_brk, &e.mm_brk,        &e.mm_arg_start,
                                  &e.mm_arg_end,     &e.mm_env_start, &e.mm_env_end};
  for (std::size_t i = 0; i < std::size(addrs); ++i) *addrs[i] = m->scalar_or(s::kFields[i], 0);
  e.exe_file_id = u32(*m, s::exe_file_id);
  e.mm_saved_auxv = m->repeated(s::mm_saved_auxv);
  for (const auto& v : m->values()) {
    if (v.number != s::vmas.number) continue;
    auto vma = ctx.nested("vmas", e.vmas.size()).decode(schema::vma::kSpec, v.bytes);
    if (!vma) return tl::unexpected(vma.error());
    e.vmas.push_back(vma_from_message(*vma));
  }
  if (auto d = m->signed_value(s::dumpable)) e.dumpable = static_cast<std::int32_t>(*d);
  e.thp_disabled = opt<bool>(*m, s::thp_disabled);
  return e;
}

Result<std::uint32_t> decode_pagemap_head(const Ctx& ctx, std::span<const std::byte> msg) {
  auto m = ctx.decode(schema::pagemap_head::kSpec, msg);
  if (!m) return tl::unexpected(m.error());
  return u32(*m, schema::pagemap_head::pages_id);
}

Result<PagemapEntry> decode_pagemap_entry(const Ctx& ctx, std::span<const std::byte> msg) {
  auto m = ctx.decode(schema::pagemap_entry::kSpec, msg);
  if (!m) return tl::unexpected(m.error());
  return pagemap_entry_from_message(*m);
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

Result<std::vector<PagesFileCheck>> check_pages_files(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> pagemaps;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.size() > 12 && name.rfind("pagemap-", 0) == 0 && name.compare(name.size() - 4, 4, ".img") == 0)
      pagemaps.push_back(entry.path());
  }
  if (ec) return fail(ec == std::errc::no_such_file_or_directory ? Errc::not_found : Errc::io,
                      "images directory " + dir.string() + ": " + ec.message());
  std::sort(pagemaps.begin(), pagemaps.end());

  std::vector<PagesFileCheck> checked;
  checked.reserve(pagemaps.size());
  for (const auto& path : pagemaps) {
    const std::string pm_name = path.filename().string();
    auto data = read_image_file(path);
    if (!data) return tl::unexpected(data.error());
    Pagemap pm;
    SNAPTIER_CRIU_TRY(pm, parse_pagemap(*data, pm_name));
    PagesFileCheck c{path, dir / ("pages-" + std::to_string(pm.pages_id) + ".img"), pm.present_bytes(), 0};
    auto size = regular_file_size(c.pages);
    if (!size && size.error().code != Errc::not_found) return tl::unexpected(size.error());
    c.file_bytes = size ? *size : 0;
    if (c.file_bytes < c.needed_bytes) {
      // The first entry CRIU would read past the end of the file, for the message.
      const PagemapEntry* first_short = nullptr;
      for (const auto& e : pm.entries)
        if (e.data_offset && *e.data_offset + e.bytes() > c.file_bytes) {
          first_short = &e;
          break;
        }
      const std::string what = size ? "holds " + std::to_string(c.file_bytes) + " bytes" : "is missing (0 bytes)";
      std::string message = c.pages.string() + " " + what + " but " + pm_name + " needs " +
                            std::to_string(c.needed_bytes) + " bytes (" + std::to_string(pm.present_pages) +
                            " present pages)";
      if (first_short != nullptr)
        message += "; first short entry at vaddr " + hex(first_short->vaddr) + " (" +
                   std::to_string(first_short->nr_pages) + " pages from offset " + std::to_string(*first_short->data_offset) + ")";
      return fail(Errc::corrupt, message + "; refused before criu restore, which would spin on it");
    }
    checked.push_back(std::move(c));
  }
  return checked;
}

}  // namespace snaptier::criu
