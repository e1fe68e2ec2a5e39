// The pool client of a memory node's own agent: calls its pool server in process (no verbs).
#include "snaptier/rdma.hpp"

namespace snaptier {
namespace {

class LocalRdmaPoolClient final : public RdmaPoolClient {
 public:
  explicit LocalRdmaPoolClient(std::shared_ptr<RdmaPoolServer> server) : server_(std::move(server)) {}
  Result<RdmaPoolGrant> connect(const RdmaEndpoint& local) override {
    if (!server_) return fail(Errc::unavailable, "local rdma pool client: no server");
    return server_->accept(local);
  }
  Result<Extent> allocate(std::uint64_t length) override {
    if (!server_) return fail(Errc::unavailable, "local rdma pool client: no server");
    return server_->allocate(length);
  }
  Result<void> release(Extent extent) override {
    if (!server_) return fail(Errc::unavailable, "local rdma pool client: no server");
    return server_->release(extent);
  }

 private:
  std::shared_ptr<RdmaPoolServer> server_;
};

}  // namespace

std::shared_ptr<RdmaPoolClient> make_local_rdma_pool_client(std::shared_ptr<RdmaPoolServer> server) {
  return std::make_shared<LocalRdmaPoolClient>(std::move(server));
}

}  // namespace snaptier
