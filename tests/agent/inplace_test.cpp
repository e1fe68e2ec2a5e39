// Pages used in place from the CXL region: the protobuf encoder beside the decoder
// (criu/pb_message.hpp, criu/schema.hpp), the checkpoint rewrite (criu/inplace_rewrite.hpp), the
// layout of mapped runs and their check in place (inplace/inplace.hpp), and what a private
// mapping of a tmpfs file at a run's pgoff really does.
//
// Against the criu 4.1.1 fixtures of tests/agent/data/criu/ (see its README.md). They keep only
// the images the parser reads, so files.img is made here with one regular-file entry, as every
// real dump has for the executable. Fixture `single` (pid 15884): the VMA 0x10000000 (8 pages,
// private anonymous, lazy) holds pages 0, 1, 2 (0xA0, 0xA1, 0xA2) and 6 (0xA6); pages-1.img has
// 20 pages, those four at file pages 8-11.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "criu/image_access.hpp"
#include "criu/inplace_rewrite.hpp"
#include "criu/pb_message.hpp"
#include "criu/schema.hpp"
#include "helpers/files.hpp"
#include "helpers/temp_dir.hpp"
#include "inplace/inplace.hpp"
#include "snaptier/criu_images.hpp"
#include "snaptier/cxl_directory.hpp"
#include "snaptier/fault_engine.hpp"
#include "snaptier/function_snapshot.hpp"
#include "snaptier/snapshot_store.hpp"
#include "snaptier/tiers.hpp"

