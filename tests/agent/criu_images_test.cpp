// CRIU image parser (snaptier/criu_images.hpp).
//
// Real fixtures in tests/agent/data/criu/ were written by criu 4.1.1 (see its README.md); the
// *.crit.json next to them are CRIU's own decoder's output for the same files, and the tests
// compare the parser against them field by field. Tests marked SYNTHETIC build images with the
// small encoder below, for encodings criu 4.1.1 does not write (packed fields, the 64-bit
// nr_pages of criu 4.2, in_parent) and for targeted corruption.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "criu/protobuf_wire.hpp"
#include "helpers/temp_dir.hpp"
#include "snaptier/criu_images.hpp"

namespace fs = std::filesystem;
using namespace snaptier;
using namespace snaptier::criu;
using Bytes = std::vector<std::byte>;

namespace {

const fs::path kData = fs::path(__FILE__).parent_path() / "data" / "criu";
const fs::path kSingle = kData / "single";  // one task, pid 15884
const fs::path kTree = kData / "tree";      // parent 15901, child 15903

Bytes read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Bytes out(chars.size());
  std::memcpy(out.data(), chars.data(), chars.size());
  return out;
}

void write_file(const fs::path& p, const Bytes& b) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

nlohmann::json crit(const fs::path& img) {
  std::ifstream in(fs::path(img).replace_extension(".crit.json"));
  return nlohmann::json::parse(in);
}

// Copies a fixture directory to a scratch directory for tests that damage it.
void copy_dir(const fs::path& from, const fs::path& to) {
  for (const auto& e : fs::directory_iterator(from))
    if (e.path().extension() == ".img") fs::copy_file(e.path(), to / e.path().filename());
}

// --- SYNTHETIC: a tiny protobuf encoder for hand-made images. ---
struct Msg {
  Bytes b;
  Msg& varint_raw(std::uint64_t v) {
    while (v >= 0x80) {
      b.push_back(std::byte(static_cast<std::uint8_t>(v | 0x80)));
      v >>= 7;
    }
    b.push_back(std::byte(static_cast<std::uint8_t>(v)));
    return *this;
  }
  Msg& v(std::uint32_t field, std::uint64_t value) { return varint_raw(field << 3 | 0).varint_raw(value); }
  Msg& bytes(std::uint32_t field, const Bytes& payload) {
    varint_raw(field << 3 | 2).varint_raw(payload.size());
    b.insert(b.end(), payload.begin(), payload.end());
    return *this;
  }
  Msg& fixed32(std::uint32_t field, std::uint32_t value) {
    varint_raw(field << 3 | 5);
    for (int i = 0; i < 4; ++i) b.push_back(std::byte(static_cast<std::uint8_t>(value >> (8 * i))));
    return *this;
  }
  Msg& fixed64(std::uint32_t field, std::uint64_t value) {
    varint_raw(field << 3 | 1);
    for (int i = 0; i < 8; ++i) b.push_back(std::byte(static_cast<std::uint8_t>(value >> (8 * i))));
    return *this;
  }
};

void put_u32(Bytes& out, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(std::byte(static_cast<std::uint8_t>(v >> (8 * i))));
}

Bytes image(std::uint32_t magic, const std::vector<Msg>& entries, bool head = true) {
  Bytes out;
  if (head) put_u32(out, kImgCommonMagic);
  put_u32(out, magic);
  for (const auto& m : entries) {
    put_u32(out, static_cast<std::uint32_t>(m.b.size()));
    out.insert(out.end(), m.b.begin(), m.b.end());
  }
  return out;
}

Msg vma(std::uint64_t start, std::uint64_t end) {
  return Msg{}.v(1, start).v(2, end).v(3, 0).v(4, 0).v(5, 3).v(6, 0x22).v(7, kVmaAreaRegular | kVmaAnonPrivate).v(8, 1);
}

Msg mm_with(const std::vector<Msg>& vmas) {
  Msg m;
  for (std::uint32_t f = 1; f <= 12; ++f) m.v(f, 0x1000 * f);
  for (const auto& x : vmas) m.bytes(14, x.b);
  return m;
}

Msg pe(std::uint64_t vaddr, std::uint32_t nr, std::uint32_t flags) { return Msg{}.v(1, vaddr).v(2, nr).v(4, flags); }

// Offsets at which a prefix of the image is still a well-formed image (entry boundaries).
std::vector<std::size_t> boundaries(const Bytes& img, std::size_t header) {
  std::vector<std::size_t> out{header};
  std::size_t pos = header;
  while (pos + 4 <= img.size()) {
    std::uint32_t len = 0;
    for (int i = 0; i < 4; ++i) len |= std::uint32_t(std::to_integer<std::uint8_t>(img[pos + i])) << (8 * i);
    pos += 4 + len;
    out.push_back(pos);
  }
  return out;
}

struct Fixture {
  fs::path path;
  std::size_t header;
  std::function<Errc(std::span<const std::byte>)> parse;  // Errc::not_found stands for "parsed fine"
};

template <class R>
Errc code_of(const R& r) {
  return r ? Errc::not_found : r.error().code;
}

std::vector<Fixture> metadata_fixtures() {
  return {
      {kSingle / "inventory.img", 4, [](auto s) { return code_of(parse_inventory(s)); }},
      {kSingle / "pstree.img", 8, [](auto s) { return code_of(parse_pstree(s)); }},
      {kTree / "pstree.img", 8, [](auto s) { return code_of(parse_pstree(s)); }},
      {kSingle / "mm-15884.img", 8, [](auto s) { return code_of(parse_mm(s)); }},
      {kSingle / "pagemap-15884.img", 8, [](auto s) { return code_of(parse_pagemap(s)); }},
      {kTree / "pagemap-15903.img", 8, [](auto s) { return code_of(parse_pagemap(s)); }},
  };
}

