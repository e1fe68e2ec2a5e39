// Placements and restore policies (snaptier/restore_policy.hpp): what each policy name means
// (mechanism, stored placement, pages installed before resume) and where placements put pages.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "snaptier/restore_policy.hpp"

namespace snaptier::policy {
namespace {

constexpr std::uint64_t P = kPageSize;

TEST(RestorePolicyTest, EveryNamedPolicyHasItsMechanismAndPlacement) {
  struct Want {
    Mechanism mechanism;
    std::string placement;
  };
  const std::map<std::string, Want> want{
      {"criu-eager", {Mechanism::criu_eager, "cxl"}},
      {"criu-lazy", {Mechanism::criu_lazy, "cxl"}},
      {"criu-remote", {Mechanism::criu_remote, "cxl"}},
      {"lazy-cxl", {Mechanism::snaptier_lazy, "cxl"}},
      {"lazy-rdma", {Mechanism::snaptier_lazy, "rdma"}},
      {"lazy-local", {Mechanism::snaptier_lazy, "local"}},
      {"reap", {Mechanism::snaptier_lazy, "cxl"}},
      {"reap-local", {Mechanism::snaptier_lazy, "local"}},
      {"aquifer", {Mechanism::snaptier_lazy, "tiered"}},
      {"trenv", {Mechanism::snaptier_lazy, "cxl"}},
      {"cxlfork", {Mechanism::snaptier_lazy, "cxl"}},
      {"tiered", {Mechanism::snaptier_lazy, "tiered"}},
      {"faasnap", {Mechanism::snaptier_lazy, "cxl"}},
  };
  const auto names = policy_names();
  EXPECT_EQ(std::set<std::string>(names.begin(), names.end()).size(), names.size()) << "duplicate name";
  ASSERT_EQ(names.size(), want.size());
  for (const auto& name : names) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(want.contains(name)) << "a new policy needs a row here";
    auto policy = make_policy(name);
    ASSERT_TRUE(policy) << policy.error().what();
    EXPECT_EQ((*policy)->name(), name);
    EXPECT_EQ((*policy)->mechanism(), want.at(name).mechanism);
    EXPECT_EQ((*policy)->placement(), want.at(name).placement);
    // Every policy reads a placement that exists.
    auto placement = make_placement((*policy)->placement());
    ASSERT_TRUE(placement) << placement.error().what();
    EXPECT_EQ((*placement)->name(), (*policy)->placement());
  }
  EXPECT_EQ(to_string(Mechanism::criu_eager), "criu-eager");
  EXPECT_EQ(to_string(Mechanism::snaptier_lazy), "snaptier-lazy");
}

TEST(RestorePolicyTest, UnknownNamesAreRejectedWithTheKnownOnes) {
  for (const std::string name : {"", "fastest", "REAP", "tiered "}) {
    auto policy = make_policy(name);
    ASSERT_FALSE(policy) << "accepted '" << name << "'";
    EXPECT_EQ(policy.error().code, Errc::invalid_argument);
    for (const auto& known : policy_names()) {
      EXPECT_NE(policy.error().message.find(known), std::string::npos) << policy.error().message;
    }
  }
  auto placement = make_placement("nvme");
  ASSERT_FALSE(placement);
  EXPECT_EQ(placement.error().code, Errc::invalid_argument);
  std::set<std::string> placements;
  for (const auto& p : all_placements()) placements.insert(std::string(p->name()));
  EXPECT_EQ(placements, (std::set<std::string>{"tiered", "cxl", "rdma", "local"}));
  for (const auto& known : placements) {
    EXPECT_NE(placement.error().message.find(known), std::string::npos) << placement.error().message;
  }
}

// 8 lazy pages; 3 of them hot, touched in the order 0x5000, 0x1000, 0x7000.
std::vector<LazyPage> profiled_pages() {
  std::vector<LazyPage> pages;
  for (std::uint64_t i = 0; i < 8; ++i) pages.push_back(LazyPage{0x10000000 + i * P, page_read_only, 0, TierKind::rdma});
  pages[5].flags = page_hot | page_written;
  pages[5].touch_order = 1;
  pages[1].flags = page_hot | page_read_only;
  pages[1].touch_order = 2;
  pages[7].flags = page_hot | page_zero;
  pages[7].touch_order = 3;
  pages[3].touch_order = 9;  // an order without the hot flag is not a hot page
  return pages;
}

TEST(RestorePolicyTest, ReapAndTieredInstallTheHotPagesInTouchOrder) {
  const auto pages = profiled_pages();
  const std::vector<std::uint64_t> hot{0x10005000, 0x10001000, 0x10007000};
  for (const char* name : {"reap", "reap-local", "tiered"}) {
    SCOPED_TRACE(name);
    auto plan = (*make_policy(name))->plan(pages);
    EXPECT_EQ(plan.before_resume, hot);
    EXPECT_TRUE(plan.background.empty());
  }
  // The input order does not matter.
  auto reversed = pages;
  std::reverse(reversed.begin(), reversed.end());
  EXPECT_EQ((*make_policy("reap"))->plan(reversed).before_resume, hot);
  // Without a profile there is nothing to install.
  std::vector<LazyPage> cold(4, LazyPage{0x1000, 0, 0, TierKind::cxl});
  EXPECT_TRUE((*make_policy("tiered"))->plan(cold).before_resume.empty());
  EXPECT_TRUE((*make_policy("reap"))->plan({}).before_resume.empty());
}

// Aquifer: the working set before resume, then every cold non-zero page in the background
// (address order), so the instance stops depending on the pool; zero pages never leave it.
TEST(RestorePolicyTest, AquiferFetchesTheColdRestInTheBackground) {
  auto pages = profiled_pages();
  pages[4].flags = page_zero;  // cold and zero: nothing to fetch
  const auto plan = (*make_policy("aquifer"))->plan(pages);
  EXPECT_EQ(plan.before_resume, (std::vector<std::uint64_t>{0x10005000, 0x10001000, 0x10007000}));
  EXPECT_EQ(plan.background, (std::vector<std::uint64_t>{0x10000000, 0x10002000, 0x10003000, 0x10006000}));
  auto reversed = pages;
  std::reverse(reversed.begin(), reversed.end());
  EXPECT_EQ((*make_policy("aquifer"))->plan(reversed).background, plan.background);
  for (std::uint64_t a : plan.before_resume) {
    EXPECT_EQ(std::count(plan.background.begin(), plan.background.end(), a), 0) << "installed twice: " << a;
  }
}

// FaaSnap: every zero page (hot or cold) to the kernel before resume; the non-zero working set
// in the background in first-touch order; cold non-zero pages on demand only.
TEST(RestorePolicyTest, FaasnapZeroesBeforeResumeAndLoadsTheWorkingSetWhileTheFunctionRuns) {
  auto pages = profiled_pages();
  pages[4].flags = page_zero;                         // cold zero
  pages[6].flags = page_hot | page_written;           // hot, touched fourth
  pages[6].touch_order = 4;
  const auto plan = (*make_policy("faasnap"))->plan(pages);
  EXPECT_EQ(plan.before_resume, (std::vector<std::uint64_t>{0x10004000, 0x10007000}));
  EXPECT_EQ(plan.background, (std::vector<std::uint64_t>{0x10005000, 0x10001000, 0x10006000}));
  std::vector<LazyPage> cold(4, LazyPage{0x1000, page_read_only, 0, TierKind::cxl});
  const auto none = (*make_policy("faasnap"))->plan(cold);
  EXPECT_TRUE(none.before_resume.empty());
  EXPECT_TRUE(none.background.empty()) << "no profile, nothing loaded ahead";
}

TEST(RestorePolicyTest, CxlforkInstallsOnlyTheWrittenPagesBeforeResume) {
  auto pages = profiled_pages();
  pages[6].flags = page_hot | page_written | page_zero;
  pages[6].touch_order = 4;
  pages[2].flags = page_hot | page_written;
  pages[2].touch_order = 5;
  auto cxlfork = *make_policy("cxlfork");
  const auto plan = cxlfork->plan(pages);
  // Written pages in touch order; the hot read-only page 0x1000 is mapped, not copied; the
  // touched zero page 0x7000 (nothing to map) last.
  EXPECT_EQ(plan.before_resume, (std::vector<std::uint64_t>{0x10005000, 0x10006000, 0x10002000, 0x10007000}));
  EXPECT_TRUE(plan.background.empty());
  for (auto& p : pages) p.flags &= ~static_cast<std::uint32_t>(page_written);
  EXPECT_EQ(cxlfork->plan(pages).before_resume, (std::vector<std::uint64_t>{0x10006000, 0x10007000}))
      << "nothing written: nothing copied, only the touched zero pages zeroed";
}

// Policies that map pages in place install the touched zero pages (fresh ones included) before
// resume, in address order; untouched zero pages stay lazy; the others leave zero pages alone.
TEST(RestorePolicyTest, InPlacePoliciesZeroTheTouchedZeroPagesBeforeResume) {
  auto pages = profiled_pages();
  pages[4].flags = page_zero;  // untouched zero page: stays lazy
  const std::uint64_t fresh = 0x0fff3000;  // touched, not in the snapshot
  pages.push_back(LazyPage{fresh, page_hot | page_zero, 5, TierKind::local});
  EXPECT_EQ((*make_policy("trenv"))->plan(pages).before_resume, (std::vector<std::uint64_t>{fresh, 0x10007000}));
  EXPECT_EQ((*make_policy("cxlfork"))->plan(pages).before_resume,
            (std::vector<std::uint64_t>{0x10005000, fresh, 0x10007000}))
      << "the written page copied first, then the zero pages";
  auto tiered = (*make_policy("tiered"))->plan(pages).before_resume;
  EXPECT_EQ(std::count(tiered.begin(), tiered.end(), 0x10007000), 1) << "already hot: planned once";
  EXPECT_TRUE((*make_policy("lazy-cxl"))->plan(pages).before_resume.empty());
}

TEST(RestorePolicyTest, DemandOnlyPoliciesPlanNothing) {
  const auto pages = profiled_pages();
  for (const char* name : {"lazy-cxl", "lazy-rdma", "lazy-local", "criu-eager", "criu-lazy", "criu-remote"}) {
    SCOPED_TRACE(name);
    auto plan = (*make_policy(name))->plan(pages);
    EXPECT_TRUE(plan.before_resume.empty());
    EXPECT_TRUE(plan.background.empty());
  }
}

std::vector<PageEntry> entries(const std::vector<std::uint32_t>& flags) {
  std::vector<PageEntry> out;
  std::uint64_t a = 0x400000;
  for (auto f : flags) {
    PageEntry e;
    e.vaddr = a;
    e.flags = f;
    out.push_back(e);
    a += P;
  }
  return out;
}

// Hot pages on CXL, the rest on the cold tier, as the placement names it.
void expect_tiered_split(const std::map<TierKind, TierCaps>& up, TierKind cold) {
  const auto pages = entries({page_hot | page_written, 0, page_hot | page_read_only, page_read_only, page_zero, page_hot | page_zero});
  auto tiered = make_placement("tiered");
  ASSERT_TRUE(tiered);
  auto named = (*tiered)->cold_tier(up);
  ASSERT_TRUE(named) << named.error().what();
  EXPECT_EQ(*named, cold);
  auto request = (*tiered)->place(pages, up);
  ASSERT_TRUE(request) << request.error().what();
  EXPECT_EQ(request->default_tier, cold);
  ASSERT_EQ(request->per_page.size(), pages.size());
  auto tier_of = [&](std::size_t i) { return request->per_page[i].value_or(request->default_tier); };
  EXPECT_EQ(tier_of(0), TierKind::cxl);
  EXPECT_EQ(tier_of(1), cold);
  EXPECT_EQ(tier_of(2), TierKind::cxl);
  EXPECT_EQ(tier_of(3), cold);
  EXPECT_EQ(tier_of(5), TierKind::cxl);  // zero pages are not stored anyway
}

TEST(RestorePolicyTest, SmallColdGapsBetweenReadOnlyHotPagesGoToCxlWithThem) {
  constexpr std::uint32_t ro = page_hot | page_read_only;
  std::vector<std::uint32_t> flags{ro, 0, 0, ro};                 // 0-3: a gap of 2: filled
  for (int k = 0; k < 9; ++k) flags.push_back(0);                // 4-12: a gap of 9 > kInPlaceGapPages
  flags.insert(flags.end(), {ro, 0, page_hot | page_written,     // 13-15: a written page is no bound
                             0, ro, page_zero, ro, 0});          // 16-20: zero pages are not stored; no right bound
  static_assert(kInPlaceGapPages == 8, "the pattern above assumes gaps of 8 are filled and 9 are not");
  const std::vector<PageEntry> pages = entries(flags);
  const std::vector<bool> gaps = small_in_place_gaps(pages);
  std::vector<std::size_t> filled;
  for (std::size_t i = 0; i < gaps.size(); ++i)
    if (gaps[i]) filled.push_back(i);
  EXPECT_EQ(filled, (std::vector<std::size_t>{1, 2}));

  // The same gap of 8 fills; pages that are not adjacent in address do not make a gap.
  std::vector<PageEntry> eight(10);
  for (std::size_t i = 0; i < eight.size(); ++i) eight[i].vaddr = 0x400000 + i * P;
  eight.front().flags = eight.back().flags = ro;
  const auto whole = small_in_place_gaps(eight);
  EXPECT_EQ(std::count(whole.begin(), whole.end(), true), 8);
  eight[5].vaddr += 100 * P;
  for (std::size_t i = 6; i < eight.size(); ++i) eight[i].vaddr += 100 * P;
  const auto split = small_in_place_gaps(eight);
  EXPECT_EQ(std::count(split.begin(), split.end(), true), 0);

  // The tiered placement stores them in CXL; the large gap stays on the cold tier.
  const std::map<TierKind, TierCaps> up{{TierKind::cxl, {}}, {TierKind::rdma, {}}};
  auto request = (*make_placement("tiered"))->place(pages, up);
  ASSERT_TRUE(request) << request.error().what();
  auto tier_of = [&](std::size_t i) { return request->per_page[i].value_or(request->default_tier); };
  EXPECT_EQ(tier_of(1), TierKind::cxl);
  EXPECT_EQ(tier_of(2), TierKind::cxl);
  for (std::size_t i = 4; i <= 12; ++i) EXPECT_EQ(tier_of(i), TierKind::rdma) << i;
  EXPECT_EQ(tier_of(14), TierKind::rdma);
  EXPECT_EQ(tier_of(20), TierKind::rdma);
}

TEST(RestorePolicyTest, TieredPlacementPutsHotPagesOnCxlAndColdOnesInRdma) {
  const std::map<TierKind, TierCaps> up{{TierKind::local, {}}, {TierKind::cxl, {}}, {TierKind::rdma, {}}};
  expect_tiered_split(up, TierKind::rdma);
  // The pool wins over local disk when both are up.
  const std::map<TierKind, TierCaps> with_file{{TierKind::cxl, {}}, {TierKind::file, {}}, {TierKind::rdma, {}}};
  expect_tiered_split(with_file, TierKind::rdma);
  const auto pages = entries({page_hot, 0});
  for (const char* single : {"cxl", "rdma", "local"}) {
    auto placement = make_placement(single);
    auto all = (*placement)->place(pages, up);
    ASSERT_TRUE(all) << all.error().what();
    EXPECT_EQ(to_string(all->default_tier), single);
    EXPECT_EQ(to_string(*(*placement)->cold_tier(up)), single);
    for (const auto& p : all->per_page) EXPECT_FALSE(p.has_value());
  }
}

// A host without a memory node (the native testbed: CXL + file): cold pages on local disk.
TEST(RestorePolicyTest, TieredPlacementWithoutRdmaPutsColdPagesInTheFileTier) {
  const std::map<TierKind, TierCaps> up{{TierKind::local, {}}, {TierKind::cxl, {}}, {TierKind::file, {}}};
  expect_tiered_split(up, TierKind::file);
}

TEST(RestorePolicyTest, PlacementsNameTheTierThatIsNotUp) {
  const auto pages = entries({page_hot, 0});
  const std::map<TierKind, TierCaps> no_rdma{{TierKind::local, {}}, {TierKind::cxl, {}}};
  const std::map<TierKind, TierCaps> no_cxl{{TierKind::file, {}}, {TierKind::rdma, {}}};
  struct Case {
    const char* placement;
    const std::map<TierKind, TierCaps>* available;
    const char* missing;
  };
  // no_rdma has no file tier either: tiered has nowhere for its cold pages.
  for (const Case& c : {Case{"tiered", &no_rdma, "rdma or the file"}, Case{"tiered", &no_cxl, "cxl"},
                        Case{"rdma", &no_rdma, "rdma"}, Case{"cxl", &no_cxl, "cxl"},
                        Case{"local", &no_cxl, "local"}}) {
    SCOPED_TRACE(std::string(c.placement) + " without " + c.missing);
    auto placement = make_placement(c.placement);
    auto request = (*placement)->place(pages, *c.available);
    ASSERT_FALSE(request);
    EXPECT_EQ(request.error().code, Errc::unavailable);
    EXPECT_NE(request.error().message.find(std::string("the ") + c.missing + " tier"), std::string::npos)
        << request.error().message;
    EXPECT_NE(request.error().message.find(std::string("placement ") + c.placement), std::string::npos)
        << request.error().message;
  }
  EXPECT_TRUE((*make_placement("cxl"))->place(pages, no_rdma));
  EXPECT_TRUE((*make_placement("rdma"))->place(pages, no_cxl));
  // rdma (the placement lazy-rdma reads) keeps failing without RDMA, local disk or not.
  const std::map<TierKind, TierCaps> cxl_and_file{{TierKind::cxl, {}}, {TierKind::file, {}}};
  auto rdma = make_placement("rdma");
  for (auto result : {(*rdma)->cold_tier(cxl_and_file).map([](TierKind) {}),
                      (*rdma)->place(pages, cxl_and_file).map([](const PlacementRequest&) {})}) {
    ASSERT_FALSE(result);
    EXPECT_EQ(result.error().code, Errc::unavailable);
    EXPECT_NE(result.error().message.find("the rdma tier"), std::string::npos) << result.error().message;
  }
}

TEST(RestorePolicyTest, RestoresNeedEveryTierThatHoldsPages) {
  SnapshotInfo info;
  info.id = "fn:rdma";
  info.bytes_per_tier = {{TierKind::cxl, 0}, {TierKind::rdma, 8 * P}};
  const std::map<TierKind, TierCaps> no_rdma{{TierKind::cxl, {}}, {TierKind::file, {}}};
  auto refused = require_readable(info, no_rdma);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::unavailable);
  EXPECT_NE(refused.error().message.find("the rdma tier"), std::string::npos) << refused.error().message;
  EXPECT_NE(refused.error().message.find("fn:rdma"), std::string::npos) << refused.error().message;
  // A tier that holds no bytes is not needed; every tier that does is.
  info.bytes_per_tier = {{TierKind::cxl, 2 * P}, {TierKind::file, 6 * P}, {TierKind::rdma, 0}};
  EXPECT_TRUE(require_readable(info, no_rdma));
  EXPECT_FALSE(require_readable(info, {{TierKind::cxl, {}}}));
}

TEST(RestorePolicyTest, VariantIdsKeepTheBaseForTieredOnly) {
  EXPECT_EQ(variant_id("x", "tiered"), "x");
  EXPECT_EQ(variant_id("x", "cxl"), "x:cxl");
  EXPECT_EQ(variant_id("matmul", "rdma"), "matmul:rdma");
  // Every policy's placement gives a distinct stored copy.
  std::set<std::string> ids;
  for (const auto& p : all_placements()) ids.insert(variant_id("fn", p->name()));
  EXPECT_EQ(ids, (std::set<std::string>{"fn", "fn:cxl", "fn:rdma", "fn:local"}));
}

}  // namespace
}  // namespace snaptier::policy