namespace snaptier {
namespace {

namespace fs = std::filesystem;
namespace schema = criu::schema;
namespace pb = criu::pb;
using Bytes = std::vector<std::byte>;
constexpr std::uint64_t P = kPageSize;
constexpr std::uint32_t kPid = 15884;
constexpr std::uint64_t kMapping = 0x10000000;
const fs::path kData = fs::path(__FILE__).parent_path() / "data" / "criu";

using testing::read_file;
using testing::write_file;

// files.img with the executable's entry (id 1), an owner set so that copying it shows.
Bytes files_img() {
  pb::Message fown(schema::fown_entry::kSpec);
  for (const auto& f : schema::fown_entry::kFields) fown.set_unsigned(f, 0);
  fown.set_unsigned(schema::fown_entry::uid, 1000);
  fown.set_unsigned(schema::fown_entry::pid, 7);
  pb::Message reg(schema::reg_file_entry::kSpec);
  reg.set_unsigned(schema::reg_file_entry::id, 1);
  reg.set_unsigned(schema::reg_file_entry::flags, 0100000);
  reg.set_unsigned(schema::reg_file_entry::pos, 0);
  reg.set_bytes(schema::reg_file_entry::fown, pb::encode(fown));
  reg.set_string(schema::reg_file_entry::name, "/tiny");
  pb::Message entry(schema::file_entry::kSpec);
  entry.set_unsigned(schema::file_entry::type, schema::kFdTypeReg);
  entry.set_unsigned(schema::file_entry::id, 1);
  entry.set_bytes(schema::file_entry::reg, pb::encode(reg));
  const Bytes entries[] = {pb::encode(entry)};
  return pb::join_image(schema::kFilesMagic, true, entries);
}

fs::path checkpoint_copy(const fs::path& from, const fs::path& to) {
  fs::create_directories(to);
  for (const auto& e : fs::directory_iterator(from)) {
    if (e.path().extension() == ".img") fs::copy_file(e.path(), to / e.path().filename());
  }
  write_file(to / "files.img", files_img());
  return to;
}

std::map<std::string, Bytes> images_of(const fs::path& dir) {
  std::map<std::string, Bytes> out;
  for (const auto& e : fs::directory_iterator(dir)) out[e.path().filename().string()] = read_file(e.path());
  return out;
}

Bytes page_of(std::uint8_t value) { return Bytes(P, std::byte{value}); }

// ---- encoder ---------------------------------------------------------------------------------

struct ImageKind {
  const char* prefix;
  std::uint32_t magic;
  const pb::MessageSpec* first;  // the first entry's message
  const pb::MessageSpec* rest;   // every later one
};


// A devdax tier that cannot lend its pages (no snaptier_cow module), as describe_backing
// reports it; built by hand so the test means the same on a host with a real, lendable device.
inplace::Backing cannot_map_dax() {
  inplace::Backing b;
  b.file = "/dev/dax0.0";
  b.reason = "devdax refuses private mappings";
  return b;
}
TEST(CriuEncoder, DecodeThenEncodeGivesEveryFixtureImageBackByteForByte) {
  const ImageKind kinds[] = {
      {"mm-", criu::kMmMagic, &schema::mm::kSpec, &schema::mm::kSpec},
      {"pagemap-", criu::kPagemapMagic, &schema::pagemap_head::kSpec, &schema::pagemap_entry::kSpec},
      {"pstree", criu::kPstreeMagic, &schema::pstree::kSpec, &schema::pstree::kSpec},
  };
  int checked = 0;
  for (const char* set : {"single", "tree"}) {
    for (const auto& e : fs::directory_iterator(kData / set)) {
      const std::string name = e.path().filename().string();
      for (const auto& kind : kinds) {
        if (!name.starts_with(kind.prefix) || e.path().extension() != ".img") continue;
        SCOPED_TRACE(std::string(set) + "/" + name);
        const Bytes original = read_file(e.path());
        auto entries = pb::split_image(original, name, kind.magic, true);
        ASSERT_TRUE(entries) << entries.error().what();
        std::vector<Bytes> encoded;
        for (std::size_t i = 0; i < entries->size(); ++i) {
          auto m = pb::decode(i == 0 ? *kind.first : *kind.rest, (*entries)[i].bytes);
          ASSERT_TRUE(m) << m.error().what();
          encoded.push_back(pb::encode(*m));
          auto again = pb::decode(i == 0 ? *kind.first : *kind.rest, encoded.back());
          ASSERT_TRUE(again);
          EXPECT_EQ(*again, *m);
        }
        EXPECT_EQ(pb::join_image(kind.magic, true, encoded), original);
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 8);  // 3 mm, 3 pagemap, 2 pstree
}

TEST(CriuEncoder, SettersKeepUnknownFieldsAndFieldOrder) {
  const Bytes mm = read_file(kData / "single" / "mm-15884.img");
  auto entries = pb::split_image(mm, "mm", criu::kMmMagic, true);
  ASSERT_TRUE(entries);
  auto m = pb::decode(schema::mm::kSpec, entries->front().bytes);
  ASSERT_TRUE(m);
  const auto vma_bytes = m->bytes(schema::mm::vmas);
  ASSERT_TRUE(vma_bytes);
  auto vma = pb::decode(schema::vma::kSpec, *vma_bytes);
  ASSERT_TRUE(vma);
  vma->set_signed(schema::vma::fd, -1);  // the value it had: a sint64 round trip
  EXPECT_EQ(pb::encode(*vma), Bytes(vma_bytes->begin(), vma_bytes->end()));
  pb::Message unknown = *vma;
  unknown.values().push_back(pb::Value{99, criu::wire::WireType::varint, 5, {}});
  unknown.set_unsigned(schema::vma::pgoff, 0x7000);
  auto back = pb::decode(schema::vma::kSpec, pb::encode(unknown));
  ASSERT_TRUE(back);
  EXPECT_EQ(back->values().back().number, 99u) << "an unknown field survives the rewrite";
  EXPECT_EQ(criu::vma_from_message(*back).pgoff, 0x7000u);
  EXPECT_EQ(criu::vma_from_message(*back).fd, -1);
}

TEST(CriuEncoder, MalformedMessagesAreCorrupt) {
  // Truncated varint, a wrong wire type for a known field, a missing required field.
  const Bytes truncated{std::byte{0x08}, std::byte{0x80}};
  auto a = pb::decode(schema::vma::kSpec, truncated);
  ASSERT_FALSE(a);
  EXPECT_EQ(a.error().code, Errc::corrupt);
  pb::Message wrong(schema::vma::kSpec);
  wrong.set_string(schema::vma::start, "x");
  auto b = pb::decode(schema::vma::kSpec, pb::encode(wrong));
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code, Errc::corrupt);
  EXPECT_NE(b.error().message.find("field 1 (start)"), std::string::npos) << b.error().message;
  pb::Message partial(schema::pagemap_entry::kSpec);
  partial.set_unsigned(schema::pagemap_entry::vaddr, 0x1000);
  auto c = pb::decode(schema::pagemap_entry::kSpec, pb::encode(partial));
  ASSERT_FALSE(c);
  EXPECT_NE(c.error().message.find("missing required field 2 (nr_pages)"), std::string::npos) << c.error().message;
  auto d = pb::split_image(Bytes(6, std::byte{0x19}), "x.img", criu::kMmMagic, true);
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().code, Errc::corrupt);
}

TEST(CriuEncoder, ARealFilesImageRoundTripsEntryByEntry) {
  const Bytes original = read_file(kData / "files" / "files.img");
  auto entries = pb::split_image(original, "files.img", schema::kFilesMagic, true);
  ASSERT_TRUE(entries) << entries.error().what();
  ASSERT_EQ(entries->size(), 5u);
  std::vector<Bytes> encoded;
  for (const auto& raw : *entries) {
    auto entry = pb::decode(schema::file_entry::kSpec, raw.bytes);
    ASSERT_TRUE(entry) << entry.error().what();
    EXPECT_EQ(entry->scalar(schema::file_entry::type), schema::kFdTypeReg);
    auto reg = pb::decode(schema::reg_file_entry::kSpec, *entry->bytes(schema::file_entry::reg));
    ASSERT_TRUE(reg) << reg.error().what();
    EXPECT_EQ(reg->scalar(schema::reg_file_entry::id), entry->scalar(schema::file_entry::id));
    EXPECT_EQ(pb::encode(*reg), Bytes(entry->bytes(schema::file_entry::reg)->begin(), entry->bytes(schema::file_entry::reg)->end()))
        << "build-ids (a field the schema does not name) survive";
    encoded.push_back(pb::encode(*entry));
  }
  EXPECT_EQ(pb::join_image(schema::kFilesMagic, true, encoded), original);
}

// ---- rewrite ---------------------------------------------------------------------------------

class RewriteTest : public ::testing::Test {
 protected:
  testing::TempDir tmp;
  fs::path dir = checkpoint_copy(kData / "single", tmp.path() / "images");
  const fs::path backing = "/dev/cxl0";
};

TEST_F(RewriteTest, SplitsTheVmaAroundTheRunAndCutsItsPagesOut) {
  const Bytes pages_before = read_file(dir / "pages-1.img");
  criu::MappingRewrite request{backing, {{kPid, {criu::MappedRun{kMapping + P, 2, 0x25000}}}}};
  auto r = criu::rewrite_for_mapping(dir, request);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_EQ(r->pages_mapped, 2u);
  EXPECT_EQ(r->file_id, 2u);
  EXPECT_EQ(r->vmas_after, r->vmas_before + 2);
  EXPECT_EQ(r->bytes_cut, 2 * P);

  auto cp = criu::load_checkpoint(dir);  // every cross-file check of the parser holds
  ASSERT_TRUE(cp) << cp.error().what();
  const auto& task = cp->tasks.front();
  std::vector<criu::VmaEntry> pieces;
  for (const auto& v : task.mm->vmas)
    if (v.start >= kMapping && v.end <= kMapping + 8 * P) pieces.push_back(v);
  ASSERT_EQ(pieces.size(), 3u);
  EXPECT_EQ(pieces[0].start, kMapping);
  EXPECT_EQ(pieces[0].end, kMapping + P);
  EXPECT_EQ(pieces[0].status, criu::kVmaAreaRegular | criu::kVmaAnonPrivate);
  EXPECT_EQ(pieces[1].start, kMapping + P);
  EXPECT_EQ(pieces[1].end, kMapping + 3 * P);
  EXPECT_EQ(pieces[1].status, criu::kVmaAreaRegular | criu::kVmaFilePrivate);
  EXPECT_EQ(pieces[1].flags, 0x02u);  // MAP_PRIVATE, no MAP_ANONYMOUS
  EXPECT_EQ(pieces[1].pgoff, 0x25000u);
  EXPECT_EQ(pieces[1].shmid, 2u);
  EXPECT_EQ(pieces[1].prot, pieces[0].prot);
  EXPECT_FALSE(pieces[1].can_be_lazy()) << "CRIU never registers a file VMA with the uffd";
  EXPECT_EQ(pieces[2].start, kMapping + 3 * P);
  EXPECT_EQ(pieces[2].end, kMapping + 8 * P);
  EXPECT_TRUE(pieces[2].can_be_lazy());

  // The pagemap lost exactly the two pages; the others kept their flags and their bytes.
  std::map<std::uint64_t, std::uint64_t> offsets;  // vaddr -> data offset
  for (const auto& pe : task.pagemap->entries) {
    for (std::uint64_t k = 0; k < pe.nr_pages; ++k) {
      const std::uint64_t a = pe.vaddr + k * P;
      EXPECT_FALSE(a >= kMapping + P && a < kMapping + 3 * P) << std::hex << a;
      if (a >= kMapping && a < kMapping + 8 * P) EXPECT_EQ(pe.flags, criu::kPePresent | criu::kPeLazy);
      offsets[a] = *pe.data_offset + k * P;
    }
  }
  EXPECT_EQ(task.pagemap->present_pages, 18u);
  const Bytes pages_after = read_file(dir / "pages-1.img");
  ASSERT_EQ(pages_after.size(), 18 * P);
  auto at = [&](std::uint64_t vaddr) { return Bytes(pages_after.begin() + offsets.at(vaddr), pages_after.begin() + offsets.at(vaddr) + P); };
  EXPECT_EQ(at(kMapping), page_of(0xA0));
  EXPECT_EQ(at(kMapping + 6 * P), page_of(0xA6));
  // Every page outside the run kept its bytes (old file pages 0-8 and 11-19).
  std::vector<std::byte> expect(pages_before.begin(), pages_before.begin() + 9 * P);
  expect.insert(expect.end(), pages_before.begin() + 11 * P, pages_before.end());
  EXPECT_EQ(pages_after, expect);

  // files.img: the old entry, then the backing file as a regular file with the owner copied.
  const Bytes files = read_file(dir / "files.img");
  auto entries = pb::split_image(files, "files.img", schema::kFilesMagic, true);
  ASSERT_TRUE(entries);
  ASSERT_EQ(entries->size(), 2u);
  const Bytes original = files_img();
  EXPECT_EQ(Bytes(entries->front().bytes.begin(), entries->front().bytes.end()), Bytes(original.begin() + 12, original.end()));
  auto added = pb::decode(schema::file_entry::kSpec, (*entries)[1].bytes);
  ASSERT_TRUE(added);
  EXPECT_EQ(added->scalar(schema::file_entry::type), schema::kFdTypeReg);
  EXPECT_EQ(added->scalar(schema::file_entry::id), 2u);
  auto reg = pb::decode(schema::reg_file_entry::kSpec, *added->bytes(schema::file_entry::reg));
  ASSERT_TRUE(reg) << reg.error().what();
  EXPECT_EQ(reg->scalar(schema::reg_file_entry::id), 2u);
  EXPECT_EQ(reg->scalar(schema::reg_file_entry::flags), 0100000u);
  EXPECT_EQ(reg->scalar(schema::reg_file_entry::pos), 0u);
  const auto name = *reg->bytes(schema::reg_file_entry::name);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(name.data()), name.size()), "/dev/cxl0");
  auto fown = pb::decode(schema::fown_entry::kSpec, *reg->bytes(schema::reg_file_entry::fown));
  ASSERT_TRUE(fown);
  EXPECT_EQ(fown->scalar(schema::fown_entry::uid), 1000u);
  EXPECT_EQ(fown->scalar(schema::fown_entry::pid), 7u);
}

