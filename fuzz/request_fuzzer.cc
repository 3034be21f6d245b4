// Arbitrary bytes as a GenerateRequest on the wire, through the server's request conversion: it
// either answers INVALID_ARGUMENT with a message or hands the engine a request within the limits
// (a prompt, max_new_tokens >= 1 within the limit, sampling values the sampler accepts, no empty
// stop string, a request_id within kMaxRequestIdBytes). Nothing else may come out, and nothing may
// crash.
#include <google/protobuf/stubs/logging.h>

#include <cstdlib>

#include "engine/sampler.h"
#include "fuzz/fuzz_support.h"
#include "server/generation_service.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Most inputs are not valid protobuf (invalid UTF-8 in a string field, ...): protobuf would log
  // each one, and the parse result is what counts.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvserve::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;  // gRPC would refuse it
  constexpr int kContext = 1024;
  kvserve::ServiceLimits limits;
  limits.max_new_tokens = 256;
  limits.max_prompt_tokens = 512;
  kvserve::ServeRequest out;
  const grpc::Status status =
      kvserve::convert_request(request, kvserve::fuzz::tokenizer(), limits, kContext, out);
  if (!status.ok()) {
    if (status.error_code() != grpc::StatusCode::INVALID_ARGUMENT) std::abort();
    if (status.error_message().empty()) std::abort();
    return 0;
  }
  const kvserve::GenerationRequest& g = out.generation;
  if (g.prompt.empty() || g.prompt.size() > static_cast<size_t>(limits.max_prompt_tokens)) {
    std::abort();
  }
  if (g.max_new_tokens < 1 || g.max_new_tokens > limits.max_new_tokens) std::abort();
  if (!kvserve::validate(g.sampling).ok()) std::abort();
  if (request.request_id().size() > kvserve::kMaxRequestIdBytes) std::abort();
  for (const std::string& stop : out.stop) {
    if (stop.empty()) std::abort();
  }
  return 0;
}
