#include "server/http_server.h"

#include <dirent.h>
#include <netinet/in.h>
#include <prometheus/text_serializer.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>

namespace kvserve {
namespace {

using nlohmann::json;

// JSON text; invalid UTF-8 a client sent (echoed in an error message) becomes U+FFFD instead of
// an exception.
std::string dump(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

// An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // the request field at fault, if one is
  std::string code;
  // The gRPC code name the failure metric counts it under (both APIs share the metric).
  std::string metric_code = "INVALID_ARGUMENT";
};

ApiError invalid(std::string message, std::string param = "") {
  return {400, std::move(message), "invalid_request_error", std::move(param),
          "",  "INVALID_ARGUMENT"};
}

json error_json(const ApiError& error) {
  const auto or_null = [](const std::string& s) { return s.empty() ? json(nullptr) : json(s); };
  return {{"error",
           {{"message", error.message},
            {"type", error.type},
            {"param", or_null(error.param)},
            {"code", or_null(error.code)}}}};
}

void send_error(httplib::Response& response, const ApiError& error) {
  response.status = error.status;
  response.set_content(dump(error_json(error)), "application/json");
}

// The HTTP status vLLM answers for what gRPC calls `status`.
ApiError from_status(const grpc::Status& status) {
  ApiError error;
  error.message = status.error_message();
  error.metric_code = status_code_name(status.error_code());
  switch (status.error_code()) {
    case grpc::StatusCode::INVALID_ARGUMENT:
      break;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      error.status = 429;
      error.type = "rate_limit_error";
      break;
    case grpc::StatusCode::UNAVAILABLE:
      error.status = 503;
      error.type = "service_unavailable";
      break;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      error.status = 504;
      error.type = "timeout";
      break;
    default:
      error.status = 500;
      error.type = "server_error";
      break;
  }
  return error;
}

// OpenAI's finish_reason: "stop" for EOS and stop strings or ids, "length" at max_tokens; a
// request cancelled by the server's drain says "abort", as vLLM's do.
json finish_reason(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kEos:
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kCancelled:
      return "abort";
    default:
      return nullptr;
  }
}

bool is_integer(const json& value) {
  return value.is_number_integer() || value.is_number_unsigned();
}

// The body of POST /v1/completions as the gRPC request it means, or what is wrong with it. Only
// the OpenAI shape is checked here; the values (limits, sampling ranges, stop strings) are
// checked by convert_request, the same code that checks gRPC requests.
struct CompletionRequest {
  v1::GenerateRequest generate;
  std::string model;
  bool stream = false;
  bool include_usage = false;
  bool logprobs = false;
  bool tokens_as_ids = false;
};

std::optional<ApiError> parse_completion(const std::string& body, CompletionRequest& out) {
  const json request = json::parse(body, nullptr, false);
  if (request.is_discarded() || !request.is_object()) {
    return invalid("the request body must be a JSON object (OpenAI's completions request)");
  }
  const auto field = [&](const char* name) -> const json* {
    const auto it = request.find(name);
    return it == request.end() || it->is_null() ? nullptr : &*it;
  };
  const auto type_error = [](const char* name, const char* type) {
    return invalid(std::string(name) + " must be " + type, name);
  };

  const json* model = field("model");
  if (model == nullptr || !model->is_string()) return type_error("model", "a string");
  out.model = model->get<std::string>();

  const json* prompt = field("prompt");
  if (prompt == nullptr) return invalid("prompt is required", "prompt");
  // One prompt per request: a string, token ids, or a list holding one of those.
  const json* single = prompt;
  if (prompt->is_array() && prompt->size() == 1 &&
      ((*prompt)[0].is_string() || (*prompt)[0].is_array())) {
    single = &(*prompt)[0];
  }
  if (single->is_string()) {
    out.generate.set_prompt(single->get<std::string>());
  } else if (single->is_array() && !single->empty() &&
             std::all_of(single->begin(), single->end(), is_integer)) {
    for (const json& id : *single) {
      if (id.is_number_unsigned()
              ? id.get<uint64_t>() > INT32_MAX
              : id.get<int64_t>() < INT32_MIN || id.get<int64_t>() > INT32_MAX) {
        return invalid("prompt token ids must be 32-bit integers", "prompt");
      }
      out.generate.mutable_prompt_token_ids()->add_ids(id.get<int32_t>());
    }
  } else if (single->is_array() && !single->empty() &&
             (single->front().is_string() || single->front().is_array())) {
    return invalid("one prompt per request: send each prompt as its own request", "prompt");
  } else {
    return invalid("prompt must be a string or a non-empty array of token ids", "prompt");
  }

  if (const json* n = field("n"); n != nullptr && !(is_integer(*n) && n->get<int64_t>() == 1)) {
    return invalid("only n = 1 is supported: send one request per completion", "n");
  }
  if (const json* best_of = field("best_of");
      best_of != nullptr && !(is_integer(*best_of) && best_of->get<int64_t>() == 1)) {
    return invalid("only best_of = 1 is supported", "best_of");
  }
  if (const json* echo = field("echo");
      echo != nullptr && !(echo->is_boolean() && !echo->get<bool>())) {
    return invalid("echo is not supported: the prompt is not returned with the completion", "echo");
  }
  if (const json* suffix = field("suffix"); suffix != nullptr) {
    return invalid("suffix is not supported (GPT-2 has no insertion mode)", "suffix");
  }
  for (const char* penalty : {"presence_penalty", "frequency_penalty"}) {
    if (const json* value = field(penalty);
        value != nullptr && !(value->is_number() && value->get<double>() == 0)) {
      return invalid(std::string(penalty) + " is not supported; repetition_penalty is", penalty);
    }
  }
  if (const json* bias = field("logit_bias");
      bias != nullptr && !(bias->is_object() && bias->empty())) {
    return invalid("logit_bias is not supported", "logit_bias");
  }
  if (const json* logprobs = field("logprobs"); logprobs != nullptr) {
    if (!is_integer(*logprobs) || logprobs->get<int64_t>() != 0) {
      return invalid(
          "only logprobs = 0 is supported: the chosen token's log-probability, no alternatives",
          "logprobs");
    }
    out.logprobs = true;
    out.generate.set_return_logprobs(true);
  }

  // vLLM's extension: logprobs.tokens as "token_id:<id>" instead of each token's text.
  if (const json* as_ids = field("return_tokens_as_token_ids"); as_ids != nullptr) {
    if (!as_ids->is_boolean()) return type_error("return_tokens_as_token_ids", "a boolean");
    out.tokens_as_ids = as_ids->get<bool>();
  }

  v1::SamplingParams& sampling = *out.generate.mutable_sampling();
  v1::StoppingCriteria& stopping = *out.generate.mutable_stopping();
  // OpenAI's default is 16 tokens; 0 and other values go to convert_request's check.
  stopping.set_max_new_tokens(16);
  if (const json* max_tokens = field("max_tokens"); max_tokens != nullptr) {
    if (!is_integer(*max_tokens) || max_tokens->get<int64_t>() < 0 ||
        max_tokens->get<int64_t>() > UINT32_MAX) {
      return type_error("max_tokens", "a non-negative integer");
    }
    stopping.set_max_new_tokens(max_tokens->get<uint32_t>());
  }
  for (const char* name : {"temperature", "top_p", "repetition_penalty"}) {
    const json* value = field(name);
    if (value == nullptr) continue;
    if (!value->is_number()) return type_error(name, "a number");
    const auto number = value->get<float>();
    if (std::strcmp(name, "temperature") == 0) sampling.set_temperature(number);
    if (std::strcmp(name, "top_p") == 0) sampling.set_top_p(number);
    if (std::strcmp(name, "repetition_penalty") == 0) sampling.set_repetition_penalty(number);
  }
  if (const json* top_k = field("top_k"); top_k != nullptr) {  // vLLM's extension; -1 means off
    if (!is_integer(*top_k) || top_k->get<int64_t>() < -1 || top_k->get<int64_t>() > INT32_MAX) {
      return type_error("top_k", "an integer, -1 or 0 for off");
    }
    sampling.set_top_k(std::max<int32_t>(0, top_k->get<int32_t>()));
  }
  if (const json* seed = field("seed"); seed != nullptr) {
    if (!is_integer(*seed) || (seed->is_number_integer() && seed->get<int64_t>() < 0)) {
      return type_error("seed", "a non-negative integer");
    }
    sampling.set_seed(seed->get<uint64_t>());
  }
  if (const json* stop = field("stop"); stop != nullptr) {
    if (stop->is_string()) {
      stopping.add_stop(stop->get<std::string>());
    } else if (stop->is_array() && std::all_of(stop->begin(), stop->end(),
                                               [](const json& s) { return s.is_string(); })) {
      for (const json& s : *stop) stopping.add_stop(s.get<std::string>());
    } else {
      return type_error("stop", "a string or an array of strings");
    }
  }
  if (const json* ids = field("stop_token_ids"); ids != nullptr) {  // vLLM's extension
    if (!ids->is_array() || !std::all_of(ids->begin(), ids->end(), is_integer)) {
      return type_error("stop_token_ids", "an array of token ids");
    }
    for (const json& id : *ids) stopping.add_stop_token_ids(id.get<int32_t>());
  }
  if (const json* ignore_eos = field("ignore_eos"); ignore_eos != nullptr) {  // vLLM's extension
    if (!ignore_eos->is_boolean()) return type_error("ignore_eos", "a boolean");
    stopping.set_ignore_eos(ignore_eos->get<bool>());
  }
  if (const json* stream = field("stream"); stream != nullptr) {
    if (!stream->is_boolean()) return type_error("stream", "a boolean");
    out.stream = stream->get<bool>();
  }
  if (const json* options = field("stream_options"); options != nullptr) {
    if (!options->is_object()) return type_error("stream_options", "an object");
    if (!out.stream)
      return invalid("stream_options is only allowed with stream: true", "stream_options");
    if (const auto it = options->find("include_usage"); it != options->end() && !it->is_null()) {
      if (!it->is_boolean()) return type_error("stream_options.include_usage", "a boolean");
      out.include_usage = it->get<bool>();
    }
  }
  return std::nullopt;
}

json usage_json(const StreamFinal& final) {
  return {{"prompt_tokens", final.prompt_tokens},
          {"completion_tokens", final.completion_tokens},
          {"total_tokens", final.prompt_tokens + final.completion_tokens}};
}

// httplib bounds each header line (8 KiB) and the request line (8 KiB, else 414) but not their
// number; requests whose headers add up to more than this are refused with 431.
constexpr size_t kMaxHeaderBytes = 64 << 10;

// How long a completion's worker waits for a message before it checks its connection and the
// server's shutdown again.
constexpr auto kPollInterval = std::chrono::milliseconds(100);

// Shuts down (their workers close them) the connections accepted on `port` that are still open:
// httplib gives no handle on them, so they are found among the process's file descriptors.
void cut_connections_to(int port) {
  DIR* fds = opendir("/proc/self/fd");
  if (fds == nullptr) return;
  while (const dirent* entry = readdir(fds)) {
    const int fd = std::atoi(entry->d_name);
    struct stat status {};
    if (fd <= 2 || fd == dirfd(fds) || fstat(fd, &status) != 0 || !S_ISSOCK(status.st_mode)) {
      continue;
    }
    int listening = 0;
    socklen_t length = sizeof listening;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) != 0 || listening != 0) {
      continue;
    }
    sockaddr_storage local{};
    length = sizeof local;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &length) != 0) continue;
    int local_port = -1;
    if (local.ss_family == AF_INET) {
      local_port = ntohs(reinterpret_cast<const sockaddr_in*>(&local)->sin_port);
    } else if (local.ss_family == AF_INET6) {
      local_port = ntohs(reinterpret_cast<const sockaddr_in6*>(&local)->sin6_port);
    }
    if (local_port == port) ::shutdown(fd, SHUT_RDWR);
  }
  closedir(fds);
}

}  // namespace