TEST_F(RewriteTest, WithARealFilesImageTheOldEntriesStayAndTheNewOneTakesTheNextId) {
  const Bytes real = read_file(kData / "files" / "files.img");
  write_file(dir / "files.img", real);
  auto r = criu::rewrite_for_mapping(dir, criu::MappingRewrite{backing, {{kPid, {criu::MappedRun{kMapping, 3, 0}}}}});
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_EQ(r->file_id, 6u);
  const Bytes after = read_file(dir / "files.img");
  ASSERT_GT(after.size(), real.size());
  EXPECT_TRUE(std::equal(real.begin(), real.end(), after.begin())) << "the dumped entries are kept byte for byte";
  auto entries = pb::split_image(after, "files.img", schema::kFilesMagic, true);
  ASSERT_TRUE(entries);
  ASSERT_EQ(entries->size(), 6u);
  auto first = pb::decode(schema::file_entry::kSpec, entries->front().bytes);
  auto added = pb::decode(schema::file_entry::kSpec, entries->back().bytes);
  ASSERT_TRUE(first && added);
  auto first_reg = pb::decode(schema::reg_file_entry::kSpec, *first->bytes(schema::file_entry::reg));
  auto added_reg = pb::decode(schema::reg_file_entry::kSpec, *added->bytes(schema::file_entry::reg));
  ASSERT_TRUE(first_reg && added_reg);
  const auto a = *first_reg->bytes(schema::reg_file_entry::fown), b = *added_reg->bytes(schema::reg_file_entry::fown);
  EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end()));
  EXPECT_FALSE(added_reg->has(schema::reg_file_entry::size)) << "no size check at restore: the region outgrows it";
  EXPECT_FALSE(added_reg->has(schema::reg_file_entry::mode));
}

