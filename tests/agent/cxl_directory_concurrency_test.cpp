// The CXL directory under concurrent callers: threads of one host share a directory, hosts are
// separate processes mapping one backing file (as two agents on two hosts map one device). They
// publish, remove and look up at once; afterwards every entry that should be there is, exactly
// once, byte-exact, and every arena byte is accounted for (no extent lost, leaked or shared).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cerrno>
#include <chrono>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "cxl/cache_model_access.hpp"
#include "cxl/crc32c.hpp"
#include "helpers/temp_dir.hpp"
#include "snaptier/cxl_directory.hpp"
#include "snaptier/tiers.hpp"

namespace snaptier {
namespace {

constexpr std::uint64_t kRegionSize = 32 << 20;
constexpr int kThreads = 3;
constexpr int kOps = 30;

std::vector<std::byte> manifest_of(const std::string& id) {
  const std::string text = "manifest of " + id;
  const auto raw = std::as_bytes(std::span(text.data(), text.size()));
  return {raw.begin(), raw.end()};
}

std::string id_of(std::uint32_t host, int thread, int op) {
  return "h" + std::to_string(host) + "-t" + std::to_string(thread) + "-" + std::to_string(op);
}

std::vector<std::byte> data_of(const std::string& id, int op) {
  std::vector<std::byte> bytes(4096 * (1 + op % 3));
  std::mt19937 rng(static_cast<unsigned>(std::hash<std::string>{}(id)));
  for (auto& b : bytes) b = static_cast<std::byte>(rng() & 0xFF);
  return bytes;
}

// The ops of one thread are fixed by its seed, so the parent knows which entries must be left.
// Op i publishes id i and then, for some i, removes an earlier id of the same thread.
struct Plan {
  std::vector<std::optional<int>> remove_after;  // per op: which earlier op's id to remove
  std::set<int> live;                            // ops whose ids stay published
};

Plan plan_of(std::uint32_t host, int thread) {
  Plan plan;
  std::mt19937 rng(1000 * host + thread);
  std::vector<int> published;
  for (int op = 0; op < kOps; ++op) {
    published.push_back(op);
    plan.remove_after.emplace_back();
    if (rng() % 3 == 0 && published.size() > 1) {
      const std::size_t pick = rng() % (published.size() - 1);
      plan.remove_after.back() = published[pick];
      published.erase(published.begin() + static_cast<std::ptrdiff_t>(pick));
    }
  }
  plan.live.insert(published.begin(), published.end());
  return plan;
}

struct Host {
  std::shared_ptr<CxlDirectory> directory;
  std::unique_ptr<Tier> tier;
};

Result<Host> attach(std::shared_ptr<RegionAccess> access, std::uint32_t index) {
  auto directory = CxlDirectory::attach(std::move(access), CxlAttachOptions{.host_index = index,
                                                                            .host_name = "host" + std::to_string(index)});
  if (!directory) return tl::unexpected(directory.error());
  auto tier = make_cxl_tier(*directory);
  if (!tier) return tl::unexpected(tier.error());
  return Host{*directory, std::move(*tier)};
}

// Looks `id` up and compares manifest and data. A snapshot removed between the lookup and the
// read of its pages may have had its space reused: that is only a failure if it is still there.
std::optional<std::string> check_visible(Host& host, const std::string& id, int op, bool* found = nullptr) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto record = host.directory->lookup(id);
    if (found != nullptr) *found = record.has_value();
    if (!record) {
      if (record.error().code == Errc::not_found) return std::nullopt;
      return id + ": " + record.error().what();
    }
    if (record->manifest != manifest_of(id)) return id + ": manifest differs";
    if (record->owned_extents.size() != 1) return id + ": " + std::to_string(record->owned_extents.size()) + " extents";
    const auto expected = data_of(id, op);
    std::vector<std::byte> got(expected.size());
    if (auto ok = host.tier->read(Extent{record->owned_extents[0].offset, got.size()}, 0, got); !ok) {
      return id + ": " + ok.error().what();
    }
    if (crc32c(got) == crc32c(expected) && got == expected) return std::nullopt;
  }
  return id + ": data differs while still published";
}

