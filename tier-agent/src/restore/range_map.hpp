// A task's view of its snapshot: which snapshot address backs each current virtual address.
// Default (no segment): identity. Segments override it: `zero` (REMOVEd or UNMAPped: later faults
// are zero-filled, never re-served from the snapshot) or `shift` (moved by mremap: the page at
// `addr` is the snapshot's page at `addr + delta`).
#pragma once

#include <cstdint>
#include <iterator>
#include <map>
#include <vector>

namespace snaptier::restore {

class RangeMap {
 public:
  enum class Kind : std::uint8_t { zero, shift };
  struct Segment {
    std::uint64_t end = 0;
    Kind kind = Kind::shift;
    std::int64_t delta = 0;
  };
  struct Lookup {
    bool zero = false;
    std::uint64_t source = 0;    // snapshot address (if !zero)
    std::uint64_t run_end = 0;   // the same translation holds up to here (exclusive)
  };

  [[nodiscard]] Lookup translate(std::uint64_t addr) const {
    auto it = segs_.upper_bound(addr);
    if (it != segs_.begin()) {
      auto prev = std::prev(it);
      if (addr < prev->second.end) {
        const Segment& s = prev->second;
        return Lookup{s.kind == Kind::zero, addr + static_cast<std::uint64_t>(s.delta), s.end};
      }
    }
    return Lookup{false, addr, it == segs_.end() ? UINT64_MAX : it->first};
  }

  void assign(std::uint64_t start, std::uint64_t end, Kind kind, std::int64_t delta = 0) {
    if (start >= end) return;
    split(start);
    split(end);
    segs_.erase(segs_.lower_bound(start), segs_.lower_bound(end));
    if (!(kind == Kind::shift && delta == 0)) segs_.emplace(start, Segment{end, kind, delta});
  }

  // mremap moved [from, from+len) to [to, to+len): the new range keeps the old translation, the
  // old range is gone (zero).
  void move(std::uint64_t from, std::uint64_t to, std::uint64_t len) {
    struct Piece {
      std::uint64_t start, end;
      Kind kind;
      std::int64_t delta;
    };
    std::vector<Piece> pieces;
    for (std::uint64_t a = from; a < from + len;) {
      Lookup l = translate(a);
      std::uint64_t e = l.run_end < from + len ? l.run_end : from + len;
      pieces.push_back(Piece{a, e, l.zero ? Kind::zero : Kind::shift,
                             l.zero ? 0 : static_cast<std::int64_t>(l.source - a)});
      a = e;
    }
    assign(from, from + len, Kind::zero);
    const std::int64_t off = static_cast<std::int64_t>(to - from);
    for (const Piece& p : pieces) {
      assign(p.start + static_cast<std::uint64_t>(off), p.end + static_cast<std::uint64_t>(off),
             p.kind, p.kind == Kind::zero ? 0 : p.delta - off);
    }
  }

  [[nodiscard]] std::size_t segment_count() const noexcept { return segs_.size(); }

 private:
  void split(std::uint64_t at) {
    auto it = segs_.upper_bound(at);
    if (it == segs_.begin()) return;
    auto prev = std::prev(it);
    if (prev->first < at && at < prev->second.end) {
      Segment tail = prev->second;
      prev->second.end = at;
      segs_.emplace(at, tail);
    }
  }

  std::map<std::uint64_t, Segment> segs_;  // start -> segment, non-overlapping
};

}  // namespace snaptier::restore