TEST_F(RewriteTest, RunsInSeveralTasksAndWholeEntriesKeepLazyHolesAsHoles) {
  fs::remove_all(dir);
  dir = checkpoint_copy(kData / "tree", tmp.path() / "tree");
  // A materialized checkpoint: lazy pages are holes. Punch the lazy pages of task 15901.
  auto before = criu::load_checkpoint(dir);
  ASSERT_TRUE(before);
  const auto* parent = before->find(15901);
  ASSERT_NE(parent, nullptr);
  {
    std::fstream f(parent->pages_path, std::ios::in | std::ios::out | std::ios::binary);
    for (const auto& pe : parent->pagemap->entries) {
      if (!pe.lazy()) continue;
      f.seekp(static_cast<std::streamoff>(*pe.data_offset));
      const Bytes zeros(pe.bytes());
      f.write(reinterpret_cast<const char*>(zeros.data()), static_cast<std::streamsize>(zeros.size()));
    }
  }
  criu::MappingRewrite request{backing,
                               {{15901, {criu::MappedRun{kMapping, 3, 0}}},
                                {15903, {criu::MappedRun{kMapping, 1, 0x8000}, criu::MappedRun{kMapping + 6 * P, 1, 0x9000}}}}};
  auto r = criu::rewrite_for_mapping(dir, request);
  ASSERT_TRUE(r) << r.error().what();
  EXPECT_EQ(r->pages_mapped, 5u);
  auto cp = criu::load_checkpoint(dir);
  ASSERT_TRUE(cp) << cp.error().what();
  EXPECT_EQ(cp->find(15901)->pagemap->present_pages, before->find(15901)->pagemap->present_pages - 3);
  EXPECT_EQ(cp->find(15903)->pagemap->present_pages, before->find(15903)->pagemap->present_pages - 2);
  // The child's page 3 (0xC3) stays, between its two runs.
  const auto* child = cp->find(15903);
  const Bytes data = read_file(child->pages_path);
  bool found = false;
  for (const auto& pe : child->pagemap->entries) {
    if (pe.vaddr <= kMapping + 3 * P && kMapping + 3 * P < pe.end()) {
      const auto off = *pe.data_offset + (kMapping + 3 * P - pe.vaddr);
      EXPECT_EQ(Bytes(data.begin() + off, data.begin() + off + P), page_of(0xC3));
      found = true;
    }
  }
  EXPECT_TRUE(found);
  // The parent's zeroed lazy pages are holes in the new file, not written blocks.
  struct stat st {};
  ASSERT_EQ(::stat(cp->find(15901)->pages_path.c_str(), &st), 0);
  EXPECT_LT(static_cast<std::uint64_t>(st.st_blocks) * 512, static_cast<std::uint64_t>(st.st_size));
}

TEST_F(RewriteTest, RefusesRunsItCannotMapAndLeavesTheImagesAlone) {
  const auto untouched = images_of(dir);
  struct Case {
    const char* why;
    criu::MappedRun run;
    Errc code;
  };
  const Case cases[] = {
      {"a file-backed VMA (the binary)", {0x401000, 1, 0}, Errc::invalid_argument},
      {"a page that is not in the pagemap", {kMapping + 3 * P, 1, 0}, Errc::invalid_argument},
      {"a gap between VMAs", {0x20000000, 1, 0}, Errc::invalid_argument},
      {"past the end of its VMA", {kMapping + 6 * P, 3, 0}, Errc::invalid_argument},
      {"the stack", {140724101021696, 1, 0}, Errc::invalid_argument},
      {"an unaligned file offset", {kMapping, 1, 100}, Errc::invalid_argument},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.why);
    auto r = criu::rewrite_for_mapping(dir, criu::MappingRewrite{backing, {{kPid, {c.run}}}});
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, c.code) << r.error().what();
    EXPECT_EQ(images_of(dir), untouched);
  }
  auto relative = criu::rewrite_for_mapping(dir, criu::MappingRewrite{"cxl0", {{kPid, {{kMapping, 1, 0}}}}});
  ASSERT_FALSE(relative);
  EXPECT_EQ(relative.error().code, Errc::invalid_argument);
  auto overlapping =
      criu::rewrite_for_mapping(dir, criu::MappingRewrite{backing, {{kPid, {{kMapping, 2, 0}, {kMapping + P, 1, 0}}}}});
  ASSERT_FALSE(overlapping);
  EXPECT_EQ(images_of(dir), untouched);
}

TEST(CanMapInPlace, MadviseStateAFileMappingAcceptsIsFineWipeOnForkIsNot) {
  criu::VmaEntry v;
  v.start = kMapping;
  v.end = kMapping + 8 * P;
  v.flags = 0x22;  // MAP_PRIVATE | MAP_ANONYMOUS
  v.status = criu::kVmaAreaRegular | criu::kVmaAnonPrivate;
  EXPECT_TRUE(criu::can_map_in_place(v));
  v.madv = (1ull << 14) | (1ull << 16);  // MADV_HUGEPAGE, MADV_DONTDUMP
  EXPECT_TRUE(criu::can_map_in_place(v));
  v.madv = 1ull << 18;  // MADV_WIPEONFORK: EINVAL on a file mapping
  EXPECT_FALSE(criu::can_map_in_place(v));
  v.madv.reset();
  v.flags |= 0x0100;  // MAP_GROWSDOWN
  EXPECT_FALSE(criu::can_map_in_place(v));
}

TEST_F(RewriteTest, MalformedImagesAreCorrupt) {
  const Bytes mm = read_file(dir / "mm-15884.img");
  const criu::MappingRewrite request{backing, {{kPid, {criu::MappedRun{kMapping, 1, 0}}}}};
  {
    Bytes cut(mm.begin(), mm.begin() + static_cast<std::ptrdiff_t>(mm.size() / 2));
    write_file(dir / "mm-15884.img", cut);
    auto r = criu::rewrite_for_mapping(dir, request);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, Errc::corrupt) << r.error().what();
    write_file(dir / "mm-15884.img", mm);
  }
  {
    Bytes bad = mm;
    bad[4] = std::byte{0};  // image magic
    write_file(dir / "mm-15884.img", bad);
    auto r = criu::rewrite_for_mapping(dir, request);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, Errc::corrupt);
    write_file(dir / "mm-15884.img", mm);
  }
  {
    fs::remove(dir / "files.img");
    auto r = criu::rewrite_for_mapping(dir, request);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, Errc::corrupt);
    EXPECT_NE(r.error().message.find("files.img is missing"), std::string::npos) << r.error().message;
  }
}

// ---- layout of mapped runs, checked in place -------------------------------------------------