std::uint64_t hexnum(const nlohmann::json& j) {
  return j.is_string() ? std::stoull(j.get<std::string>(), nullptr, 0) : j.get<std::uint64_t>();
}

}  // namespace

// ---------------------------------------------------------------- wire decoder

TEST(CriuWire, VarintsAndBounds) {
  using wire::WireReader;
  auto bytes = [](std::initializer_list<int> v) {
    Bytes b;
    for (int x : v) b.push_back(std::byte(static_cast<std::uint8_t>(x)));
    return b;
  };
  std::size_t pos = 0;
  Bytes one = bytes({0x96, 0x01});
  EXPECT_EQ(WireReader::read_varint(one, pos), 150u);
  EXPECT_EQ(pos, 2u);
  Bytes max = bytes({0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01});
  pos = 0;
  EXPECT_EQ(WireReader::read_varint(max, pos), UINT64_MAX);
  Bytes over = bytes({0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02});
  pos = 0;
  EXPECT_FALSE(WireReader::read_varint(over, pos));
  Bytes eleven(20, std::byte{0x80});
  pos = 0;
  EXPECT_FALSE(WireReader::read_varint(eleven, pos));
  Bytes cut = bytes({0x80, 0x80});
  pos = 0;
  EXPECT_FALSE(WireReader::read_varint(cut, pos));
  EXPECT_EQ(wire::zigzag_decode(1), -1);
  EXPECT_EQ(wire::zigzag_decode(2), 1);
  EXPECT_EQ(wire::zigzag_decode(UINT64_MAX), INT64_MIN);
}

TEST(CriuWire, FieldTypesUnknownFieldsAndGroups) {
  Msg m;
  m.v(1, 7).fixed32(2, 0xdeadbeef).fixed64(3, 0x0102030405060708).bytes(4, Msg{}.v(1, 1).b).v(1000, 5);
  wire::WireReader r(m.b);
  wire::Field f;
  ASSERT_TRUE(r.next(f));
  EXPECT_EQ(f.value, 7u);
  ASSERT_TRUE(r.next(f));
  EXPECT_EQ(f.type, wire::WireType::fixed32);
  EXPECT_EQ(f.value, 0xdeadbeefu);
  ASSERT_TRUE(r.next(f));
  EXPECT_EQ(f.value, 0x0102030405060708u);
  ASSERT_TRUE(r.next(f));
  EXPECT_EQ(f.bytes.size(), 2u);
  ASSERT_TRUE(r.next(f));
  EXPECT_EQ(f.number, 1000u);
  EXPECT_FALSE(r.next(f));
  EXPECT_FALSE(r.failed());

  for (std::uint64_t tag : {std::uint64_t{1 << 3 | 3}, std::uint64_t{1 << 3 | 4}, std::uint64_t{1 << 3 | 6},
                            std::uint64_t{0 << 3 | 0}}) {
    Msg bad;
    bad.varint_raw(tag).varint_raw(0);
    wire::WireReader rb(bad.b);
    EXPECT_FALSE(rb.next(f));
    EXPECT_TRUE(rb.failed()) << tag;
  }
  Msg longer;
  longer.varint_raw(1 << 3 | 2).varint_raw(100).varint_raw(1);
  wire::WireReader rl(longer.b);
  EXPECT_FALSE(rl.next(f));
  EXPECT_NE(rl.error().find("runs past the end"), std::string::npos) << rl.error();
  Msg huge;  // a 2^63 length must not wrap the bounds check
  huge.varint_raw(1 << 3 | 2).varint_raw(UINT64_C(1) << 63);
  wire::WireReader rh(huge.b);
  EXPECT_FALSE(rh.next(f));
  EXPECT_TRUE(rh.failed());
  Msg fixed_cut;
  fixed_cut.varint_raw(1 << 3 | 1).varint_raw(1);
  wire::WireReader rf(fixed_cut.b);
  EXPECT_FALSE(rf.next(f));
  EXPECT_TRUE(rf.failed());
}

// ---------------------------------------------------------------- real fixtures vs crit

TEST(CriuImages, InventoryMatchesCrit) {
  auto inv = parse_inventory(read_file(kSingle / "inventory.img"));
  ASSERT_TRUE(inv) << inv.error().what();
  const auto j = crit(kSingle / "inventory.img")["entries"][0];
  EXPECT_EQ(inv->img_version, j["img_version"].get<std::uint32_t>());
  EXPECT_EQ(inv->img_version, 2u);
  EXPECT_EQ(inv->fdinfo_per_id, j["fdinfo_per_id"].get<bool>());
  EXPECT_EQ(inv->ns_per_id, j["ns_per_id"].get<bool>());
  EXPECT_EQ(inv->root_cg_set, j["root_cg_set"].get<std::uint32_t>());
  EXPECT_EQ(inv->lsmtype, 0u);  // NO_LSM
}

TEST(CriuImages, PstreeMatchesCrit) {
  for (const auto& dir : {kSingle, kTree}) {
    auto tree = parse_pstree(read_file(dir / "pstree.img"));
    ASSERT_TRUE(tree) << tree.error().what();
    const auto j = crit(dir / "pstree.img")["entries"];
    ASSERT_EQ(tree->size(), j.size());
    for (std::size_t i = 0; i < j.size(); ++i) {
      EXPECT_EQ((*tree)[i].pid, j[i]["pid"].get<std::uint32_t>());
      EXPECT_EQ((*tree)[i].ppid, j[i]["ppid"].get<std::uint32_t>());
      EXPECT_EQ((*tree)[i].pgid, j[i]["pgid"].get<std::uint32_t>());
      EXPECT_EQ((*tree)[i].sid, j[i]["sid"].get<std::uint32_t>());
      EXPECT_EQ((*tree)[i].threads, j[i]["threads"].get<std::vector<std::uint32_t>>());
    }
  }
  auto tree = parse_pstree(read_file(kTree / "pstree.img"));
  ASSERT_TRUE(tree);
  ASSERT_EQ(tree->size(), 2u);
  EXPECT_EQ((*tree)[0].pid, 15901u);
  EXPECT_EQ((*tree)[0].ppid, 0u);
  EXPECT_EQ((*tree)[1].pid, 15903u);
  EXPECT_EQ((*tree)[1].ppid, 15901u);
  EXPECT_EQ((*tree)[1].threads, std::vector<std::uint32_t>{15903});
}