// One host: kThreads threads sharing one directory and tier, each running its plan while looking
// up what the others (on this and the other hosts) published. Returns what went wrong.
std::vector<std::string> run_host(Host& host, std::uint32_t index, std::uint32_t hosts) {
  std::vector<std::string> problems;
  std::mutex mutex;
  std::atomic<int> found_others{0};
  std::barrier start(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      auto note = [&](std::string what) {
        std::lock_guard lock(mutex);
        problems.push_back(std::move(what));
      };
      const Plan plan = plan_of(index, t);
      std::mt19937 rng(77 * index + t);
      start.arrive_and_wait();
      for (int op = 0; op < kOps; ++op) {
        const std::string id = id_of(index, t, op);
        const auto data = data_of(id, op);
        auto extent = host.tier->allocate(data.size());
        if (!extent) return note("allocate " + id + ": " + extent.error().what());
        if (auto ok = host.tier->write(*extent, 0, data); !ok) return note("write " + id + ": " + ok.error().what());
        const std::vector<Extent> owned{*extent};
        if (auto ok = host.directory->publish(id, manifest_of(id), owned); !ok) {
          return note("publish " + id + ": " + ok.error().what());
        }
        if (auto victim = plan.remove_after[op]) {
          if (auto ok = host.directory->remove(id_of(index, t, *victim)); !ok) {
            return note("remove " + id_of(index, t, *victim) + ": " + ok.error().what());
          }
        }
        for (int look = 0; look < 2; ++look) {
          const auto other = static_cast<std::uint32_t>(rng() % hosts);
          const int other_thread = static_cast<int>(rng() % kThreads);
          const int other_op = static_cast<int>(rng() % kOps);
          bool found = false;
          if (auto bad = check_visible(host, id_of(other, other_thread, other_op), other_op, &found)) return note(*bad);
          if (found && other != index) ++found_others;
        }
        if (op % 7 == 0) {
          if (auto listed = host.directory->list(); !listed) return note("list: " + listed.error().what());
        }
        std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
      }
    });
  }
  for (auto& thread : threads) thread.join();
  // However the hosts were scheduled, each must end up seeing what another published.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (found_others.load() == 0 && hosts > 1 && std::chrono::steady_clock::now() < deadline) {
    const std::uint32_t other = (index + 1) % hosts;
    for (int t = 0; t < kThreads && found_others.load() == 0; ++t) {
      for (int op : plan_of(other, t).live) {
        bool found = false;
        if (auto bad = check_visible(host, id_of(other, t, op), op, &found)) problems.push_back(*bad);
        if (found) {
          ++found_others;
          break;
        }
      }
    }
    if (found_others.load() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (problems.empty() && found_others.load() == 0) problems.push_back("never found another host's entry");
  for (const auto& p : host.directory->problems()) problems.push_back("directory problem: " + p.reason);
  return problems;
}

bool overlaps(Extent a, Extent b) { return a.offset < b.offset + b.length && b.offset < a.offset + a.length; }
std::uint64_t pages_of(std::uint64_t length) { return (length + 4095) / 4096 * 4096; }

class CxlDirectoryConcurrencyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = testing::make_region_file(dir_.path(), kRegionSize);
    region_ = *MappedRegion::open(path_);
    CacheModelAccess formatter(region_);
    ASSERT_TRUE(format_cxl_region(formatter, CxlFormatOptions{.host_count = kWorkers + 1, .log_entries_per_host = 512}));
  }

  // Everything the plans leave published is there exactly once and intact; the arena of each
  // worker holds exactly its live entries once every host has moved past every tombstone.
  void expect_invariants() {
    auto verifier = attach(std::make_shared<CacheModelAccess>(region_), kWorkers);
    ASSERT_TRUE(verifier) << verifier.error().what();
    std::set<std::string> expected;
    for (std::uint32_t h = 0; h < kWorkers; ++h) {
      for (int t = 0; t < kThreads; ++t) {
        for (int op : plan_of(h, t).live) expected.insert(id_of(h, t, op));
      }
    }
    auto listed = verifier->directory->list();
    ASSERT_TRUE(listed) << listed.error().what();
    std::set<std::string> found;
    for (const auto& entry : *listed) {
      EXPECT_TRUE(found.insert(entry.id).second) << entry.id << " listed twice";
      EXPECT_EQ(entry.owner_name, "host" + std::to_string(entry.owner_host)) << entry.id;
    }
    EXPECT_EQ(found, expected);

    std::map<std::uint32_t, std::uint64_t> live_bytes;
    std::vector<std::pair<Extent, std::string>> extents;
    for (const auto& entry : *listed) {
      auto record = verifier->directory->lookup(entry.id);
      ASSERT_TRUE(record) << record.error().what();
      const int op = std::stoi(entry.id.substr(entry.id.rfind('-') + 1));
      EXPECT_EQ(check_visible(*verifier, entry.id, op), std::nullopt);
      extents.emplace_back(Extent{entry.record.offset, pages_of(entry.record.length)}, entry.id + " record");
      live_bytes[entry.owner_host] += pages_of(entry.record.length);
      for (const Extent& e : record->owned_extents) {
        extents.emplace_back(e, entry.id + " pages");
        live_bytes[entry.owner_host] += e.length;
      }
    }
    for (std::size_t i = 0; i < extents.size(); ++i) {
      for (std::size_t j = i + 1; j < extents.size(); ++j) {
        EXPECT_FALSE(overlaps(extents[i].first, extents[j].first)) << extents[i].second << " and " << extents[j].second;
      }
    }
    EXPECT_TRUE(verifier->directory->problems().empty());

    // Restart every worker (arena recovery from its log), let every host replay everything,
    // then each arena holds its live entries and nothing else.
    std::vector<Host> workers;
    for (std::uint32_t h = 0; h < kWorkers; ++h) {
      auto worker = attach(std::make_shared<CacheModelAccess>(region_), h);
      ASSERT_TRUE(worker) << worker.error().what();
      EXPECT_EQ(worker->directory->arena_used_bytes(),
                live_bytes[h] + worker->directory->arena_pending_bytes()) << "host " << h;
      workers.push_back(std::move(*worker));
    }
    for (int round = 0; round < 2; ++round) {
      ASSERT_TRUE(verifier->directory->refresh());
      for (auto& worker : workers) ASSERT_TRUE(worker.directory->refresh());
    }
    for (std::uint32_t h = 0; h < kWorkers; ++h) {
      EXPECT_EQ(workers[h].directory->arena_pending_bytes(), 0u) << "host " << h;
      EXPECT_EQ(workers[h].directory->arena_used_bytes(), live_bytes[h]) << "host " << h;
      EXPECT_TRUE(workers[h].directory->problems().empty());
    }
  }

  static constexpr std::uint32_t kWorkers = 2;
  testing::TempDir dir_;
  std::filesystem::path path_;
  std::shared_ptr<MappedRegion> region_;
};

