// Verified pages of snapshot copies kept in host DRAM so that N restores of one copy read each
// page from a slow tier (rdma, file) once: a bounded, sharded LRU keyed by (copy id, copy
// generation, page index) with single-flight reads. Only SnapshotStore::read_pages fills it, and
// only with bytes that passed their CRC32C right after the tier read; a hit additionally requires
// the page entry to name the same tier, location and CRC the cached bytes were checked against,
// so a cached page is exactly as trustworthy as a freshly verified one.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "snaptier/error.hpp"
#include "snaptier/store.hpp"
#include "snaptier/tier.hpp"

namespace snaptier::store_detail {

struct PageKey {
  std::string copy;               // snapshot id
  std::uint64_t generation = 0;   // SnapshotInfo::created_unix_ns: a re-put id is another copy
  std::uint64_t page = 0;         // index into Snapshot::pages
  friend bool operator==(const PageKey&, const PageKey&) = default;
};

// The stored bytes a page entry names; a cached copy serves only an entry that names the same.
struct PageIdentity {
  TierKind tier = TierKind::local;
  std::uint64_t location = 0;
  std::uint32_t crc32c = 0;
  friend bool operator==(const PageIdentity&, const PageIdentity&) = default;
};

// Safe to call from any number of threads at once; a caller blocks only while waiting for
// another caller's read of the same page, which is bounded by that tier read.
class PageCache {
 private:
  struct Entry;

 public:
  // capacity_bytes is rounded down to whole pages; 0 makes a cache that holds nothing and never
  // claims (every acquire() is bypass).
  explicit PageCache(std::uint64_t capacity_bytes);
  ~PageCache();
  PageCache(const PageCache&) = delete;
  PageCache& operator=(const PageCache&) = delete;

  // The right to read one page from its tier and hand the verified bytes to fill(); every
  // caller that asks for the page meanwhile waits for it. Dropping a claim unfilled (a failed
  // tier read) lets the waiters read the page themselves.
  class Claim {
   public:
    Claim() = default;
    Claim(Claim&& other) noexcept;
    Claim& operator=(Claim&& other) noexcept;
    ~Claim();
    explicit operator bool() const noexcept { return entry_ != nullptr; }

   private:
    friend class PageCache;
    Claim(PageCache* cache, std::shared_ptr<Entry> entry) : cache_(cache), entry_(std::move(entry)) {}
    void release() noexcept;
    PageCache* cache_ = nullptr;
    std::shared_ptr<Entry> entry_;
  };

  enum class Outcome {
    hit,      // the page was cached: its bytes are in `out`
    joined,   // another caller was reading it: waited, its bytes are in `out`
    claimed,  // nobody has it: read it, verify it, then fill() or reject() the claim
    failed,   // the read this caller waited for failed its check: `error` says how
    bypass,   // not cacheable here (disabled, or the entry names other bytes): read uncached
  };
  struct Acquired {
    Outcome outcome = Outcome::bypass;
    Claim claim;                 // for claimed
    std::optional<Error> error;  // for failed
  };

  // `out` is one page. Waits while another caller reads the page.
  [[nodiscard]] Acquired acquire(const PageKey& key, const PageIdentity& identity, std::span<std::byte> out);
  // Claims the page only if nobody has it (cached or being read); never waits. For extending
  // one tier read over the pages that follow a claimed one.
  [[nodiscard]] Claim try_claim(const PageKey& key, const PageIdentity& identity);

  // `bytes` (one page) passed its check: cache them and hand them to the waiters.
  void fill(Claim claim, std::span<const std::byte> bytes);
  // The bytes failed their check: never cached; the waiters get `error`.
  void reject(Claim claim, Error error);

  // Drops every page of `copy` (any generation); reads of it in flight are not kept.
  void invalidate(const std::string& copy);

  [[nodiscard]] PageCacheStats stats() const;
  [[nodiscard]] std::uint64_t capacity_bytes() const noexcept { return capacity_bytes_; }

 private:
  struct KeyHash {
    std::size_t operator()(const PageKey& key) const noexcept;
  };
  struct Entry {
    PageKey key;
    PageIdentity identity;
    enum class State { reading, ready, failed, abandoned } state = State::reading;
    std::unique_ptr<std::byte[]> bytes;  // ready: one verified page, immutable from then on
    std::optional<Error> error;          // failed
    bool dropped = false;                // invalidated while being read: not kept when filled
    std::list<Entry*>::iterator lru;     // ready entries only; front = most recently used
  };
  struct Shard {
    std::mutex mutex;
    std::condition_variable done;
    std::unordered_map<PageKey, std::shared_ptr<Entry>, KeyHash> entries;
    std::list<Entry*> lru;
    std::uint64_t ready_pages = 0;
  };

  Shard& shard_of(const PageKey& key);
  void finish(Claim& claim, Entry::State state, std::span<const std::byte> bytes, std::optional<Error> error);

  std::uint64_t capacity_bytes_;
  std::uint64_t pages_per_shard_;
  std::vector<std::unique_ptr<Shard>> shards_;
  std::atomic<std::uint64_t> hits_{0}, joined_{0}, filled_{0}, rejected_{0}, evicted_{0}, invalidated_{0};
  std::atomic<std::uint64_t> ready_pages_{0};
};

}  // namespace snaptier::store_detail
