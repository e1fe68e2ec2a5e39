// CRIU checkpoint <-> tiered snapshot (snaptier/function_snapshot.hpp) with real components: the
// criu 4.1.1 fixtures in tests/agent/data/criu/ (see its README.md), a SnapshotStore over a
// local tier, a file tier and a CXL tier backed by a regular file, and real userfaultfd.
//
// Fixture `single` (pid 15884, pages-1.img = 20 pages in pagemap order):
//   file page 0      0x401000            non-lazy
//   file pages 1-5   0x4a4000 (5 pages)  non-lazy
//   file pages 6-7   0x4ad000 (2 pages)  lazy
//   file pages 8-10  0x10000000          lazy (0xA0, 0xA1, 0xA2)
//   file page 11     0x10006000          lazy (0xA6)
//   file pages 12-13 heap                lazy
//   file pages 14-15 vdso-ish            non-lazy
//   file pages 16-19 stack               lazy
// None of its pages is all zero; the "zeroed" copy below clears file pages 2, 9 and 10.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/unique_fd.hpp"
#include "helpers/scm_rights.hpp"
#include "helpers/temp_dir.hpp"
#include "helpers/userfaultfd.hpp"
#include "snaptier/criu_images.hpp"
#include "snaptier/cxl_directory.hpp"
#include "snaptier/fault_engine.hpp"
#include "snaptier/function_snapshot.hpp"
#include "snaptier/lazy_pages.hpp"
#include "snaptier/restore_policy.hpp"
#include "snaptier/snapshot_store.hpp"
#include "snaptier/tiers.hpp"

namespace snaptier {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<std::byte>;
using namespace std::chrono_literals;
constexpr std::uint64_t P = kPageSize;

const fs::path kData = fs::path(__FILE__).parent_path() / "data" / "criu";
constexpr std::uint32_t kSinglePid = 15884;
constexpr std::uint64_t kMapping = 0x10000000;  // 8 pages; 0-2 and 6 hold data, all lazy

Bytes read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Bytes out(chars.size());
  if (!chars.empty()) std::memcpy(out.data(), chars.data(), chars.size());
  return out;
}

void write_file(const fs::path& p, const Bytes& b) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// A checkpoint directory as CRIU leaves it: the images (the *.crit.json next to the fixtures are
// test oracles, not images), plus a log file and a socket-like leftover ingest must skip.
fs::path copy_checkpoint(const fs::path& from, const fs::path& to) {
  fs::create_directories(to);
  for (const auto& e : fs::directory_iterator(from)) {
    if (e.path().extension() == ".img") fs::copy_file(e.path(), to / e.path().filename());
  }
  write_file(to / "dump.log", Bytes(10, std::byte{'x'}));
  return to;
}

bool all_zero(std::span<const std::byte> b) {
  return std::all_of(b.begin(), b.end(), [](std::byte x) { return x == std::byte{0}; });
}

std::set<std::string> image_names(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() == ".img") out.insert(e.path().filename().string());
  }
  return out;
}

// A store over local + file + CXL (a regular file standing in for /dev/dax0.0).
class Tiers {
 public:
  explicit Tiers(const fs::path& dir, bool with_cxl = true) : dir_(dir) {
    local = std::shared_ptr<Tier>(*make_local_tier(4 << 20));
    file = std::shared_ptr<Tier>(*make_file_tier(dir / "file-tier", 4 << 20));
    std::map<TierKind, std::shared_ptr<Tier>> tiers{{TierKind::local, local}, {TierKind::file, file}};
    if (with_cxl) {
      auto region = MappedRegion::open(testing::make_region_file(dir, 8 << 20));
      EXPECT_TRUE(region) << region.error().what();
      auto access = make_direct_region_access(*region);
      EXPECT_TRUE(format_cxl_region(*access, CxlFormatOptions{.host_count = 2, .log_entries_per_host = 64}));
      auto attached = CxlDirectory::attach(access, CxlAttachOptions{.host_index = 0, .host_name = "hostA"});
      EXPECT_TRUE(attached) << attached.error().what();
      directory = *attached;
      cxl = std::shared_ptr<Tier>(*make_cxl_tier(directory));
      tiers.emplace(TierKind::cxl, cxl);
    }
    auto made = make_snapshot_store(StoreOptions{"hostA", dir / "state", tiers, directory});
    EXPECT_TRUE(made) << made.error().what();
    store = std::shared_ptr<SnapshotStore>(std::move(*made));
  }
  std::shared_ptr<Tier> local, file, cxl;
  std::shared_ptr<CxlDirectory> directory;
  std::shared_ptr<SnapshotStore> store;

 private:
  fs::path dir_;
};

// Page i -> cxl, file, local, cxl, ...: every tier holds pages of every kind of range.
PlacementRequest round_robin(std::size_t pages) {
  PlacementRequest r;
  r.default_tier = TierKind::local;
  const TierKind order[] = {TierKind::cxl, TierKind::file, TierKind::local};
  for (std::size_t i = 0; i < pages; ++i) r.per_page.push_back(order[i % 3]);
  return r;
}

class FunctionSnapshotTest : public ::testing::Test {
 protected:
  fs::path single() { return copy_checkpoint(kData / "single", tmp_.path() / "single"); }
  fs::path tree() { return copy_checkpoint(kData / "tree", tmp_.path() / "tree"); }
  // `single` with file pages 2 (non-lazy), 9 and 10 (lazy, 0x10001000-0x10003000) zeroed.
  fs::path zeroed() {
    const fs::path dir = copy_checkpoint(kData / "single", tmp_.path() / "zeroed");
    Bytes pages = read_file(dir / "pages-1.img");
    for (std::size_t i : {2, 9, 10}) std::fill_n(pages.begin() + static_cast<std::ptrdiff_t>(i * P), P, std::byte{0});
    write_file(dir / "pages-1.img", pages);
    return dir;
  }

  // Ingest `dir`, put it into `tiers` as `id`, read it back.
  Snapshot stored(const fs::path& dir, Tiers& tiers, const std::string& id, std::optional<PlacementRequest> placement = {}) {
    auto ingested = snap::ingest(dir);
    EXPECT_TRUE(ingested) << ingested.error().what();
    ingested->snapshot.info.id = id;
    const auto request = placement ? *placement : round_robin(ingested->snapshot.pages.size());
    auto info = tiers.store->put(ingested->snapshot, ingested->data, request);
    EXPECT_TRUE(info) << info.error().what();
    auto got = tiers.store->get(id);
    EXPECT_TRUE(got) << got.error().what();
    return *got;
  }

  testing::TempDir tmp_;
};

// ---- ingest -------------------------------------------------------------------------------------