TEST_F(CxlDirectoryConcurrencyTest, ThreadsOfHostsInSeparateProcessesPublishRemoveAndLookUp) {
  // The hosts start together: each waits for the parent to close the pipe.
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  std::vector<pid_t> children;
  for (std::uint32_t h = 0; h < kWorkers; ++h) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(go[1]);
      char byte = 0;
      while (::read(go[0], &byte, 1) < 0 && errno == EINTR) {
      }
      // A host of its own: its own mapping of the backing file and its own private cache.
      std::vector<std::string> problems;
      auto region = MappedRegion::open(path_);
      if (!region) {
        problems.push_back(region.error().what());
      } else if (auto host = attach(std::make_shared<CacheModelAccess>(*region), h); !host) {
        problems.push_back(host.error().what());
      } else {
        problems = run_host(*host, h, kWorkers);
      }
      std::ofstream(dir_.path() / ("host" + std::to_string(h) + ".problems")) << (problems.empty() ? "" : problems.front());
      ::_exit(problems.empty() ? 0 : 1);
    }
    children.push_back(pid);
  }
  ::close(go[0]);
  ::close(go[1]);
  for (std::uint32_t h = 0; h < kWorkers; ++h) {
    int status = 0;
    ASSERT_EQ(::waitpid(children[h], &status, 0), children[h]);
    ASSERT_TRUE(WIFEXITED(status));
    std::ifstream in(dir_.path() / ("host" + std::to_string(h) + ".problems"));
    std::stringstream text;
    text << in.rdbuf();
    EXPECT_EQ(WEXITSTATUS(status), 0) << "host " << h << ": " << text.str();
  }
  expect_invariants();
}

// The same in one process with the production accessor: hosts are directories over one mapping,
// their threads interleave freely.
TEST_F(CxlDirectoryConcurrencyTest, ThreadsOfTwoHostsInOneProcessWithDirectAccess) {
  std::vector<Host> hosts;
  for (std::uint32_t h = 0; h < kWorkers; ++h) {
    auto host = attach(make_direct_region_access(region_), h);
    ASSERT_TRUE(host) << host.error().what();
    hosts.push_back(std::move(*host));
  }
  std::vector<std::vector<std::string>> problems(kWorkers);
  std::vector<std::thread> runners;
  for (std::uint32_t h = 0; h < kWorkers; ++h) {
    runners.emplace_back([&, h] { problems[h] = run_host(hosts[h], h, kWorkers); });
  }
  for (auto& runner : runners) runner.join();
  for (std::uint32_t h = 0; h < kWorkers; ++h) EXPECT_TRUE(problems[h].empty()) << problems[h].front();
  hosts.clear();
  expect_invariants();
}

}  // namespace
}  // namespace snaptier