// The `single` checkpoint stored with every page on a CXL tier over a regular file.
class MappedRunsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    region_file = testing::make_region_file(tmp.path(), 8 << 20);
    auto region = MappedRegion::open(region_file);
    ASSERT_TRUE(region) << region.error().what();
    auto access = make_direct_region_access(*region);
    ASSERT_TRUE(format_cxl_region(*access, CxlFormatOptions{.host_count = 2, .log_entries_per_host = 64}));
    auto attached = CxlDirectory::attach(access, CxlAttachOptions{.host_index = 0, .host_name = "hostA"});
    ASSERT_TRUE(attached) << attached.error().what();
    directory = *attached;
    cxl = std::shared_ptr<Tier>(*make_cxl_tier(directory));
    auto made = make_snapshot_store(StoreOptions{"hostA", tmp.path() / "state", {{TierKind::cxl, cxl}}, directory});
    ASSERT_TRUE(made) << made.error().what();
    store = std::shared_ptr<SnapshotStore>(std::move(*made));
    auto in = snap::ingest(checkpoint_copy(kData / "single", tmp.path() / "dump"));
    ASSERT_TRUE(in) << in.error().what();
    ingested = std::move(*in);
    backing = inplace::describe_backing(region_file, false);
  }

  // Marks the pages of [vaddr, vaddr + n pages) hot with `flag`.
  void touch(std::uint64_t vaddr, std::size_t n, PageFlags flag) {
    for (auto& p : ingested.snapshot.pages) {
      if (p.vaddr >= vaddr && p.vaddr < vaddr + n * P) p.flags |= page_hot | flag;
    }
  }
  // The profile's discarded ranges (and mremapped ones, none unless given).
  void discarded(const std::string& json_text, const std::string& remapped_text = "{}") {
    ingested.snapshot.blobs[snap::kDiscardedBlob].assign(reinterpret_cast<const std::byte*>(json_text.data()),
                                                         reinterpret_cast<const std::byte*>(json_text.data()) + json_text.size());
    ingested.snapshot.blobs[snap::kRemappedBlob].assign(
        reinterpret_cast<const std::byte*>(remapped_text.data()),
        reinterpret_cast<const std::byte*>(remapped_text.data()) + remapped_text.size());
  }
  Snapshot stored(const std::string& id, PlacementRequest placement = {TierKind::cxl, {}}) {
    Snapshot s = ingested.snapshot;
    s.info.id = id;
    auto info = store->put(s, ingested.data, placement);
    EXPECT_TRUE(info) << info.error().what();
    auto got = store->get(id);
    EXPECT_TRUE(got);
    return *got;
  }
  Result<inplace::Plan> plan(const Snapshot& s, policy::InPlacePages what = policy::InPlacePages::read_only_hot) {
    return inplace::plan_runs(s, ingested.checkpoint, what, backing);
  }
  // The run starting at `vaddr` (pages = 0 if none does).
  static criu::MappedRun run_at(const inplace::Plan& p, std::uint64_t vaddr) {
    for (const auto& r : p.runs)
      if (r.run.vaddr == vaddr) return r.run;
    return {};
  }
  const PageEntry& page_at(const Snapshot& s, std::uint64_t vaddr) {
    return *std::find_if(s.pages.begin(), s.pages.end(), [&](const PageEntry& p) { return p.vaddr == vaddr; });
  }

  testing::TempDir tmp;
  fs::path region_file;
  std::shared_ptr<CxlDirectory> directory;
  std::shared_ptr<Tier> cxl;
  std::shared_ptr<SnapshotStore> store;
  snap::Ingested ingested;
  inplace::Backing backing;
};

TEST_F(MappedRunsTest, ReadOnlyHotRunsAreContiguousInTheRegionAndOneRunPerVmaStretch) {
  touch(kMapping, 3, page_read_only);      // pages 0-2
  touch(kMapping + 6 * P, 1, page_read_only);  // page 6
  touch(0x401000, 1, page_read_only);      // hot, read-only, but in the binary's file VMA
  discarded("{}");
  const Snapshot s = stored("fn");
  auto p = plan(s);
  ASSERT_TRUE(p) << p.error().what();
  ASSERT_EQ(p->runs.size(), 2u);
  EXPECT_EQ(p->pages, 4u);
  EXPECT_EQ(p->wanted, 5u);
  EXPECT_EQ(p->skipped_layout, 1u);
  EXPECT_EQ(p->skipped_vma, 1u) << "the binary's VMA is a file mapping already";
  EXPECT_EQ(p->skipped_tier, 0u);
  EXPECT_EQ(p->runs[0].run, (criu::MappedRun{kMapping, 3, page_at(s, kMapping).location}));
  EXPECT_EQ(p->runs[1].run, (criu::MappedRun{kMapping + 6 * P, 1, page_at(s, kMapping + 6 * P).location}));
  EXPECT_EQ(p->runs[0].run.file_offset % P, 0u);
  for (std::uint64_t k = 1; k < 3; ++k) EXPECT_EQ(page_at(s, kMapping + k * P).location, p->runs[0].run.file_offset + k * P);
  EXPECT_EQ(p->rewrite.runs.at(kPid).size(), 2u);
  EXPECT_EQ(p->rewrite.backing_file, fs::weakly_canonical(region_file));

  // The region file holds each run's bytes at its pgoff: what the mapping will show.
  const Bytes region = read_file(region_file);
  for (std::uint64_t k = 0; k < 3; ++k) {
    const auto at = region.begin() + static_cast<std::ptrdiff_t>(p->runs[0].run.file_offset + k * P);
    EXPECT_EQ(Bytes(at, at + P), page_of(static_cast<std::uint8_t>(0xA0 + k))) << k;
  }
  EXPECT_TRUE(inplace::verify_runs(*store, s, *p));
}

