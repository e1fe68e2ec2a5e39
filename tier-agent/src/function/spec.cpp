// Function folders (function.toml) and the output check of `invoke --check`, without the
// function's own code: mirrors workloads/runtime/function_folder.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <system_error>

#include <toml++/toml.h>

#include "snaptier/function.hpp"

namespace snaptier::function {
namespace {

using nlohmann::json;

constexpr const char* kMetadata = "function.toml";

json toml_to_json(const toml::node& node) {
  switch (node.type()) {
    case toml::node_type::table: {
      json object = json::object();
      for (const auto& [key, value] : *node.as_table()) object[std::string(key.str())] = toml_to_json(value);
      return object;
    }
    case toml::node_type::array: {
      json array = json::array();
      for (const auto& value : *node.as_array()) array.push_back(toml_to_json(value));
      return array;
    }
    case toml::node_type::string: return node.as_string()->get();
    case toml::node_type::integer: return static_cast<std::int64_t>(node.as_integer()->get());
    case toml::node_type::floating_point: return node.as_floating_point()->get();
    case toml::node_type::boolean: return node.as_boolean()->get();
    case toml::node_type::date: {
      std::ostringstream text;
      text << node.as_date()->get();
      return text.str();
    }
    case toml::node_type::time: {
      std::ostringstream text;
      text << node.as_time()->get();
      return text.str();
    }
    case toml::node_type::date_time: {
      std::ostringstream text;
      text << node.as_date_time()->get();
      return text.str();
    }
    default: return nullptr;
  }
}

std::string kind_of(const json& value) {
  if (value.is_boolean()) return "a boolean";
  if (value.is_number()) return "a number";
  if (value.is_string()) return "a string";
  if (value.is_null()) return "null";
  if (value.is_array()) return "an array";
  if (value.is_object()) return "an object";
  return "a value";
}

std::string shown(const json& value) {
  constexpr std::size_t kMax = 200;
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > kMax) text = text.substr(0, kMax) + "...";
  return text;
}

// A JSON number or boolean as Python sees it (bool is an int there).
struct Number {
  enum { integer, unsigned_integer, floating } kind;
  std::int64_t i = 0;
  std::uint64_t u = 0;
  double d = 0;
};

Number number_of(const json& value) {
  if (value.is_boolean()) return {Number::integer, value.get<bool>() ? 1 : 0, 0, 0};
  if (value.is_number_unsigned()) return {Number::unsigned_integer, 0, value.get<std::uint64_t>(), 0};
  if (value.is_number_integer()) return {Number::integer, value.get<std::int64_t>(), 0, 0};
  return {Number::floating, 0, 0, value.get<double>()};
}

// Python compares int and float exactly (2**53 + 1 != 2.0**53), unlike a cast to double.
bool float_equals_int(double d, std::int64_t i) {
  if (!std::isfinite(d) || std::trunc(d) != d) return false;
  if (d < -9223372036854775808.0 || d >= 9223372036854775808.0) return false;
  return static_cast<std::int64_t>(d) == i;
}
bool float_equals_uint(double d, std::uint64_t u) {
  if (!std::isfinite(d) || std::trunc(d) != d) return false;
  if (d < 0 || d >= 18446744073709551616.0) return false;
  return static_cast<std::uint64_t>(d) == u;
}

bool numbers_equal(const Number& a, const Number& b) {
  if (a.kind == Number::floating && b.kind == Number::floating) return a.d == b.d;
  if (a.kind == Number::floating) return b.kind == Number::integer ? float_equals_int(a.d, b.i) : float_equals_uint(a.d, b.u);
  if (b.kind == Number::floating) return numbers_equal(b, a);
  if (a.kind == Number::integer && b.kind == Number::integer) return a.i == b.i;
  if (a.kind == Number::unsigned_integer && b.kind == Number::unsigned_integer) return a.u == b.u;
  const Number& s = a.kind == Number::integer ? a : b;
  const Number& u = a.kind == Number::integer ? b : a;
  return s.i >= 0 && static_cast<std::uint64_t>(s.i) == u.u;
}

}  // namespace

