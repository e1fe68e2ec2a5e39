// The control plane's wire codec: addresses, framing, request/response envelopes and the typed
// commands. Everything that turns bytes into values lives here so that it can be tested alone.
#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <string>
#include <type_traits>
#include <vector>

#include <boost/asio/ip/address.hpp>

#include "control/json_reader.hpp"
#include "snaptier/control.hpp"

namespace snaptier {

using nlohmann::json;

std::string NetAddress::to_string() const {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

namespace {

bool is_dns_name(std::string_view host) {
  if (host.empty() || host.size() > 253) return false;
  std::size_t label = 0;
  for (char c : host) {
    if (c == '.') {
      if (label == 0) return false;
      label = 0;
      continue;
    }
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-')) return false;
    if (++label > 63) return false;
  }
  return label > 0;
}

}  // namespace

Result<NetAddress> parse_net_address(std::string_view text, bool allow_port_zero) {
  auto invalid = [&](std::string_view why) {
    return fail(Errc::invalid_argument, "invalid address \"" + std::string(text) + "\": " +
                                            std::string(why) + " (expected HOST:PORT or [IPv6]:PORT)");
  };
  NetAddress address;
  std::string_view port_text;
  if (!text.empty() && text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string_view::npos) return invalid("missing ']'");
    address.host = std::string(text.substr(1, close - 1));
    if (close + 1 >= text.size() || text[close + 1] != ':') return invalid("missing :PORT");
    port_text = text.substr(close + 2);
    boost::system::error_code ec;
    boost::asio::ip::make_address_v6(address.host, ec);
    if (ec) return invalid("not an IPv6 address inside []");
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string_view::npos) return invalid("missing :PORT");
    address.host = std::string(text.substr(0, colon));
    port_text = text.substr(colon + 1);
    if (address.host.find(':') != std::string::npos) return invalid("IPv6 addresses must be in brackets");
    bool looks_numeric = !address.host.empty() &&
        std::all_of(address.host.begin(), address.host.end(),
                    [](char c) { return std::isdigit(static_cast<unsigned char>(c)) || c == '.'; });
    if (looks_numeric) {
      boost::system::error_code ec;
      boost::asio::ip::make_address_v4(address.host, ec);
      if (ec) return invalid("not an IPv4 address");
    } else if (!is_dns_name(address.host)) {
      return invalid("not an IP address or host name");
    }
  }
  if (port_text.empty()) return invalid("empty port");
  unsigned port = 0;
  auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (ec != std::errc{} || end != port_text.data() + port_text.size() || port > 65535) {
    return invalid("port must be a number 0-65535");
  }
  if (port == 0 && !allow_port_zero) return invalid("port 0 is not a reachable port");
  address.port = static_cast<std::uint16_t>(port);
  return address;
}