TEST_F(FunctionSnapshotTest, IngestSingleTaskCheckpoint) {
  const fs::path dir = single();
  auto ingested = snap::ingest(dir);
  ASSERT_TRUE(ingested) << ingested.error().what();
  const auto& cp = ingested->checkpoint;
  ASSERT_EQ(cp.tasks.size(), 1u);
  const auto& pm = *cp.tasks[0].pagemap;
  EXPECT_EQ(pm.present_pages, 20u);
  ASSERT_EQ(ingested->snapshot.pages.size(), pm.present_pages);
  EXPECT_EQ(ingested->data, read_file(dir / "pages-1.img"));
  // One PageEntry per stored page, in pagemap order, with its address.
  std::size_t i = 0;
  for (const auto& pe : pm.entries) {
    if (!pe.present()) continue;
    for (std::uint64_t k = 0; k < pe.nr_pages; ++k, ++i) {
      EXPECT_EQ(ingested->snapshot.pages[i].vaddr, pe.vaddr + k * P) << "page " << i;
      EXPECT_EQ(ingested->snapshot.pages[i].touch_order, 0u);
    }
  }
  EXPECT_EQ(static_cast<unsigned char>(ingested->data[8 * P]), 0xA0);
  EXPECT_EQ(ingested->snapshot.pages[8].vaddr, kMapping);
  // A blob per metadata image, byte for byte; no pages image, no log; plus the layout.
  std::set<std::string> blobs;
  for (const auto& [name, bytes] : ingested->snapshot.blobs) blobs.insert(name);
  EXPECT_EQ(blobs, (std::set<std::string>{"img:inventory.img", "img:mm-15884.img", "img:pagemap-15884.img",
                                          "img:pstree.img", snap::kLayoutBlob}));
  for (const auto& name : {"inventory.img", "mm-15884.img", "pagemap-15884.img", "pstree.img"}) {
    EXPECT_EQ(ingested->snapshot.blobs.at(std::string("img:") + name), read_file(dir / name)) << name;
  }
  ASSERT_EQ(ingested->layout.tasks.size(), 1u);
  const auto& t = ingested->layout.tasks[0];
  EXPECT_EQ(t.pid, kSinglePid);
  EXPECT_EQ(t.pages_file, "pages-1.img");
  EXPECT_EQ(t.first_page, 0u);
  EXPECT_EQ(t.page_count, 20u);
  auto decoded = snap::decode_layout(ingested->snapshot.blobs.at(snap::kLayoutBlob));
  ASSERT_TRUE(decoded) << decoded.error().what();
  ASSERT_EQ(decoded->tasks.size(), 1u);
  EXPECT_EQ(decoded->tasks[0].page_count, 20u);
}

TEST_F(FunctionSnapshotTest, IngestProcessTreeLaysTasksOutOneAfterTheOther) {
  const fs::path dir = tree();
  auto ingested = snap::ingest(dir);
  ASSERT_TRUE(ingested) << ingested.error().what();
  std::uint64_t present = 0;
  for (const auto& task : ingested->checkpoint.tasks) present += task.pagemap->present_pages;
  EXPECT_EQ(present, 18u + 19u);
  ASSERT_EQ(ingested->snapshot.pages.size(), present);
  ASSERT_EQ(ingested->layout.tasks.size(), 2u);
  const auto& parent = ingested->layout.tasks[0];
  const auto& child = ingested->layout.tasks[1];
  EXPECT_EQ(parent.pid, 15901u);
  EXPECT_EQ(parent.pages_file, "pages-1.img");
  EXPECT_EQ(parent.first_page, 0u);
  EXPECT_EQ(parent.page_count, 18u);
  EXPECT_EQ(child.pid, 15903u);
  EXPECT_EQ(child.pages_file, "pages-2.img");
  EXPECT_EQ(child.first_page, 18u);
  EXPECT_EQ(child.page_count, 19u);
  Bytes expected = read_file(dir / "pages-1.img");
  const Bytes second = read_file(dir / "pages-2.img");
  expected.insert(expected.end(), second.begin(), second.end());
  EXPECT_EQ(ingested->data, expected);
  EXPECT_EQ(ingested->snapshot.blobs.size(), 6u + 1u);  // inventory, pstree, 2 x (mm, pagemap) + layout
  EXPECT_TRUE(ingested->snapshot.blobs.contains("img:mm-15903.img"));
  EXPECT_TRUE(ingested->snapshot.blobs.contains("img:pagemap-15903.img"));
  EXPECT_FALSE(ingested->snapshot.blobs.contains("img:pages-2.img"));
  EXPECT_FALSE(ingested->snapshot.blobs.contains("img:dump.log"));
}

TEST_F(FunctionSnapshotTest, LayoutRoundTripsAndCorruptLayoutsAreRejected) {
  snap::Layout layout;
  layout.tasks.push_back({7, "pages-1.img", 0, 3});
  layout.tasks.push_back({9, "pages-2.img", 3, 0});
  layout.tasks.push_back({11, "pages-3.img", 3, 5});
  auto back = snap::decode_layout(snap::encode_layout(layout));
  ASSERT_TRUE(back) << back.error().what();
  ASSERT_EQ(back->tasks.size(), 3u);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(back->tasks[i].pid, layout.tasks[i].pid);
    EXPECT_EQ(back->tasks[i].pages_file, layout.tasks[i].pages_file);
    EXPECT_EQ(back->tasks[i].first_page, layout.tasks[i].first_page);
    EXPECT_EQ(back->tasks[i].page_count, layout.tasks[i].page_count);
  }
  auto empty = snap::decode_layout(snap::encode_layout(snap::Layout{}));
  ASSERT_TRUE(empty);
  EXPECT_TRUE(empty->tasks.empty());

  auto bytes = [](std::string_view s) {
    Bytes b(s.size());
    std::memcpy(b.data(), s.data(), s.size());
    return b;
  };
  const std::vector<std::string> bad{
      "",
      "not json",
      "[]",
      R"({"version":2,"tasks":[]})",
      R"({"version":"1","tasks":[]})",
      R"({"version":null,"tasks":[]})",
      R"({"version":[1],"tasks":[]})",
      R"({"tasks":[]})",
      R"({"version":1})",
      R"({"version":1,"tasks":{}})",
      R"({"version":1,"tasks":[{"pid":1,"pages_file":"pages-1.img","first_page":0}]})",
      R"({"version":1,"tasks":[{"pid":-1,"pages_file":"pages-1.img","first_page":0,"page_count":1}]})",
      R"({"version":1,"tasks":[{"pid":1,"pages_file":"pages-1.img","first_page":0,"page_count":"1"}]})",
      R"({"version":1,"tasks":[{"pid":1,"pages_file":"../pages-1.img","first_page":0,"page_count":1}]})",
      R"({"version":1,"tasks":[{"pid":1,"pages_file":"mm-1.img","first_page":0,"page_count":1}]})",
      R"({"version":1,"tasks":[{"pid":1,"pages_file":"pages-1.img","first_page":1,"page_count":1}]})",
      R"({"version":1,"tasks":[{"pid":1,"pages_file":"pages-1.img","first_page":0,"page_count":2},)"
      R"({"pid":2,"pages_file":"pages-2.img","first_page":1,"page_count":1}]})",
      R"({"version":1,"tasks":[7]})",
      R"({"version":1,"tasks":[{"pid":4294982180,"pages_file":"pages-1.img","first_page":0,"page_count":1}]})",
      R"({"version":1,"tasks":[{"pid":1,"pages_file":"pages-1.img","first_page":0,"page_count":18446744073709551615},)"
      R"({"pid":2,"pages_file":"pages-2.img","first_page":18446744073709551615,"page_count":21}]})",
  };
  for (const auto& text : bad) {
    auto decoded = snap::decode_layout(bytes(text));
    ASSERT_FALSE(decoded) << "accepted: " << text;
    EXPECT_EQ(decoded.error().code, Errc::corrupt) << text;
    EXPECT_NE(decoded.error().message.find(snap::kLayoutBlob), std::string::npos) << decoded.error().message;
  }
}

