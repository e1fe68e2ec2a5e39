// CRIU checkpoint <-> tiered snapshot: ingest, materialize, profile, and the store-backed
// lazy page source (include/snaptier/function_snapshot.hpp).
#include "snaptier/function_snapshot.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "core/unique_fd.hpp"

namespace snaptier::snap {

namespace fs = std::filesystem;
using detail::UniqueFd;
using nlohmann::json;

namespace {

bool all_zero(std::span<const std::byte> page) {
  return std::all_of(page.begin(), page.end(), [](std::byte b) { return b == std::byte{0}; });
}

Result<void> read_exact(int fd, std::byte* out, std::size_t length, std::uint64_t offset, const std::string& what) {
  std::size_t done = 0;
  while (done < length) {
    ssize_t n = ::pread(fd, out + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno(Errc::io, "read " + what, errno);
    }
    if (n == 0) return fail(Errc::corrupt, what + ": short read at offset " + std::to_string(offset + done));
    done += static_cast<std::size_t>(n);
  }
  return {};
}

Result<void> write_exact(int fd, const std::byte* in, std::size_t length, std::uint64_t offset, const std::string& what) {
  std::size_t done = 0;
  while (done < length) {
    ssize_t n = ::pwrite(fd, in + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno(Errc::io, "write " + what, errno);
    }
    done += static_cast<std::size_t>(n);
  }
  return {};
}

bool is_pages_image(const std::string& name) {
  return name.starts_with("pages-") && name.ends_with(".img");
}

// A blob name becomes a file name on the restoring host: plain names only.
bool is_plain_file_name(std::string_view name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string_view::npos &&
         name.find('\0') == std::string_view::npos;
}

const TaskLayout* find_task(const Layout& layout, std::uint32_t pid) {
  for (const auto& t : layout.tasks) {
    if (t.pid == pid) return &t;
  }
  return nullptr;
}

}  // namespace

// ---- layout ------------------------------------------------------------------------------------

std::vector<std::byte> encode_layout(const Layout& layout) {
  json tasks = json::array();
  for (const auto& t : layout.tasks) {
    tasks.push_back({{"pid", t.pid}, {"pages_file", t.pages_file}, {"first_page", t.first_page}, {"page_count", t.page_count}});
  }
  const std::string text = json{{"version", 1}, {"tasks", tasks}}.dump();
  std::vector<std::byte> out(text.size());
  std::memcpy(out.data(), text.data(), text.size());
  return out;
}

Result<Layout> decode_layout(std::span<const std::byte> bytes) {
  const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  auto corrupt = [](const std::string& why) { return fail(Errc::corrupt, std::string(kLayoutBlob) + ": " + why); };
  // (no j.value("version", 0): it throws when "version" is not a number)
  if (!j.is_object() || !j.contains("version") || !j["version"].is_number_unsigned() || j["version"] != 1 ||
      !j.contains("tasks") || !j["tasks"].is_array()) {
    return corrupt("not a version 1 layout");
  }
  Layout layout;
  std::uint64_t next = 0;
  for (const auto& t : j["tasks"]) {
    if (!t.is_object() || !t.contains("pid") || !t["pid"].is_number_unsigned() || !t.contains("pages_file") ||
        !t["pages_file"].is_string() || !t.contains("first_page") || !t["first_page"].is_number_unsigned() ||
        !t.contains("page_count") || !t["page_count"].is_number_unsigned()) {
      return corrupt("a task entry lacks pid, pages_file, first_page or page_count");
    }
    if (t["pid"].get<std::uint64_t>() > UINT32_MAX) return corrupt("pid out of range");
    TaskLayout tl;
    tl.pid = t["pid"].get<std::uint32_t>();
    tl.pages_file = t["pages_file"].get<std::string>();
    tl.first_page = t["first_page"].get<std::uint64_t>();
    tl.page_count = t["page_count"].get<std::uint64_t>();
    if (!is_plain_file_name(tl.pages_file) || !is_pages_image(tl.pages_file)) return corrupt("bad pages_file '" + tl.pages_file + "'");
    if (tl.first_page != next) return corrupt("task page ranges are not contiguous");
    if (tl.page_count > UINT64_MAX / kPageSize - next) return corrupt("page_count out of range");
    next += tl.page_count;
    layout.tasks.push_back(std::move(tl));
  }
  return layout;
}

// ---- ingest --------------------------------------------------------------------------------------

Result<Ingested> ingest(const fs::path& images_dir) {
  auto checkpoint = criu::load_checkpoint(images_dir);
  if (!checkpoint) return tl::unexpected(checkpoint.error());
  Ingested out;

  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(images_dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_regular_file() || is_pages_image(name) || name.ends_with(".log")) continue;
    auto bytes = criu::read_image_file(entry.path());
    if (!bytes) return tl::unexpected(bytes.error());
    out.snapshot.blobs[kImageBlobPrefix + name] = std::move(*bytes);
  }
  if (ec) return fail(Errc::io, "list " + images_dir.string() + ": " + ec.message());