TEST(CriuImages, MmMatchesCrit) {
  for (const auto& img : {kSingle / "mm-15884.img", kTree / "mm-15901.img", kTree / "mm-15903.img"}) {
    SCOPED_TRACE(img.string());
    auto mm = parse_mm(read_file(img));
    ASSERT_TRUE(mm) << mm.error().what();
    const auto j = crit(img)["entries"][0];
    EXPECT_EQ(mm->mm_start_code, hexnum(j["mm_start_code"]));
    EXPECT_EQ(mm->mm_end_code, hexnum(j["mm_end_code"]));
    EXPECT_EQ(mm->mm_start_data, hexnum(j["mm_start_data"]));
    EXPECT_EQ(mm->mm_end_data, hexnum(j["mm_end_data"]));
    EXPECT_EQ(mm->mm_start_stack, hexnum(j["mm_start_stack"]));
    EXPECT_EQ(mm->mm_start_brk, hexnum(j["mm_start_brk"]));
    EXPECT_EQ(mm->mm_brk, hexnum(j["mm_brk"]));
    EXPECT_EQ(mm->mm_arg_start, hexnum(j["mm_arg_start"]));
    EXPECT_EQ(mm->mm_arg_end, hexnum(j["mm_arg_end"]));
    EXPECT_EQ(mm->mm_env_start, hexnum(j["mm_env_start"]));
    EXPECT_EQ(mm->mm_env_end, hexnum(j["mm_env_end"]));
    EXPECT_EQ(mm->exe_file_id, j["exe_file_id"].get<std::uint32_t>());
    EXPECT_EQ(mm->mm_saved_auxv, j["mm_saved_auxv"].get<std::vector<std::uint64_t>>());
    EXPECT_EQ(mm->dumpable, j["dumpable"].get<std::int32_t>());
    EXPECT_EQ(mm->thp_disabled, j["thp_disabled"].get<bool>());
    const auto& jv = j["vmas"];
    ASSERT_EQ(mm->vmas.size(), jv.size());
    for (std::size_t i = 0; i < jv.size(); ++i) {
      const auto& v = mm->vmas[i];
      EXPECT_EQ(v.start, hexnum(jv[i]["start"]));
      EXPECT_EQ(v.end, hexnum(jv[i]["end"]));
      EXPECT_EQ(v.pgoff, jv[i]["pgoff"].get<std::uint64_t>());
      EXPECT_EQ(v.shmid, jv[i]["shmid"].get<std::uint64_t>());
      EXPECT_EQ(v.prot, jv[i]["prot"].get<std::uint32_t>());
      EXPECT_EQ(v.flags, jv[i]["flags"].get<std::uint32_t>());
      EXPECT_EQ(v.status, jv[i]["status"].get<std::uint32_t>());
      EXPECT_EQ(v.fd, jv[i]["fd"].get<std::int64_t>());
      EXPECT_EQ(v.madv.has_value(), jv[i].contains("madv"));
      if (v.madv) {
        EXPECT_EQ(*v.madv, hexnum(jv[i]["madv"]));
      }
      EXPECT_EQ(v.fdflags.has_value(), jv[i].contains("fdflags"));
    }
  }
  // The fixture process's own mapping: 8 private anonymous rw pages at 0x10000000.
  auto mm = parse_mm(read_file(kSingle / "mm-15884.img"));
  ASSERT_TRUE(mm);
  ASSERT_EQ(mm->vmas.size(), 12u);
  const auto& v = mm->vmas[6];
  EXPECT_EQ(v.start, 0x10000000u);
  EXPECT_EQ(v.end, 0x10008000u);
  EXPECT_EQ(v.prot, 3u);      // PROT_READ | PROT_WRITE
  EXPECT_EQ(v.flags, 0x22u);  // MAP_PRIVATE | MAP_ANONYMOUS
  EXPECT_EQ(v.status, kVmaAreaRegular | kVmaAnonPrivate);
  EXPECT_EQ(v.fd, -1);
  EXPECT_TRUE(v.can_be_lazy());
  EXPECT_FALSE(mm->vmas[0].can_be_lazy());  // the binary's file mapping
  EXPECT_FALSE(mm->vmas[9].can_be_lazy());  // vdso
  EXPECT_EQ(mm->vmas[11].start, 0xffffffffff600000u);  // vsyscall
}