TEST_F(FunctionSnapshotTest, IngestOfSomethingElseFailsCleanly) {
  const fs::path empty = tmp_.path() / "empty";
  fs::create_directories(empty);
  auto none = snap::ingest(empty);
  ASSERT_FALSE(none);
  EXPECT_NE(none.error().message.find("inventory.img"), std::string::npos) << none.error().message;
  EXPECT_FALSE(snap::ingest(tmp_.path() / "does-not-exist"));
  // Images that are not images.
  const fs::path garbage = tmp_.path() / "garbage";
  fs::create_directories(garbage);
  write_file(garbage / "inventory.img", Bytes(64, std::byte{0x42}));
  write_file(garbage / "pstree.img", Bytes(16, std::byte{0x17}));
  auto bad = snap::ingest(garbage);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::corrupt) << bad.error().what();
  // A pages file that does not hold what the pagemap says.
  const fs::path cut = single();
  fs::resize_file(cut / "pages-1.img", 19 * P);
  auto truncated = snap::ingest(cut);
  ASSERT_FALSE(truncated);
  EXPECT_EQ(truncated.error().code, Errc::corrupt) << truncated.error().what();
}

// ---- store + materialize ---------------------------------------------------------------------

void expect_dirs_identical(const fs::path& want, const fs::path& got) {
  EXPECT_EQ(image_names(want), image_names(got));
  for (const auto& name : image_names(want)) {
    EXPECT_TRUE(read_file(want / name) == read_file(got / name)) << name << " differs";
  }
}

TEST_F(FunctionSnapshotTest, MaterializeAllPagesReproducesTheCheckpointFromEveryTier) {
  for (const auto& [name, dir] : {std::pair{"single", single()}, std::pair{"tree", tree()}}) {
    SCOPED_TRACE(name);
    Tiers tiers(tmp_.path() / (std::string("tiers-") + name));
    const Snapshot snapshot = stored(dir, tiers, name);
    std::set<TierKind> used;
    for (const auto& p : snapshot.pages) used.insert(p.tier);
    EXPECT_EQ(used, (std::set<TierKind>{TierKind::local, TierKind::file, TierKind::cxl}));
    const fs::path out = tmp_.path() / (std::string("restore-all-") + name);
    auto m = snap::materialize(snapshot, *tiers.store, out, /*all_pages=*/true);
    ASSERT_TRUE(m) << m.error().what();
    EXPECT_EQ(m->pages_written, snapshot.pages.size());
    EXPECT_EQ(m->bytes_written, snapshot.pages.size() * P);
    EXPECT_EQ(m->checkpoint.tasks.size(), name == std::string("tree") ? 2u : 1u);
    expect_dirs_identical(dir, out);
    EXPECT_FALSE(fs::exists(out / snap::kLayoutBlob));
  }
}

TEST_F(FunctionSnapshotTest, MaterializeWithoutLazyPagesLeavesHolesWhereTheyWere) {
  const fs::path dir = tree();
  Tiers tiers(tmp_.path() / "tiers");
  const Snapshot snapshot = stored(dir, tiers, "fn");
  const fs::path out = tmp_.path() / "restore";
  auto m = snap::materialize(snapshot, *tiers.store, out, /*all_pages=*/false);
  ASSERT_TRUE(m) << m.error().what();
  EXPECT_EQ(image_names(dir), image_names(out));
  std::uint64_t non_lazy = 0, lazy = 0;
  auto original = criu::load_checkpoint(dir);
  ASSERT_TRUE(original);
  for (const auto& task : original->tasks) {
    const std::string pages_file = task.pages_path.filename().string();
    const Bytes want = read_file(task.pages_path);
    const Bytes got = read_file(out / pages_file);
    ASSERT_EQ(got.size(), want.size()) << pages_file;
    for (const auto& pe : task.pagemap->entries) {
      if (!pe.present()) continue;
      const auto off = static_cast<std::ptrdiff_t>(*pe.data_offset);
      const auto len = static_cast<std::ptrdiff_t>(pe.nr_pages * P);
      const std::span<const std::byte> got_range(got.data() + off, static_cast<std::size_t>(len));
      if (pe.lazy()) {
        lazy += pe.nr_pages;
        EXPECT_TRUE(all_zero(got_range)) << pages_file << " lazy entry at 0x" << std::hex << pe.vaddr << " is not a hole";
      } else {
        non_lazy += pe.nr_pages;
        EXPECT_TRUE(std::equal(got_range.begin(), got_range.end(), want.begin() + off))
            << pages_file << " entry at 0x" << std::hex << pe.vaddr << " differs";
      }
    }
  }
  EXPECT_GT(lazy, 0u);
  EXPECT_EQ(m->pages_written, non_lazy);
  for (const auto& name : image_names(dir)) {
    if (!name.starts_with("pages-")) {
      EXPECT_EQ(read_file(dir / name), read_file(out / name)) << name;
    }
  }
}

TEST_F(FunctionSnapshotTest, ZeroPagesTakeNoSpaceAndMaterializeAsZeros) {
  const fs::path dir = zeroed();
  Tiers tiers(tmp_.path() / "tiers");
  auto ingested = snap::ingest(dir);
  ASSERT_TRUE(ingested);
  ingested->snapshot.info.id = "zeroed";
  auto info = tiers.store->put(ingested->snapshot, ingested->data, round_robin(20));
  ASSERT_TRUE(info) << info.error().what();
  EXPECT_EQ(info->page_count, 20u);
  EXPECT_EQ(info->zero_pages, 3u);
  std::uint64_t stored_bytes = 0;
  for (const auto& [tier, bytes] : info->bytes_per_tier) stored_bytes += bytes;
  EXPECT_EQ(stored_bytes, 17 * P);
  // Round robin over 20 pages: cxl gets 0,3,6,9,12,15,18; file 1,4,7,10,13,16,19; local 2,5,...
  // minus the zero pages 2 (local), 9 (cxl), 10 (file).
  EXPECT_EQ(info->bytes_per_tier.at(TierKind::cxl), 6 * P);
  EXPECT_EQ(info->bytes_per_tier.at(TierKind::file), 6 * P);
  EXPECT_EQ(info->bytes_per_tier.at(TierKind::local), 5 * P);
  EXPECT_EQ(tiers.local->stats().used_bytes, 5 * P);
  EXPECT_EQ(tiers.file->stats().used_bytes, 6 * P);
  auto snapshot = tiers.store->get("zeroed");
  ASSERT_TRUE(snapshot);
  for (std::size_t i : {2, 9, 10}) EXPECT_TRUE(snapshot->pages[i].flags & page_zero) << i;
  auto m = snap::materialize(*snapshot, *tiers.store, tmp_.path() / "out", true);
  ASSERT_TRUE(m) << m.error().what();
  EXPECT_EQ(m->pages_written, 17u);
  expect_dirs_identical(dir, tmp_.path() / "out");
}

