#include "client/http_client.h"

#include <httplib.h>

#include <nlohmann/json.hpp>
#include <stdexcept>
#include <thread>

namespace kvserve::client {
namespace {

using nlohmann::json;

// The gRPC status kvserve's gRPC API gives for what its HTTP API answered with `http_status`.
grpc::StatusCode code_of(int http_status) {
  switch (http_status) {
    case 400:
    case 404:
      return grpc::StatusCode::INVALID_ARGUMENT;
    case 401:
      return grpc::StatusCode::UNAUTHENTICATED;
    case 429:
      return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case 503:
      return grpc::StatusCode::UNAVAILABLE;
    case 504:
      return grpc::StatusCode::DEADLINE_EXCEEDED;
    default:
      return grpc::StatusCode::INTERNAL;
  }
}

grpc::Status error_status(int http_status, const std::string& body) {
  const json parsed = json::parse(body, nullptr, false);
  std::string message = body;
  if (parsed.is_object() && parsed.contains("error")) {
    message = parsed["error"].value("message", body);
  }
  return grpc::Status(code_of(http_status), "HTTP " + std::to_string(http_status) + ": " + message);
}

v1::FinishReason finish_reason(const std::string& reason, const std::string& stop_reason) {
  if (reason == "length") return v1::FINISH_REASON_LENGTH;
  if (reason == "abort") return v1::FINISH_REASON_CANCELLED;
  if (reason == "stop") return stop_reason.empty() ? v1::FINISH_REASON_EOS : v1::FINISH_REASON_STOP;
  return v1::FINISH_REASON_UNSPECIFIED;
}

// The body of POST /v1/completions for a gRPC request.
json completion_body(const v1::GenerateRequest& request, const std::string& model) {
  json body = {{"model", model},
               {"stream", true},
               {"stream_options", {{"include_usage", true}}},
               {"logprobs", 0},
               {"return_tokens_as_token_ids", true}};
  if (request.has_prompt_token_ids()) {
    body["prompt"] = std::vector<int32_t>(request.prompt_token_ids().ids().begin(),
                                          request.prompt_token_ids().ids().end());
  } else {
    body["prompt"] = request.prompt();
  }
  const v1::SamplingParams& sampling = request.sampling();
  if (sampling.has_temperature()) body["temperature"] = sampling.temperature();
  if (sampling.has_top_k()) body["top_k"] = sampling.top_k();
  if (sampling.has_top_p()) body["top_p"] = sampling.top_p();
  if (sampling.has_repetition_penalty()) body["repetition_penalty"] = sampling.repetition_penalty();
  if (sampling.has_seed()) body["seed"] = sampling.seed();
  const v1::StoppingCriteria& stopping = request.stopping();
  if (stopping.has_max_new_tokens()) body["max_tokens"] = stopping.max_new_tokens();
  if (stopping.stop_size() > 0) {
    body["stop"] = std::vector<std::string>(stopping.stop().begin(), stopping.stop().end());
  }
  if (stopping.stop_token_ids_size() > 0) {
    body["stop_token_ids"] =
        std::vector<int32_t>(stopping.stop_token_ids().begin(), stopping.stop_token_ids().end());
  }
  if (stopping.ignore_eos()) body["ignore_eos"] = true;
  return body;
}

}  // namespace

HttpGenerationClient::HttpGenerationClient(const std::string& address, std::string api_key)
    : api_key_(std::move(api_key)) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) throw std::runtime_error("--addr must be HOST:PORT: " + address);
  host_ = address.substr(0, colon);
  if (host_.size() > 1 && host_.front() == '[' && host_.back() == ']') {
    host_ = host_.substr(1, host_.size() - 2);
  }
  port_ = std::stoi(address.substr(colon + 1));
}

HttpGenerationClient::~HttpGenerationClient() {
  std::unique_lock<std::mutex> lock(mu_);
  finished_.wait(lock, [&] { return running_ == 0; });
}