TEST(CriuImages, PagemapMatchesCrit) {
  for (const auto& img : {kSingle / "pagemap-15884.img", kTree / "pagemap-15901.img", kTree / "pagemap-15903.img"}) {
    SCOPED_TRACE(img.string());
    auto pm = parse_pagemap(read_file(img));
    ASSERT_TRUE(pm) << pm.error().what();
    const auto j = crit(img)["entries"];
    EXPECT_EQ(pm->pages_id, j[0]["pages_id"].get<std::uint32_t>());
    ASSERT_EQ(pm->entries.size() + 1, j.size());
    std::uint64_t offset = 0;
    for (std::size_t i = 0; i < pm->entries.size(); ++i) {
      const auto& e = pm->entries[i];
      EXPECT_EQ(e.vaddr, hexnum(j[i + 1]["vaddr"]));
      EXPECT_EQ(e.nr_pages, j[i + 1]["nr_pages"].get<std::uint64_t>());
      EXPECT_EQ(e.flags, j[i + 1]["flags"].get<std::uint32_t>());
      ASSERT_TRUE(e.present());
      EXPECT_EQ(e.data_offset, offset);
      offset += e.bytes();
    }
    EXPECT_EQ(pm->present_bytes(), offset);
  }
  auto pm = parse_pagemap(read_file(kSingle / "pagemap-15884.img"));
  ASSERT_TRUE(pm);
  EXPECT_EQ(pm->pages_id, 1u);
  ASSERT_EQ(pm->entries.size(), 8u);
  EXPECT_EQ(pm->entries[3].vaddr, 0x10000000u);
  EXPECT_EQ(pm->entries[3].nr_pages, 3u);
  EXPECT_EQ(pm->entries[3].flags, kPeLazy | kPePresent);
  EXPECT_EQ(pm->entries[3].data_offset, 8 * kPageSize);  // after 1 + 5 + 2 pages
  EXPECT_EQ(pm->entries[0].flags, kPePresent);           // file-backed text page: not lazy
  EXPECT_EQ(pm->present_pages, 20u);
}

TEST(CriuImages, LoadCheckpointSingleTaskPagesHoldTheKnownPattern) {
  auto cp = load_checkpoint(kSingle);
  ASSERT_TRUE(cp) << cp.error().what();
  ASSERT_EQ(cp->tasks.size(), 1u);
  const Task* t = cp->find(15884);
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->mm && t->pagemap);
  EXPECT_EQ(t->pages_path.filename(), "pages-1.img");
  EXPECT_EQ(t->pages_file_bytes, 20 * kPageSize);
  EXPECT_EQ(cp->find(1), nullptr);
  // The fixture filled pages 0, 1, 2 and 6 of its mapping with 0xA0 + page index.
  const Bytes pages = read_file(t->pages_path);
  ASSERT_EQ(pages.size(), t->pages_file_bytes);
  int checked = 0;
  for (const auto& e : t->pagemap->entries) {
    if (e.vaddr < 0x10000000 || e.vaddr >= 0x10008000) continue;
    for (std::uint64_t p = 0; p < e.nr_pages; ++p) {
      const std::uint64_t page_index = (e.vaddr - 0x10000000) / kPageSize + p;
      const std::byte* data = pages.data() + *e.data_offset + p * kPageSize;
      for (std::size_t k = 0; k < kPageSize; k += 511)
        ASSERT_EQ(std::to_integer<int>(data[k]), 0xA0 + static_cast<int>(page_index));
      ++checked;
    }
  }
  EXPECT_EQ(checked, 4);
}

TEST(CriuImages, LoadCheckpointTreeAndLazyFlagsAgreeWithVmas) {
  auto cp = load_checkpoint(kTree);
  ASSERT_TRUE(cp) << cp.error().what();
  ASSERT_EQ(cp->tasks.size(), 2u);
  EXPECT_EQ(cp->tasks[0].pstree.pid, 15901u);
  const Task* child = cp->find(15903);
  ASSERT_NE(child, nullptr);
  EXPECT_EQ(child->pages_path.filename(), "pages-2.img");
  EXPECT_EQ(child->pages_file_bytes, 19 * kPageSize);
  // The child also wrote page 3 (0xC3) after the fork: its entry is 4 pages long.
  const Bytes pages = read_file(child->pages_path);
  bool found = false;
  for (const auto& e : child->pagemap->entries)
    if (e.vaddr == 0x10000000) {
      ASSERT_EQ(e.nr_pages, 4u);
      EXPECT_EQ(std::to_integer<int>(pages[*e.data_offset + 3 * kPageSize + 100]), 0xC3);
      EXPECT_EQ(std::to_integer<int>(pages[*e.data_offset + 2 * kPageSize]), 0xA2);
      found = true;
    }
  EXPECT_TRUE(found);
  // CRIU marked lazy only pages of VMAs that can be lazy.
  for (const auto& t : cp->tasks)
    for (const auto& e : t.pagemap->entries) {
      if (!e.lazy()) continue;
      for (const auto& v : t.mm->vmas)
        if (v.contains(e.vaddr)) {
          EXPECT_TRUE(v.can_be_lazy()) << std::hex << e.vaddr;
        }
    }
}

// ---------------------------------------------------------------- SYNTHETIC encodings

TEST(CriuImages, SyntheticPackedThreadsAndUnknownFields) {
  Msg e;
  e.v(1, 5).v(2, 0).v(3, 5).v(4, 5).bytes(5, Msg{}.varint_raw(5).varint_raw(6).varint_raw(300).b).v(99, 1);
  e.v(5, 7);  // unpacked elements may follow packed ones
  auto tree = parse_pstree(image(kPstreeMagic, {e}));
  ASSERT_TRUE(tree) << tree.error().what();
  EXPECT_EQ(tree->at(0).threads, (std::vector<std::uint32_t>{5, 6, 300, 7}));
}

TEST(CriuImages, SyntheticPagemapCompatAndNewNrPages) {
  Msg head = Msg{}.v(1, 9);
  Msg old_present = Msg{}.v(1, 0x1000).v(2, 2);                   // no flags: PE_PRESENT
  Msg old_parent = Msg{}.v(1, 0x3000).v(2, 1).v(3, 1);            // in_parent: PE_PARENT
  Msg wide = Msg{}.v(1, 0x10000).v(2, 0).v(4, kPePresent).v(5, 3);  // criu 4.2's 64-bit nr_pages
  auto pm = parse_pagemap(image(kPagemapMagic, {head, old_present, old_parent, wide}));
  ASSERT_TRUE(pm) << pm.error().what();
  EXPECT_EQ(pm->pages_id, 9u);
  EXPECT_EQ(pm->entries[0].flags, kPePresent);
  EXPECT_EQ(pm->entries[0].data_offset, 0u);
  EXPECT_EQ(pm->entries[1].flags, kPeParent);
  EXPECT_FALSE(pm->entries[1].data_offset);
  EXPECT_EQ(pm->entries[2].nr_pages, 3u);
  EXPECT_EQ(pm->entries[2].data_offset, 2 * kPageSize);
  EXPECT_EQ(pm->present_pages, 5u);
}