TEST_F(FunctionSnapshotTest, MaterializeRejectsSnapshotsThatAreNotCheckpoints) {
  Tiers tiers(tmp_.path() / "tiers", /*with_cxl=*/false);
  Snapshot snapshot = stored(single(), tiers, "fn", PlacementRequest{TierKind::local, {}});
  Snapshot no_layout = snapshot;
  no_layout.blobs.erase(snap::kLayoutBlob);
  EXPECT_EQ(snap::materialize(no_layout, *tiers.store, tmp_.path() / "a", true).error().code, Errc::invalid_argument);
  Snapshot short_table = snapshot;
  short_table.pages.pop_back();
  EXPECT_EQ(snap::materialize(short_table, *tiers.store, tmp_.path() / "b", true).error().code, Errc::corrupt);
  Snapshot escaping = snapshot;
  escaping.blobs["img:../evil.img"] = Bytes(4, std::byte{1});
  EXPECT_EQ(snap::materialize(escaping, *tiers.store, tmp_.path() / "c", true).error().code, Errc::corrupt);
  EXPECT_FALSE(fs::exists(tmp_.path() / "evil.img"));
  Snapshot moved = snapshot;
  moved.pages[3].vaddr += P;  // page table disagrees with the pagemap
  EXPECT_EQ(snap::materialize(moved, *tiers.store, tmp_.path() / "d", true).error().code, Errc::corrupt);
}

// ---- StorePageSource ----------------------------------------------------------------------------

// Checks every lazy page of every task against CheckpointPageSource over the original images
// and the bytes of the original pages files.
void expect_serves_like_the_checkpoint(snap::StorePageSource& source, const fs::path& original_dir,
                                       std::size_t max_pages) {
  auto original = criu::load_checkpoint(original_dir);
  ASSERT_TRUE(original);
  auto oracle = lazy::CheckpointPageSource::open(*original);
  ASSERT_TRUE(oracle);
  Bytes buffer(max_pages * P), want(max_pages * P);
  for (const auto& task : original->tasks) {
    const TaskId id = task.pstree.pid;
    ASSERT_TRUE(source.has_task(id));
    ASSERT_EQ(source.lazy_pages(id), (*oracle)->lazy_pages(id)) << "task " << id;
    const Bytes file = read_file(task.pages_path);
    for (const auto& range : (*oracle)->lazy_ranges(id)) {
      for (std::uint64_t a = range.start; a < range.end;) {
        auto fill = source.fetch(id, a, max_pages, buffer);
        ASSERT_TRUE(fill) << std::hex << a << ": " << fill.error().what();
        ASSERT_GE(fill->pages, 1u);
        ASSERT_LE(fill->pages, max_pages);
        ASSERT_LE(a + fill->pages * P, range.end) << "answer runs past the lazy range";
        for (std::size_t k = 0; k < fill->pages; ++k) {
          const std::uint64_t off = range.file_offset + (a - range.start) + k * P;
          const std::span<const std::byte> expected(file.data() + off, P);
          if (fill->answer == PageAnswer::zero) {
            EXPECT_TRUE(all_zero(expected)) << "zero answer for a non-zero page at 0x" << std::hex << a + k * P;
          } else {
            const std::byte* got = fill->data != nullptr ? fill->data + k * P : buffer.data() + k * P;
            EXPECT_EQ(0, std::memcmp(got, expected.data(), P)) << "page 0x" << std::hex << a + k * P;
            EXPECT_FALSE(all_zero(expected)) << "copy answer for a zero page at 0x" << std::hex << a + k * P;
          }
        }
        a += fill->pages * P;
      }
    }
  }
}

TEST_F(FunctionSnapshotTest, StorePageSourceServesEveryLazyPageExactly) {
  for (const auto& [name, dir] : {std::pair{"single", zeroed()}, std::pair{"tree", tree()}}) {
    SCOPED_TRACE(name);
    Tiers tiers(tmp_.path() / (std::string("tiers-") + name));
    const Snapshot snapshot = stored(dir, tiers, name);
    auto m = snap::materialize(snapshot, *tiers.store, tmp_.path() / (std::string("out-") + name), false);
    ASSERT_TRUE(m) << m.error().what();
    auto source = snap::StorePageSource::open(tiers.store, snapshot, m->checkpoint);
    ASSERT_TRUE(source) << source.error().what();
    expect_serves_like_the_checkpoint(**source, dir, 1);
    expect_serves_like_the_checkpoint(**source, dir, 16);
    EXPECT_FALSE((*source)->has_task(4242));
    EXPECT_TRUE((*source)->lazy_pages(4242).empty());
    Bytes buffer(4 * P);
    EXPECT_EQ((*source)->fetch(4242, kMapping, 4, buffer).error().code, Errc::not_found);
  }
}

TEST_F(FunctionSnapshotTest, StorePageSourceAnswersZeroOutsideLazyRangesAndForZeroPages) {
  const fs::path dir = zeroed();
  Tiers tiers(tmp_.path() / "tiers");
  const Snapshot snapshot = stored(dir, tiers, "fn", PlacementRequest{TierKind::cxl, {}});
  auto m = snap::materialize(snapshot, *tiers.store, tmp_.path() / "out", false);
  ASSERT_TRUE(m);
  auto source = snap::StorePageSource::open(tiers.store, snapshot, m->checkpoint);
  ASSERT_TRUE(source) << source.error().what();
  Bytes buffer(8 * P);
  // 0x10000000: page 0 holds data, 1 and 2 were zeroed -> copy 1 page in place (CXL), then zero x2.
  auto first = (*source)->fetch(kSinglePid, kMapping, 8, buffer);
  ASSERT_TRUE(first) << first.error().what();
  EXPECT_EQ(first->answer, PageAnswer::copy);
  EXPECT_EQ(first->pages, 1u);
  EXPECT_EQ(first->tier, TierKind::cxl);
  ASSERT_NE(first->data, nullptr);  // CXL is byte addressable: in place
  EXPECT_EQ(static_cast<unsigned char>(first->data[0]), 0xA0);
  auto zero = (*source)->fetch(kSinglePid, kMapping + P, 8, buffer);
  ASSERT_TRUE(zero);
  EXPECT_EQ(zero->answer, PageAnswer::zero);
  EXPECT_EQ(zero->pages, 2u);
  // 0x10003000..0x10006000 is not in the pagemap: fresh memory, zero up to the next lazy range.
  auto gap = (*source)->fetch(kSinglePid, kMapping + 3 * P, 8, buffer);
  ASSERT_TRUE(gap);
  EXPECT_EQ(gap->answer, PageAnswer::zero);
  EXPECT_EQ(gap->pages, 3u);
  // A non-lazy page (CRIU restores it itself) is never served from the store.
  auto eager = (*source)->fetch(kSinglePid, 0x401000, 1, std::span(buffer).first(P));
  ASSERT_TRUE(eager);
  EXPECT_EQ(eager->answer, PageAnswer::zero);
  // Contiguous CXL pages come back as one in-place run: 0x10006000 is one page, the heap two.
  const auto lazy = (*source)->lazy_pages(kSinglePid);
  ASSERT_EQ(lazy.size(), 12u);
  auto run = (*source)->fetch(kSinglePid, lazy.back() - 3 * P, 8, buffer);  // the 4 stack pages
  ASSERT_TRUE(run);
  EXPECT_EQ(run->answer, PageAnswer::copy);
  EXPECT_EQ(run->pages, 4u);
  EXPECT_NE(run->data, nullptr);
}