std::unique_ptr<httplib::Client> HttpGenerationClient::take_connection() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!idle_.empty()) {
      std::unique_ptr<httplib::Client> connection = std::move(idle_.back());
      idle_.pop_back();
      return connection;
    }
  }
  auto connection = std::make_unique<httplib::Client>(host_, port_);
  connection->set_keep_alive(true);
  connection->set_tcp_nodelay(true);
  if (!api_key_.empty()) connection->set_bearer_token_auth(api_key_);
  return connection;
}

void HttpGenerationClient::give_back(std::unique_ptr<httplib::Client> connection) {
  std::lock_guard<std::mutex> lock(mu_);
  idle_.push_back(std::move(connection));
}

grpc::Status HttpGenerationClient::GetModelInfo(double timeout_s, v1::ModelInfo* info) {
  std::unique_ptr<httplib::Client> connection = take_connection();
  const time_t timeout = timeout_s > 0 ? static_cast<time_t>(timeout_s) + 1 : 300;
  connection->set_read_timeout(timeout, 0);
  const httplib::Result response = connection->Get("/v1/models");
  if (!response) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        "GET /v1/models: " + httplib::to_string(response.error()));
  }
  if (response->status != 200) return error_status(response->status, response->body);
  give_back(std::move(connection));
  const json models = json::parse(response->body, nullptr, false);
  if (!models.is_object() || !models.contains("data") || models["data"].empty()) {
    return grpc::Status(grpc::StatusCode::INTERNAL,
                        "GET /v1/models: no model in " + response->body);
  }
  const json& model = models["data"][0];
  const json kv = model.value("kvserve", json::object());
  info->set_model(model.value("root", ""));
  info->set_context_length(model.value("max_model_len", 0));
  info->set_architecture(kv.value("architecture", ""));
  info->set_n_layer(kv.value("n_layer", 0));
  info->set_n_head(kv.value("n_head", 0));
  info->set_n_embd(kv.value("n_embd", 0));
  info->set_vocab_size(kv.value("vocab_size", 0));
  info->set_kv_format(kv.value("kv_format", ""));
  info->set_kv_bits(kv.value("kv_bits", 0));
  info->set_kv_key_group(kv.value("kv_key_group", 0));
  info->set_kv_value_group(kv.value("kv_value_group", 0));
  info->set_kv_residual(kv.value("kv_residual", 0));
  info->set_kv_page_tokens(kv.value("kv_page_tokens", 0));
  info->set_kv_params(kv.value("kv_params", ""));
  info->set_kv_residual_format(kv.value("kv_residual_format", ""));
  info->set_device(kv.value("device", ""));
  info->set_version(kv.value("version", ""));
  std::lock_guard<std::mutex> lock(mu_);
  model_id_ = model.value("id", "");
  return grpc::Status::OK;
}

void HttpGenerationClient::StartGenerate(v1::GenerateRequest request, double timeout_s,
                                         ChunkCallback on_chunk, DoneCallback on_done) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++running_;
  }
  std::thread([this, request = std::move(request), timeout_s, on_chunk = std::move(on_chunk),
               on_done = std::move(on_done)] {
    on_done(generate(request, timeout_s, on_chunk));
    std::lock_guard<std::mutex> lock(mu_);
    --running_;
    finished_.notify_all();
  }).detach();
}