TEST_F(MappedRunsTest, ASmallColdGapInCxlIsMappedWithTheReadOnlyHotPagesAroundIt) {
  touch(kMapping, 1, page_read_only);
  touch(kMapping + 2 * P, 1, page_read_only);  // page 1 is cold: a gap of one
  discarded("{}");
  const Snapshot s = stored("fn");
  auto p = plan(s);
  ASSERT_TRUE(p) << p.error().what();
  ASSERT_EQ(p->runs.size(), 1u) << "one mapping, not two with an anonymous piece between";
  EXPECT_EQ(p->runs[0].run, (criu::MappedRun{kMapping, 3, page_at(s, kMapping).location}));
  EXPECT_EQ(p->pages, 3u);
  EXPECT_TRUE(inplace::verify_runs(*store, s, *p)) << "the gap page is checked like the others";
}

TEST_F(MappedRunsTest, WrittenDiscardedAndScatteredPagesBreakRuns) {
  touch(kMapping, 1, page_read_only);
  touch(kMapping + P, 1, page_written);    // copied before resume, never mapped
  touch(kMapping + 2 * P, 1, page_read_only);
  touch(kMapping + 6 * P, 1, page_read_only);
  discarded("{\"15884\": [[" + std::to_string(kMapping + 6 * P) + ", " + std::to_string(kMapping + 7 * P) + "]]}");
  const Snapshot s = stored("fn");
  auto p = plan(s);
  ASSERT_TRUE(p) << p.error().what();
  ASSERT_EQ(p->runs.size(), 2u);
  EXPECT_EQ(p->runs[0].run.vaddr, kMapping);
  EXPECT_EQ(p->runs[0].run.pages, 1u);
  EXPECT_EQ(p->runs[1].run.vaddr, kMapping + 2 * P);
  EXPECT_EQ(p->skipped_discarded, 1u) << "a range the profile discarded reads zeros, a mapped one would not";

  // trenv maps every stored page of the VMA, written ones too, as long as the region keeps
  // them adjacent.
  auto all = plan(s, policy::InPlacePages::all_stored);
  ASSERT_TRUE(all);
  EXPECT_EQ(run_at(*all, kMapping), (criu::MappedRun{kMapping, 3, page_at(s, kMapping).location}));

  // cxlfork maps what trenv maps (cold pages included) but the written page, which it copies
  // before resume instead; the discarded page stays out as for every policy.
  auto unwritten = plan(s, policy::InPlacePages::all_unwritten);
  ASSERT_TRUE(unwritten) << unwritten.error().what();
  auto mapped_pages = [](const inplace::Plan& p) {
    std::set<std::uint64_t> out;
    for (const auto& r : p.runs)
      for (std::uint64_t k = 0; k < r.run.pages; ++k) out.insert(r.run.vaddr + k * P);
    return out;
  };
  auto want = mapped_pages(*all);
  ASSERT_EQ(want.erase(kMapping + P), 1u) << "trenv maps the written page";
  EXPECT_EQ(mapped_pages(*unwritten), want);
  EXPECT_EQ(run_at(*unwritten, kMapping).pages, 1u);
  EXPECT_EQ(run_at(*unwritten, kMapping + 2 * P), (criu::MappedRun{kMapping + 2 * P, 1, page_at(s, kMapping + 2 * P).location}));
  EXPECT_EQ(unwritten->skipped_discarded, 1u);
  EXPECT_EQ(unwritten->pages + unwritten->skipped_discarded + unwritten->skipped_layout, unwritten->wanted);

  // Pages of one run on two tiers (or apart in the region) become two runs.
  PlacementRequest split{TierKind::cxl, {}};
  split.per_page.resize(ingested.snapshot.pages.size());
  for (std::size_t i = 0; i < ingested.snapshot.pages.size(); ++i) {
    if (ingested.snapshot.pages[i].vaddr == kMapping + P) split.per_page[i] = TierKind::file;
  }
  auto file_tier = make_file_tier(tmp.path() / "files", 1 << 20);
  ASSERT_TRUE(file_tier);
  auto made = make_snapshot_store(StoreOptions{"hostA", tmp.path() / "state2",
                                               {{TierKind::cxl, cxl}, {TierKind::file, std::shared_ptr<Tier>(std::move(*file_tier))}},
                                               directory});
  ASSERT_TRUE(made);
  store = std::shared_ptr<SnapshotStore>(std::move(*made));
  const Snapshot mixed = stored("mixed", split);
  auto m = plan(mixed, policy::InPlacePages::all_stored);
  ASSERT_TRUE(m);
  EXPECT_EQ(run_at(*m, kMapping), (criu::MappedRun{kMapping, 1, page_at(mixed, kMapping).location}));
  EXPECT_EQ(run_at(*m, kMapping + 2 * P).pages, 1u);
  EXPECT_EQ(run_at(*m, kMapping + P).pages, 0u) << "the page on the file tier is not mapped";
  EXPECT_GE(m->skipped_tier, 1u);
}

TEST_F(MappedRunsTest, RefusedWithoutPrivateMappingsOrWithoutARecordedProfile) {
  touch(kMapping, 3, page_read_only);
  const Snapshot old = stored("old");  // no kDiscardedBlob: taken before discards were recorded
  auto p = plan(old);
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code, Errc::unsupported);
  discarded("{}");
  ingested.snapshot.blobs.erase(snap::kRemappedBlob);
  const Snapshot no_remaps = stored("no-remaps");  // profiled before mremaps were recorded
  auto r = plan(no_remaps);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::unsupported);
  EXPECT_NE(r.error().message.find("mremapped"), std::string::npos) << r.error().message;
  discarded("{}");
  const Snapshot s = stored("fn");
  backing = cannot_map_dax();
  auto dax = plan(s);
  ASSERT_FALSE(dax);
  EXPECT_EQ(dax.error().code, Errc::unavailable);
  EXPECT_NE(dax.error().message.find("in-place: no (devdax refuses private mappings)"), std::string::npos)
      << dax.error().message;
}