// ---------------------------------------------------------------- corruption

TEST(CriuImagesCorrupt, EveryTruncationIsCleanAndOnlyEntryBoundariesParse) {
  for (const auto& fx : metadata_fixtures()) {
    SCOPED_TRACE(fx.path.string());
    const Bytes img = read_file(fx.path);
    const auto ok = boundaries(img, fx.header);
    for (std::size_t n = 0; n < img.size(); ++n) {
      const Bytes cut(img.begin(), img.begin() + static_cast<std::ptrdiff_t>(n));
      const Errc c = fx.parse(cut);
      const bool at_boundary = std::find(ok.begin(), ok.end(), n) != ok.end();
      if (!at_boundary) {
        EXPECT_EQ(c, Errc::corrupt) << "prefix " << n;
      } else {
        EXPECT_TRUE(c == Errc::corrupt || c == Errc::not_found) << "prefix " << n;
      }
    }
  }
}

TEST(CriuImagesCorrupt, EveryBitFlipIsCleanOrStillValid) {
  for (const auto& fx : metadata_fixtures()) {
    SCOPED_TRACE(fx.path.string());
    const Bytes img = read_file(fx.path);
    for (std::size_t i = 0; i < img.size(); ++i)
      for (int bit = 0; bit < 8; ++bit) {
        Bytes bad = img;
        bad[i] ^= std::byte(static_cast<std::uint8_t>(1u << bit));
        const Errc c = fx.parse(bad);
        EXPECT_TRUE(c == Errc::corrupt || c == Errc::not_found) << "byte " << i << " bit " << bit;
        if (i < fx.header) {
          EXPECT_EQ(c, Errc::corrupt) << "magic byte " << i;
        }
      }
  }
}

TEST(CriuImagesCorrupt, MagicsAndLengths) {
  const Bytes pm = read_file(kSingle / "pagemap-15884.img");
  auto r = parse_mm(pm, "mm-1.img");  // a pagemap is not an mm image
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::corrupt);
  EXPECT_NE(r.error().message.find("mm-1.img: image magic"), std::string::npos) << r.error().message;

  Bytes service = pm;
  service[0] = std::byte{0x40}, service[1] = std::byte{0x59}, service[2] = std::byte{0x10}, service[3] = std::byte{0x55};
  auto s = parse_pagemap(service, "pagemap-15884.img");
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message.find("service image"), std::string::npos) << s.error().message;

  Bytes beyond = pm;  // first entry's length -> beyond the file
  beyond[8] = std::byte{0xff}, beyond[9] = std::byte{0xff};
  auto b = parse_pagemap(beyond, "pagemap-15884.img");
  ASSERT_FALSE(b);
  EXPECT_NE(b.error().message.find("entry 0 at offset 8: length 65535 runs past the end"), std::string::npos)
      << b.error().message;

  Bytes huge = pm;
  for (int i = 8; i < 12; ++i) huge[i] = std::byte{0xff};
  EXPECT_EQ(code_of(parse_pagemap(huge)), Errc::corrupt);

  // A varint bomb: a length-delimited field whose length never ends.
  Msg bomb;
  bomb.varint_raw(1 << 3 | 2);
  for (int i = 0; i < 64; ++i) bomb.b.push_back(std::byte{0xff});
  auto v = parse_pstree(image(kPstreeMagic, {bomb}), "pstree.img");
  ASSERT_FALSE(v);
  EXPECT_NE(v.error().message.find("pstree.img: entry 0 (pstree_entry) at offset 8"), std::string::npos)
      << v.error().message;

  // Inventory has no head magic; an inventory written with one is wrong.
  EXPECT_EQ(code_of(parse_inventory(image(kInventoryMagic, {Msg{}.v(1, 2)}, true))), Errc::corrupt);
  EXPECT_TRUE(parse_inventory(image(kInventoryMagic, {Msg{}.v(1, 2)}, false)));
  EXPECT_EQ(code_of(parse_inventory(image(kInventoryMagic, {}, false))), Errc::corrupt);
}

TEST(CriuImagesCorrupt, FieldLevelErrorsNameTheField) {
  auto missing = parse_pstree(image(kPstreeMagic, {Msg{}.v(1, 5).v(2, 0).v(3, 5)}), "pstree.img");
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.error().message.find("missing required field 4 (sid)"), std::string::npos);

  auto wide = parse_pstree(image(kPstreeMagic, {Msg{}.v(1, UINT64_C(1) << 32).v(2, 0).v(3, 5).v(4, 5)}));
  ASSERT_FALSE(wide);
  EXPECT_NE(wide.error().message.find("does not fit uint32"), std::string::npos);

  auto wrong_type = parse_pstree(image(kPstreeMagic, {Msg{}.fixed32(1, 5).v(2, 0).v(3, 5).v(4, 5)}));
  ASSERT_FALSE(wrong_type);
  EXPECT_NE(wrong_type.error().message.find("field 1 (pid)"), std::string::npos);

  Msg bad_vma = vma(0x1000, 0x2000);
  bad_vma.b.resize(bad_vma.b.size() - 2);  // drop fd
  auto mm = parse_mm(image(kMmMagic, {mm_with({vma(0x0, 0x1000), bad_vma})}), "mm-3.img");
  ASSERT_FALSE(mm);
  EXPECT_NE(mm.error().message.find("mm-3.img: entry 0 (mm_entry)"), std::string::npos) << mm.error().message;
  EXPECT_NE(mm.error().message.find("vmas[1] missing required field 8 (fd)"), std::string::npos)
      << mm.error().message;
  EXPECT_EQ(code_of(parse_mm(image(kMmMagic, {}))), Errc::corrupt);
  EXPECT_EQ(code_of(parse_mm(image(kMmMagic, {mm_with({}), mm_with({})}))), Errc::corrupt);
}

