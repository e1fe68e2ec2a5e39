// CheckpointPageSource: lazy ranges of a CRIU checkpoint, data pread from pages-<id>.img.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <string>

#include "core/unique_fd.hpp"
#include "snaptier/lazy_pages.hpp"

namespace snaptier::lazy {

using criu::kPageSize;

struct CheckpointPageSource::Impl {
  struct TaskPages {
    std::vector<LazyRange> ranges;  // ascending, non-overlapping
    std::shared_ptr<detail::UniqueFd> pages_fd;
    std::string pages_name;
  };
  std::map<TaskId, TaskPages> tasks;
  std::uint64_t total_lazy_pages = 0;
};

CheckpointPageSource::CheckpointPageSource(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CheckpointPageSource::~CheckpointPageSource() = default;

Result<std::vector<LazyRange>> lazy_ranges_of(const criu::Task& task) {
  std::vector<LazyRange> ranges;
  if (!task.mm || !task.pagemap) return ranges;
  const auto& vmas = task.mm->vmas;
  for (const auto& pe : task.pagemap->entries) {
    if (!pe.lazy()) continue;
    if (pe.in_parent() || !pe.data_offset) {
      return fail(Errc::unsupported, "pagemap-" + std::to_string(task.pstree.pid) +
                                         ".img: lazy entry at 0x" + std::to_string(pe.vaddr) +
                                         " has its pages in a parent checkpoint (not supported)");
    }
    // Cut at VMA bounds (criu collect_lazy_iovecs): an entry may span adjacent VMAs.
    std::uint64_t start = pe.vaddr;
    const std::uint64_t end = pe.end();
    for (const auto& vma : vmas) {
      if (start >= end) break;
      if (vma.end <= start) continue;
      if (vma.start >= end) break;
      const std::uint64_t s = std::max(start, vma.start);
      const std::uint64_t e = std::min(end, vma.end);
      ranges.push_back(LazyRange{s, e, *pe.data_offset + (s - pe.vaddr)});
      start = e;
    }
  }
  return ranges;
}

RangeHit find_lazy_range(std::span<const LazyRange> ranges, std::uint64_t vaddr, std::size_t max_pages) noexcept {
  // First range whose end is beyond vaddr.
  auto r = std::upper_bound(ranges.begin(), ranges.end(), vaddr,
                            [](std::uint64_t a, const LazyRange& lr) { return a < lr.end; });
  RangeHit hit;
  const bool inside = r != ranges.end() && vaddr >= r->start;
  const std::uint64_t limit = inside ? r->end : (r == ranges.end() ? vaddr + max_pages * kPageSize : r->start);
  hit.range = inside ? &*r : nullptr;
  hit.pages = std::max<std::size_t>(1, static_cast<std::size_t>(std::min<std::uint64_t>(max_pages, (limit - vaddr) / kPageSize)));
  return hit;
}

bool in_lazy_vma(const criu::Task& task, std::span<const LazyRange> ranges, std::uint64_t addr) noexcept {
  if (!task.mm || ranges.empty()) return false;
  for (const auto& vma : task.mm->vmas) {
    if (vma.contains(addr)) return vma.can_be_lazy();
  }
  return false;
}

Result<std::shared_ptr<CheckpointPageSource>> CheckpointPageSource::open(const criu::Checkpoint& checkpoint) {
  auto impl = std::make_unique<Impl>();
  for (const auto& task : checkpoint.tasks) {
    Impl::TaskPages tp;
    auto ranges = lazy_ranges_of(task);
    if (!ranges) return tl::unexpected(ranges.error());
    tp.ranges = std::move(*ranges);
    for (const auto& r : tp.ranges) impl->total_lazy_pages += (r.end - r.start) / kPageSize;
    if (!tp.ranges.empty()) {
      int fd = ::open(task.pages_path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) return fail_errno(Errc::io, "open " + task.pages_path.string(), errno);
      tp.pages_fd = std::make_shared<detail::UniqueFd>(fd);
      tp.pages_name = task.pages_path.filename().string();
    }
    impl->tasks.emplace(static_cast<TaskId>(task.pstree.pid), std::move(tp));
  }
  return std::shared_ptr<CheckpointPageSource>(new CheckpointPageSource(std::move(impl)));
}

bool CheckpointPageSource::has_task(TaskId task) const noexcept { return impl_->tasks.count(task) != 0; }

std::vector<LazyRange> CheckpointPageSource::lazy_ranges(TaskId task) const {
  auto it = impl_->tasks.find(task);
  return it == impl_->tasks.end() ? std::vector<LazyRange>{} : it->second.ranges;
}

std::vector<std::uint64_t> CheckpointPageSource::lazy_pages(TaskId task) const {
  std::vector<std::uint64_t> pages;
  for (const auto& r : lazy_ranges(task)) {
    for (std::uint64_t a = r.start; a < r.end; a += kPageSize) pages.push_back(a);
  }
  return pages;
}

std::uint64_t CheckpointPageSource::lazy_page_count() const noexcept { return impl_->total_lazy_pages; }

Result<PageFill> CheckpointPageSource::fetch(TaskId task, std::uint64_t vaddr, std::size_t max_pages,
                                             std::span<std::byte> buffer) {
  auto it = impl_->tasks.find(task);
  if (it == impl_->tasks.end()) {
    return fail(Errc::not_found, "task " + std::to_string(task) + " is not in the checkpoint");
  }
  const RangeHit hit = find_lazy_range(it->second.ranges, vaddr, max_pages);
  PageFill fill;
  fill.pages = hit.pages;
  if (hit.range == nullptr) {
    fill.answer = PageAnswer::zero;
    return fill;
  }
  const LazyRange* r = hit.range;
  const std::size_t pages = hit.pages;
  const std::size_t bytes = pages * kPageSize;
  if (buffer.size() < bytes) return fail(Errc::invalid_argument, "fetch: buffer too small");
  std::uint64_t off = r->file_offset + (vaddr - r->start);
  std::size_t done = 0;
  while (done < bytes) {
    ssize_t n = ::pread(it->second.pages_fd->get(), buffer.data() + done, bytes - done,
                        static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno(Errc::io, "pread " + it->second.pages_name, errno);
    }
    if (n == 0) {
      return fail(Errc::corrupt, it->second.pages_name + ": short read at offset " +
                                     std::to_string(off + done) + " (file truncated?)");
    }
    done += static_cast<std::size_t>(n);
  }
  fill.answer = PageAnswer::copy;
  fill.tier = TierKind::file;
  fill.pages = pages;
  fill.data = nullptr;
  return fill;
}

}  // namespace snaptier::lazy