TEST_F(MappedRunsTest, ACorruptPageInTheRegionRefusesTheRestoreBeforeAnythingIsMapped) {
  touch(kMapping, 3, page_read_only);
  discarded("{}");
  const Snapshot s = stored("fn");
  auto p = plan(s);
  ASSERT_TRUE(p);
  // One flipped byte in the middle page of the run, in the region file itself.
  const std::uint64_t at = page_at(s, kMapping + P).location + 77;
  {
    std::fstream f(region_file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(at));
    f.put(static_cast<char>(0x5A));
  }
  auto v = inplace::verify_runs(*store, s, *p);
  ASSERT_FALSE(v);
  EXPECT_EQ(v.error().code, Errc::corrupt);
  EXPECT_NE(v.error().message.find("snapshot 'fn'"), std::string::npos) << v.error().message;
  EXPECT_NE(v.error().message.find("vaddr 0x10001000"), std::string::npos) << v.error().message;
  EXPECT_NE(v.error().message.find("tier cxl"), std::string::npos) << v.error().message;

  // prepare() stops there: the images are not rewritten.
  const fs::path images = tmp.path() / "restore";
  auto materialized = snap::materialize(s, *store, images, false);
  ASSERT_TRUE(materialized) << materialized.error().what();
  const auto untouched = images_of(images);
  auto prepared = inplace::prepare(*store, s, images, materialized->checkpoint, policy::InPlacePages::read_only_hot, backing);
  ASSERT_FALSE(prepared);
  EXPECT_EQ(prepared.error().code, Errc::corrupt);
  EXPECT_EQ(images_of(images), untouched);
}

TEST_F(MappedRunsTest, PrepareRewritesTheImagesAndTheLazySourceNoLongerServesMappedPages) {
  touch(kMapping, 3, page_read_only);
  touch(kMapping + 6 * P, 1, page_written);
  discarded("{}");
  const Snapshot s = stored("fn");
  const fs::path images = tmp.path() / "restore";
  auto materialized = snap::materialize(s, *store, images, false);
  ASSERT_TRUE(materialized);
  auto prepared = inplace::prepare(*store, s, images, materialized->checkpoint, policy::InPlacePages::read_only_hot, backing);
  ASSERT_TRUE(prepared) << prepared.error().what();
  EXPECT_EQ(prepared->plan.pages, 3u);
  auto source = snap::StorePageSource::open(store, s, prepared->checkpoint);
  ASSERT_TRUE(source) << source.error().what();
  const auto lazy = (*source)->lazy_pages(kPid);
  for (std::uint64_t k = 0; k < 3; ++k) {
    EXPECT_EQ(std::count(lazy.begin(), lazy.end(), kMapping + k * P), 0) << "mapped page " << k << " is still lazy";
  }
  ASSERT_EQ(std::count(lazy.begin(), lazy.end(), kMapping + 6 * P), 1);
  // The page left to copy still comes from the right snapshot page (the page table, not the
  // shrunken pages file, locates it).
  Bytes buffer(4 * P);
  auto fill = (*source)->fetch(kPid, kMapping + 6 * P, 1, buffer);
  ASSERT_TRUE(fill) << fill.error().what();
  ASSERT_EQ(fill->pages, 1u);
  EXPECT_EQ(Bytes(fill->data, fill->data + P), page_of(0xA6));
  bool hot_written_in_view = false;
  for (const auto& v : (*source)->policy_view(kPid)) {
    EXPECT_FALSE(v.vaddr >= kMapping && v.vaddr < kMapping + 3 * P);
    hot_written_in_view |= v.vaddr == kMapping + 6 * P && (v.flags & page_written) != 0;
  }
  EXPECT_TRUE(hot_written_in_view) << "the written hot page is left to the policy's plan";
}

TEST_F(MappedRunsTest, TheProfileRecordsDiscardsAndTheyKeepTheirRangesOutOfEveryRun) {
  snap::ProfileRecorder recorder;
  for (std::uint64_t k = 0; k < 3; ++k) {
    FaultObservation read;
    read.task = read.source_task = kPid;
    read.address = kMapping + k * P;
    read.source_address = read.address;
    recorder.record(read);
  }
  FaultObservation discard;
  discard.task = discard.source_task = kPid;
  discard.address = kMapping + P;
  discard.source_address = kMapping + P;
  discard.discarded_bytes = P;
  recorder.record(discard);
  const snap::ProfileSummary summary = snap::apply_profile(ingested, recorder, 0);
  EXPECT_EQ(summary.faults, 3u) << "a discard is not a fault";
  EXPECT_EQ(summary.discards, 1u);
  EXPECT_EQ(summary.read_only, 3u);
  const Snapshot s = stored("fn");
  auto p = plan(s);
  ASSERT_TRUE(p) << p.error().what();
  EXPECT_EQ(p->skipped_discarded, 1u);
  EXPECT_EQ(run_at(*p, kMapping).pages, 1u);
  EXPECT_EQ(run_at(*p, kMapping + 2 * P).pages, 1u);
}

TEST_F(MappedRunsTest, TheProfileRecordsMremapsAndTheirRangesAreNeverMappedByAnyPolicy) {
  snap::ProfileRecorder recorder;
  for (std::uint64_t k = 0; k < 4; ++k) {
    FaultObservation read;
    read.task = read.source_task = kPid;
    read.address = kMapping + k * P;
    read.source_address = read.address;
    recorder.record(read);
  }
  // mremap of pages 1-2 (the event gives the old range only: whether it grew is unknown).
  FaultObservation moved;
  moved.task = moved.source_task = kPid;
  moved.address = 0x7f0000000000;
  moved.source_address = kMapping + P;
  moved.remapped_bytes = 2 * P;
  recorder.record(moved);
  const snap::ProfileSummary summary = snap::apply_profile(ingested, recorder, 0);
  EXPECT_EQ(summary.faults, 4u) << "a remap is not a fault";
  EXPECT_EQ(summary.remaps, 1u);
  EXPECT_EQ(summary.discards, 0u);
  const Snapshot s = stored("fn");
  for (auto what : {policy::InPlacePages::read_only_hot, policy::InPlacePages::all_stored,
                    policy::InPlacePages::all_unwritten}) {
    auto p = plan(s, what);
    ASSERT_TRUE(p) << p.error().what();
    EXPECT_EQ(p->skipped_remapped, 2u);
    EXPECT_EQ(run_at(*p, kMapping).pages, 1u);
    for (const auto& r : p->runs) {
      EXPECT_FALSE(r.run.vaddr < kMapping + 3 * P && kMapping + P < r.run.vaddr + r.run.pages * P)
          << "a run covers the mremapped pages";
    }
  }
}