  std::uint64_t total_pages = 0;
  for (const auto& task : checkpoint->tasks) {
    if (task.pagemap) total_pages += task.pagemap->present_pages;
  }
  out.data.resize(total_pages * kPageSize);
  out.snapshot.pages.reserve(total_pages);
  for (const auto& task : checkpoint->tasks) {
    if (!task.pagemap) continue;
    TaskLayout tl;
    tl.pid = task.pstree.pid;
    tl.pages_file = task.pages_path.filename().string();
    tl.first_page = out.snapshot.pages.size();
    tl.page_count = task.pagemap->present_pages;
    for (const auto& pe : task.pagemap->entries) {
      if (pe.in_parent()) {
        return fail(Errc::unsupported, "pagemap-" + std::to_string(task.pstree.pid) +
                                           ".img has pages in a parent checkpoint (incremental dumps are not supported)");
      }
      if (!pe.present()) continue;
      for (std::uint64_t k = 0; k < pe.nr_pages; ++k) {
        PageEntry page;
        page.vaddr = pe.vaddr + k * kPageSize;
        out.snapshot.pages.push_back(page);
      }
    }
    if (tl.page_count > 0) {
      int fd = ::open(task.pages_path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) return fail_errno(Errc::io, "open " + task.pages_path.string(), errno);
      UniqueFd pages_fd(fd);
      if (auto ok = read_exact(fd, out.data.data() + tl.first_page * kPageSize, tl.page_count * kPageSize, 0,
                               task.pages_path.filename().string());
          !ok) {
        return tl::unexpected(ok.error());
      }
    }
    out.layout.tasks.push_back(std::move(tl));
  }
  out.snapshot.blobs[kLayoutBlob] = encode_layout(out.layout);
  out.checkpoint = std::move(*checkpoint);
  return out;
}

// ---- materialize ----------------------------------------------------------------------------------