TEST_F(FunctionSnapshotTest, CorruptTierDataFailsTheFetchInsteadOfServingWrongBytes) {
  const fs::path dir = single();
  Tiers tiers(tmp_.path() / "tiers", /*with_cxl=*/false);
  const Snapshot snapshot = stored(dir, tiers, "fn", PlacementRequest{TierKind::file, {}});
  auto m = snap::materialize(snapshot, *tiers.store, tmp_.path() / "out", false);
  ASSERT_TRUE(m);
  auto source = snap::StorePageSource::open(tiers.store, snapshot, m->checkpoint);
  ASSERT_TRUE(source);
  // No zero pages: page i of the snapshot is page i of the file tier's one extent file.
  // Damage page 9 (0x10001000, lazy) behind the store's back.
  std::size_t files = 0;
  for (const auto& entry : fs::directory_iterator(tmp_.path() / "tiers" / "file-tier")) {
    std::fstream f(entry.path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(9 * P + 77));
    f.put('\x5c');
    ++files;
  }
  ASSERT_EQ(files, 1u);
  Bytes buffer(3 * P);
  auto head = (*source)->fetch(kSinglePid, kMapping, 3, buffer);  // page 8 fine, 9 bad
  ASSERT_TRUE(head) << head.error().what();
  EXPECT_EQ(head->answer, PageAnswer::copy);
  EXPECT_EQ(head->pages, 1u);  // what was read before the bad page
  EXPECT_EQ(static_cast<unsigned char>(buffer[0]), 0xA0);
  auto bad = (*source)->fetch(kSinglePid, kMapping + P, 2, std::span(buffer).first(2 * P));
  ASSERT_FALSE(bad) << "served a page that fails its checksum";
  EXPECT_EQ(bad.error().code, Errc::corrupt);
  auto after = (*source)->fetch(kSinglePid, kMapping + 2 * P, 1, std::span(buffer).first(P));
  ASSERT_TRUE(after);
  EXPECT_EQ(static_cast<unsigned char>(buffer[0]), 0xA2);
  // Restoring every page (criu-eager) trips over it too; without the lazy ones it does not.
  EXPECT_EQ(snap::materialize(snapshot, *tiers.store, tmp_.path() / "all", true).error().code, Errc::corrupt);
  EXPECT_TRUE(snap::materialize(snapshot, *tiers.store, tmp_.path() / "eager-only", false));
}

// ---- profiling --------------------------------------------------------------------------------

FaultObservation seen(std::uint64_t source_address, bool write, TaskId task = kSinglePid) {
  FaultObservation f;
  f.task = task;
  f.source_task = task;
  f.address = source_address;
  f.source_address = source_address;
  f.write = write;
  return f;
}

TEST_F(FunctionSnapshotTest, ProfileMarksTouchedPagesInFirstTouchOrder) {
  const fs::path dir = zeroed();  // file pages 2, 9, 10 are zero
  auto ingested = snap::ingest(dir);
  ASSERT_TRUE(ingested);
  const auto& pages = ingested->snapshot.pages;
  snap::ProfileRecorder recorder;
  recorder.record(seen(pages[11].vaddr, /*write=*/true));    // order 1, written
  recorder.record(seen(pages[8].vaddr, false));              // order 2, read only
  recorder.record(seen(pages[8].vaddr, true));               // not a first touch
  FaultObservation zero_range = seen(0, false);
  zero_range.source_address.reset();                         // a removed range: no snapshot page
  recorder.record(zero_range);
  recorder.record(seen(pages[9].vaddr, false));              // order 3, a zero page
  recorder.record(seen(pages[0].vaddr + 0, true, 15883));    // another task: not this snapshot's page
  recorder.record(seen(pages[16].vaddr, false));             // order 5
  EXPECT_EQ(recorder.faults(), 7u);
  recorder.freeze();
  recorder.record(seen(pages[12].vaddr, true));  // e.g. the digest call after the profiled run
  EXPECT_EQ(recorder.faults(), 7u);
  EXPECT_EQ(recorder.touches().size(), 5u);

  // Flags from an earlier profile are replaced, not merged.
  ingested->snapshot.pages[12].flags = page_hot | page_written;
  ingested->snapshot.pages[12].touch_order = 99;
  const auto summary = snap::apply_profile(*ingested, recorder, 0);
  const auto& p = ingested->snapshot.pages;
  EXPECT_EQ(p[11].flags & (page_hot | page_written | page_read_only), page_hot | page_written);
  EXPECT_EQ(p[11].touch_order, 1u);
  EXPECT_EQ(p[8].flags & (page_hot | page_written | page_read_only), page_hot | page_read_only);
  EXPECT_EQ(p[8].touch_order, 2u);
  EXPECT_EQ(p[9].flags & (page_hot | page_zero | page_read_only), page_hot | page_zero | page_read_only);
  EXPECT_EQ(p[9].touch_order, 3u);
  EXPECT_EQ(p[16].touch_order, 5u);
  EXPECT_TRUE(p[16].flags & page_read_only);
  EXPECT_EQ(p[12].flags & (page_hot | page_written | page_read_only), 0u);
  EXPECT_EQ(p[12].touch_order, 0u);
  EXPECT_EQ(p[0].flags & page_hot, 0u);  // the other task's touch at this address does not count
  EXPECT_TRUE(p[2].flags & page_zero);
  EXPECT_FALSE(p[2].flags & page_hot);
  // Orders are unique and follow first touches.
  std::vector<std::pair<std::uint32_t, std::uint64_t>> order;
  for (const auto& e : p) {
    if (e.flags & page_hot) order.emplace_back(e.touch_order, e.vaddr);
  }
  std::sort(order.begin(), order.end());
  ASSERT_EQ(order.size(), 4u);
  EXPECT_EQ(order[0].second, pages[11].vaddr);
  EXPECT_EQ(order[3].second, pages[16].vaddr);

  EXPECT_EQ(summary.faults, 7u);
  EXPECT_EQ(summary.hot, 4u);
  EXPECT_EQ(summary.written, 1u);
  EXPECT_EQ(summary.read_only, 3u);
  EXPECT_EQ(summary.zero, 3u);
  EXPECT_EQ(summary.hot_zero, 1u);
  EXPECT_EQ(summary.cold, 20u - 4u - (3u - 1u));  // untouched non-zero pages
  EXPECT_EQ(summary.changed_after_read, 0u);
  EXPECT_EQ(summary.hot + summary.cold + summary.zero - summary.hot_zero, p.size());
  EXPECT_EQ(summary.written + summary.read_only, summary.hot);
}