// One /v1/completions request in the engine: the channel the engine thread pushes into and the
// condition variable that wakes the worker thread waiting on it.
class HttpServer::Completion final : public StreamListener {
 public:
  Completion(std::string id, std::string model, int64_t created, size_t buffer)
      : id(std::move(id)),
        model(std::move(model)),
        created(created),
        channel(std::make_shared<StreamChannel>(buffer)) {}

  // Engine thread (the channel has no StreamWriter): only wakes the waiting worker.
  void on_message_ready() override {
    std::lock_guard<std::mutex> lock(mu_);
    ready_.notify_all();
  }

  // Worker thread: the next message, or false after `timeout` without one.
  bool next(StreamMessage& out, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return ready_.wait_for(lock, timeout, [&] { return channel->pop(out); });
  }

  // A chunk of the response (streamed or not) in OpenAI's shape.
  json chunk(json choices) const {
    return {{"id", id},
            {"object", "text_completion"},
            {"created", created},
            {"model", model},
            {"choices", std::move(choices)}};
  }

  const std::string id;
  const std::string model;
  const int64_t created;
  const std::shared_ptr<StreamChannel> channel;
  EngineLoop::Ticket ticket = 0;
  bool logprobs = false;
  bool tokens_as_ids = false;
  bool include_usage = false;
  bool ended = false;  // the final message or an error was read (worker thread only)

