#include "store/page_cache.hpp"

#include <algorithm>
#include <cstring>
#include <functional>
#include <utility>

namespace snaptier::store_detail {

namespace {
// Enough shards that 16+ restores on 2..64 cores rarely meet on one lock, few enough that a
// small cache still holds a useful number of pages per shard.
constexpr std::uint64_t kMaxShards = 16;
constexpr std::uint64_t kMinPagesPerShard = 64;
}  // namespace

std::size_t PageCache::KeyHash::operator()(const PageKey& key) const noexcept {
  std::size_t h = std::hash<std::string>{}(key.copy);
  h ^= std::hash<std::uint64_t>{}(key.generation) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  h ^= std::hash<std::uint64_t>{}(key.page) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  return h;
}

PageCache::PageCache(std::uint64_t capacity_bytes)
    : capacity_bytes_(capacity_bytes / kPageSize * kPageSize) {
  const std::uint64_t pages = capacity_bytes_ / kPageSize;
  const std::uint64_t shards = std::clamp<std::uint64_t>(pages / kMinPagesPerShard, 1, kMaxShards);
  pages_per_shard_ = pages / shards;
  if (pages == 0) return;
  for (std::uint64_t i = 0; i < shards; ++i) shards_.push_back(std::make_unique<Shard>());
}

PageCache::~PageCache() = default;

PageCache::Claim::Claim(Claim&& other) noexcept
    : cache_(std::exchange(other.cache_, nullptr)), entry_(std::move(other.entry_)) {}

PageCache::Claim& PageCache::Claim::operator=(Claim&& other) noexcept {
  if (this != &other) {
    release();
    cache_ = std::exchange(other.cache_, nullptr);
    entry_ = std::move(other.entry_);
  }
  return *this;
}

PageCache::Claim::~Claim() { release(); }

// An unfilled claim (the tier read failed, or the caller gave up): the waiters read it themselves.
void PageCache::Claim::release() noexcept {
  if (entry_ && cache_) cache_->finish(*this, Entry::State::abandoned, {}, std::nullopt);
  entry_.reset();
  cache_ = nullptr;
}

PageCache::Shard& PageCache::shard_of(const PageKey& key) {
  return *shards_[KeyHash{}(key) % shards_.size()];
}

PageCache::Acquired PageCache::acquire(const PageKey& key, const PageIdentity& identity, std::span<std::byte> out) {
  if (shards_.empty()) return {};
  Shard& shard = shard_of(key);
  std::unique_lock lock(shard.mutex);
  for (;;) {
    auto it = shard.entries.find(key);
    if (it == shard.entries.end()) {
      auto entry = std::make_shared<Entry>();
      entry->key = key;
      entry->identity = identity;
      shard.entries.emplace(key, entry);
      return Acquired{Outcome::claimed, Claim(this, std::move(entry)), std::nullopt};
    }
    std::shared_ptr<Entry> entry = it->second;
    if (entry->identity != identity) return {};
    if (entry->state == Entry::State::ready) {
      shard.lru.splice(shard.lru.begin(), shard.lru, entry->lru);
      lock.unlock();
      // Ready bytes never change, and `entry` keeps them alive past an eviction.
      std::memcpy(out.data(), entry->bytes.get(), kPageSize);
      hits_.fetch_add(1, std::memory_order_relaxed);
      return Acquired{Outcome::hit, {}, std::nullopt};
    }
    shard.done.wait(lock, [&] { return entry->state != Entry::State::reading; });
    if (entry->state == Entry::State::ready) {
      lock.unlock();
      std::memcpy(out.data(), entry->bytes.get(), kPageSize);
      joined_.fetch_add(1, std::memory_order_relaxed);
      return Acquired{Outcome::joined, {}, std::nullopt};
    }
    if (entry->state == Entry::State::failed) return Acquired{Outcome::failed, {}, entry->error};
    // Abandoned: the entry is gone from the map; look again (and most likely claim it).
  }
}

PageCache::Claim PageCache::try_claim(const PageKey& key, const PageIdentity& identity) {
  if (shards_.empty()) return {};
  Shard& shard = shard_of(key);
  std::lock_guard lock(shard.mutex);
  if (shard.entries.contains(key)) return {};
  auto entry = std::make_shared<Entry>();
  entry->key = key;
  entry->identity = identity;
  shard.entries.emplace(key, entry);
  return Claim(this, std::move(entry));
}

void PageCache::fill(Claim claim, std::span<const std::byte> bytes) {
  finish(claim, Entry::State::ready, bytes, std::nullopt);
}

void PageCache::reject(Claim claim, Error error) {
  finish(claim, Entry::State::failed, {}, std::move(error));
}

void PageCache::finish(Claim& claim, Entry::State state, std::span<const std::byte> bytes,
                       std::optional<Error> error) {
  std::shared_ptr<Entry> entry = std::move(claim.entry_);
  claim.cache_ = nullptr;
  if (!entry) return;
  // Copied before the lock: the shard is held only for bookkeeping.
  std::unique_ptr<std::byte[]> copy;
  if (state == Entry::State::ready) {
    copy.reset(new std::byte[kPageSize]);
    std::memcpy(copy.get(), bytes.data(), kPageSize);
  }
  Shard& shard = shard_of(entry->key);
  {
    std::lock_guard lock(shard.mutex);
    entry->state = state;
    entry->error = std::move(error);
    entry->bytes = std::move(copy);
    const bool keep = state == Entry::State::ready && !entry->dropped;
    if (!keep) {
      // Waiters hold their own reference and read the outcome from it.
      if (!entry->dropped) shard.entries.erase(entry->key);
    } else {
      shard.lru.push_front(entry.get());
      entry->lru = shard.lru.begin();
      ++shard.ready_pages;
      ready_pages_.fetch_add(1, std::memory_order_relaxed);
      while (shard.ready_pages > pages_per_shard_) {
        Entry* victim = shard.lru.back();
        shard.lru.pop_back();
        --shard.ready_pages;
        ready_pages_.fetch_sub(1, std::memory_order_relaxed);
        evicted_.fetch_add(1, std::memory_order_relaxed);
        shard.entries.erase(victim->key);  // may destroy *victim: nothing touches it after
      }
    }
  }
  shard.done.notify_all();
  if (state == Entry::State::ready) filled_.fetch_add(1, std::memory_order_relaxed);
  if (state == Entry::State::failed) rejected_.fetch_add(1, std::memory_order_relaxed);
}

void PageCache::invalidate(const std::string& copy) {
  for (auto& shard : shards_) {
    std::lock_guard lock(shard->mutex);
    for (auto it = shard->entries.begin(); it != shard->entries.end();) {
      Entry& entry = *it->second;
      if (entry.key.copy != copy) {
        ++it;
        continue;
      }
      if (entry.state == Entry::State::ready) {
        shard->lru.erase(entry.lru);
        --shard->ready_pages;
        ready_pages_.fetch_sub(1, std::memory_order_relaxed);
        invalidated_.fetch_add(1, std::memory_order_relaxed);
      } else {
        entry.dropped = true;  // its reader still finishes and wakes its waiters
      }
      it = shard->entries.erase(it);
    }
  }
}

PageCacheStats PageCache::stats() const {
  return PageCacheStats{
      .capacity_bytes = capacity_bytes_,
      .used_bytes = ready_pages_.load(std::memory_order_relaxed) * kPageSize,
      .hits = hits_.load(std::memory_order_relaxed),
      .joined = joined_.load(std::memory_order_relaxed),
      .filled = filled_.load(std::memory_order_relaxed),
      .rejected = rejected_.load(std::memory_order_relaxed),
      .evicted = evicted_.load(std::memory_order_relaxed),
      .invalidated = invalidated_.load(std::memory_order_relaxed),
  };
}

}  // namespace snaptier::store_detail