TEST(CriuImagesCorrupt, PagemapEntryChecks) {
  const Msg head = Msg{}.v(1, 1);
  auto err = [&](std::vector<Msg> entries) {
    entries.insert(entries.begin(), head);
    auto r = parse_pagemap(image(kPagemapMagic, entries), "pagemap-1.img");
    return r ? std::string() : r.error().message;
  };
  EXPECT_NE(err({pe(0x1001, 1, kPePresent)}).find("entry 1 (pagemap_entry) at offset 14: vaddr 0x1001 nr_pages 1: "
                                                  "vaddr is not page aligned"),
            std::string::npos)
      << err({pe(0x1001, 1, kPePresent)});
  EXPECT_NE(err({pe(0x1000, 0, kPePresent)}).find("no pages"), std::string::npos);
  EXPECT_NE(err({pe(0x5000, 1, kPePresent), pe(0x1000, 1, kPePresent)}).find("entry 2"), std::string::npos);
  EXPECT_NE(err({pe(0x1000, 4, kPePresent), pe(0x3000, 1, kPePresent)}).find("overlaps"), std::string::npos);
  EXPECT_NE(err({pe(0x1000, 1, kPePresent | kPeParent)}).find("both PE_PRESENT and PE_PARENT"), std::string::npos);
  EXPECT_NE(err({Msg{}.v(1, 0xfffffffffffff000).v(2, 0).v(5, 2)}).find("wraps"), std::string::npos);
  EXPECT_NE(err({Msg{}.v(1, 0).v(2, 0).v(5, UINT64_MAX)}).find("wraps"), std::string::npos);
  EXPECT_EQ(err({Msg{}.v(1, 0xfffffffffffff000).v(2, 1)}), "");  // the very last page is fine
  EXPECT_NE(err({Msg{}.v(2, 1)}).find("missing required field 1 (vaddr)"), std::string::npos);
  EXPECT_EQ(code_of(parse_pagemap(image(kPagemapMagic, {}))), Errc::corrupt);  // no head
}

TEST(CriuCheckpointCorrupt, MissingFilesAndDirectories) {
  snaptier::testing::TempDir tmp;
  EXPECT_EQ(load_checkpoint(tmp.path() / "nope").error().code, Errc::not_found);
  EXPECT_EQ(load_checkpoint(tmp.path()).error().code, Errc::not_found);  // no inventory.img
  copy_dir(kSingle, tmp.path());
  fs::remove(tmp.path() / "pstree.img");
  EXPECT_EQ(load_checkpoint(tmp.path()).error().code, Errc::not_found);
  fs::copy_file(kSingle / "pstree.img", tmp.path() / "pstree.img");
  ASSERT_TRUE(load_checkpoint(tmp.path()));

  fs::rename(tmp.path() / "mm-15884.img", tmp.path() / "mm-x.img");
  auto r = load_checkpoint(tmp.path());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::corrupt);
  EXPECT_NE(r.error().message.find("mm-15884.img is missing"), std::string::npos) << r.error().message;
  fs::remove(tmp.path() / "pagemap-15884.img");  // neither image: a task without memory (zombie)
  auto z = load_checkpoint(tmp.path());
  ASSERT_TRUE(z) << z.error().what();
  EXPECT_FALSE(z->tasks[0].mm);
}

TEST(CriuCheckpointCorrupt, PagesFileSizeMustMatch) {
  snaptier::testing::TempDir tmp;
  copy_dir(kSingle, tmp.path());
  const auto pages = tmp.path() / "pages-1.img";
  for (std::uint64_t size : {std::uint64_t{0}, 19 * kPageSize, 20 * kPageSize - 1, 20 * kPageSize + 1, 21 * kPageSize}) {
    fs::resize_file(pages, size);
    auto r = load_checkpoint(tmp.path());
    ASSERT_FALSE(r) << size;
    EXPECT_EQ(r.error().code, Errc::corrupt);
    EXPECT_NE(r.error().message.find("pages-1.img: " + std::to_string(size) + " bytes, but pagemap-15884.img has 20 "
                                     "present pages"),
              std::string::npos)
        << r.error().message;
  }
  fs::remove(pages);
  auto r = load_checkpoint(tmp.path());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::corrupt);
  EXPECT_NE(r.error().message.find("pages-1.img is missing"), std::string::npos) << r.error().message;
}