 private:
  std::mutex mu_;
  std::condition_variable ready_;
};

HttpServer::HttpServer(const HttpOptions& options, Metrics& metrics)
    : options_(options), metrics_(metrics) {
  const auto threads = static_cast<size_t>(std::max(options_.threads, kReservedHttpThreads + 1));
  server_.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  // SO_REUSEADDR only: httplib's default adds SO_REUSEPORT, which would let a second server share
  // the port silently instead of failing to start. The socket is kept to raise its backlog below.
  server_.set_socket_options([this](socket_t socket) {
    const int yes = 1;
    setsockopt(socket, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    listen_socket_ = socket;
  });
  server_.set_read_timeout(options_.read_timeout_s, 0);
  server_.set_write_timeout(options_.write_timeout_s, 0);
  server_.set_keep_alive_timeout(options_.read_timeout_s);
  server_.set_keep_alive_max_count(1000);
  server_.set_payload_max_length(options_.max_body_bytes);
  route();
  const bool bound = options_.port == 0 ? (port_ = server_.bind_to_any_port(options_.host)) > 0
                                        : server_.bind_to_port(options_.host, options_.port);
  if (!bound) {
    throw std::runtime_error("http: cannot listen on " + options_.host + ":" +
                             std::to_string(options_.port) +
                             " (port in use or address not local?)");
  }
  if (options_.port != 0) port_ = options_.port;
  // Debian's httplib 0.11 listens with a compiled-in backlog of 5: a burst of new connections
  // (64 clients starting at once) overflows the accept queue and some of them fail. Calling
  // listen() again on the listening socket raises its backlog.
  if (::listen(listen_socket_, SOMAXCONN) != 0) {
    spdlog::warn("http: cannot raise the listen backlog: {}", std::strerror(errno));
  }
  thread_ = std::thread([this] {
    server_.listen_after_bind();
    listener_done_.store(true);
  });
}

HttpServer::~HttpServer() {
  shutdown(std::chrono::milliseconds(0));
}

void HttpServer::start_serving(EngineLoop& loop, const Tokenizer& tokenizer, v1::ModelInfo info) {
  loop_ = &loop;
  tokenizer_ = &tokenizer;
  info_ = std::move(info);
  std::string path = info_.model();
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  model_id_ = path.substr(path.find_last_of('/') + 1);
  created_ = std::chrono::duration_cast<std::chrono::seconds>(
                 std::chrono::system_clock::now().time_since_epoch())
                 .count();
  state_.store(State::kServing, std::memory_order_release);
}

void HttpServer::shutdown(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (open_completions_.load() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  stopping_.store(true);
  server_.stop();
  if (!thread_.joinable()) return;
  // The listening thread ends once every worker has finished its connection. A worker reading a
  // request that a client trickles in byte by byte would keep it (and the process) alive for as
  // long as the client wants: after a grace period the connections still open are cut.
  const auto grace = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  while (!listener_done_.load() && std::chrono::steady_clock::now() < grace) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (!listener_done_.load()) cut_connections_to(port_);
  thread_.join();
}

void HttpServer::route() {
  server_.set_pre_routing_handler([this](const httplib::Request& request,
                                         httplib::Response& response) {
    size_t header_bytes = 0;
    for (const auto& [name, value] : request.headers)
      header_bytes += name.size() + value.size() + 4;
    if (header_bytes > kMaxHeaderBytes) {
      send_error(response,
                 {431, "the request's headers exceed " + std::to_string(kMaxHeaderBytes) + " bytes",
                  "invalid_request_error", "", "", "INVALID_ARGUMENT"});
      response.set_header("Connection", "close");
      return httplib::Server::HandlerResponse::Handled;
    }
    if (options_.api_key.empty() || request.path.rfind("/v1/", 0) != 0) {
      return httplib::Server::HandlerResponse::Unhandled;
    }
    const std::string expected = "Bearer " + options_.api_key;
    const std::string given = request.get_header_value("Authorization");
    // Compared in time that does not depend on where they first differ.
    unsigned char difference = given.size() == expected.size() ? 0 : 1;
    for (size_t i = 0; i < given.size() && i < expected.size(); ++i) {
      difference |= static_cast<unsigned char>(given[i] ^ expected[i]);
    }
    if (difference == 0) return httplib::Server::HandlerResponse::Unhandled;
    send_error(response, {401, "missing or wrong API key: send \"Authorization: Bearer <key>\"",
                          "invalid_request_error", "", "invalid_api_key", "UNAUTHENTICATED"});
    return httplib::Server::HandlerResponse::Handled;
  });

  server_.Get("/metrics", [this](const httplib::Request&, httplib::Response& response) {
    response.set_content(prometheus::TextSerializer().Serialize(metrics_.registry()->Collect()),
                         "text/plain; version=0.0.4; charset=utf-8");
  });
  server_.Get("/health", [this](const httplib::Request&, httplib::Response& response) {
    const State state = state_.load(std::memory_order_acquire);
    response.status = state == State::kServing ? 200 : 503;
    response.set_content(dump({{"status", state == State::kServing   ? "SERVING"
                                          : state == State::kLoading ? "LOADING"
                                                                     : "DRAINING"}}),
                         "application/json");
  });
  server_.Get("/v1/models", [this](const httplib::Request&, httplib::Response& response) {
    handle_models(response);
  });
  server_.Post("/v1/completions",
               [this](const httplib::Request& request, httplib::Response& response) {
                 handle_completions(request, response);
               });
  server_.Post("/v1/chat/completions", [](const httplib::Request&, httplib::Response& response) {
    send_error(response, {404,
                          "/v1/chat/completions is not served: GPT-2 has no chat template. Use "
                          "/v1/completions with a text prompt.",
                          "invalid_request_error", "", "not_found", "INVALID_ARGUMENT"});
  });
  // Unknown paths (404), wrong methods (405), oversized bodies (413) and malformed requests
  // (400) get an OpenAI-style body too.
  server_.set_error_handler([](const httplib::Request& request, httplib::Response& response) {
    if (!response.body.empty()) return;
    const std::string message =
        response.status == 404
            ? "no such endpoint: " + request.method + " " + request.path
            : "the request was refused with HTTP status " + std::to_string(response.status);
    send_error(response, {response.status, message, "invalid_request_error", "", "", ""});
  });
  server_.set_exception_handler(
      [](const httplib::Request&, httplib::Response& response, std::exception_ptr error) {
        std::string what = "unknown";
        try {
          std::rethrow_exception(error);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        send_error(response, {500, "internal error: " + what, "server_error", "", "", "INTERNAL"});
      });
}

void HttpServer::handle_models(httplib::Response& response) const {
  if (state_.load(std::memory_order_acquire) == State::kLoading) {
    send_error(response, from_status(grpc::Status(
                             grpc::StatusCode::UNAVAILABLE,
                             "the server is loading the model; retry when /health says SERVING")));
    return;
  }
  const json model = {{"id", model_id_},
                      {"object", "model"},
                      {"created", created_},
                      {"owned_by", "kvserve"},
                      {"root", info_.model()},
                      {"max_model_len", info_.context_length()},
                      {"kvserve",
                       {{"architecture", info_.architecture()},
                        {"n_layer", info_.n_layer()},
                        {"n_head", info_.n_head()},
                        {"n_embd", info_.n_embd()},
                        {"vocab_size", info_.vocab_size()},
                        {"kv_format", info_.kv_format()},
                        {"kv_bits", info_.kv_bits()},
                        {"kv_key_group", info_.kv_key_group()},
                        {"kv_value_group", info_.kv_value_group()},
                        {"kv_residual", info_.kv_residual()},
                        {"kv_page_tokens", info_.kv_page_tokens()},
                        {"kv_params", info_.kv_params()},
                        {"kv_residual_format", info_.kv_residual_format()},
                        {"device", info_.device()},
                        {"version", info_.version()}}}};
  response.set_content(dump({{"object", "list"}, {"data", json::array({model})}}),
                       "application/json");
}

void HttpServer::handle_completions(const httplib::Request& request, httplib::Response& response) {
  metrics_.count_request("http");
  std::string id = request.get_header_value("X-Request-Id");
  if (id.empty()) id = "http-" + std::to_string(next_request_number_++);
  const auto reject = [&](const ApiError& error) {
    spdlog::warn("request {} rejected: HTTP {}: {}", id, error.status, error.message);
    metrics_.count_failure(error.metric_code);
    send_error(response, error);
  };
  switch (state_.load(std::memory_order_acquire)) {
    case State::kLoading:
      return reject(from_status(
          grpc::Status(grpc::StatusCode::UNAVAILABLE,
                       "the server is loading the model; retry when /health says SERVING")));
    case State::kDraining:
      return reject(from_status(grpc::Status(
          grpc::StatusCode::UNAVAILABLE, "the server is shutting down; retry on another replica")));
    case State::kServing:
      break;
  }
  CompletionRequest parsed;
  if (auto error = parse_completion(request.body, parsed)) return reject(*error);
  if (parsed.model != model_id_ && parsed.model != info_.model()) {
    ApiError error{
        404,
        "the model `" + parsed.model + "` does not exist; this server serves `" + model_id_ + "`",
        "invalid_request_error",
        "model",
        "model_not_found",
        "INVALID_ARGUMENT"};
    return reject(error);
  }
  ServeRequest serve;
  serve.id = id;
  serve.arrival = Clock::now();
  if (grpc::Status status = convert_request(parsed.generate, *tokenizer_, options_.limits,
                                            info_.context_length(), serve);
      !status.ok()) {
    return reject(from_status(status));
  }
  const int max_open =
      std::min(options_.limits.max_concurrent_streams, options_.threads - kReservedHttpThreads);
  if (open_completions_.fetch_add(1) >= max_open) {
    --open_completions_;
    return reject(from_status(
        grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                     "too many concurrent HTTP completions (" + std::to_string(max_open) +
                         ": --http-threads and --max-concurrent-streams); retry with backoff")));
  }
  auto completion = std::make_shared<Completion>("cmpl-" + id, model_id_, created_,
                                                 options_.limits.stream_buffer_messages);
  completion->logprobs = parsed.logprobs;
  completion->tokens_as_ids = parsed.tokens_as_ids;
  completion->include_usage = parsed.include_usage;
  completion->channel->set_listener(completion);
  switch (loop_->submit(std::move(serve), completion->channel, completion->ticket)) {
    case EngineLoop::SubmitResult::kAccepted:
      break;
    case EngineLoop::SubmitResult::kQueueFull:
      --open_completions_;
      return reject(
          from_status(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                   "the request queue is full (--max-queued-requests); retry with "
                                   "backoff or add replicas")));
    case EngineLoop::SubmitResult::kDeviceLost:
      --open_completions_;
      return reject(
          from_status(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                   "the device failed (device lost) and this server is restarting; "
                                   "retry on another replica")));
  }
  if (parsed.stream) {
    stream_response(std::move(completion), response);
  } else {
    // Released however whole_response ends (an exception becomes a 500 in httplib).
    const std::unique_ptr<std::atomic<int>, void (*)(std::atomic<int>*)> open(
        &open_completions_, [](std::atomic<int>* count) { --*count; });
    whole_response(*completion, response);
  }
}