namespace control {

using detail::JsonReader;

namespace {

constexpr std::array<std::pair<Errc, std::string_view>, 12> kErrcNames{{
    {Errc::invalid_argument, "invalid_argument"},
    {Errc::not_found, "not_found"},
    {Errc::already_exists, "already_exists"},
    {Errc::no_space, "no_space"},
    {Errc::corrupt, "corrupt"},
    {Errc::io, "io"},
    {Errc::unsupported, "unsupported"},
    {Errc::timeout, "timeout"},
    {Errc::unavailable, "unavailable"},
    {Errc::permission_denied, "permission_denied"},
    {Errc::protocol, "protocol"},
    {Errc::busy, "busy"},
}};

constexpr std::array<std::pair<TierKind, std::string_view>, 4> kTierNames{{
    {TierKind::local, "local"},
    {TierKind::file, "file"},
    {TierKind::cxl, "cxl"},
    {TierKind::rdma, "rdma"},
}};

// Serialization must never throw on odd bytes (a path in an error message may not be UTF-8).
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// Snapshot ids and blob names become file names and CXL directory keys in the store; the rule
// is the store's (1..63 of [A-Za-z0-9._:-], no leading '.'), checked here so that a bad id is
// an invalid_argument naming the field rather than an error from deep inside a tier.
constexpr std::size_t kMaxNameLength = 63;

Result<std::string> check_name(JsonReader& reader, std::string_view key, const std::string& value) {
  if (value.empty()) return reader.error(key, "must not be empty");
  if (value.size() > kMaxNameLength) {
    return reader.error(key, "longer than " + std::to_string(kMaxNameLength) + " characters");
  }
  if (value.front() == '.') return reader.error(key, "must not start with '.'");
  for (char c : value) {
    bool allowed = std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-' || c == ':';
    if (!allowed) return reader.error(key, "may contain only letters, digits, '.', '_', ':' and '-'");
  }
  return value;
}

Result<std::string> snapshot_id(JsonReader& reader) {
  SNAPTIER_TRY(id, reader.required_string("id"));
  return check_name(reader, "id", id);
}

using CommandParser = Result<Command> (*)(JsonReader&, const json& args);

Result<Command> parse_put(JsonReader& reader, const json& args) {
  SnapshotPut put;
  SNAPTIER_TRY(id, snapshot_id(reader));
  put.id = id;
  SNAPTIER_TRY(path, reader.required_absolute_path("path"));
  put.data_path = path;
  SNAPTIER_TRY(base, reader.unsigned_integer("base_vaddr"));
  put.base_vaddr = base.value_or(0);
  if (put.base_vaddr % 4096 != 0) return reader.error("base_vaddr", "must be page aligned (a multiple of 4096)");
  SNAPTIER_TRY(tier, reader.string("tier"));
  if (tier) {
    auto kind = tier_kind_from_name(*tier);
    if (!kind) return reader.error("tier", "must be one of local, file, cxl, rdma; got \"" + *tier + "\"");
    put.tier = *kind;
  }
  if (const json* metadata = reader.find("metadata")) {
    if (!metadata->is_object()) return reader.error("metadata", "expected an object {name: path}");
    JsonReader blobs(*metadata, "args.metadata.");
    for (auto it = metadata->begin(); it != metadata->end(); ++it) {
      SNAPTIER_TRY(name, check_name(blobs, it.key(), it.key()));
      if (!it->is_string()) return blobs.error(it.key(), "expected a path string");
      SNAPTIER_TRY(blob_path, blobs.check_absolute_path(it.key(), it->get<std::string>()));
      put.metadata.emplace(name, blob_path);
    }
  }
  (void)args;
  return put;
}

Result<Command> parse_ping(JsonReader&, const json&) { return Ping{}; }
Result<Command> parse_status(JsonReader&, const json&) { return Status{}; }
Result<Command> parse_list(JsonReader&, const json&) { return SnapshotList{}; }
Result<Command> parse_info(JsonReader& reader, const json&) {
  SNAPTIER_TRY(id, snapshot_id(reader));
  return SnapshotInfoQuery{id};
}
Result<Command> parse_read(JsonReader& reader, const json&) {
  SNAPTIER_TRY(id, snapshot_id(reader));
  SNAPTIER_TRY(path, reader.required_absolute_path("path"));
  return SnapshotRead{id, path};
}
Result<Command> parse_delete(JsonReader& reader, const json&) {
  SNAPTIER_TRY(id, snapshot_id(reader));
  return SnapshotDelete{id};
}
Result<Command> parse_rdma_connect(JsonReader& reader, const json&) {
  const json* endpoint = reader.find("endpoint");
  if (endpoint == nullptr) return reader.error("endpoint", "required field is missing");
  SNAPTIER_TRY(decoded, decode_endpoint(*endpoint));
  return RdmaConnect{decoded};
}
Result<Command> parse_rdma_alloc(JsonReader& reader, const json&) {
  SNAPTIER_TRY(length, reader.required_unsigned("length"));
  if (length == 0) return reader.error("length", "must be positive");
  return RdmaAlloc{length};
}
Result<Command> parse_rdma_free(JsonReader& reader, const json&) {
  SNAPTIER_TRY(offset, reader.required_unsigned("offset"));
  SNAPTIER_TRY(length, reader.required_unsigned("length"));
  if (length == 0) return reader.error("length", "must be positive");
  return RdmaFree{Extent{offset, length}};
}

// Function and host names: a folder name / a [peers] key, never a path.
Result<std::string> check_plain_name(JsonReader& reader, std::string_view key, const std::string& value) {
  if (value.empty()) return reader.error(key, "must not be empty");
  if (value.size() > kMaxNameLength) return reader.error(key, "longer than " + std::to_string(kMaxNameLength) + " characters");
  if (value.front() == '.' || value.front() == '-') return reader.error(key, "must not start with '.' or '-'");
  for (char c : value) {
    bool allowed = std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
    if (!allowed) return reader.error(key, "may contain only letters, digits, '.', '_' and '-'");
  }
  return value;
}

Result<std::optional<std::string>> optional_host(JsonReader& reader) {
  SNAPTIER_TRY(host, reader.string("host"));
  if (!host) return std::optional<std::string>{};
  SNAPTIER_TRY(checked, check_plain_name(reader, "host", *host));
  return std::optional<std::string>{checked};
}

Result<Command> parse_function_snapshot(JsonReader& reader, const json&) {
  FunctionSnapshot c;
  SNAPTIER_TRY(function, reader.required_string("function"));
  SNAPTIER_TRY(checked, check_plain_name(reader, "function", function));
  c.function = checked;
  SNAPTIER_TRY(id, reader.string("id"));
  if (id) {
    SNAPTIER_TRY(checked_id, check_name(reader, "id", *id));
    // ':' separates a snapshot from its placement variants ("matmul:cxl").
    if (checked_id.find(':') != std::string::npos) return reader.error("id", "must not contain ':'");
    c.id = checked_id;
  }
  SNAPTIER_TRY(host, optional_host(reader));
  c.host = host;
  return c;
}

Result<Command> parse_function_restore(JsonReader& reader, const json&) {
  FunctionRestore c;
  SNAPTIER_TRY(id, snapshot_id(reader));
  c.snapshot = id;
  SNAPTIER_TRY(policy, reader.required_string("policy"));
  SNAPTIER_TRY(checked_policy, check_plain_name(reader, "policy", policy));
  c.policy = checked_policy;
  SNAPTIER_TRY(host, optional_host(reader));
  c.host = host;
  SNAPTIER_TRY(keep, reader.boolean("keep"));
  c.keep = keep.value_or(false);
  SNAPTIER_TRY(measure_limit, reader.boolean("measure_limit"));
  c.measure_limit = measure_limit.value_or(false);
  SNAPTIER_TRY(instances, reader.unsigned_integer("instances", 256));
  if (instances) {
    if (*instances < 1) return reader.error("instances", "must be 1..256");
    c.instances = static_cast<std::uint32_t>(*instances);
  }
  return c;
}

Result<Command> parse_function_instances(JsonReader&, const json&) { return FunctionInstances{}; }

Result<Command> parse_function_kill(JsonReader& reader, const json&) {
  FunctionKill c;
  SNAPTIER_TRY(instance, reader.required_string("instance"));
  const bool plain = !instance.empty() && instance.size() <= 128 &&
                     std::all_of(instance.begin(), instance.end(), [](unsigned char ch) {
                       return std::isalnum(ch) != 0 || ch == '.' || ch == '_' || ch == ':' || ch == '-';
                     });
  if (!plain) return reader.error("instance", "must be an id from function.instances");
  c.instance = instance;
  return c;
}

Result<Command> parse_function_serve_lazy(JsonReader& reader, const json&) {
  FunctionServeLazy c;
  SNAPTIER_TRY(id, snapshot_id(reader));
  c.snapshot = id;
  SNAPTIER_TRY(address, reader.required_string("address"));
  boost::system::error_code ec;
  boost::asio::ip::make_address(address, ec);
  if (ec) return reader.error("address", "must be an IP address, got \"" + address + "\"");
  c.address = address;
  SNAPTIER_TRY(port, reader.required_unsigned("port", 65535));
  if (port < 1024) return reader.error("port", "must be 1024..65535");
  c.port = static_cast<std::uint16_t>(port);
  return c;
}

struct OpEntry {
  std::string_view name;
  CommandParser parse;
};

// Op names, in Command's alternative order (op_name() indexes this table).
constexpr std::array<OpEntry, std::variant_size_v<Command>> kOps{{
    {"ping", parse_ping},
    {"status", parse_status},
    {"snapshot.put", parse_put},
    {"snapshot.list", parse_list},
    {"snapshot.info", parse_info},
    {"snapshot.read", parse_read},
    {"snapshot.delete", parse_delete},
    {"rdma.connect", parse_rdma_connect},
    {"rdma.alloc", parse_rdma_alloc},
    {"rdma.free", parse_rdma_free},
    {"function.snapshot", parse_function_snapshot},
    {"function.restore", parse_function_restore},
    {"function.serve_lazy", parse_function_serve_lazy},
    {"function.instances", parse_function_instances},
    {"function.kill", parse_function_kill},
}};

json encode_args(const Command& command) {
  return std::visit(
      [](const auto& c) -> json {
        using T = std::decay_t<decltype(c)>;
        if constexpr (std::is_same_v<T, SnapshotPut>) {
          json args{{"id", c.id}, {"path", c.data_path.string()}};
          if (c.base_vaddr != 0) args["base_vaddr"] = c.base_vaddr;
          if (c.tier) args["tier"] = tier_kind_name(*c.tier);
          if (!c.metadata.empty()) {
            json metadata = json::object();
            for (const auto& [name, path] : c.metadata) metadata[name] = path.string();
            args["metadata"] = metadata;
          }
          return args;
        } else if constexpr (std::is_same_v<T, SnapshotInfoQuery> || std::is_same_v<T, SnapshotDelete>) {
          return json{{"id", c.id}};
        } else if constexpr (std::is_same_v<T, SnapshotRead>) {
          return json{{"id", c.id}, {"path", c.output_path.string()}};
        } else if constexpr (std::is_same_v<T, RdmaConnect>) {
          return json{{"endpoint", encode_endpoint(c.client)}};
        } else if constexpr (std::is_same_v<T, RdmaAlloc>) {
          return json{{"length", c.length}};
        } else if constexpr (std::is_same_v<T, RdmaFree>) {
          return encode_extent(c.extent);
        } else if constexpr (std::is_same_v<T, FunctionSnapshot>) {
          json args{{"function", c.function}};
          if (c.id) args["id"] = *c.id;
          if (c.host) args["host"] = *c.host;
          return args;
        } else if constexpr (std::is_same_v<T, FunctionServeLazy>) {
          return json{{"id", c.snapshot}, {"address", c.address}, {"port", c.port}};
        } else if constexpr (std::is_same_v<T, FunctionRestore>) {
          json args{{"id", c.snapshot}, {"policy", c.policy}};
          if (c.host) args["host"] = *c.host;
          if (c.keep) args["keep"] = true;
          if (c.measure_limit) args["measure_limit"] = true;
          if (c.instances) args["instances"] = *c.instances;
          return args;
        } else if constexpr (std::is_same_v<T, FunctionKill>) {
          return json{{"instance", c.instance}};
        } else {
          return json::object();
        }
      },
      command);
}

}  // namespace

std::string_view errc_name(Errc code) noexcept {
  for (const auto& [errc, name] : kErrcNames) {
    if (errc == code) return name;
  }
  return "protocol";
}

std::optional<Errc> errc_from_name(std::string_view name) noexcept {
  for (const auto& [errc, known] : kErrcNames) {
    if (known == name) return errc;
  }
  return std::nullopt;
}

std::string_view tier_kind_name(TierKind kind) noexcept {
  for (const auto& [k, name] : kTierNames) {
    if (k == kind) return name;
  }
  return "unknown";
}

std::optional<TierKind> tier_kind_from_name(std::string_view name) noexcept {
  for (const auto& [kind, known] : kTierNames) {
    if (known == name) return kind;
  }
  return std::nullopt;
}

std::string_view op_name(const Command& command) noexcept { return kOps[command.index()].name; }

bool is_long_running(const Command& command) noexcept {
  return std::holds_alternative<FunctionSnapshot>(command) || std::holds_alternative<FunctionRestore>(command) ||
         std::holds_alternative<FunctionServeLazy>(command);
}

tl::expected<Request, RejectedRequest> parse_request(std::string_view payload) {
  auto reject = [](std::optional<std::uint64_t> id, Error error) {
    return tl::unexpected(RejectedRequest{id, std::move(error)});
  };
  json document;
  try {
    document = json::parse(payload);
  } catch (const json::exception& e) {
    return reject(std::nullopt, Error{Errc::protocol, std::string("malformed JSON: ") + e.what()});
  }
  if (!document.is_object()) {
    return reject(std::nullopt, Error{Errc::protocol, "a request must be a JSON object"});
  }
  JsonReader envelope(document, "");

  // The id first, so that every later error can be correlated by the client.
  auto id = envelope.required_unsigned("id");
  if (!id) return reject(std::nullopt, id.error());
  std::optional<std::uint64_t> known_id = *id;

  auto version = envelope.required_unsigned("v");
  if (!version) return reject(known_id, version.error());
  if (*version != static_cast<std::uint64_t>(kProtocolVersion)) {
    return reject(known_id, Error{Errc::protocol, "unsupported protocol version " + std::to_string(*version) +
                                                      " (this agent speaks v" + std::to_string(kProtocolVersion) + ")"});
  }
  auto op = envelope.required_string("op");
  if (!op) return reject(known_id, op.error());
  auto token = envelope.string("token");
  if (!token) return reject(known_id, token.error());

  static const json kNoArgs = json::object();
  const json* args = envelope.find("args");
  if (args == nullptr) args = &kNoArgs;
  if (!args->is_object()) {
    return reject(known_id, Error{Errc::invalid_argument, "field \"args\": expected an object"});
  }
  if (auto unknown = envelope.reject_unknown_fields(); !unknown) return reject(known_id, unknown.error());

  auto entry = std::find_if(kOps.begin(), kOps.end(), [&](const OpEntry& e) { return e.name == *op; });
  if (entry == kOps.end()) return reject(known_id, Error{Errc::unsupported, "unknown op \"" + *op + "\""});

  JsonReader arg_reader(*args, "args.");
  auto command = entry->parse(arg_reader, *args);
  if (!command) return reject(known_id, command.error());
  if (auto unknown = arg_reader.reject_unknown_fields(); !unknown) return reject(known_id, unknown.error());
  return Request{*id, token->value_or(""), std::move(*command)};
}

std::string encode_request(const Request& request) {
  json j{{"v", kProtocolVersion}, {"id", request.id}, {"op", op_name(request.command)}};
  if (!request.token.empty()) j["token"] = request.token;
  json args = encode_args(request.command);
  if (!args.empty()) j["args"] = std::move(args);
  return dump(j);
}

std::string encode_response(const Response& response) {
  json j{{"v", kProtocolVersion}};
  j["id"] = response.id ? json(*response.id) : json(nullptr);
  if (response.outcome) {
    j["ok"] = true;
    j["result"] = response.outcome->is_null() ? json::object() : *response.outcome;
  } else {
    j["ok"] = false;
    j["error"] = json{{"code", errc_name(response.outcome.error().code)},
                      {"message", response.outcome.error().message}};
  }
  return dump(j);
}

Result<Response> parse_response(std::string_view payload) {
  json document;
  try {
    document = json::parse(payload);
  } catch (const json::exception& e) {
    return fail(Errc::protocol, std::string("malformed JSON in response: ") + e.what());
  }
  if (!document.is_object()) return fail(Errc::protocol, "a response must be a JSON object");
  auto bad = [](std::string_view why) { return fail(Errc::protocol, "malformed response: " + std::string(why)); };
  auto version = document.find("v");
  if (version == document.end() || !version->is_number_unsigned() ||
      version->get<std::uint64_t>() != static_cast<std::uint64_t>(kProtocolVersion)) {
    return bad("missing or unsupported \"v\"");
  }
  Response response{std::nullopt, json::object()};
  auto id = document.find("id");
  if (id == document.end()) return bad("missing \"id\"");
  if (id->is_number_unsigned()) {
    response.id = id->get<std::uint64_t>();
  } else if (!id->is_null()) {
    return bad("\"id\" must be an integer or null");
  }
  auto ok = document.find("ok");
  if (ok == document.end() || !ok->is_boolean()) return bad("missing boolean \"ok\"");
  if (ok->get<bool>()) {
    auto result = document.find("result");
    if (result == document.end() || !result->is_object()) return bad("missing object \"result\"");
    response.outcome = *result;
  } else {
    auto error = document.find("error");
    if (error == document.end() || !error->is_object()) return bad("missing object \"error\"");
    auto code = error->find("code");
    auto message = error->find("message");
    if (code == error->end() || !code->is_string() || message == error->end() || !message->is_string()) {
      return bad("\"error\" needs string \"code\" and \"message\"");
    }
    // An unknown code from a newer peer is still an error; report it as a protocol error
    // rather than guessing its meaning.
    auto errc = errc_from_name(code->get<std::string>());
    std::string text = message->get<std::string>();
    if (!errc) text = "(" + code->get<std::string>() + ") " + text;
    response.outcome = tl::unexpected(Error{errc.value_or(Errc::protocol), std::move(text)});
  }
  return response;
}

std::string encode_frame(std::string_view payload) {
  auto length = static_cast<std::uint32_t>(payload.size());
  std::string frame;
  frame.reserve(kFrameHeaderBytes + payload.size());
  frame.push_back(static_cast<char>((length >> 24) & 0xff));
  frame.push_back(static_cast<char>((length >> 16) & 0xff));
  frame.push_back(static_cast<char>((length >> 8) & 0xff));
  frame.push_back(static_cast<char>(length & 0xff));
  frame.append(payload);
  return frame;
}

std::uint32_t decode_frame_length(std::span<const std::byte, kFrameHeaderBytes> header) noexcept {
  return (std::to_integer<std::uint32_t>(header[0]) << 24) | (std::to_integer<std::uint32_t>(header[1]) << 16) |
         (std::to_integer<std::uint32_t>(header[2]) << 8) | std::to_integer<std::uint32_t>(header[3]);
}

json encode_endpoint(const RdmaEndpoint& endpoint) {
  return json{{"gid", endpoint.gid}, {"qpn", endpoint.qpn}, {"psn", endpoint.psn}, {"lid", endpoint.lid}};
}

Result<RdmaEndpoint> decode_endpoint(const json& j) {
  if (!j.is_object()) return fail(Errc::invalid_argument, "field \"endpoint\": expected an object");
  JsonReader reader(j, "endpoint.");
  RdmaEndpoint endpoint;
  SNAPTIER_TRY(gid, reader.required_string("gid"));
  bool hex = gid.size() == 32 && std::all_of(gid.begin(), gid.end(), [](char c) {
    return std::isxdigit(static_cast<unsigned char>(c));
  });
  if (!hex) return reader.error("gid", "must be 32 hexadecimal digits");
  endpoint.gid = gid;
  // QPNs and PSNs are 24-bit quantities in the InfiniBand spec.
  SNAPTIER_TRY(qpn, reader.required_unsigned("qpn", 0xffffff));
  SNAPTIER_TRY(psn, reader.required_unsigned("psn", 0xffffff));
  SNAPTIER_TRY(lid, reader.unsigned_integer("lid", 0xffff));
  endpoint.qpn = static_cast<std::uint32_t>(qpn);
  endpoint.psn = static_cast<std::uint32_t>(psn);
  endpoint.lid = static_cast<std::uint16_t>(lid.value_or(0));
  if (auto unknown = reader.reject_unknown_fields(); !unknown) return tl::unexpected(unknown.error());
  return endpoint;
}

json encode_grant(const RdmaPoolGrant& grant) {
  return json{{"endpoint", encode_endpoint(grant.endpoint)},
              {"remote_addr", grant.remote_addr},
              {"rkey", grant.rkey},
              {"pool_size", grant.pool_size},
              {"epoch", grant.epoch}};
}

Result<RdmaPoolGrant> decode_grant(const json& j) {
  if (!j.is_object()) return fail(Errc::protocol, "grant: expected an object");
  JsonReader reader(j, "");
  RdmaPoolGrant grant;
  const json* endpoint = reader.find("endpoint");
  if (endpoint == nullptr) return reader.error("endpoint", "required field is missing");
  SNAPTIER_TRY(decoded, decode_endpoint(*endpoint));
  grant.endpoint = decoded;
  SNAPTIER_TRY(remote_addr, reader.required_unsigned("remote_addr"));
  SNAPTIER_TRY(rkey, reader.required_unsigned("rkey", 0xffffffffu));
  SNAPTIER_TRY(pool_size, reader.required_unsigned("pool_size"));
  SNAPTIER_TRY(epoch, reader.unsigned_integer("epoch"));
  grant.remote_addr = remote_addr;
  grant.rkey = static_cast<std::uint32_t>(rkey);
  grant.pool_size = pool_size;
  grant.epoch = epoch.value_or(0);
  return grant;
}

json encode_extent(const Extent& extent) { return json{{"offset", extent.offset}, {"length", extent.length}}; }

Result<Extent> decode_extent(const json& j) {
  if (!j.is_object()) return fail(Errc::protocol, "extent: expected an object");
  JsonReader reader(j, "");
  SNAPTIER_TRY(offset, reader.required_unsigned("offset"));
  SNAPTIER_TRY(length, reader.required_unsigned("length"));
  return Extent{offset, length};
}

std::string to_string(const Endpoint& endpoint) {
  if (const auto* unix_endpoint = std::get_if<UnixEndpoint>(&endpoint)) return "unix:" + unix_endpoint->path.string();
  return "tcp:" + std::get<NetAddress>(endpoint).to_string();
}

}  // namespace control
}  // namespace snaptier