TEST_F(FunctionSnapshotTest, ProfileCountsAPageWrittenAfterItsReadFaultAsWritten) {
  // The "restored process" is this test process: its memory at the fixture's 0x10000000 holds
  // the snapshot's pages 0 and 1, and page 1 has since been written.
  void* m = ::mmap(reinterpret_cast<void*>(kMapping), 2 * P, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  if (m != reinterpret_cast<void*>(kMapping)) {
    if (m != MAP_FAILED) ::munmap(m, 2 * P);
    GTEST_SKIP() << "0x10000000 is taken in this process";
  }
  auto ingested = snap::ingest(single());
  ASSERT_TRUE(ingested);
  std::memcpy(m, ingested->data.data() + 8 * P, 2 * P);
  static_cast<unsigned char*>(m)[P + 5] ^= 0xFF;
  snap::ProfileRecorder recorder;
  recorder.record(seen(kMapping, false));
  recorder.record(seen(kMapping + P, false));
  const auto summary = snap::apply_profile(*ingested, recorder, ::getpid());
  ::munmap(m, 2 * P);
  EXPECT_TRUE(ingested->snapshot.pages[8].flags & page_read_only);
  EXPECT_TRUE(ingested->snapshot.pages[9].flags & page_written);
  EXPECT_FALSE(ingested->snapshot.pages[9].flags & page_read_only);
  EXPECT_EQ(summary.changed_after_read, 1u);
  EXPECT_EQ(summary.written, 1u);
  EXPECT_EQ(summary.read_only, 1u);
}

TEST_F(FunctionSnapshotTest, PolicyViewCarriesTheProfileOfLazyPages) {
  const fs::path dir = single();
  auto ingested = snap::ingest(dir);
  ASSERT_TRUE(ingested);
  const auto& pages = ingested->snapshot.pages;
  snap::ProfileRecorder recorder;
  recorder.record(seen(pages[17].vaddr, true));  // stack (lazy)
  recorder.record(seen(pages[0].vaddr, false));  // non-lazy: not in the view
  recorder.record(seen(pages[8].vaddr, false));  // 0x10000000 (lazy)
  (void)snap::apply_profile(*ingested, recorder, 0);
  ingested->snapshot.info.id = "fn";
  Tiers tiers(tmp_.path() / "tiers");
  std::map<TierKind, TierCaps> up{{TierKind::cxl, {}}, {TierKind::rdma, {}}};
  auto placement = policy::make_placement("tiered");
  ASSERT_TRUE(placement);
  auto request = (*placement)->place(ingested->snapshot.pages, up);
  ASSERT_TRUE(request);
  // No rdma tier in this store: put the cold pages on the file tier instead.
  request->default_tier = TierKind::file;
  ASSERT_TRUE(tiers.store->put(ingested->snapshot, ingested->data, *request));
  auto snapshot = tiers.store->get("fn");
  ASSERT_TRUE(snapshot);
  EXPECT_EQ(snapshot->pages[17].tier, TierKind::cxl);
  EXPECT_EQ(snapshot->pages[8].tier, TierKind::cxl);
  EXPECT_EQ(snapshot->pages[9].tier, TierKind::file);
  auto m = snap::materialize(*snapshot, *tiers.store, tmp_.path() / "out", false);
  ASSERT_TRUE(m);
  auto source = snap::StorePageSource::open(tiers.store, *snapshot, m->checkpoint);
  ASSERT_TRUE(source);
  const auto view = (*source)->policy_view(kSinglePid);
  ASSERT_EQ(view.size(), 12u);
  std::vector<std::uint64_t> addresses;
  for (const auto& p : view) addresses.push_back(p.vaddr);
  EXPECT_EQ(addresses, (*source)->lazy_pages(kSinglePid));
  auto reap = policy::make_policy("reap");
  ASSERT_TRUE(reap);
  const auto plan = (*reap)->plan(view);
  EXPECT_EQ(plan.before_resume, (std::vector<std::uint64_t>{pages[17].vaddr, pages[8].vaddr}));
  EXPECT_TRUE(plan.background.empty());
  for (const auto& p : view) {
    if (p.vaddr == pages[8].vaddr) {
      EXPECT_EQ(p.touch_order, 3u);
      EXPECT_EQ(p.tier, TierKind::cxl);
    }
  }
}

// ---- end to end: real userfaultfd, pages from the store's tiers -----------------------------

struct Restored {
  pid_t pid = -1;
  int sock = -1;
  int uffd = -1;
  ~Restored() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
    if (sock >= 0) ::close(sock);
  }
};

