#include "inplace/inplace.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/unique_fd.hpp"
#include "inplace/dax_device.hpp"
#include "snaptier/process.hpp"
#include "snaptier/function_snapshot.hpp"

namespace snaptier::inplace {

namespace fs = std::filesystem;
using nlohmann::json;

Backing describe_backing(const fs::path& path, bool device_dax) {
  Backing b;
  std::error_code ec;
  b.file = fs::weakly_canonical(fs::absolute(path, ec), ec);
  if (ec) b.file = path;
  if (!device_dax) {
    b.can_map = true;
    return b;
  }
  auto device = find_dax_device(path);
  if (!device) {
    b.reason = "devdax refuses private mappings and " + device.error().message;
    return b;
  }
  b.device = *device;
  auto node = lend_to_cow_device(*device);
  if (!node) {
    b.reason = "devdax refuses private mappings and " + node.error().message;
    return b;
  }
  b.file = *node;
  b.file_offset = 0;  // the module's offset 0 is the device's first byte, as the agent maps it
  b.can_map = true;
  return b;
}

std::string describe(const Backing& backing) {
  if (!backing.can_map) return "in-place: no (" + backing.reason + ")";
  return backing.device ? "in-place: yes (" + backing.file.string() + " over " + backing.device->name + ")"
                        : "in-place: yes";
}

json to_json(const Backing& backing) {
  json out{{"can_map", backing.can_map}, {"file", backing.file.string()}};
  if (!backing.can_map) out["reason"] = backing.reason;
  if (const auto& d = backing.device) {
    out["device"] = {{"name", d->name},       {"mode", d->mode},
                     {"size_bytes", d->size}, {"align_bytes", d->align},
                     {"phys_start", d->phys_start}, {"ranges", d->ranges}};
  }
  return out;
}

namespace {

// (pid -> ascending, merged [start, end)) from kDiscardedBlob; nullopt if the blob is missing.
using Ranges = std::map<std::uint32_t, std::vector<std::pair<std::uint64_t, std::uint64_t>>>;

Result<Ranges> profiled_ranges(const Snapshot& snapshot, const char* name, std::string_view what) {
  auto blob = snapshot.blobs.find(name);
  if (blob == snapshot.blobs.end()) {
    return fail(Errc::unsupported, "snapshot '" + snapshot.info.id + "' was profiled before " + std::string(what) +
                                       " ranges were recorded; take it again to map it in place");
  }
  const json j = json::parse(std::string_view(reinterpret_cast<const char*>(blob->second.data()), blob->second.size()),
                             nullptr, false);
  auto bad = [&] { return fail(Errc::corrupt, "snapshot '" + snapshot.info.id + "': " + name + " is damaged"); };
  if (!j.is_object()) return bad();
  Ranges out;
  for (const auto& [pid, list] : j.items()) {
    std::uint32_t p = 0;
    try {
      p = static_cast<std::uint32_t>(std::stoul(pid));
    } catch (...) {
      return bad();
    }
    if (!list.is_array()) return bad();
    auto& ranges = out[p];
    for (const auto& r : list) {
      if (!r.is_array() || r.size() != 2 || !r[0].is_number_unsigned() || !r[1].is_number_unsigned()) return bad();
      ranges.emplace_back(r[0].get<std::uint64_t>(), r[1].get<std::uint64_t>());
    }
    std::sort(ranges.begin(), ranges.end());
  }
  return out;
}

bool overlaps(const std::vector<std::pair<std::uint64_t, std::uint64_t>>& ranges, std::uint64_t page) {
  auto it = std::upper_bound(ranges.begin(), ranges.end(), std::make_pair(page, UINT64_MAX));
  // Ranges are few (one per discard event); a linear look back keeps overlapping ones right.
  for (auto r = ranges.begin(); r != it; ++r) {
    if (page < r->second && page + kPageSize > r->first) return true;
  }
  return false;
}

bool selected(const PageEntry& page, policy::InPlacePages selection) {
  if ((page.flags & page_zero) != 0 || selection == policy::InPlacePages::none) return false;
  if (selection == policy::InPlacePages::all_stored) return true;
  if (selection == policy::InPlacePages::all_unwritten) return (page.flags & page_written) == 0;
  return policy::read_only_hot(page);
}

}  // namespace

Result<Plan> plan_runs(const Snapshot& snapshot, const criu::Checkpoint& materialized, policy::InPlacePages selection,
                       const Backing& backing) {
  if (!backing.can_map) return fail(Errc::unavailable, "the CXL tier cannot map pages in place: " + describe(backing));
  auto discarded = profiled_ranges(snapshot, snap::kDiscardedBlob, "discarded");
  if (!discarded) return tl::unexpected(discarded.error());
  auto remapped = profiled_ranges(snapshot, snap::kRemappedBlob, "mremapped");
  if (!remapped) return tl::unexpected(remapped.error());
  auto layout_blob = snapshot.blobs.find(snap::kLayoutBlob);
  if (layout_blob == snapshot.blobs.end())
    return fail(Errc::invalid_argument, "snapshot '" + snapshot.info.id + "' is not a CRIU checkpoint");
  auto layout = snap::decode_layout(layout_blob->second);
  if (!layout) return tl::unexpected(layout.error());

  Plan plan;
  plan.rewrite.backing_file = backing.file;
  const std::vector<bool> gaps = selection == policy::InPlacePages::read_only_hot
                                     ? policy::small_in_place_gaps(snapshot.pages)
                                     : std::vector<bool>{};
  static const std::vector<std::pair<std::uint64_t, std::uint64_t>> kNone;
  for (const auto& task : materialized.tasks) {
    if (!task.mm || !task.pagemap) continue;
    const std::uint32_t pid = task.pstree.pid;
    auto tl_it = std::find_if(layout->tasks.begin(), layout->tasks.end(), [&](const auto& t) { return t.pid == pid; });
    if (tl_it == layout->tasks.end()) return fail(Errc::corrupt, "layout has no task " + std::to_string(pid));
    const auto d = discarded->find(pid);
    const auto& gone = d == discarded->end() ? kNone : d->second;
    const auto m = remapped->find(pid);
    const auto& moved = m == remapped->end() ? kNone : m->second;
    std::optional<RunPages> open;  // the run being grown
    auto close = [&] {
      if (!open) return;
      plan.pages += open->run.pages;
      plan.rewrite.runs[pid].push_back(open->run);
      plan.runs.push_back(*open);
      open.reset();
    };
    std::size_t vma = 0;
    for (const auto& pe : task.pagemap->entries) {
      if (!pe.present() || !pe.data_offset) continue;
      const std::size_t first = tl_it->first_page + *pe.data_offset / kPageSize;
      if (first + pe.nr_pages > snapshot.pages.size())
        return fail(Errc::corrupt, "snapshot '" + snapshot.info.id + "': pagemap points past the page table");
      for (std::uint64_t k = 0; k < pe.nr_pages; ++k) {
        const std::uint64_t vaddr = pe.vaddr + k * kPageSize;
        const std::size_t index = first + k;
        const PageEntry& page = snapshot.pages[index];
        if (page.vaddr != vaddr)
          return fail(Errc::corrupt, "snapshot '" + snapshot.info.id + "': page " + std::to_string(index) +
                                         " does not match the pagemap");
        // read_only_hot: and the cold pages of a small gap between two, where the copy holds
        // them in CXL (the tiered placement puts them there: policy::small_in_place_gaps).
        const bool gap = !gaps.empty() && gaps[index] && page.tier == TierKind::cxl;
        if (!gap && !selected(page, selection)) {
          close();
          continue;
        }
        ++plan.wanted;
        while (vma < task.mm->vmas.size() && task.mm->vmas[vma].end <= vaddr) ++vma;
        const bool in_vma = vma < task.mm->vmas.size() && task.mm->vmas[vma].contains(vaddr);
        const bool vma_ok = in_vma && criu::can_map_in_place(task.mm->vmas[vma]);
        const bool tier_ok = page.tier == TierKind::cxl && (page.flags & page_checksummed) != 0;
        if (!vma_ok || !tier_ok) {
          ++plan.skipped_layout;
          ++(vma_ok ? plan.skipped_tier : plan.skipped_vma);
          close();
          continue;
        }
        if (overlaps(gone, vaddr)) {
          ++plan.skipped_discarded;
          close();
          continue;
        }
        if (overlaps(moved, vaddr)) {
          ++plan.skipped_remapped;
          close();
          continue;
        }
        const std::uint64_t offset = backing.file_offset + page.location;
        if (open && open->run.vaddr + open->run.pages * kPageSize == vaddr &&
            open->run.file_offset + open->run.pages * kPageSize == offset && task.mm->vmas[vma].contains(open->run.vaddr)) {
          ++open->run.pages;
          continue;
        }
        close();
        open = RunPages{pid, index, criu::MappedRun{vaddr, 1, offset}};
      }
    }
    close();
  }
  return plan;
}

Result<void> verify_runs(SnapshotStore& store, const Snapshot& snapshot, const Plan& plan) {
  for (const auto& r : plan.runs) {
    for (std::uint64_t done = 0; done < r.run.pages;) {
      auto run = store.read_pages(snapshot, r.first_index + done, r.run.pages - done, {});
      if (!run) return tl::unexpected(run.error());
      if (!run->in_place || run->zero) {
        return fail(Errc::corrupt, "snapshot '" + snapshot.info.id + "': page " + std::to_string(r.first_index + done) +
                                       " is not where a mapping of the CXL region would find it");
      }
      done += run->pages;
    }
  }
  return {};
}

Result<Prepared> prepare(SnapshotStore& store, const Snapshot& snapshot, const fs::path& images,
                         const criu::Checkpoint& materialized, policy::InPlacePages selection, const Backing& backing) {
  const auto t0 = std::chrono::steady_clock::now();
  Prepared out;
  auto plan = plan_runs(snapshot, materialized, selection, backing);
  if (!plan) return tl::unexpected(plan.error());
  out.plan = std::move(*plan);
  if (auto ok = verify_runs(store, snapshot, out.plan); !ok) return tl::unexpected(ok.error());
  auto rewritten = criu::rewrite_for_mapping(images, out.plan.rewrite);
  if (!rewritten) return tl::unexpected(rewritten.error());
  out.rewrite = *rewritten;
  auto checkpoint = criu::load_checkpoint(images);
  if (!checkpoint) {
    return fail(checkpoint.error().code, "the checkpoint rewritten for mapping in place does not load: " +
                                             checkpoint.error().message);
  }
  out.checkpoint = std::move(*checkpoint);
  out.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

Result<void> admit(const policy::RestorePolicy& policy, const std::optional<Backing>& backing) {
  const policy::InPlace use = policy.in_place();
  if (use.pages == policy::InPlacePages::none || !use.required || (backing && backing->can_map)) return {};
  return fail(Errc::unavailable, "policy " + std::string(policy.name()) + " maps " + std::string(to_string(use.pages)) +
                                     " in place from CXL, and this host cannot: " +
                                     (backing ? describe(*backing) : std::string("no CXL tier is up")));
}

policy::InPlacePages selection(const policy::RestorePolicy& policy, const std::optional<Backing>& backing) {
  return backing && backing->can_map ? policy.in_place().pages : policy::InPlacePages::none;
}

StepReport describe_choice(const policy::RestorePolicy& policy, const std::optional<Backing>& backing) {
  const policy::InPlacePages wanted = policy.in_place().pages;
  const bool maps = selection(policy, backing) != policy::InPlacePages::none;
  StepReport out;
  out.pages = std::string(to_string(wanted));
  out.mode = wanted == policy::InPlacePages::none ? "off" : maps ? "mapped" : "copied (this host cannot map)";
  out.tier = backing ? describe(*backing) : std::string("no CXL tier");
  return out;
}

void report(const Prepared& prepared, StepReport& out) {
  const Plan& plan = prepared.plan;
  const criu::RewriteResult& rewrite = prepared.rewrite;
  out.mapped = StepReport::Mapped{.prepare_ms = prepared.ms,
                                  .pages_mapped = plan.pages,
                                  .pages_wanted = plan.wanted,
                                  .skipped_discarded = plan.skipped_discarded,
                                  .skipped_remapped = plan.skipped_remapped,
                                  .skipped_layout = plan.skipped_layout,
                                  .skipped_tier = plan.skipped_tier,
                                  .skipped_vma = plan.skipped_vma,
                                  .runs = plan.runs.size(),
                                  .vmas_before = rewrite.vmas_before,
                                  .vmas_after = rewrite.vmas_after,
                                  .bytes_cut_from_images = rewrite.bytes_cut,
                                  .backing_file = plan.rewrite.backing_file.string()};
}

json to_json(const StepReport& r) {
  json out{{"pages", r.pages}, {"mode", r.mode}, {"tier", r.tier}};
  if (r.prepared) out["prepared"] = *r.prepared;
  if (const auto& m = r.mapped) {
    out.update(json{{"prepare_ms", m->prepare_ms},
                    {"pages_mapped", m->pages_mapped},
                    {"pages_wanted", m->pages_wanted},
                    {"skipped_discarded", m->skipped_discarded},
                    {"skipped_remapped", m->skipped_remapped},
                    {"skipped_layout", m->skipped_layout},
                    {"skipped_tier", m->skipped_tier},
                    {"skipped_vma", m->skipped_vma},
                    {"runs", m->runs},
                    {"vmas_before", m->vmas_before},
                    {"vmas_after", m->vmas_after},
                    {"bytes_cut_from_images", m->bytes_cut_from_images},
                    {"backing_file", m->backing_file}});
  }
  return out;
}

namespace {

// Bytes of [start, end) that the page table maps (bit 63 of each /proc/PID/pagemap entry).
std::uint64_t present_bytes(int pagemap, std::uint64_t start, std::uint64_t end) {
  std::uint64_t bytes = 0;
  std::vector<std::uint64_t> entries(512);
  for (std::uint64_t page = start / kPageSize; page < end / kPageSize;) {
    const std::uint64_t want = std::min<std::uint64_t>(entries.size(), end / kPageSize - page);
    const ssize_t got = ::pread(pagemap, entries.data(), want * sizeof(std::uint64_t),
                                static_cast<off_t>(page * sizeof(std::uint64_t)));
    if (got <= 0) break;
    const std::uint64_t n = static_cast<std::uint64_t>(got) / sizeof(std::uint64_t);
    for (std::uint64_t k = 0; k < n; ++k) bytes += (entries[k] >> 63) * kPageSize;
    page += n;
  }
  return bytes;
}

std::uint64_t kib_field(const std::string& line) {
  std::istringstream in(line.substr(line.find(':') + 1));
  std::uint64_t kib = 0;
  in >> kib;
  return kib * 1024;
}

}  // namespace

MemoryUse measure(pid_t root, const fs::path& backing) {
  MemoryUse use;
  std::vector<pid_t> tree = proc::descendants(root);
  if (root > 0) tree.insert(tree.begin(), root);
  const std::string file = backing.string();
  for (pid_t pid : tree) {
    std::istringstream rollup(proc::read_proc_file("/proc/" + std::to_string(pid) + "/smaps_rollup"));
    std::string line;
    while (std::getline(rollup, line)) {
      if (line.rfind("Anonymous:", 0) == 0) use.local_anonymous_bytes += kib_field(line);
    }
    if (file.empty()) continue;
    // Device pages mapped through /dev/snaptier-cow are not "normal" pages, so smaps counts
    // them in no field; the page table does: present pages of the mapped VMAs minus the private
    // copies (Anonymous) are the pages still read from CXL, for a file and a device alike.
    std::istringstream smaps(proc::read_proc_file("/proc/" + std::to_string(pid) + "/smaps"));
    detail::UniqueFd pagemap(::open(("/proc/" + std::to_string(pid) + "/pagemap").c_str(), O_RDONLY | O_CLOEXEC));
    bool mapped = false;
    std::uint64_t present = 0;
    while (std::getline(smaps, line)) {
      // A VMA header: "start-end perms offset dev inode [path]"; fields are "Name:  value kB".
      const auto colon = line.find(':');
      const bool header = colon == std::string::npos || line.find(' ') < colon;
      if (header) {
        mapped = line.size() >= file.size() && line.compare(line.size() - file.size(), file.size(), file) == 0;
        if (mapped) {
          std::uint64_t start = 0, end = 0;
          if (std::sscanf(line.c_str(), "%" SCNx64 "-%" SCNx64, &start, &end) == 2 && pagemap) {
            present = present_bytes(pagemap.get(), start, end);
          } else {
            present = 0;
          }
        }
        continue;
      }
      if (!mapped) continue;
      if (line.rfind("Anonymous:", 0) == 0) {
        const std::uint64_t anon = kib_field(line);
        use.mapped_cow_bytes += anon;
        use.cxl_mapped_bytes += present - std::min(present, anon);
      }
    }
  }
  return use;
}

}  // namespace snaptier::inplace