// ---- what the kernel does with such a mapping ------------------------------------------------

fs::path tmpfs_dir() {
  std::error_code ec;
  return fs::is_directory("/dev/shm", ec) ? fs::path("/dev/shm") : fs::temp_directory_path();
}

TEST(PrivateFileMapping, ReadsTheFileAtPgoffAndAWriteCostsOneAnonymousPageLeavingTheFileAlone) {
  testing::TempDir tmp;
  const fs::path file = tmpfs_dir() / ("snaptier-inplace-" + std::to_string(::getpid()));
  constexpr std::size_t kPages = 16, kOffsetPages = 4, kRun = 8;
  {
    Bytes data;
    for (std::size_t i = 0; i < kPages; ++i) {
      Bytes page = page_of(static_cast<std::uint8_t>(0x30 + i));
      data.insert(data.end(), page.begin(), page.end());
    }
    write_file(file, data);
  }
  const Bytes before = read_file(file);
  const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  auto* base = static_cast<std::byte*>(
      ::mmap(nullptr, kRun * P, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, static_cast<off_t>(kOffsetPages * P)));
  ::close(fd);
  ASSERT_NE(base, MAP_FAILED);
  for (std::size_t i = 0; i < kRun; ++i) {
    EXPECT_EQ(Bytes(base + i * P, base + (i + 1) * P), page_of(static_cast<std::uint8_t>(0x30 + kOffsetPages + i))) << i;
  }
  base[3 * P + 5] = std::byte{0xEE};
  EXPECT_EQ(base[3 * P + 5], std::byte{0xEE});
  auto use = inplace::measure(::getpid(), fs::weakly_canonical(file));
  EXPECT_EQ(use.mapped_cow_bytes, P) << "one write, one private page";
  EXPECT_EQ(use.cxl_mapped_bytes, (kRun - 1) * P) << "the other pages stay the file's";
  EXPECT_GE(use.local_anonymous_bytes, P);
  EXPECT_EQ(read_file(file), before) << "the file never sees the write";
  // MADV_DONTNEED gives the file's bytes back, not zeros: why a discarded range is never mapped.
  ASSERT_EQ(::madvise(base + 3 * P, P, MADV_DONTNEED), 0);
  EXPECT_EQ(Bytes(base + 3 * P, base + 4 * P), page_of(static_cast<std::uint8_t>(0x30 + kOffsetPages + 3)));
  ::munmap(base, kRun * P);
  fs::remove(file);
}

}  // namespace
}  // namespace snaptier

namespace snaptier {
namespace {

// ---- policies --------------------------------------------------------------------------------

TEST(InPlacePolicies, TieredMapsReadOnlyHotPagesTrenvEverythingCxlforkAllButWrittenAquiferNothing) {
  using policy::InPlacePages;
  const std::map<std::string, policy::InPlace> want{
      {"tiered", {InPlacePages::read_only_hot, false}},
      {"trenv", {InPlacePages::all_stored, true}},
      {"cxlfork", {InPlacePages::all_unwritten, true}},
      {"aquifer", {InPlacePages::none, false}},
      {"reap", {InPlacePages::none, false}},
  };
  for (const auto& [name, w] : want) {
    SCOPED_TRACE(name);
    auto p = policy::make_policy(name);
    ASSERT_TRUE(p) << p.error().what();
    EXPECT_EQ((*p)->in_place().pages, w.pages);
    EXPECT_EQ((*p)->in_place().required, w.required);
  }
  // aquifer is what tiered did before it mapped: the same copy, the same plan.
  auto aquifer = *policy::make_policy("aquifer");
  auto tiered = *policy::make_policy("tiered");
  EXPECT_EQ(aquifer->placement(), tiered->placement());
  const std::vector<policy::LazyPage> pages{{0x1000, page_hot | page_written, 2, TierKind::cxl},
                                            {0x2000, page_hot | page_read_only, 1, TierKind::cxl},
                                            {0x3000, page_read_only, 0, TierKind::rdma}};
  EXPECT_EQ(aquifer->plan(pages).before_resume, tiered->plan(pages).before_resume);
}

TEST(InPlacePolicies, AHostThatCannotMapRefusesTrenvAndLetsTieredCopy) {
  const auto dax = cannot_map_dax();
  const auto shm = inplace::describe_backing("/dev/shm/cxl", false);
  EXPECT_EQ(inplace::describe(dax), "in-place: no (devdax refuses private mappings)");
  EXPECT_EQ(inplace::describe(shm), "in-place: yes");
  auto trenv = *policy::make_policy("trenv");
  auto cxlfork = *policy::make_policy("cxlfork");
  auto tiered = *policy::make_policy("tiered");
  for (const auto& backing : {std::optional<inplace::Backing>(dax), std::optional<inplace::Backing>()}) {
    for (const auto* required : {trenv.get(), cxlfork.get()}) {
      auto refused = inplace::admit(*required, backing);
      ASSERT_FALSE(refused);
      EXPECT_EQ(refused.error().code, Errc::unavailable);
      EXPECT_NE(refused.error().message.find("policy " + std::string(required->name())), std::string::npos)
          << refused.error().message;
    }
    EXPECT_TRUE(inplace::admit(*tiered, backing));
    EXPECT_EQ(inplace::selection(*tiered, backing), policy::InPlacePages::none);
    EXPECT_EQ(inplace::describe_choice(*tiered, backing).mode, "copied (this host cannot map)");
  }
  auto refused = inplace::admit(*trenv, dax);
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message.find("devdax refuses private mappings"), std::string::npos);
  EXPECT_TRUE(inplace::admit(*trenv, shm));
  EXPECT_EQ(inplace::selection(*tiered, shm), policy::InPlacePages::read_only_hot);
  EXPECT_EQ(inplace::selection(*trenv, shm), policy::InPlacePages::all_stored);
  EXPECT_TRUE(inplace::admit(*cxlfork, shm));
  EXPECT_EQ(inplace::selection(*cxlfork, shm), policy::InPlacePages::all_unwritten);
}

}  // namespace
}  // namespace snaptier