// A child that maps the fixture's 8-page mapping at 0x10000000 empty, registers it with a uffd
// and hands it over, then on "go" (a byte on r.sock) writes page 6 first and reads all 8,
// comparing with `expected` (exit 0; 10+i: page i wrong; 3x: setup). The uffd goes to this
// process over r.sock (r.uffd), or, given `lazy_socket`, to a LazyPagesServer as criu restore
// hands it over (pid, uffd with one byte, RSTF).
bool spawn_restored(Restored& r, const Bytes& expected, const fs::path& lazy_socket = {}) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return false;
  r.pid = ::fork();
  if (r.pid < 0) return false;
  if (r.pid == 0) {
    ::close(sv[0]);
    ::alarm(10);
    void* m = ::mmap(reinterpret_cast<void*>(kMapping), 8 * P, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (m != reinterpret_cast<void*>(kMapping)) ::_exit(30);
    auto fd = create_userfaultfd(default_uffd_features());
    if (!fd) ::_exit(31);
    if (!register_missing(*fd, m, 8 * P)) ::_exit(32);
    const char byte = 'u';
    if (lazy_socket.empty()) {
      if (snaptier::testing::send_with_fd(sv[1], *fd, &byte, 1) != 1) ::_exit(33);
    } else {
      int sk = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      std::strncpy(addr.sun_path, lazy_socket.c_str(), sizeof(addr.sun_path) - 1);
      if (::connect(sk, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) ::_exit(35);
      const std::int32_t pid = kSinglePid;
      const std::uint32_t rstf = lazy::kRestoreFinished;
      if (::send(sk, &pid, sizeof pid, MSG_NOSIGNAL) != sizeof pid ||
          snaptier::testing::send_with_fd(sk, *fd, &byte, 1) != 1 ||
          ::send(sk, &rstf, sizeof rstf, MSG_NOSIGNAL) != sizeof rstf) {
        ::_exit(36);
      }
      ::close(sk);
    }
    ::close(*fd);
    char go = 0;
    if (::read(sv[1], &go, 1) != 1) ::_exit(34);
    volatile unsigned char* p = static_cast<unsigned char*>(m);
    p[6 * P + 100] = 0x5A;  // write fault
    for (std::size_t i = 0; i < 8; ++i) {
      for (std::size_t b = 0; b < P; ++b) {
        unsigned char want = static_cast<unsigned char>(expected[i * P + b]);
        if (i == 6 && b == 100) want = 0x5A;
        if (p[i * P + b] != want) ::_exit(10 + static_cast<int>(i));
      }
    }
    ::_exit(0);
  }
  ::close(sv[1]);
  r.sock = sv[0];
  if (!lazy_socket.empty()) return true;
  char byte = 0;
  r.uffd = snaptier::testing::receive_with_fd(r.sock, &byte, 1, 5000);
  return r.uffd >= 0;
}

// What the restored 8-page mapping at 0x10000000 must hold: file pages 8-10 at pages 0-2, file
// page 11 at page 6, zeros elsewhere.
Bytes mapping_bytes(const fs::path& checkpoint_dir) {
  const Bytes pages_file = read_file(checkpoint_dir / "pages-1.img");
  Bytes expected(8 * P);
  std::memcpy(expected.data(), pages_file.data() + 8 * P, 3 * P);
  std::memcpy(expected.data() + 6 * P, pages_file.data() + 11 * P, P);
  return expected;
}


TEST_F(FunctionSnapshotTest, RestoredTaskFaultsInLazyPagesFromEveryTier) {
  if (auto why = snaptier::testing::userfaultfd_unavailable(default_uffd_features())) GTEST_SKIP() << *why;
  const fs::path dir = single();
  Tiers tiers(tmp_.path() / "tiers");
  const Snapshot snapshot = stored(dir, tiers, "fn");  // pages 8, 9, 10, 11 on local, cxl, file, local
  auto m = snap::materialize(snapshot, *tiers.store, tmp_.path() / "out", false);
  ASSERT_TRUE(m) << m.error().what();
  auto source = snap::StorePageSource::open(tiers.store, snapshot, m->checkpoint);
  ASSERT_TRUE(source) << source.error().what();

  const Bytes expected = mapping_bytes(dir);

  snap::ProfileRecorder recorder;
  FaultEngineOptions options;
  options.on_fault = [&](const FaultObservation& f) { recorder.record(f); };
  auto engine = FaultEngine::create(*source, options);
  ASSERT_TRUE(engine) << engine.error().what();
  Restored child;
  ASSERT_TRUE(spawn_restored(child, expected));
  AdoptOptions adopt;
  adopt.pid = child.pid;
  ASSERT_TRUE((*engine)->adopt(kSinglePid, child.uffd, adopt));
  ASSERT_EQ(::write(child.sock, "g", 1), 1);
  int status = -1;
  auto served = (*engine)->run_until(
      [&] { return ::waitpid(child.pid, &status, WNOHANG) == child.pid; },
      std::chrono::steady_clock::now() + 5s);
  ASSERT_TRUE(served) << served.error().what();
  child.pid = -1;
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0) << "10+i: page i wrong, 3x: setup";

  const FaultMetrics& metrics = (*engine)->metrics();
  EXPECT_EQ(metrics.faults, 8u);
  EXPECT_EQ(metrics.write_faults, 1u);
  EXPECT_EQ(metrics.zero_filled_faults, 4u);  // pages 3, 4, 5, 7: outside the lazy ranges
  std::map<TierKind, std::uint64_t> want_tiers;
  for (std::size_t i : {8, 9, 10, 11}) ++want_tiers[snapshot.pages[i].tier];
  EXPECT_EQ(metrics.demand_pages_per_tier, want_tiers);
  EXPECT_EQ(metrics.errors, 0u);

  // The profile of this run: page 6 written first, the others read in address order.
  auto ingested = snap::ingest(dir);
  ASSERT_TRUE(ingested);
  const auto summary = snap::apply_profile(*ingested, recorder, 0);
  EXPECT_EQ(summary.faults, 8u);
  EXPECT_EQ(summary.hot, 4u);  // the 4 snapshot pages of the mapping; 3, 4, 5, 7 are not in it
  EXPECT_EQ(summary.written, 1u);
  EXPECT_EQ(summary.cold, 16u);
  const auto& p = ingested->snapshot.pages;
  EXPECT_EQ(p[11].touch_order, 1u);
  EXPECT_TRUE(p[11].flags & page_written);
  EXPECT_LT(p[8].touch_order, p[9].touch_order);
  EXPECT_LT(p[9].touch_order, p[10].touch_order);
  EXPECT_TRUE(p[10].flags & page_read_only);
}

// ---- integrity: a corrupt page ends the restore on every path that hands pages out -----------
//
// Snapshot page 9 is 0x10001000 (lazy; page 1 of the child's mapping). damage() flips one of
// its bytes through its tier, behind the store's back, as a stray write to the shared backing
// file or a stale cache line on a non-coherent device would leave it.

constexpr std::size_t kDamaged = 9;

void damage(Tiers& tiers, const PageEntry& page) {
  Tier& tier = page.tier == TierKind::cxl ? *tiers.cxl : page.tier == TierKind::file ? *tiers.file : *tiers.local;
  std::byte b[1];
  ASSERT_TRUE(tier.read(Extent{page.location, P}, 77, b));
  b[0] ^= std::byte{0x5c};
  ASSERT_TRUE(tier.write(Extent{page.location, P}, 77, b));
}

// The error a user sees says what is damaged and where.
void expect_names_the_damaged_page(const Error& error, TierKind tier) {
  EXPECT_EQ(error.code, Errc::corrupt) << error.what();
  for (const std::string part : {std::string("snapshot 'fn'"), std::string("page 9 "), std::string("vaddr 0x10001000"),
                                 "tier " + std::string(to_string(tier)), std::string("checksum")}) {
    EXPECT_NE(error.message.find(part), std::string::npos) << "'" << part << "' not in: " << error.message;
  }
}

// pagemap(5) bit 63: the page is installed in `pid`'s memory (reading it never faults).
bool page_present(pid_t pid, std::uint64_t vaddr) {
  detail::UniqueFd fd(::open(("/proc/" + std::to_string(pid) + "/pagemap").c_str(), O_RDONLY | O_CLOEXEC));
  std::uint64_t entry = 0;
  if (!fd || ::pread(fd.get(), &entry, sizeof entry, static_cast<off_t>(vaddr / P * sizeof entry)) != sizeof entry) {
    ADD_FAILURE() << "cannot read the pagemap of " << pid;
    return false;
  }
  return (entry >> 63) != 0;
}

class CorruptPageTest : public FunctionSnapshotTest {
 protected:
  // Stores `single` with every page on `tier`, damages page 9, materializes what CRIU restores
  // itself (page 9 is lazy, so that succeeds) and opens the store-backed source over it.
  void prepare(TierKind tier) {
    const std::string name(to_string(tier));
    dir_ = copy_checkpoint(kData / "single", tmp_.path() / ("single-" + name));
    expected_ = mapping_bytes(dir_);
    tiers_.emplace(tmp_.path() / ("tiers-" + name));
    snapshot_ = stored(dir_, *tiers_, "fn", PlacementRequest{tier, {}});
    ASSERT_EQ(snapshot_.pages[kDamaged].vaddr, kMapping + P);
    damage(*tiers_, snapshot_.pages[kDamaged]);
    images_ = tmp_.path() / ("images-" + name);
    auto m = snap::materialize(snapshot_, *tiers_->store, images_, /*all_pages=*/false);
    ASSERT_TRUE(m) << m.error().what();
    auto source = snap::StorePageSource::open(tiers_->store, snapshot_, m->checkpoint);
    ASSERT_TRUE(source) << source.error().what();
    source_ = *source;
  }

