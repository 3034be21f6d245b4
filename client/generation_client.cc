#include "client/generation_client.h"

#include <absl/status/status.h>
#include <algorithm>
#include <cctype>

#include <google/protobuf/util/json_util.h>

#include <fstream>
#include <future>
#include <sstream>
#include <stdexcept>
#include <utility>

namespace kvserve::client {
namespace {

std::string read_pem(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in || text.str().empty()) throw std::runtime_error("cannot read " + path);
  return text.str();
}

void set_timeout(grpc::ClientContext& context, double timeout_s) {
  if (timeout_s > 0) {
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::duration_cast<std::chrono::system_clock::duration>(
                             std::chrono::duration<double>(timeout_s)));
  }
}

// One Generate stream on the callback API. It owns itself and is deleted once the call is over,
// after on_done has run. Reads are issued one at a time, so the callbacks of one stream never run
// concurrently.
class GenerateCall : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  GenerateCall(v1::Generation::Stub* stub, v1::GenerateRequest request, double timeout_s,
               ChunkCallback on_chunk, DoneCallback on_done)
      : request_(std::move(request)), on_chunk_(std::move(on_chunk)), on_done_(std::move(on_done)) {
    set_timeout(context_, timeout_s);
    stub->async()->Generate(&context_, &request_, this);
    StartRead(&response_);
    outcome_.timing.start = Clock::now();
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream is over; OnDone follows with the status
    const Clock::time_point now = Clock::now();
    if (response_.has_chunk()) {
      const v1::TokenChunk& chunk = response_.chunk();
      outcome_.timing.chunks.push_back({now, chunk.token_ids_size()});
      if (on_chunk_) on_chunk_(chunk, now);
    } else if (response_.has_final()) {
      outcome_.final = response_.final();
    }
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    outcome_.timing.end = Clock::now();
    outcome_.status = status;
    if (status.ok() && !outcome_.final) {
      outcome_.status =
          grpc::Status(grpc::StatusCode::INTERNAL, "the stream ended without its final message");
    }
    // The call is deleted before the caller hears of it: once the last call is done the caller may
    // destroy the channel and return from main, which under ASan raced with this destructor
    // (a double free on a gRPC thread at exit).
    DoneCallback on_done = std::move(on_done_);
    GenerateOutcome outcome = std::move(outcome_);
    delete this;
    on_done(std::move(outcome));
  }

 private:
  grpc::ClientContext context_;
  v1::GenerateRequest request_;
  v1::GenerateResponse response_;
  ChunkCallback on_chunk_;
  DoneCallback on_done_;
  GenerateOutcome outcome_;
};

}  // namespace

std::shared_ptr<grpc::Channel> make_channel(const std::string& address, const TlsFiles& tls) {
  if (tls.ca.empty()) return grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = read_pem(tls.ca);
  if (!tls.cert.empty()) options.pem_cert_chain = read_pem(tls.cert);
  if (!tls.key.empty()) options.pem_private_key = read_pem(tls.key);
  return grpc::CreateChannel(address, grpc::SslCredentials(options));
}

GenerationClient::GenerationClient(const std::string& address, const TlsFiles& tls)
    : GenerationClient(make_channel(address, tls)) {}

GenerationClient::GenerationClient(std::shared_ptr<grpc::Channel> channel)
    : channel_(std::move(channel)),
      generation_(v1::Generation::NewStub(channel_)),
      health_(grpc::health::v1::Health::NewStub(channel_)) {}

void GenerationClient::StartGenerate(v1::GenerateRequest request, double timeout_s,
                                     ChunkCallback on_chunk, DoneCallback on_done) {
  new GenerateCall(generation_.get(), std::move(request), timeout_s, std::move(on_chunk),
                   std::move(on_done));
}

GenerateOutcome GenerationClient::Generate(v1::GenerateRequest request, double timeout_s,
                                           ChunkCallback on_chunk) {
  std::promise<GenerateOutcome> done;
  std::future<GenerateOutcome> outcome = done.get_future();
  StartGenerate(std::move(request), timeout_s, std::move(on_chunk),
                [&done](GenerateOutcome o) { done.set_value(std::move(o)); });
  return outcome.get();
}

grpc::Status GenerationClient::CheckHealth(const std::string& service, double timeout_s,
                                           ServingStatus* status) {
  grpc::ClientContext context;
  set_timeout(context, timeout_s);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status result = health_->Check(&context, request, &response);
  if (result.ok()) *status = response.status();
  return result;
}

grpc::Status GenerationClient::GetModelInfo(double timeout_s, v1::ModelInfo* info) {
  grpc::ClientContext context;
  set_timeout(context, timeout_s);
  return generation_->GetModelInfo(&context, v1::GetModelInfoRequest(), info);
}

grpc::Status GenerationClient::GetCacheStats(double timeout_s, v1::CacheStats* stats) {
  grpc::ClientContext context;
  set_timeout(context, timeout_s);
  return generation_->GetCacheStats(&context, v1::GetCacheStatsRequest(), stats);
}

std::string status_code_name(grpc::StatusCode code) {
  // gRPC's status codes are absl's, number for number.
  const std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.empty() ? "CODE_" + std::to_string(static_cast<int>(code)) : name;
}

std::string describe(const grpc::Status& status) {
  return status_code_name(status.error_code()) + ": " + status.error_message();
}

std::string explain_connection_failure(const grpc::Status& status, bool tls) {
  if (status.error_code() != grpc::StatusCode::UNAVAILABLE) return "";
  std::string text = status.error_message();
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  auto has = [&](const char* needle) { return text.find(needle) != std::string::npos; };
  if (has("not in peer certificate")) {
    return "the client refused the server: its certificate does not name the address dialled "
           "(--addr must match a DNS name or IP in the certificate's subjectAltName)";
  }
  if (has("certificate verify failed") || has("certificate_verify_failed")) {
    return "the client refused the server: its certificate is not signed by a CA in --tls-ca "
           "(untrusted CA)";
  }
  if (has("certificate required")) {
    return "the server refused the client: it requires a client certificate (mutual TLS); pass "
           "--tls-cert and --tls-key";
  }
  if (has("alert unknown ca") || has("alert bad certificate") || has("certificate unknown")) {
    return "the server refused the client: the client certificate is not signed by a CA the "
           "server trusts (--tls-client-ca)";
  }
  if (has("wrong version number") || has("wrong_version_number") || has("packet length too long")) {
    return "the server does not speak TLS: connect without --tls-ca, or start the server with "
           "--tls-cert/--tls-key";
  }
  if (has("socket closed") || has("connection reset") || has("handshake")) {
    return tls ? "the server closed the connection during the TLS handshake: it probably requires "
                 "a client certificate (--tls-cert/--tls-key) or does not trust the one given"
               : "the server closed the connection: it probably requires TLS (pass --tls-ca with "
                 "the CA that signed its certificate)";
  }
  return "";
}

nlohmann::json to_json(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string text;
  if (!google::protobuf::util::MessageToJsonString(message, &text, options).ok()) {
    throw std::logic_error(message.GetTypeName() + " does not print as JSON");
  }
  return nlohmann::json::parse(text);
}

}  // namespace kvserve::client