json HttpServer::logprobs_json(const Completion& completion, const std::vector<int32_t>& ids,
                               const std::vector<float>& logprobs) const {
  json tokens = json::array();
  for (int32_t id : ids) {
    tokens.push_back(completion.tokens_as_ids ? "token_id:" + std::to_string(id)
                                              : tokenizer_->decode({id}));
  }
  return {{"tokens", tokens}, {"token_logprobs", logprobs}, {"top_logprobs", nullptr}};
}

void HttpServer::whole_response(Completion& completion, httplib::Response& response) {
  std::string text;
  std::vector<int32_t> ids;
  std::vector<float> logprobs;
  StreamMessage message;
  while (true) {
    if (!completion.next(message, kPollInterval)) {
      if (stopping_.load()) {
        loop_->cancel(completion.ticket);
        send_error(response,
                   from_status(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server stopped")));
        return;
      }
      continue;
    }
    if (message.kind == StreamMessage::Kind::kChunk) {
      text += message.text;
      ids.insert(ids.end(), message.token_ids.begin(), message.token_ids.end());
      logprobs.insert(logprobs.end(), message.logprobs.begin(), message.logprobs.end());
      continue;
    }
    if (message.kind == StreamMessage::Kind::kError) {
      send_error(response,
                 from_status(grpc::Status(to_code(message.error), message.error_message)));
      return;
    }
    break;
  }
  json choice = {{"index", 0},
                 {"text", text},
                 {"logprobs", nullptr},
                 {"finish_reason", finish_reason(message.final.reason)}};
  if (!message.final.matched_stop.empty()) choice["stop_reason"] = message.final.matched_stop;
  if (completion.logprobs) choice["logprobs"] = logprobs_json(completion, ids, logprobs);
  json body = completion.chunk(json::array({choice}));
  body["usage"] = usage_json(message.final);
  response.set_content(dump(body), "application/json");
}

void HttpServer::stream_response(std::shared_ptr<Completion> completion,
                                 httplib::Response& response) {
  response.set_header("Cache-Control", "no-cache");
  response.set_header("X-Accel-Buffering", "no");
  const auto provider = [this, completion](size_t, httplib::DataSink& sink) {
    const auto send = [&](const json& event) {
      const std::string frame = "data: " + dump(event) + "\n\n";
      return sink.write(frame.data(), frame.size());
    };
    const auto end = [&] {
      static const std::string kDone = "data: [DONE]\n\n";
      completion->ended = true;
      const bool ok = sink.write(kDone.data(), kDone.size());
      sink.done();
      return ok;
    };
    StreamMessage message;
    if (!completion->next(message, kPollInterval)) return !stopping_.load();
    // Drains what is waiting, so that a fast engine costs one wake-up per step, not per token.
    do {
      switch (message.kind) {
        case StreamMessage::Kind::kChunk: {
          if (message.text.empty() && !completion->logprobs) break;  // held back (stop strings)
          json choice = {{"index", 0},
                         {"text", message.text},
                         {"logprobs", nullptr},
                         {"finish_reason", nullptr}};
          if (completion->logprobs) {
            choice["logprobs"] = logprobs_json(*completion, message.token_ids, message.logprobs);
          }
          json event = completion->chunk(json::array({choice}));
          if (completion->include_usage) event["usage"] = nullptr;
          if (!send(event)) return false;
          break;
        }
        case StreamMessage::Kind::kFinal: {
          json choice = {{"index", 0},
                         {"text", ""},
                         {"logprobs", nullptr},
                         {"finish_reason", finish_reason(message.final.reason)}};
          if (!message.final.matched_stop.empty())
            choice["stop_reason"] = message.final.matched_stop;
          json event = completion->chunk(json::array({choice}));
          if (completion->include_usage) event["usage"] = nullptr;
          if (!send(event)) return false;
          if (completion->include_usage) {
            // As OpenAI does: one more chunk with no choices and the usage of the whole request.
            json usage = completion->chunk(json::array());
            usage["usage"] = usage_json(message.final);
            if (!send(usage)) return false;
          }
          return end();
        }
        case StreamMessage::Kind::kError: {
          // The status line (200) is gone; the error goes in the stream, as vLLM sends it.
          if (!send(error_json(
                  from_status(grpc::Status(to_code(message.error), message.error_message))))) {
            return false;
          }
          return end();
        }
      }
    } while (completion->next(message, std::chrono::milliseconds(0)));
    return true;
  };
  // Runs when the response is over, written to the end or not: a client that went away cancels
  // its request, whose blocks go back to the pool at the next step.
  const auto release = [this, completion](bool) {
    if (!completion->ended) loop_->cancel(completion->ticket);
    --open_completions_;
  };
  response.set_chunked_content_provider("text/event-stream", provider, release);
}

}  // namespace kvserve
