// A client of kvserve's OpenAI-compatible HTTP API (POST /v1/completions with stream: true,
// GET /v1/models) behind the same GenerateApi as the gRPC client, so that `kvserve-cli load
// --api http` measures both APIs with one load generator. Uses cpp-httplib's client.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "client/generation_client.h"

namespace httplib {
class Client;
}

namespace kvserve::client {

class HttpGenerationClient final : public GenerateApi {
 public:
  // `address` is HOST:PORT of the server's HTTP port; `api_key` (may be empty) is sent as a
  // Bearer token.
  HttpGenerationClient(const std::string& address, std::string api_key);
  ~HttpGenerationClient() override;  // waits for the calls in flight

  // Each call runs on a thread of its own over a kept-alive connection from a pool: an HTTP/1.1
  // stream holds its connection until the response ends. Chunks carry their token ids (the
  // request asks for logprobs as token ids), so the timing is per token as with gRPC. The final
  // message is built from the usage chunk and the finish_reason.
  void StartGenerate(v1::GenerateRequest request, double timeout_s, ChunkCallback on_chunk,
                     DoneCallback on_done) override;
  // From GET /v1/models: the model's id, context and the "kvserve" fields.
  grpc::Status GetModelInfo(double timeout_s, v1::ModelInfo* info) override;

 private:
  GenerateOutcome generate(const v1::GenerateRequest& request, double timeout_s,
                           const ChunkCallback& on_chunk);
  std::unique_ptr<httplib::Client> take_connection();
  void give_back(std::unique_ptr<httplib::Client> connection);

  std::string host_;
  int port_ = 0;
  const std::string api_key_;
  std::mutex mu_;  // guards everything below
  std::condition_variable finished_;
  std::string model_id_;  // from /v1/models, sent as each request's "model"
  int running_ = 0;
  std::vector<std::unique_ptr<httplib::Client>> idle_;
};

}  // namespace kvserve::client