TEST(CriuCheckpointCorrupt, PagemapEntriesMustLieInsideVmas) {
  snaptier::testing::TempDir tmp;
  copy_dir(kSingle, tmp.path());
  auto write_pm = [&](std::vector<Msg> entries) {
    entries.insert(entries.begin(), Msg{}.v(1, 1));
    write_file(tmp.path() / "pagemap-15884.img", image(kPagemapMagic, entries));
    fs::resize_file(tmp.path() / "pages-1.img", 0);
    std::uint64_t n = 0;
    const auto parsed = parse_pagemap(image(kPagemapMagic, entries));
    if (parsed)
      for (const auto& e : parsed->entries) n += e.present() ? e.nr_pages : 0;
    fs::resize_file(tmp.path() / "pages-1.img", n * kPageSize);
    return load_checkpoint(tmp.path());
  };
  // Inside one VMA; spanning the adjacent VMAs [0x4a2000,0x4a6000) + [0x4a6000,0x4a9000) (as CRIU wrote it).
  EXPECT_TRUE(write_pm({pe(0x10000000, 8, kPePresent)}));
  EXPECT_TRUE(write_pm({pe(0x4a4000, 5, kPePresent)}));
  // Past the end of the 8-page VMA, in the gap before it, spanning a hole, above everything.
  for (const auto& [bad, addr] : std::vector<std::pair<Msg, std::string>>{
           {pe(0x10000000, 9, kPePresent), "0x10008000"},
           {pe(0x0fff0000, 1, kPePresent), "0xfff0000"},
           {pe(0x4ae000, 2, kPeLazy | kPePresent), "0x4af000"},
           {pe(0xfffffffffffff000, 1, kPePresent), "0xfffffffffffff000"}}) {
    auto r = write_pm({pe(0x401000, 1, kPePresent), bad});
    ASSERT_FALSE(r) << addr;
    EXPECT_EQ(r.error().code, Errc::corrupt);
    EXPECT_NE(r.error().message.find("pagemap-15884.img: entry 2 "), std::string::npos) << r.error().message;
    EXPECT_NE(r.error().message.find("address " + addr + " is outside every vma of mm-15884.img"), std::string::npos)
        << r.error().message;
  }
  // In-parent entries are checked against the VMAs too, but need no data.
  EXPECT_TRUE(write_pm({pe(0x10000000, 2, kPeParent), pe(0x10002000, 1, kPePresent)}));
}

TEST(CriuCheckpointCorrupt, TreeAndVmaConsistency) {
  snaptier::testing::TempDir tmp;
  copy_dir(kTree, tmp.path());
  auto pstree = [&](std::vector<Msg> entries) {
    write_file(tmp.path() / "pstree.img", image(kPstreeMagic, entries));
    auto r = load_checkpoint(tmp.path());
    return r ? std::string() : r.error().message;
  };
  auto task = [](std::uint32_t pid, std::uint32_t ppid) { return Msg{}.v(1, pid).v(2, ppid).v(3, 1).v(4, 1).v(5, pid); };
  EXPECT_EQ(pstree({task(15901, 0), task(15903, 15901)}), "");
  EXPECT_NE(pstree({}).find("no tasks"), std::string::npos);
  EXPECT_NE(pstree({task(15901, 0), task(15901, 15901)}).find("pid 15901 appears twice"), std::string::npos);
  EXPECT_NE(pstree({task(15901, 0), task(15903, 77)}).find("parent 77 is not in the tree"), std::string::npos);
  EXPECT_NE(pstree({task(15901, 15903), task(15903, 15901)}).find("entry 0 (the root)"), std::string::npos);
  pstree({task(15901, 0), task(15903, 15901)});

  // Two tasks pointing at one pages file.
  write_file(tmp.path() / "pagemap-15903.img", read_file(kTree / "pagemap-15901.img"));
  auto shared = load_checkpoint(tmp.path());
  ASSERT_FALSE(shared);
  EXPECT_NE(shared.error().message.find("pages_id 1 is also used by task 15901"), std::string::npos)
      << shared.error().message;
  write_file(tmp.path() / "pagemap-15903.img", read_file(kTree / "pagemap-15903.img"));

  auto mm = [&](std::vector<Msg> vmas) {
    write_file(tmp.path() / "mm-15903.img", image(kMmMagic, {mm_with(vmas)}));
    auto r = load_checkpoint(tmp.path());
    return r ? std::string() : r.error().message;
  };
  EXPECT_NE(mm({vma(0x1000, 0x1000)}).find("mm-15903.img: vma 0 [0x1000, 0x1000) is empty"), std::string::npos);
  EXPECT_NE(mm({vma(0x1000, 0x1800)}).find("not page aligned"), std::string::npos);
  EXPECT_NE(mm({vma(0x1000, 0x4000), vma(0x3000, 0x5000)}).find("vma 1 [0x3000, 0x5000) overlaps"),
            std::string::npos);
  EXPECT_NE(mm({vma(0x0, 0x1000)}).find("pagemap-15903.img: entry 1 "), std::string::npos);  // VMAs gone
}

TEST(CriuCheckpointCorrupt, DamagedImagesInADirectoryFailCleanly) {
  // Every single-byte flip of every metadata image, through load_checkpoint: never a crash,
  // and only Errc::corrupt / Errc::unsupported (an inventory version byte) or success.
  snaptier::testing::TempDir tmp;
  copy_dir(kSingle, tmp.path());
  for (const char* name : {"inventory.img", "pstree.img", "mm-15884.img", "pagemap-15884.img"}) {
    const Bytes good = read_file(kSingle / name);
    for (std::size_t i = 0; i < good.size(); ++i) {
      Bytes bad = good;
      bad[i] ^= std::byte{0xff};
      write_file(tmp.path() / name, bad);
      auto r = load_checkpoint(tmp.path());
      if (!r) {
        const Errc c = r.error().code;
        EXPECT_TRUE(c == Errc::corrupt || c == Errc::unsupported || c == Errc::not_found)
            << name << " byte " << i << ": " << r.error().what();
      }
    }
    write_file(tmp.path() / name, good);
  }
  ASSERT_TRUE(load_checkpoint(tmp.path()));
}

// ---------------------------------------------------------------- before criu restore

