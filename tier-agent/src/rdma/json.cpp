// nlohmann::json conversions of the connection records. Field names match the control plane's
// encode_endpoint/encode_grant so that either encoder's output decodes with either decoder.
// from_json follows nlohmann's convention (json::exception on a missing or mistyped field);
// code at a trust boundary uses control::decode_endpoint/decode_grant, which return Result.
#include <nlohmann/json.hpp>

#include "snaptier/rdma.hpp"

namespace snaptier {

void to_json(nlohmann::json& j, const RdmaEndpoint& e) {
  j = nlohmann::json{{"gid", e.gid}, {"qpn", e.qpn}, {"psn", e.psn}, {"lid", e.lid}};
}

void from_json(const nlohmann::json& j, RdmaEndpoint& e) {
  j.at("gid").get_to(e.gid);
  j.at("qpn").get_to(e.qpn);
  j.at("psn").get_to(e.psn);
  // lid is meaningless on RoCE; peers may leave it out.
  e.lid = j.contains("lid") ? j.at("lid").get<std::uint16_t>() : std::uint16_t{0};
}

void to_json(nlohmann::json& j, const RdmaPoolGrant& g) {
  j = nlohmann::json{{"endpoint", g.endpoint},
                     {"remote_addr", g.remote_addr},
                     {"rkey", g.rkey},
                     {"pool_size", g.pool_size},
                     {"epoch", g.epoch}};
}

void from_json(const nlohmann::json& j, RdmaPoolGrant& g) {
  j.at("endpoint").get_to(g.endpoint);
  j.at("remote_addr").get_to(g.remote_addr);
  j.at("rkey").get_to(g.rkey);
  j.at("pool_size").get_to(g.pool_size);
  // Memory nodes from before pool epochs leave it out: 0, "not tracked".
  g.epoch = j.contains("epoch") ? j.at("epoch").get<std::uint64_t>() : std::uint64_t{0};
}

}  // namespace snaptier