GenerateOutcome HttpGenerationClient::generate(const v1::GenerateRequest& request, double timeout_s,
                                               const ChunkCallback& on_chunk) {
  GenerateOutcome outcome;
  std::string model;
  {
    std::lock_guard<std::mutex> lock(mu_);
    model = model_id_;
  }
  if (model.empty()) {
    v1::ModelInfo info;
    if (grpc::Status asked = GetModelInfo(10, &info); !asked.ok()) {
      outcome.status = asked;
      outcome.timing.start = outcome.timing.end = Clock::now();
      return outcome;
    }
    std::lock_guard<std::mutex> lock(mu_);
    model = model_id_;
  }
  std::unique_ptr<httplib::Client> connection = take_connection();
  connection->set_read_timeout(timeout_s > 0 ? static_cast<time_t>(timeout_s) + 1 : 3600, 0);

  int http_status = 0;
  std::string pending;  // bytes of an event not yet complete
  std::string error_body;
  std::string reason, stop_reason;
  bool done = false;
  v1::GenerateFinal final;
  grpc::Status stream_error;
  httplib::Request http;
  http.method = "POST";
  http.path = "/v1/completions";
  http.body = completion_body(request, model).dump();
  http.set_header("Content-Type", "application/json");
  if (!request.request_id().empty()) http.set_header("X-Request-Id", request.request_id());
  http.response_handler = [&](const httplib::Response& response) {
    http_status = response.status;
    return true;
  };
  http.content_receiver = [&](const char* data, size_t length, uint64_t, uint64_t) {
    if (http_status != 200) {
      error_body.append(data, length);
      return true;
    }
    pending.append(data, length);
    for (size_t end; (end = pending.find("\n\n")) != std::string::npos;) {
      const std::string frame = pending.substr(0, end);
      pending.erase(0, end + 2);
      if (frame.rfind("data: ", 0) != 0) continue;
      const std::string payload = frame.substr(6);
      if (payload == "[DONE]") {
        done = true;
        continue;
      }
      const json event = json::parse(payload, nullptr, false);
      if (event.is_discarded()) continue;
      if (event.contains("error")) {
        stream_error = grpc::Status(grpc::StatusCode::INTERNAL,
                                    event["error"].value("message", std::string("error")));
        continue;
      }
      if (event.contains("usage") && event["usage"].is_object()) {
        final.set_prompt_tokens(event["usage"].value("prompt_tokens", 0u));
        final.set_completion_tokens(event["usage"].value("completion_tokens", 0u));
      }
      if (!event.contains("choices") || event["choices"].empty()) continue;
      const json& choice = event["choices"][0];
      if (choice.contains("finish_reason") && choice["finish_reason"].is_string()) {
        reason = choice["finish_reason"].get<std::string>();
        if (choice.contains("stop_reason") && choice["stop_reason"].is_string()) {
          stop_reason = choice["stop_reason"].get<std::string>();
        }
      }
      v1::TokenChunk chunk;
      chunk.set_text(choice.value("text", ""));
      if (choice.contains("logprobs") && choice["logprobs"].is_object()) {
        for (const json& token : choice["logprobs"]["tokens"]) {
          chunk.add_token_ids(std::stoi(token.get<std::string>().substr(9)));  // "token_id:N"
        }
        for (const json& logprob : choice["logprobs"]["token_logprobs"]) {
          chunk.add_logprobs(logprob.get<float>());
        }
      }
      if (chunk.token_ids_size() == 0 && chunk.text().empty()) continue;  // the final chunk
      const Clock::time_point now = Clock::now();
      outcome.timing.chunks.push_back({now, chunk.token_ids_size()});
      if (on_chunk) on_chunk(chunk, now);
    }
    return true;
  };
  outcome.timing.start = Clock::now();
  const httplib::Result result = connection->send(http);
  outcome.timing.end = Clock::now();
  if (!result) {
    outcome.status = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                  "POST /v1/completions: " + httplib::to_string(result.error()));
    return outcome;  // the connection is broken: not reused
  }
  give_back(std::move(connection));
  if (http_status != 200) {
    outcome.status = error_status(http_status, error_body);
  } else if (!stream_error.ok()) {
    outcome.status = stream_error;
  } else if (!done || reason.empty()) {
    outcome.status = grpc::Status(grpc::StatusCode::INTERNAL, "the stream ended without [DONE]");
  } else {
    final.set_finish_reason(finish_reason(reason, stop_reason));
    final.set_matched_stop(stop_reason);
    outcome.final = final;
  }
  return outcome;
}

}  // namespace kvserve::client