Result<FunctionSpec> load_spec(const std::filesystem::path& function_dir) {
  std::error_code ec;
  std::filesystem::path dir = std::filesystem::absolute(function_dir, ec).lexically_normal();
  if (ec) dir = function_dir;
  if (dir.has_parent_path() && !dir.has_filename()) dir = dir.parent_path();  // "x/" -> "x"
  if (!std::filesystem::is_directory(dir, ec)) {
    return fail(Errc::not_found, dir.string() + " is not a function folder: no such directory");
  }
  const std::filesystem::path metadata_path = dir / kMetadata;
  if (!std::filesystem::is_regular_file(metadata_path, ec)) {
    return fail(Errc::not_found, dir.string() + " is not a function folder: no " + kMetadata);
  }

  // toml++ reports syntax errors by exception (TOML_EXCEPTIONS is on in every build we use);
  // this is start-up code, never a fault path.
  toml::table root;
  try {
    root = toml::parse_file(metadata_path.string());
  } catch (const toml::parse_error& e) {
    const auto& where = e.source().begin;
    return fail(Errc::invalid_argument, metadata_path.string() + ":" + std::to_string(where.line) + ":" +
                                            std::to_string(where.column) + ": " + std::string(e.description()));
  }
  const auto wrong_type = [&](const std::string& key, const std::string& expected, const toml::node& node) {
    return fail(Errc::invalid_argument, metadata_path.string() + ": " + key + " must be " + expected + ", got " +
                                            kind_of(toml_to_json(node)));
  };

  FunctionSpec spec;
  spec.dir = dir;
  spec.name = dir.filename().string();
  if (const toml::node* name = root.get("name")) {  // the runtime honours it too
    if (!name->is_string()) return wrong_type("name", "a string", *name);
    spec.name = name->as_string()->get();
  }
  if (const toml::node* description = root.get("description")) {
    if (!description->is_string()) return wrong_type("description", "a string", *description);
    spec.description = description->as_string()->get();
  }
  spec.config = json::object();
  if (const toml::node* config = root.get("config")) {
    if (!config->is_table()) return wrong_type("config", "a table", *config);
    spec.config = toml_to_json(*config);
  }
  spec.expect = json::object();
  if (const toml::node* example = root.get("example")) {
    if (!example->is_table()) return wrong_type("example", "a table", *example);
    const toml::table& table = *example->as_table();
    if (const toml::node* input = table.get("input")) {
      if (!input->is_table()) return wrong_type("example.input", "a table (a JSON object)", *input);
      spec.example_input = toml_to_json(*input);
    }
    if (const toml::node* expect = table.get("expect")) {
      if (!expect->is_table()) return wrong_type("example.expect", "a table", *expect);
      spec.expect = toml_to_json(*expect);
    }
  }
  return spec;
}

Result<std::vector<std::string>> list_functions(const std::filesystem::path& workloads_dir) {
  std::error_code ec;
  std::filesystem::directory_iterator entries(workloads_dir, ec);
  if (ec) return fail(Errc::not_found, "cannot list " + workloads_dir.string() + ": " + ec.message());
  std::vector<std::string> names;
  for (; entries != std::filesystem::directory_iterator(); entries.increment(ec)) {
    if (ec) break;
    const auto& entry = *entries;
    std::error_code entry_ec;
    if (entry.is_directory(entry_ec) && std::filesystem::is_regular_file(entry.path() / kMetadata, entry_ec)) {
      names.push_back(entry.path().filename().string());
    }
  }
  if (ec) return fail(Errc::io, "cannot list " + workloads_dir.string() + ": " + ec.message());
  std::sort(names.begin(), names.end());
  return names;
}

bool python_equal(const json& a, const json& b) {
  const bool a_number = a.is_number() || a.is_boolean();
  const bool b_number = b.is_number() || b.is_boolean();
  if (a_number || b_number) return a_number && b_number && numbers_equal(number_of(a), number_of(b));
  if (a.type() != b.type()) return false;
  if (a.is_string()) return a.get_ref<const std::string&>() == b.get_ref<const std::string&>();
  if (a.is_null()) return true;
  if (a.is_array()) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
      if (!python_equal(a[i], b[i])) return false;
    }
    return true;
  }
  if (a.is_object()) {
    if (a.size() != b.size()) return false;
    for (auto it = a.begin(); it != a.end(); ++it) {
      const auto other = b.find(it.key());
      if (other == b.end() || !python_equal(it.value(), *other)) return false;
    }
    return true;
  }
  return a == b;  // binary values: not produced by parsing JSON or TOML
}

std::vector<std::string> check_expect(const json& output, const json& expect) {
  std::vector<std::string> problems;
  if (expect.is_null() || (expect.is_object() && expect.empty())) return problems;
  if (!expect.is_object()) {
    problems.push_back("[example.expect] is " + kind_of(expect) + ", not a table");
    return problems;
  }
  if (!output.is_object()) {
    problems.push_back("output is " + kind_of(output) + ", expected an object");
    return problems;
  }
  for (auto it = expect.begin(); it != expect.end(); ++it) {
    const auto found = output.find(it.key());
    if (found == output.end()) {
      problems.push_back("output has no field '" + it.key() + "'");
      continue;
    }
    if (python_equal(*found, it.value())) continue;
    std::string problem = "output." + it.key() + " = " + shown(*found) + ", expected " + shown(it.value());
    const std::string got_kind = kind_of(*found);
    const std::string expected_kind = kind_of(it.value());
    const bool both_numeric = (found->is_number() || found->is_boolean()) && (it.value().is_number() || it.value().is_boolean());
    if (got_kind != expected_kind && !both_numeric) problem += " (" + got_kind + ", expected " + expected_kind + ")";
    problems.push_back(std::move(problem));
  }
  return problems;
}

}  // namespace snaptier::function
