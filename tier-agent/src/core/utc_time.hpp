// One rendering of wall-clock times for people (status tables, error messages).
#pragma once

#include <cstdint>
#include <ctime>
#include <string>

namespace snaptier::detail {

// "2026-12-02T00:41:07Z" for a time in milliseconds since the epoch.
[[nodiscard]] inline std::string utc_time(std::uint64_t unix_ms) {
  const std::time_t seconds = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  ::gmtime_r(&seconds, &tm);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

}  // namespace snaptier::detail
