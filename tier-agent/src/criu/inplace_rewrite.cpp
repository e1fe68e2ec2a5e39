#include "criu/inplace_rewrite.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>

#include "core/unique_fd.hpp"
#include "criu/image_access.hpp"
#include "criu/pb_message.hpp"
#include "criu/schema.hpp"
#include "snaptier/criu_images.hpp"

namespace snaptier::criu {
namespace {

namespace fs = std::filesystem;
using detail::UniqueFd;

constexpr std::uint32_t kMapPrivate = 0x02, kMapAnonymous = 0x20, kMapGrowsdown = 0x0100;
constexpr std::uint32_t kOLargefile = 0100000;  // x86-64 / generic O_LARGEFILE, as CRIU dumps it

std::string hex(std::uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::uint64_t run_end(const MappedRun& r) { return r.vaddr + r.pages * kPageSize; }

// A file written beside its final name, renamed over it by commit().
struct Staged {
  fs::path final_path;
  fs::path temp_path;
};

class Stager {
 public:
  ~Stager() {
    std::error_code ec;
    for (const auto& s : staged_) fs::remove(s.temp_path, ec);
  }
  Result<void> write(const fs::path& path, std::span<const std::byte> bytes) {
    auto fd = create(path);
    if (!fd) return tl::unexpected(fd.error());
    return write_at(fd->get(), bytes, 0, staged_.back().temp_path);
  }
  Result<UniqueFd> create(const fs::path& path) {
    Staged s{path, path.string() + ".inplace-tmp"};
    UniqueFd fd(::open(s.temp_path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    if (!fd) return fail_errno(Errc::io, "create " + s.temp_path.string(), errno);
    staged_.push_back(std::move(s));
    return fd;
  }
  Result<void> commit() {
    for (const auto& s : staged_) {
      if (::rename(s.temp_path.c_str(), s.final_path.c_str()) != 0)
        return fail_errno(Errc::io, "rename " + s.temp_path.string(), errno);
    }
    staged_.clear();
    return {};
  }
  static Result<void> write_at(int fd, std::span<const std::byte> bytes, std::uint64_t offset, const fs::path& what) {
    std::size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return fail_errno(Errc::io, "write " + what.string(), errno);
      done += static_cast<std::size_t>(n);
    }
    return {};
  }

 private:
  std::vector<Staged> staged_;
};

Result<std::vector<std::byte>> read_image(const fs::path& path) {
  auto data = read_image_file(path);
  if (!data && data.error().code == Errc::not_found)
    return fail(Errc::corrupt, path.filename().string() + " is missing");
  return data;
}

tl::unexpected<Error> corrupt(const std::string& file, std::size_t entry, const Error& e) {
  return fail(Errc::corrupt, file + ": entry " + std::to_string(entry) + ": " + e.message);
}

// The checks of rewrite_for_mapping's contract on one run against the VMA holding it.
Result<void> check_vma_for_run(const VmaEntry& v, const MappedRun& r, std::uint32_t pid) {
  const std::string where = "task " + std::to_string(pid) + ": run at " + hex(r.vaddr) + " (" + std::to_string(r.pages) +
                            " pages) in vma [" + hex(v.start) + ", " + hex(v.end) + ")";
  if (run_end(r) > v.end) return fail(Errc::invalid_argument, where + " runs past the end of the vma");
  if (!can_map_in_place(v))
    return fail(Errc::invalid_argument, where + ": not a private anonymous vma a file mapping can replace");
  return {};
}

struct TaskRewrite {
  std::uint32_t pid = 0;
  std::vector<std::byte> mm;       // the new mm-<pid>.img
  std::vector<std::byte> pagemap;  // the new pagemap-<pid>.img
  fs::path pages_path;
  // (old offset, new offset, bytes) of the present data that stays.
  struct Copy {
    std::uint64_t from = 0, to = 0, length = 0;
  };
  std::vector<Copy> copies;
  std::uint64_t new_pages_bytes = 0;
  std::uint64_t pages_mapped = 0;
  std::uint64_t vmas_before = 0, vmas_after = 0;
};

Result<std::vector<std::byte>> rewrite_mm(const fs::path& dir, std::uint32_t pid, std::span<const MappedRun> runs,
                                          std::uint32_t file_id, TaskRewrite& out) {
  const std::string name = "mm-" + std::to_string(pid) + ".img";
  auto data = read_image(dir / name);
  if (!data) return tl::unexpected(data.error());
  auto entries = pb::split_image(*data, name, kMmMagic, true);
  if (!entries) return tl::unexpected(entries.error());
  if (entries->size() != 1) return fail(Errc::corrupt, name + ": expected exactly one mm_entry");
  auto mm = pb::decode(schema::mm::kSpec, entries->front().bytes);
  if (!mm) return corrupt(name, 0, mm.error());

  namespace v = schema::vma;
  std::vector<pb::Value> values;
  std::size_t next_run = 0;
  std::size_t vma_index = 0;
  for (const auto& value : mm->values()) {
    if (value.number != schema::mm::vmas.number) {
      values.push_back(value);
      continue;
    }
    auto msg = pb::decode(v::kSpec, value.bytes);
    if (!msg) return corrupt(name, 0, Error{Errc::corrupt, "vmas[" + std::to_string(vma_index) + "] " + msg.error().message});
    ++vma_index;
    ++out.vmas_before;
    const VmaEntry vma = vma_from_message(*msg);
    if (next_run < runs.size() && runs[next_run].vaddr < vma.start)
      return fail(Errc::invalid_argument, "task " + std::to_string(pid) + ": run at " + hex(runs[next_run].vaddr) +
                                              " is outside every vma");
    auto piece = [&](std::uint64_t start, std::uint64_t end, const MappedRun* run) {
      pb::Message m = *msg;
      m.set_unsigned(v::start, start);
      m.set_unsigned(v::end, end);
      if (run != nullptr) {
        m.set_unsigned(v::pgoff, run->file_offset);
        m.set_unsigned(v::shmid, file_id);
        m.set_unsigned(v::flags, (vma.flags & ~kMapAnonymous) | kMapPrivate);
        m.set_unsigned(v::status, kVmaAreaRegular | kVmaFilePrivate);
        m.set_signed(v::fd, -1);
        m.set_unsigned(v::fdflags, 0);  // O_RDONLY: a private mapping never writes the file
      }
      values.push_back(pb::Value{schema::mm::vmas.number, wire::WireType::length_delimited, 0, pb::encode(m)});
      ++out.vmas_after;
    };
    std::uint64_t cursor = vma.start;
    while (next_run < runs.size() && runs[next_run].vaddr < vma.end) {
      const MappedRun& r = runs[next_run];
      if (auto ok = check_vma_for_run(vma, r, pid); !ok) return tl::unexpected(ok.error());
      if (r.vaddr > cursor) piece(cursor, r.vaddr, nullptr);
      piece(r.vaddr, run_end(r), &r);
      cursor = run_end(r);
      ++next_run;
    }
    if (cursor == vma.start) {
      values.push_back(value);  // untouched, byte for byte
      ++out.vmas_after;
    } else if (cursor < vma.end) {
      piece(cursor, vma.end, nullptr);
    }
  }
  if (next_run < runs.size())
    return fail(Errc::invalid_argument, "task " + std::to_string(pid) + ": run at " + hex(runs[next_run].vaddr) +
                                            " is outside every vma");
  mm->values() = std::move(values);
  const std::vector<std::byte> encoded[] = {pb::encode(*mm)};
  return pb::join_image(kMmMagic, true, encoded);
}

Result<void> rewrite_pagemap(const fs::path& dir, std::uint32_t pid, std::span<const MappedRun> runs, TaskRewrite& out) {
  const std::string name = "pagemap-" + std::to_string(pid) + ".img";
  auto data = read_image(dir / name);
  if (!data) return tl::unexpected(data.error());
  auto entries = pb::split_image(*data, name, kPagemapMagic, true);
  if (!entries) return tl::unexpected(entries.error());
  if (entries->empty()) return fail(Errc::corrupt, name + ": no pagemap_head");
  auto head = pb::decode(schema::pagemap_head::kSpec, entries->front().bytes);
  if (!head) return corrupt(name, 0, head.error());
  out.pages_path = dir / ("pages-" + std::to_string(head->scalar_or(schema::pagemap_head::pages_id, 0)) + ".img");

  namespace p = schema::pagemap_entry;
  std::vector<std::vector<std::byte>> kept{std::vector<std::byte>(entries->front().bytes.begin(), entries->front().bytes.end())};
  std::vector<std::uint64_t> covered(runs.size(), 0);
  std::uint64_t old_offset = 0;
  for (std::size_t i = 1; i < entries->size(); ++i) {
    const auto& raw = (*entries)[i];
    auto msg = pb::decode(p::kSpec, raw.bytes);
    if (!msg) return corrupt(name, i, msg.error());
    const PagemapEntry e = pagemap_entry_from_message(*msg);
    if (e.nr_pages == 0 || e.vaddr % kPageSize != 0 || e.nr_pages > std::numeric_limits<std::uint64_t>::max() / kPageSize ||
        e.vaddr > std::numeric_limits<std::uint64_t>::max() - e.bytes())
      return fail(Errc::corrupt, name + ": entry " + std::to_string(i) + ": bad range");
    const std::uint64_t entry_offset = old_offset;
    if (e.present()) old_offset += e.bytes();
    // The parts of the entry outside every run stay, as entries of their own.
    std::uint64_t cursor = e.vaddr;
    bool split = false;
    auto keep = [&](std::uint64_t from, std::uint64_t to) {
      if (from >= to) return;
      pb::Message m = *msg;
      const std::uint64_t n = (to - from) / kPageSize;
      m.set_unsigned(p::vaddr, from);
      if (m.has(p::nr_pages64)) m.set_unsigned(p::nr_pages64, n);
      m.set_unsigned(p::nr_pages, std::min<std::uint64_t>(n, std::numeric_limits<std::uint32_t>::max()));
      kept.push_back(pb::encode(m));
      if (e.present()) {
        out.copies.push_back({entry_offset + (from - e.vaddr), out.new_pages_bytes, to - from});
        out.new_pages_bytes += to - from;
      }
    };
    for (std::size_t r = 0; r < runs.size(); ++r) {
      const std::uint64_t a = std::max(runs[r].vaddr, e.vaddr), b = std::min(run_end(runs[r]), e.end());
      if (a >= b) continue;
      if (!e.present() || e.in_parent())
        return fail(Errc::invalid_argument, "task " + std::to_string(pid) + ": run at " + hex(runs[r].vaddr) +
                                                " covers pages that are not present in " + name);
      split = true;
      keep(cursor, a);
      covered[r] += (b - a) / kPageSize;
      cursor = b;
    }
    if (!split) {
      kept.emplace_back(raw.bytes.begin(), raw.bytes.end());
      if (e.present()) {
        out.copies.push_back({entry_offset, out.new_pages_bytes, e.bytes()});
        out.new_pages_bytes += e.bytes();
      }
    } else {
      keep(cursor, e.end());
    }
  }
  for (std::size_t r = 0; r < runs.size(); ++r) {
    if (covered[r] != runs[r].pages)
      return fail(Errc::invalid_argument, "task " + std::to_string(pid) + ": run at " + hex(runs[r].vaddr) + " has " +
                                              std::to_string(runs[r].pages - covered[r]) + " of its " +
                                              std::to_string(runs[r].pages) + " pages missing from " + name);
    out.pages_mapped += runs[r].pages;
  }
  out.pagemap = pb::join_image(kPagemapMagic, true, kept);
  return {};
}

// Copies the data that stays into the staged pages file; all-zero pages are left as holes
// (what a materialized checkpoint has for its lazy pages, and what reads back as zeros anyway).
Result<void> write_pages(const TaskRewrite& t, Stager& stager) {
  UniqueFd in(::open(t.pages_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!in) return fail_errno(errno == ENOENT ? Errc::corrupt : Errc::io, "open " + t.pages_path.string(), errno);
  auto out = stager.create(t.pages_path);
  if (!out) return tl::unexpected(out.error());
  if (::ftruncate(out->get(), static_cast<off_t>(t.new_pages_bytes)) != 0)
    return fail_errno(Errc::io, "size " + t.pages_path.string(), errno);
  constexpr std::size_t kChunk = 64 * kPageSize;
  std::vector<std::byte> buf(kChunk);
  for (const auto& c : t.copies) {
    for (std::uint64_t done = 0; done < c.length;) {
      const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(kChunk, c.length - done));
      const ssize_t n = ::pread(in.get(), buf.data(), want, static_cast<off_t>(c.from + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return fail_errno(Errc::io, "read " + t.pages_path.string(), errno);
      if (static_cast<std::size_t>(n) != want)
        return fail(Errc::corrupt, t.pages_path.filename().string() + ": shorter than its pagemap says");
      for (std::size_t k = 0; k < want; k += kPageSize) {
        const auto page = std::span<const std::byte>(buf).subspan(k, kPageSize);
        if (std::all_of(page.begin(), page.end(), [](std::byte b) { return b == std::byte{0}; })) continue;
        if (auto ok = Stager::write_at(out->get(), page, c.to + done + k, t.pages_path); !ok) return ok;
      }
      done += want;
    }
  }
  return {};
}

// files.img with one more regular-file entry for `backing`; its id is the largest id + 1.
Result<std::vector<std::byte>> add_backing_file(const fs::path& dir, const fs::path& backing, std::uint32_t& file_id) {
  const std::string name = "files.img";
  auto data = read_image(dir / name);
  if (!data) return tl::unexpected(data.error());
  auto entries = pb::split_image(*data, name, schema::kFilesMagic, true);
  if (!entries) return tl::unexpected(entries.error());
  namespace f = schema::file_entry;
  namespace r = schema::reg_file_entry;
  std::uint64_t max_id = 0;
  std::optional<std::vector<std::byte>> fown;
  std::vector<std::vector<std::byte>> out;
  for (std::size_t i = 0; i < entries->size(); ++i) {
    auto m = pb::decode(f::kSpec, (*entries)[i].bytes);
    if (!m) return corrupt(name, i, m.error());
    max_id = std::max(max_id, m->scalar_or(f::id, 0));
    if (!fown && m->scalar_or(f::type, 0) == schema::kFdTypeReg) {
      if (auto reg_bytes = m->bytes(f::reg)) {
        auto reg = pb::decode(r::kSpec, *reg_bytes);
        if (!reg) return corrupt(name, i, Error{Errc::corrupt, "reg " + reg.error().message});
        if (auto b = reg->bytes(r::fown)) fown.emplace(b->begin(), b->end());
      }
    }
    out.emplace_back((*entries)[i].bytes.begin(), (*entries)[i].bytes.end());
  }
  if (max_id >= std::numeric_limits<std::uint32_t>::max()) return fail(Errc::corrupt, name + ": file ids exhausted");
  file_id = static_cast<std::uint32_t>(max_id + 1);
  if (!fown) {  // no owner: what CRIU dumps for a file nobody set F_SETOWN on
    pb::Message none(schema::fown_entry::kSpec);
    for (const auto& spec : schema::fown_entry::kFields) none.set_unsigned(spec, 0);
    fown = pb::encode(none);
  }
  pb::Message reg(r::kSpec);
  reg.set_unsigned(r::id, file_id);
  reg.set_unsigned(r::flags, kOLargefile);
  reg.set_unsigned(r::pos, 0);
  reg.set_bytes(r::fown, *fown);
  reg.set_string(r::name, backing.string());
  pb::Message entry(f::kSpec);
  entry.set_unsigned(f::type, schema::kFdTypeReg);
  entry.set_unsigned(f::id, file_id);
  entry.set_bytes(f::reg, pb::encode(reg));
  out.push_back(pb::encode(entry));
  return pb::join_image(schema::kFilesMagic, true, out);
}

Result<void> check_request(const MappingRewrite& request) {
  if (!request.backing_file.is_absolute())
    return fail(Errc::invalid_argument, "backing file '" + request.backing_file.string() + "' is not an absolute path");
  for (const auto& [pid, runs] : request.runs) {
    std::uint64_t prev_end = 0;
    for (const auto& r : runs) {
      const std::string where = "task " + std::to_string(pid) + ": run at " + hex(r.vaddr);
      if (r.pages == 0 || r.vaddr % kPageSize != 0 || r.file_offset % kPageSize != 0)
        return fail(Errc::invalid_argument, where + ": empty or not page aligned");
      if (r.pages > (std::numeric_limits<std::uint64_t>::max() - r.vaddr) / kPageSize ||
          r.pages > (std::numeric_limits<std::uint64_t>::max() - r.file_offset) / kPageSize)
        return fail(Errc::invalid_argument, where + ": wraps");
      if (r.vaddr < prev_end) return fail(Errc::invalid_argument, where + ": runs are not ascending and disjoint");
      prev_end = run_end(r);
    }
  }
  return {};
}

}  // namespace

bool can_map_in_place(const VmaEntry& v) noexcept {
  // CRIU replays vma_entry.madv (bit n = MADV n) with madvise() on the restored VMA: WIPEONFORK
  // (18) and KEEPONFORK (19) are EINVAL on a file mapping; HUGEPAGE, DONTDUMP, DONTFORK, ... are not.
  constexpr std::uint64_t kAnonymousOnlyMadv = (1ull << 18) | (1ull << 19);
  return v.can_be_lazy() && (v.flags & kMapGrowsdown) == 0 && (v.status & kVmaAreaStack) == 0 &&
         (v.madv.value_or(0) & kAnonymousOnlyMadv) == 0;
}

Result<RewriteResult> rewrite_for_mapping(const fs::path& dir, const MappingRewrite& request) {
  if (auto ok = check_request(request); !ok) return tl::unexpected(ok.error());
  RewriteResult result;
  const bool any = std::any_of(request.runs.begin(), request.runs.end(), [](const auto& kv) { return !kv.second.empty(); });
  if (!any) return result;
  Stager stager;
  std::uint32_t file_id = 0;
  auto files = add_backing_file(dir, request.backing_file, file_id);
  if (!files) return tl::unexpected(files.error());
  std::vector<TaskRewrite> tasks;
  for (const auto& [pid, runs] : request.runs) {
    if (runs.empty()) continue;
    TaskRewrite t;
    t.pid = pid;
    auto mm = rewrite_mm(dir, pid, runs, file_id, t);
    if (!mm) return tl::unexpected(mm.error());
    t.mm = std::move(*mm);
    if (auto ok = rewrite_pagemap(dir, pid, runs, t); !ok) return tl::unexpected(ok.error());
    tasks.push_back(std::move(t));
  }
  // Everything checked: stage the files, then rename them all.
  if (auto ok = stager.write(dir / "files.img", *files); !ok) return tl::unexpected(ok.error());
  for (auto& t : tasks) {
    const std::string pid = std::to_string(t.pid);
    std::error_code ec;
    const std::uint64_t old_bytes = fs::file_size(t.pages_path, ec);
    if (ec) return fail(Errc::corrupt, t.pages_path.filename().string() + ": " + ec.message());
    if (auto ok = stager.write(dir / ("mm-" + pid + ".img"), t.mm); !ok) return tl::unexpected(ok.error());
    if (auto ok = stager.write(dir / ("pagemap-" + pid + ".img"), t.pagemap); !ok) return tl::unexpected(ok.error());
    if (auto ok = write_pages(t, stager); !ok) return tl::unexpected(ok.error());
    result.pages_mapped += t.pages_mapped;
    result.vmas_before += t.vmas_before;
    result.vmas_after += t.vmas_after;
    result.bytes_cut += old_bytes - std::min(old_bytes, t.new_pages_bytes);
  }
  if (auto ok = stager.commit(); !ok) return tl::unexpected(ok.error());
  result.file_id = file_id;
  return result;
}

}  // namespace snaptier::criu