TEST(CriuPagesCheck, CompleteFixturesPass) {
  auto single = check_pages_files(kSingle);
  ASSERT_TRUE(single) << single.error().what();
  ASSERT_EQ(single->size(), 1u);
  EXPECT_EQ(single->at(0).pages, kSingle / "pages-1.img");
  EXPECT_EQ(single->at(0).needed_bytes, 20 * kPageSize);
  EXPECT_EQ(single->at(0).file_bytes, 20 * kPageSize);
  auto tree = check_pages_files(kTree);
  ASSERT_TRUE(tree) << tree.error().what();
  EXPECT_EQ(tree->size(), 2u) << "both tasks' pagemaps";
}

TEST(CriuPagesCheck, ShortOrMissingPagesFileIsRefusedNamingFileAndBytes) {
  snaptier::testing::TempDir tmp;
  copy_dir(kSingle, tmp.path());
  const auto pages = tmp.path() / "pages-1.img";
  for (std::uint64_t size : {std::uint64_t{0}, 19 * kPageSize, 20 * kPageSize - 1}) {
    fs::resize_file(pages, size);
    auto r = check_pages_files(tmp.path());
    ASSERT_FALSE(r) << size;
    EXPECT_EQ(r.error().code, Errc::corrupt);
    EXPECT_NE(r.error().message.find(pages.string() + " holds " + std::to_string(size) +
                                     " bytes but pagemap-15884.img needs 81920 bytes (20 present pages)"),
              std::string::npos)
        << r.error().message;
  }
  // A longer file is what CRIU accepts too: it reads only what the pagemap names.
  fs::resize_file(pages, 21 * kPageSize);
  auto longer = check_pages_files(tmp.path());
  ASSERT_TRUE(longer) << longer.error().what();
  EXPECT_EQ(longer->at(0).file_bytes, 21 * kPageSize);
  fs::remove(pages);
  auto missing = check_pages_files(tmp.path());
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, Errc::corrupt);
  EXPECT_NE(missing.error().message.find(pages.string() + " is missing (0 bytes) but pagemap-15884.img needs 81920"),
            std::string::npos)
      << missing.error().message;
  // A pagemap that does not parse is refused too, before anything reads the pages.
  write_file(tmp.path() / "pagemap-15884.img", Bytes(3, std::byte{0}));
  auto garbage = check_pages_files(tmp.path());
  ASSERT_FALSE(garbage);
  EXPECT_EQ(garbage.error().code, Errc::corrupt);
  EXPECT_NE(garbage.error().message.find("pagemap-15884.img"), std::string::npos) << garbage.error().message;
}

// SYNTHETIC: the flags of criu/page-xfer.c. Bytes in pages-<id>.img only for PE_PRESENT (plain
// dump: PE_PRESENT, or PE_LAZY|PE_PRESENT); none for PE_PARENT (the parent checkpoint) or
// PE_LAZY alone (`criu dump --lazy-pages`: the page server sends them).
TEST(CriuPagesCheck, OnlyPresentEntriesNeedBytesLazyOnlyAndParentDoNot) {
  snaptier::testing::TempDir tmp;
  Msg head = Msg{}.v(1, 3);
  const std::vector<Msg> entries{head,
                                 pe(0x10000, 2, kPePresent),
                                 pe(0x20000, 4, kPeLazy),             // served by a page server
                                 pe(0x30000, 8, kPeParent),           // in the parent checkpoint
                                 pe(0x40000, 1, kPeLazy | kPePresent),  // plain dump, lazy-capable VMA
                                 pe(0x50000, 16, kPeLazy)};
  write_file(tmp.path() / "pagemap-7.img", image(kPagemapMagic, entries));
  write_file(tmp.path() / "pages-3.img", Bytes(3 * kPageSize, std::byte{0x5a}));
  auto ok = check_pages_files(tmp.path());
  ASSERT_TRUE(ok) << ok.error().what();
  EXPECT_EQ(ok->at(0).needed_bytes, 3 * kPageSize);

  // One page short: the PE_LAZY|PE_PRESENT entry, from offset 2 pages, is what lacks bytes.
  fs::resize_file(tmp.path() / "pages-3.img", 2 * kPageSize);
  auto short_lazy = check_pages_files(tmp.path());
  ASSERT_FALSE(short_lazy);
  EXPECT_NE(short_lazy.error().message.find("needs 12288 bytes (3 present pages); first short entry at vaddr 0x40000 "
                                            "(1 pages from offset 8192)"),
            std::string::npos)
      << short_lazy.error().message;

  // Only lazy and parent entries: nothing needed, not even the file.
  fs::remove(tmp.path() / "pages-3.img");
  write_file(tmp.path() / "pagemap-7.img", image(kPagemapMagic, {head, pe(0x20000, 4, kPeLazy), pe(0x30000, 8, kPeParent)}));
  auto none = check_pages_files(tmp.path());
  ASSERT_TRUE(none) << none.error().what();
  EXPECT_EQ(none->at(0).needed_bytes, 0u);
}

TEST(CriuPagesCheck, SharedMemoryPagemapsAreCheckedToo) {
  snaptier::testing::TempDir tmp;
  copy_dir(kSingle, tmp.path());
  write_file(tmp.path() / "pagemap-shmem-9.img", image(kPagemapMagic, {Msg{}.v(1, 2), pe(0, 4, kPePresent)}));
  write_file(tmp.path() / "pages-2.img", Bytes(kPageSize, std::byte{1}));
  auto r = check_pages_files(tmp.path());
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("pages-2.img holds 4096 bytes but pagemap-shmem-9.img needs 16384"), std::string::npos)
      << r.error().message;
  write_file(tmp.path() / "pages-2.img", Bytes(4 * kPageSize, std::byte{1}));
  auto ok = check_pages_files(tmp.path());
  ASSERT_TRUE(ok) << ok.error().what();
  EXPECT_EQ(ok->size(), 2u);
}

TEST(CriuPagesCheck, MissingDirectoryIsNotFound) {
  auto r = check_pages_files(kData / "no-such-images");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::not_found);
}
