// The snapshot step that stores one copy per placement (agent/snapshot_copies.hpp), over a store
// that records what it is asked: which copies a host with or without RDMA makes, what a
// skipped copy says, and that a copy the store refuses does not sink the whole snapshot.
#include <gtest/gtest.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "agent/snapshot_copies.hpp"
#include "snaptier/function_snapshot.hpp"

namespace snaptier::agent_detail {
namespace {

using nlohmann::json;

// Keeps snapshots in memory; bytes_per_tier from the placement; refuses pages on `full` tiers.
class RecordingStore final : public SnapshotStore {
 public:
  std::map<std::string, Snapshot> stored;
  std::set<TierKind> full;
  bool remove_fails = false;

  Result<SnapshotInfo> put(Snapshot snapshot, std::span<const std::byte>, const PlacementRequest& placement) override {
    SnapshotInfo info = snapshot.info;
    info.page_count = snapshot.pages.size();
    for (std::size_t i = 0; i < snapshot.pages.size(); ++i) {
      const TierKind tier = i < placement.per_page.size() && placement.per_page[i] ? *placement.per_page[i]
                                                                                    : placement.default_tier;
      if (full.contains(tier)) return fail(Errc::no_space, std::string(to_string(tier)) + " tier is full");
      snapshot.pages[i].tier = tier;
      info.bytes_per_tier[tier] += kPageSize;
    }
    info.published = !info.bytes_per_tier.contains(TierKind::file) && !info.bytes_per_tier.contains(TierKind::local);
    snapshot.info = info;
    stored[info.id] = std::move(snapshot);
    return info;
  }
  Result<Snapshot> get(const std::string& id) override {
    auto it = stored.find(id);
    if (it == stored.end()) return fail(Errc::not_found, id);
    return it->second;
  }
  Result<std::vector<SnapshotInfo>> list() override { return std::vector<SnapshotInfo>{}; }
  Result<void> remove(const std::string& id) override {
    if (remove_fails) return fail(Errc::io, "disk gone");
    if (stored.erase(id) == 0) return fail(Errc::not_found, id);
    return {};
  }
  Result<PageRun> read_pages(const Snapshot&, std::size_t, std::size_t, std::span<std::byte>) override {
    return fail(Errc::unsupported, "not here");
  }
};

// 4 pages: 0 and 2 hot (profiled), 1 and 3 cold.
Snapshot profiled(const std::string& id) {
  Snapshot s;
  s.info.id = id;
  for (std::uint64_t i = 0; i < 4; ++i) {
    PageEntry e;
    e.vaddr = 0x10000000 + i * kPageSize;
    e.flags = i % 2 == 0 ? std::uint32_t{page_hot} : 0u;
    s.pages.push_back(e);
  }
  return s;
}

const std::vector<std::byte> kData(4 * kPageSize, std::byte{1});
const json kBlob{{"function", "fn"}, {"digest", "d"}, {"socket", "/s"}};

json blob_of(const Snapshot& s) {
  const auto& b = s.blobs.at(snap::kFunctionBlob);
  return json::parse(std::string(reinterpret_cast<const char*>(b.data()), b.size()));
}

const json* variant(const StoredCopies& c, const std::string& placement) {
  for (const auto& v : c.variants) {
    if (v["placement"] == placement) return &v;
  }
  return nullptr;
}

TEST(SnapshotCopiesTest, HostWithoutRdmaStoresTieredWithColdPagesOnFileAndSkipsRdma) {
  RecordingStore store;
  store.stored["fn:rdma"] = profiled("fn:rdma");  // from an earlier snapshot, when RDMA was up
  const std::map<TierKind, TierCaps> up{{TierKind::local, {}}, {TierKind::cxl, {}}, {TierKind::file, {}}};
  auto copies = store_copies(store, profiled("fn"), kData, kBlob, up);
  ASSERT_TRUE(copies) << copies.error().what();

  const json* tiered = variant(*copies, "tiered");
  ASSERT_NE(tiered, nullptr) << copies->variants.dump();
  EXPECT_EQ((*tiered)["id"], "fn");
  EXPECT_EQ((*tiered)["cold_tier"], "file");
  EXPECT_EQ((*tiered)["bytes_per_tier"], (json{{"cxl", 2 * kPageSize}, {"file", 2 * kPageSize}}));
  EXPECT_FALSE((*tiered)["published"].get<bool>());
  const json* cxl = variant(*copies, "cxl");
  ASSERT_NE(cxl, nullptr);
  EXPECT_EQ((*cxl)["cold_tier"], "cxl");
  EXPECT_EQ(variant(*copies, "rdma"), nullptr);
  // Every page in this host's DRAM: a copy only this host can read.
  const json* local = variant(*copies, "local");
  ASSERT_NE(local, nullptr);
  EXPECT_EQ((*local)["id"], "fn:local");
  EXPECT_EQ((*local)["bytes_per_tier"], (json{{"local", 4 * kPageSize}}));
  EXPECT_FALSE((*local)["published"].get<bool>());

  ASSERT_EQ(copies->skipped.size(), 1u);
  EXPECT_EQ(copies->skipped[0]["placement"], "rdma");
  EXPECT_NE(copies->skipped[0]["reason"].get<std::string>().find("the rdma tier"), std::string::npos)
      << copies->skipped[0].dump();
  EXPECT_FALSE(store.stored.contains("fn:rdma")) << "an older rdma copy would be restored as this snapshot";

  // What a restore reads later: the copy names its placement and cold tier.
  const json blob = blob_of(store.stored.at("fn"));
  EXPECT_EQ(blob["placement"], "tiered");
  EXPECT_EQ(blob["cold_tier"], "file");
  EXPECT_EQ(blob["digest"], "d");
  EXPECT_EQ(blob_of(store.stored.at("fn:cxl"))["cold_tier"], "cxl");
}

TEST(SnapshotCopiesTest, HostWithRdmaKeepsTieredColdPagesInThePool) {
  RecordingStore store;
  const std::map<TierKind, TierCaps> up{{TierKind::local, {}}, {TierKind::cxl, {}}, {TierKind::file, {}},
                                        {TierKind::rdma, {}}};
  auto copies = store_copies(store, profiled("fn"), kData, kBlob, up);
  ASSERT_TRUE(copies) << copies.error().what();
  EXPECT_TRUE(copies->skipped.empty()) << copies->skipped.dump();
  ASSERT_EQ(copies->variants.size(), 4u);
  EXPECT_EQ((*variant(*copies, "tiered"))["cold_tier"], "rdma");
  EXPECT_EQ((*variant(*copies, "tiered"))["bytes_per_tier"], (json{{"cxl", 2 * kPageSize}, {"rdma", 2 * kPageSize}}));
  EXPECT_EQ((*variant(*copies, "rdma"))["cold_tier"], "rdma");
  EXPECT_EQ(blob_of(store.stored.at("fn"))["cold_tier"], "rdma");
}

TEST(SnapshotCopiesTest, ACopyTheStoreRefusesIsSkippedTheOthersAreKept) {
  RecordingStore store;
  store.full = {TierKind::file};
  const std::map<TierKind, TierCaps> up{{TierKind::local, {}}, {TierKind::cxl, {}}, {TierKind::file, {}}};
  auto copies = store_copies(store, profiled("fn"), kData, kBlob, up);
  ASSERT_TRUE(copies) << copies.error().what();
  ASSERT_EQ(copies->variants.size(), 2u);
  EXPECT_NE(variant(*copies, "cxl"), nullptr);
  EXPECT_NE(variant(*copies, "local"), nullptr);
  std::map<std::string, std::string> reasons;
  for (const auto& s : copies->skipped) reasons[s["placement"].get<std::string>()] = s["reason"].get<std::string>();
  ASSERT_EQ(reasons.size(), 2u);
  EXPECT_NE(reasons["tiered"].find("file tier is full"), std::string::npos) << reasons["tiered"];
  EXPECT_NE(reasons["rdma"].find("the rdma tier"), std::string::npos) << reasons["rdma"];
}

TEST(SnapshotCopiesTest, NoCopyAtAllOrAnOldCopyThatStaysIsAnError) {
  RecordingStore store;
  auto none = store_copies(store, profiled("fn"), kData, kBlob, {{TierKind::file, {}}});
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, Errc::unavailable);
  EXPECT_NE(none.error().message.find("the cxl tier"), std::string::npos) << none.error().message;
  store.remove_fails = true;
  auto stuck = store_copies(store, profiled("fn"), kData, kBlob, {{TierKind::cxl, {}}});
  ASSERT_FALSE(stuck);
  EXPECT_EQ(stuck.error().code, Errc::io);
  EXPECT_TRUE(store.stored.empty());
}

}  // namespace
}  // namespace snaptier::agent_detail