  // An engine serving child `r`, adopted with its pid (the default failure policy kills it).
  std::unique_ptr<FaultEngine> engine_for(Restored& r) {
    auto engine = FaultEngine::create(source_);
    EXPECT_TRUE(engine) << engine.error().what();
    if (!engine) return nullptr;
    EXPECT_TRUE(spawn_restored(r, expected_));
    AdoptOptions adopt;
    adopt.pid = r.pid;
    EXPECT_TRUE((*engine)->adopt(kSinglePid, r.uffd, adopt));
    return std::move(*engine);
  }

  // Serves until the restore fails (or 5 s), then reaps the child; returns its wait status.
  static int serve_until_failed(FaultEngine& engine, Restored& r) {
    (void)engine.run_until([] { return false; }, std::chrono::steady_clock::now() + 5s);
    int status = -1;
    EXPECT_EQ(::waitpid(r.pid, &status, 0), r.pid);
    r.pid = -1;
    return status;
  }

  fs::path dir_, images_;
  Bytes expected_;
  std::optional<Tiers> tiers_;
  Snapshot snapshot_;
  std::shared_ptr<snap::StorePageSource> source_;
};

bool killed(int status) { return WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL; }

TEST_F(CorruptPageTest, DemandFaultOnACorruptPageKillsTheTaskOnEveryTier) {
  if (auto why = snaptier::testing::userfaultfd_unavailable(default_uffd_features())) GTEST_SKIP() << *why;
  // cxl and local hand the engine their mapping (checked in place), file a checked copy.
  for (TierKind tier : {TierKind::cxl, TierKind::local, TierKind::file}) {
    SCOPED_TRACE(to_string(tier));
    prepare(tier);
    Restored child;
    auto engine = engine_for(child);
    ASSERT_TRUE(engine);
    ASSERT_EQ(::write(child.sock, "g", 1), 1);
    const int status = serve_until_failed(*engine, child);
    // Killed at its fault on page 1 (10 + 1 would mean it read the damaged bytes).
    EXPECT_TRUE(killed(status)) << "wait status " << status;
    ASSERT_TRUE(engine->failure());
    expect_names_the_damaged_page(*engine->failure(), tier);
    // Pages 6 and 0, faulted before it, were served from the tier; the damaged one was not.
    EXPECT_EQ(engine->metrics().demand_pages_per_tier, (std::map<TierKind, std::uint64_t>{{tier, 2}}));
  }
}

TEST_F(CorruptPageTest, PrefetchInstallsThePagesBeforeACorruptOneAndNeverIt) {
  if (auto why = snaptier::testing::userfaultfd_unavailable(default_uffd_features())) GTEST_SKIP() << *why;
  prepare(TierKind::cxl);
  Restored child;
  auto engine = engine_for(child);
  ASSERT_TRUE(engine);
  const std::vector<std::uint64_t> pages{kMapping, kMapping + P, kMapping + 2 * P};
  auto prefetched = engine->prefetch(kSinglePid, pages);  // the child has not been told to go
  ASSERT_FALSE(prefetched) << "prefetched a page that fails its checksum";
  expect_names_the_damaged_page(prefetched.error(), TierKind::cxl);
  EXPECT_TRUE(page_present(child.pid, kMapping));
  EXPECT_FALSE(page_present(child.pid, kMapping + P)) << "the damaged page was installed";
  EXPECT_FALSE(page_present(child.pid, kMapping + 2 * P));
}

TEST_F(CorruptPageTest, LazyServerEndsTheRestoreWhenAPrefetchedPageIsCorrupt) {
  if (auto why = snaptier::testing::userfaultfd_unavailable(default_uffd_features())) GTEST_SKIP() << *why;
  prepare(TierKind::cxl);
  const fs::path work = tmp_.path() / "work";
  fs::create_directories(work);
  Restored child;
  bool resumed = false;
  lazy::LazyPagesOptions o;
  o.images_dir = images_;
  o.work_dir = work;
  o.source = source_;
  o.planner = [](TaskId task, const lazy::LazySource& source) { return lazy::TaskPrefetch{source.lazy_pages(task), {}}; };
  o.on_resumed = [&] {
    resumed = true;
    (void)!::write(child.sock, "g", 1);
  };
  o.accept_timeout = 2000ms;
  o.step_timeout = 1000ms;
  o.serve_timeout = 5000ms;
  auto server = lazy::LazyPagesServer::bind(std::move(o));
  ASSERT_TRUE(server) << server.error().what();
  ASSERT_TRUE(spawn_restored(child, expected_, (*server)->socket_path()));
  const lazy::LazyPagesReport report = (*server)->run();
  int status = -1;
  ASSERT_EQ(::waitpid(child.pid, &status, 0), child.pid);
  const pid_t pid = std::exchange(child.pid, -1);
  EXPECT_TRUE(killed(status)) << "wait status " << status;
  EXPECT_FALSE(resumed) << "control returned to a task with a damaged page";
  ASSERT_TRUE(report.error);
  expect_names_the_damaged_page(*report.error, TierKind::cxl);
  EXPECT_EQ(report.killed, std::vector<pid_t>{pid});
}

TEST_F(CorruptPageTest, BackgroundFetchOfACorruptPageKillsTheTask) {
  if (auto why = snaptier::testing::userfaultfd_unavailable(default_uffd_features())) GTEST_SKIP() << *why;
  prepare(TierKind::cxl);
  Restored child;
  auto engine = engine_for(child);
  ASSERT_TRUE(engine);
  ASSERT_TRUE(engine->prefetch_in_background(kSinglePid, {kMapping, kMapping + P, kMapping + 2 * P}));
  const int status = serve_until_failed(*engine, child);  // the child waits for "go" meanwhile
  EXPECT_TRUE(killed(status)) << "wait status " << status;
  ASSERT_TRUE(engine->failure());
  expect_names_the_damaged_page(*engine->failure(), TierKind::cxl);
  EXPECT_EQ(engine->metrics().pages_background, 1u);  // page 0 only
}

TEST_F(CorruptPageTest, MaterializeFailsAndNeverWritesTheCorruptPage) {
  prepare(TierKind::cxl);
  const fs::path out = tmp_.path() / "all";
  auto m = snap::materialize(snapshot_, *tiers_->store, out, /*all_pages=*/true);
  ASSERT_FALSE(m) << "materialized a page that fails its checksum";
  expect_names_the_damaged_page(m.error(), TierKind::cxl);
  // Page 8 (same pagemap entry, before it) was written; page 9 is still a hole.
  const Bytes written = read_file(out / "pages-1.img");
  ASSERT_EQ(written.size(), 20 * P);
  EXPECT_EQ(0, std::memcmp(written.data() + 8 * P, expected_.data(), P));
  EXPECT_TRUE(all_zero(std::span(written).subspan(kDamaged * P, P)));
}

}  // namespace
}  // namespace snaptier
