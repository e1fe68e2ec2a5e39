// Strict reading of a JSON object at the edge: typed getters that name the offending field, and
// a final check that rejects fields nobody asked for (a typo must not be silently ignored).
#pragma once

#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "core/try.hpp"
#include "snaptier/error.hpp"

namespace snaptier::control::detail {

class JsonReader {
 public:
  // `object` must outlive the reader. `prefix` names the object in errors ("args.").
  JsonReader(const nlohmann::json& object, std::string prefix) : object_(object), prefix_(std::move(prefix)) {}

  [[nodiscard]] tl::unexpected<Error> error(std::string_view key, std::string_view why) const {
    return fail(Errc::invalid_argument, "field \"" + prefix_ + std::string(key) + "\": " + std::string(why));
  }

  [[nodiscard]] const nlohmann::json* find(std::string_view key) {
    seen_.insert(std::string(key));
    auto it = object_.find(std::string(key));
    return it == object_.end() ? nullptr : &*it;
  }

  [[nodiscard]] Result<std::optional<std::string>> string(std::string_view key) {
    const nlohmann::json* value = find(key);
    if (value == nullptr) return std::optional<std::string>{};
    if (!value->is_string()) return error(key, std::string("expected a string, got ") + value->type_name());
    return std::optional<std::string>{value->get<std::string>()};
  }

  [[nodiscard]] Result<std::optional<bool>> boolean(std::string_view key) {
    const nlohmann::json* value = find(key);
    if (value == nullptr) return std::optional<bool>{};
    if (!value->is_boolean()) return error(key, "expected true or false");
    return std::optional<bool>{value->get<bool>()};
  }

  [[nodiscard]] Result<std::string> required_string(std::string_view key) {
    SNAPTIER_TRY(value, string(key));
    if (!value) return error(key, "required field is missing");
    return *value;
  }

  [[nodiscard]] Result<std::optional<std::uint64_t>> unsigned_integer(
      std::string_view key, std::uint64_t max = std::numeric_limits<std::uint64_t>::max()) {
    const nlohmann::json* value = find(key);
    if (value == nullptr) return std::optional<std::uint64_t>{};
    std::uint64_t number = 0;
    if (value->is_number_unsigned()) {
      number = value->get<std::uint64_t>();
    } else if (value->is_number_integer()) {
      return error(key, "must not be negative");
    } else {
      return error(key, std::string("expected a non-negative integer, got ") + value->type_name());
    }
    if (number > max) return error(key, "must be at most " + std::to_string(max));
    return std::optional<std::uint64_t>{number};
  }

  [[nodiscard]] Result<std::uint64_t> required_unsigned(
      std::string_view key, std::uint64_t max = std::numeric_limits<std::uint64_t>::max()) {
    SNAPTIER_TRY(value, unsigned_integer(key, max));
    if (!value) return error(key, "required field is missing");
    return *value;
  }

  // An absolute filesystem path: the agent's working directory is not the caller's.
  [[nodiscard]] Result<std::filesystem::path> required_absolute_path(std::string_view key) {
    SNAPTIER_TRY(value, required_string(key));
    return check_absolute_path(key, value);
  }

  [[nodiscard]] Result<std::filesystem::path> check_absolute_path(std::string_view key,
                                                                  const std::string& value) const {
    if (value.empty()) return error(key, "must not be empty");
    if (value.find('\0') != std::string::npos) return error(key, "must not contain NUL bytes");
    if (value.front() != '/') return error(key, "must be an absolute path, got \"" + value + "\"");
    return std::filesystem::path(value);
  }

  [[nodiscard]] Result<void> reject_unknown_fields() const {
    for (auto it = object_.begin(); it != object_.end(); ++it) {
      if (!seen_.contains(it.key())) return error(it.key(), "unknown field");
    }
    return {};
  }

 private:
  const nlohmann::json& object_;
  std::string prefix_;
  std::set<std::string> seen_;
};

}  // namespace snaptier::control::detail