Result<Materialized> materialize(const Snapshot& snapshot, SnapshotStore& store, const fs::path& dir, bool all_pages) {
  auto layout_blob = snapshot.blobs.find(kLayoutBlob);
  if (layout_blob == snapshot.blobs.end()) {
    return fail(Errc::invalid_argument, "snapshot '" + snapshot.info.id + "' is not a CRIU checkpoint (no " + kLayoutBlob + ")");
  }
  auto layout = decode_layout(layout_blob->second);
  if (!layout) return tl::unexpected(layout.error());
  const std::uint64_t layout_pages = layout->tasks.empty() ? 0 : layout->tasks.back().first_page + layout->tasks.back().page_count;
  if (layout_pages != snapshot.pages.size()) {
    return fail(Errc::corrupt, "snapshot '" + snapshot.info.id + "': layout covers " + std::to_string(layout_pages) +
                                   " pages, the page table has " + std::to_string(snapshot.pages.size()));
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return fail(Errc::io, "create " + dir.string() + ": " + ec.message());

  auto write_file = [&](const fs::path& path, std::span<const std::byte> bytes) -> Result<void> {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return fail_errno(Errc::io, "create " + path.string(), errno);
    UniqueFd guard(fd);
    return write_exact(fd, bytes.data(), bytes.size(), 0, path.string());
  };
  for (const auto& [name, bytes] : snapshot.blobs) {
    if (!name.starts_with(kImageBlobPrefix)) continue;
    const std::string file = name.substr(std::strlen(kImageBlobPrefix));
    if (!is_plain_file_name(file)) return fail(Errc::corrupt, "snapshot blob '" + name + "' is not a plain file name");
    if (auto ok = write_file(dir / file, bytes); !ok) return tl::unexpected(ok.error());
  }
  // Full-size pages files (holes read as zeros), so the checkpoint loads and validates.
  std::map<std::uint32_t, UniqueFd> pages_fds;
  for (const auto& t : layout->tasks) {
    const fs::path path = dir / t.pages_file;
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return fail_errno(Errc::io, "create " + path.string(), errno);
    pages_fds.emplace(t.pid, UniqueFd(fd));
    if (::ftruncate(fd, static_cast<off_t>(t.page_count * kPageSize)) != 0) {
      return fail_errno(Errc::io, "size " + path.string(), errno);
    }
  }
  auto checkpoint = criu::load_checkpoint(dir);
  if (!checkpoint) return tl::unexpected(checkpoint.error());

  Materialized out;
  constexpr std::size_t kRunPages = 64;
  std::vector<std::byte> scratch(kRunPages * kPageSize);
  for (const auto& task : checkpoint->tasks) {
    if (!task.pagemap) continue;
    const TaskLayout* tl = find_task(*layout, task.pstree.pid);
    if (tl == nullptr) return fail(Errc::corrupt, "layout has no task " + std::to_string(task.pstree.pid));
    const int fd = pages_fds.at(task.pstree.pid).get();
    for (const auto& pe : task.pagemap->entries) {
      if (!pe.present() || !pe.data_offset || (pe.lazy() && !all_pages)) continue;
      const std::uint64_t first = tl->first_page + *pe.data_offset / kPageSize;
      if (first + pe.nr_pages > snapshot.pages.size()) {
        return fail(Errc::corrupt, "snapshot '" + snapshot.info.id + "': pagemap-" + std::to_string(task.pstree.pid) +
                                       ".img points past the page table");
      }
      for (std::uint64_t k = 0; k < pe.nr_pages; ++k) {
        if (snapshot.pages[first + k].vaddr != pe.vaddr + k * kPageSize) {
          return fail(Errc::corrupt, "snapshot '" + snapshot.info.id + "': page " + std::to_string(first + k) +
                                         " does not match the pagemap");
        }
      }
      // Verified runs straight from the tier's mapping (or the scratch copy) into the file; a
      // page that fails its check is never written.
      for (std::uint64_t k = 0; k < pe.nr_pages;) {
        auto run = store.read_pages(snapshot, first + k, pe.nr_pages - k, scratch);
        if (!run) return tl::unexpected(run.error());
        if (!run->zero) {  // a zero page stays a hole, which reads as zeros
          if (auto ok = write_exact(fd, run->data, run->pages * kPageSize, *pe.data_offset + k * kPageSize, tl->pages_file);
              !ok) {
            return tl::unexpected(ok.error());
          }
          out.pages_written += run->pages;
          out.bytes_written += run->pages * kPageSize;
        }
        k += run->pages;
      }
    }
  }
  out.checkpoint = std::move(*checkpoint);
  return out;
}

// ---- profiling ----------------------------------------------------------------------------------

void ProfileRecorder::record(const FaultObservation& fault) {
  std::lock_guard lock(mutex_);
  if (frozen_) return;
  if (fault.discarded_bytes > 0 || fault.remapped_bytes > 0) {
    if (fault.source_address) {
      const std::uint64_t bytes = fault.discarded_bytes > 0 ? fault.discarded_bytes : fault.remapped_bytes;
      (fault.discarded_bytes > 0 ? discards_ : remaps_)
          .push_back({static_cast<std::int64_t>(fault.source_task), {*fault.source_address, *fault.source_address + bytes}});
    }
    return;
  }
  ++faults_;
  if (!fault.source_address) return;
  const auto key = std::make_pair(static_cast<std::int64_t>(fault.source_task), *fault.source_address);
  if (touches_.contains(key)) return;
  touches_.emplace(key, Touch{static_cast<std::uint32_t>(touches_.size() + 1), fault.write});
}

void ProfileRecorder::freeze() {
  std::lock_guard lock(mutex_);
  frozen_ = true;
}

std::map<std::pair<std::int64_t, std::uint64_t>, ProfileRecorder::Touch> ProfileRecorder::touches() const {
  std::lock_guard lock(mutex_);
  return touches_;
}

std::uint64_t ProfileRecorder::faults() const {
  std::lock_guard lock(mutex_);
  return faults_;
}

std::vector<std::pair<std::int64_t, std::pair<std::uint64_t, std::uint64_t>>> ProfileRecorder::discards() const {
  std::lock_guard lock(mutex_);
  return discards_;
}

std::vector<std::pair<std::int64_t, std::pair<std::uint64_t, std::uint64_t>>> ProfileRecorder::remaps() const {
  std::lock_guard lock(mutex_);
  return remaps_;
}

void to_json(json& j, const ProfileSummary& s) {
  j = json{{"faults", s.faults}, {"hot", s.hot}, {"cold", s.cold}, {"written", s.written},
           {"read_only", s.read_only}, {"zero", s.zero}, {"hot_zero", s.hot_zero},
           {"changed_after_read", s.changed_after_read}, {"fresh", s.fresh}, {"discards", s.discards}, {"remaps", s.remaps}};
}

ProfileSummary apply_profile(Ingested& ingested, const ProfileRecorder& recorder, pid_t restored_pid) {
  ProfileSummary summary;
  summary.faults = recorder.faults();
  const auto touches = recorder.touches();
  UniqueFd mem;
  const bool single_task = ingested.layout.tasks.size() == 1;
  if (restored_pid > 0 && single_task) {
    const std::string path = "/proc/" + std::to_string(restored_pid) + "/mem";
    mem = UniqueFd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  }
  std::vector<std::byte> now(kPageSize);
  auto& pages = ingested.snapshot.pages;
  // Fresh pages: touched, not in the snapshot, inside a VMA that has lazy pages (so CRIU has
  // registered it with the uffd and a zero page can be installed there before resume).
  json fresh = json::object();
  for (const auto& task : ingested.checkpoint.tasks) {
    if (!task.mm || !task.pagemap) continue;
    auto ranges = lazy::lazy_ranges_of(task);
    if (!ranges || ranges->empty()) continue;
    std::set<std::uint64_t> in_snapshot;
    for (const auto& pe : task.pagemap->entries) {
      for (std::uint64_t k = 0; k < pe.nr_pages; ++k) in_snapshot.insert(pe.vaddr + k * kPageSize);
    }
    json list = json::array();
    for (const auto& [key, touch] : touches) {
      if (key.first != static_cast<std::int64_t>(task.pstree.pid) || in_snapshot.contains(key.second)) continue;
      if (!lazy::in_lazy_vma(task, *ranges, key.second)) continue;
      list.push_back(json::array({key.second, touch.order}));
      ++summary.fresh;
    }
    if (!list.empty()) fresh[std::to_string(task.pstree.pid)] = std::move(list);
  }
  auto store_ranges = [&](const char* blob, const auto& list, std::uint64_t& count) {
    json ranges = json::object();
    for (const auto& [task, range] : list) {
      ranges[std::to_string(task)].push_back(json::array({range.first, range.second}));
      ++count;
    }
    const std::string text = ranges.dump();
    ingested.snapshot.blobs[blob].assign(reinterpret_cast<const std::byte*>(text.data()),
                                         reinterpret_cast<const std::byte*>(text.data()) + text.size());
  };
  store_ranges(kDiscardedBlob, recorder.discards(), summary.discards);
  store_ranges(kRemappedBlob, recorder.remaps(), summary.remaps);
  const std::string fresh_text = fresh.dump();
  ingested.snapshot.blobs[kFreshBlob].assign(reinterpret_cast<const std::byte*>(fresh_text.data()),
                                             reinterpret_cast<const std::byte*>(fresh_text.data()) + fresh_text.size());
  for (const auto& task : ingested.layout.tasks) {
    for (std::uint64_t i = task.first_page; i < task.first_page + task.page_count; ++i) {
      PageEntry& page = pages[i];
      const auto bytes = std::span<const std::byte>(ingested.data).subspan(i * kPageSize, kPageSize);
      page.flags &= ~(page_hot | page_written | page_read_only | page_zero);
      page.touch_order = 0;
      const bool zero = all_zero(bytes);
      if (zero) {
        page.flags |= page_zero;
        ++summary.zero;
      }
      auto it = touches.find(std::make_pair(static_cast<std::int64_t>(task.pid), page.vaddr));
      if (it == touches.end()) {
        if (!zero) ++summary.cold;
        continue;
      }
      page.flags |= page_hot;
      page.touch_order = it->second.order;
      ++summary.hot;
      if (zero) ++summary.hot_zero;
      bool written = it->second.write;
      if (!written && mem) {
        // The page was installed on a read fault; if its bytes differ now, the task wrote it later.
        ssize_t n = ::pread(mem.get(), now.data(), kPageSize, static_cast<off_t>(page.vaddr));
        if (n == static_cast<ssize_t>(kPageSize) && std::memcmp(now.data(), bytes.data(), kPageSize) != 0) {
          written = true;
          ++summary.changed_after_read;
        }
      }
      if (written) {
        page.flags |= page_written;
        ++summary.written;
      } else {
        page.flags |= page_read_only;
        ++summary.read_only;
      }
    }
  }
  return summary;
}

// ---- StorePageSource --------------------------------------------------------------------------

struct StorePageSource::Impl {
  struct Run {  // a present pagemap entry: [start, end) -> first page index
    std::uint64_t start = 0;
    std::uint64_t end = 0;
    std::uint64_t first_index = 0;
  };
  struct TaskPages {
    std::vector<lazy::LazyRange> ranges;  // ascending
    std::vector<Run> runs;                // ascending
    std::vector<std::pair<std::uint64_t, std::uint32_t>> fresh;  // (vaddr, touch order)
  };
  std::shared_ptr<SnapshotStore> store;
  Snapshot snapshot;
  std::map<TaskId, TaskPages> tasks;

  std::optional<std::uint64_t> index_of(const TaskPages& tp, std::uint64_t vaddr) const {
    auto it = std::upper_bound(tp.runs.begin(), tp.runs.end(), vaddr,
                               [](std::uint64_t a, const Run& r) { return a < r.end; });
    if (it == tp.runs.end() || vaddr < it->start) return std::nullopt;
    return it->first_index + (vaddr - it->start) / kPageSize;
  }
};

StorePageSource::StorePageSource(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
StorePageSource::~StorePageSource() = default;

Result<std::shared_ptr<StorePageSource>> StorePageSource::open(std::shared_ptr<SnapshotStore> store, Snapshot snapshot,
                                                               const criu::Checkpoint& checkpoint) {
  auto layout_blob = snapshot.blobs.find(kLayoutBlob);
  if (layout_blob == snapshot.blobs.end()) return fail(Errc::invalid_argument, "snapshot has no " + std::string(kLayoutBlob));
  auto layout = decode_layout(layout_blob->second);
  if (!layout) return tl::unexpected(layout.error());
  json fresh;
  if (auto f = snapshot.blobs.find(kFreshBlob); f != snapshot.blobs.end()) {
    fresh = json::parse(std::string_view(reinterpret_cast<const char*>(f->second.data()), f->second.size()), nullptr, false);
  }
  auto impl = std::make_unique<Impl>();
  for (const auto& task : checkpoint.tasks) {
    Impl::TaskPages tp;
    if (task.pagemap && task.mm) {
      const TaskLayout* tl = find_task(*layout, task.pstree.pid);
      if (tl == nullptr) return fail(Errc::corrupt, "layout has no task " + std::to_string(task.pstree.pid));
      // From the page table, not the pagemap's data offsets: a checkpoint rewritten for mapping
      // in place (criu/inplace_rewrite.hpp) has fewer pages in its pages file than the snapshot.
      if (tl->first_page + tl->page_count > snapshot.pages.size()) return fail(Errc::corrupt, "layout points past the page table");
      for (std::uint64_t i = tl->first_page; i < tl->first_page + tl->page_count; ++i) {
        const std::uint64_t vaddr = snapshot.pages[i].vaddr;
        if (!tp.runs.empty() && vaddr < tp.runs.back().end) return fail(Errc::corrupt, "task pages are not ascending");
        if (!tp.runs.empty() && vaddr == tp.runs.back().end) {
          tp.runs.back().end += kPageSize;
        } else {
          tp.runs.push_back(Impl::Run{vaddr, vaddr + kPageSize, i});
        }
      }
      auto ranges = lazy::lazy_ranges_of(task);
      if (!ranges) return tl::unexpected(ranges.error());
      tp.ranges = std::move(*ranges);
      if (fresh.is_object() && fresh.contains(std::to_string(task.pstree.pid))) {
        for (const auto& item : fresh[std::to_string(task.pstree.pid)]) {
          if (!item.is_array() || item.size() != 2 || !item[0].is_number_unsigned() || !item[1].is_number_unsigned()) continue;
          const std::uint64_t a = item[0].get<std::uint64_t>();
          if (a % kPageSize != 0) continue;
          // Only inside a VMA with lazy ranges (CRIU registered it), as ingest recorded.
          if (lazy::in_lazy_vma(task, tp.ranges, a)) tp.fresh.emplace_back(a, item[1].get<std::uint32_t>());
        }
      }
    }
    impl->tasks.emplace(static_cast<TaskId>(task.pstree.pid), std::move(tp));
  }
  impl->store = std::move(store);
  impl->snapshot = std::move(snapshot);
  return std::shared_ptr<StorePageSource>(new StorePageSource(std::move(impl)));
}

bool StorePageSource::has_task(TaskId task) const noexcept { return impl_->tasks.contains(task); }

std::vector<std::uint64_t> StorePageSource::lazy_pages(TaskId task) const {
  std::vector<std::uint64_t> out;
  auto it = impl_->tasks.find(task);
  if (it == impl_->tasks.end()) return out;
  for (const auto& r : it->second.ranges) {
    for (std::uint64_t a = r.start; a < r.end; a += kPageSize) out.push_back(a);
  }
  return out;
}

std::vector<policy::LazyPage> StorePageSource::policy_view(TaskId task) const {
  std::vector<policy::LazyPage> out;
  auto it = impl_->tasks.find(task);
  if (it == impl_->tasks.end()) return out;
  for (const auto& r : it->second.ranges) {
    for (std::uint64_t a = r.start; a < r.end; a += kPageSize) {
      auto index = impl_->index_of(it->second, a);
      if (!index) continue;
      const PageEntry& e = impl_->snapshot.pages[*index];
      out.push_back(policy::LazyPage{a, e.flags, e.touch_order, e.tier});
    }
  }
  for (const auto& [vaddr, order] : it->second.fresh) {
    out.push_back(policy::LazyPage{vaddr, page_zero | page_hot, order, TierKind::local});
  }
  return out;
}

Result<PageFill> StorePageSource::fetch(TaskId task, std::uint64_t vaddr, std::size_t max_pages,
                                        std::span<std::byte> buffer) {
  auto it = impl_->tasks.find(task);
  if (it == impl_->tasks.end()) return fail(Errc::not_found, "task " + std::to_string(task) + " is not in the snapshot");
  const auto& tp = it->second;
  const lazy::RangeHit hit = lazy::find_lazy_range(tp.ranges, vaddr, max_pages);
  PageFill fill;
  if (hit.range == nullptr) {
    fill.answer = PageAnswer::zero;
    fill.pages = hit.pages;
    return fill;
  }
  auto first = impl_->index_of(tp, vaddr);
  if (!first) return fail(Errc::corrupt, "lazy page 0x" + std::to_string(vaddr) + " has no page table entry");
  const std::size_t limit = hit.pages;
  const auto& pages = impl_->snapshot.pages;
  const PageEntry& head = pages[*first];
  std::size_t n = 1;
  if ((head.flags & page_zero) != 0) {
    while (n < limit && (pages[*first + n].flags & page_zero) != 0) ++n;
    fill.answer = PageAnswer::zero;
    fill.pages = n;
    return fill;
  }
  // The store checks every page where the engine will copy it from, right before UFFDIO_COPY.
  auto run = impl_->store->read_pages(impl_->snapshot, *first, limit, buffer);
  if (!run) return tl::unexpected(run.error());
  fill.answer = PageAnswer::copy;
  fill.tier = run->tier;
  fill.pages = run->pages;
  fill.data = run->data;
  return fill;
}

}  // namespace snaptier::snap
