#include "client/load_generator.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>

#include "client/latency_stats.h"
#include "common/text_io.h"

namespace kvserve::client {
namespace {

double seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// The prompt text of a --prompts-file. Document separators are dropped: whether the server reads
// "<|endoftext|>" in a prompt as the special token is not the load generator's business.
std::string read_prompt_text(const std::string& path) {
  std::string text = read_file(path);
  const std::string separator = "<|endoftext|>";
  for (size_t at; (at = text.find(separator)) != std::string::npos;) {
    text.erase(at, separator.size());
  }
  return text;
}

bool is_utf8_continuation(char c) {
  return (static_cast<unsigned char>(c) & 0xC0) == 0x80;
}

// `length` bytes of `text` from a random offset, both ends moved onto character boundaries so the
// prompt is valid UTF-8 (the server rejects anything else).
std::string random_slice(const std::string& text, size_t length, std::mt19937_64& rng) {
  size_t start = std::uniform_int_distribution<size_t>(0, text.size() - length)(rng);
  while (start < text.size() && is_utf8_continuation(text[start])) ++start;
  size_t end = std::min(start + length, text.size());
  while (end < text.size() && is_utf8_continuation(text[end])) --end;
  return text.substr(start, end - start);
}

// mean/median/std/p50/p90/p99 of `seconds_samples` in milliseconds under vLLM's key names; null
// when there were no samples.
void add_latency(nlohmann::json& out, const std::string& metric,
                 const std::vector<double>& seconds_samples) {
  std::vector<double> ms;
  ms.reserve(seconds_samples.size());
  for (double s : seconds_samples) ms.push_back(s * 1e3);
  const std::optional<Summary> s = summarize(std::move(ms));
  const auto put = [&](const std::string& stat, double value) {
    out[stat + "_" + metric + "_ms"] = s ? nlohmann::json(value) : nlohmann::json(nullptr);
  };
  put("mean", s ? s->mean : 0);
  put("median", s ? s->p50 : 0);
  put("std", s ? s->stddev : 0);
  put("p50", s ? s->p50 : 0);
  put("p90", s ? s->p90 : 0);
  put("p99", s ? s->p99 : 0);
}

void validate(const LoadOptions& o) {
  if (o.requests < 1 || o.concurrency < 1 || o.prompt_len < 1 || o.max_new_tokens < 1) {
    throw std::invalid_argument(
        "requests, concurrency, prompt length and max new tokens must be >= 1");
  }
  if (!(o.rate > 0)) throw std::invalid_argument("the request rate must be > 0 (or inf)");
  if (!(o.chars_per_token > 0)) throw std::invalid_argument("chars per token must be > 0");
  if (o.shared_prefix_len < 0) throw std::invalid_argument("the shared prefix must be >= 0");
  if (o.shared_prefix_len > 0 && !o.prompts_file.empty()) {
    throw std::invalid_argument("a shared prefix needs random token ids, not a prompts file");
  }
}

}  // namespace

RequestMeasures measure(const GenerateOutcome& outcome) {
  const StreamTiming& t = outcome.timing;
  RequestMeasures m;
  m.e2e = seconds(t.end - t.start);
  m.prompt_tokens = outcome.final->prompt_tokens();
  m.output_tokens = outcome.final->completion_tokens();
  if (t.chunks.empty()) return m;
  m.ttft = seconds(t.chunks.front().time - t.start);
  if (m.output_tokens > 1) m.tpot = (m.e2e - *m.ttft) / (m.output_tokens - 1);
  for (size_t i = 1; i < t.chunks.size(); ++i) {
    const int tokens = std::max(1, t.chunks[i].tokens);
    const double gap = seconds(t.chunks[i].time - t.chunks[i - 1].time);
    m.itl.insert(m.itl.end(), tokens, gap / tokens);
  }
  return m;
}

std::vector<double> arrival_offsets(int n, double rate, uint64_t seed) {
  std::vector<double> offsets(n, 0.0);
  if (std::isinf(rate)) return offsets;
  std::mt19937_64 rng(seed);
  std::exponential_distribution<double> gap(rate);
  for (int i = 1; i < n; ++i) offsets[i] = offsets[i - 1] + gap(rng);
  return offsets;
}

std::vector<v1::GenerateRequest> make_requests(const LoadOptions& options, int vocab_size) {
  std::mt19937_64 rng(options.seed);
  std::string text;
  size_t slice_length = 0;
  if (!options.prompts_file.empty()) {
    text = read_prompt_text(options.prompts_file);
    slice_length = static_cast<size_t>(std::max(
        1.0, std::round(static_cast<double>(options.prompt_len) * options.chars_per_token)));
    if (text.size() < slice_length) {
      throw std::runtime_error(options.prompts_file + " holds " + std::to_string(text.size()) +
                               " bytes of text, fewer than one prompt needs (" +
                               std::to_string(slice_length) + ")");
    }
  } else if (vocab_size < 2) {
    throw std::runtime_error("the server reports a vocabulary of " + std::to_string(vocab_size) +
                             " tokens: no random prompt can be drawn");
  }
  // The last id is left out: GPT-2 checkpoints put <|endoftext|> there.
  std::uniform_int_distribution<int32_t> token(0, std::max(0, vocab_size - 2));
  std::vector<int32_t> shared_prefix;
  for (int k = 0; k < options.shared_prefix_len; ++k) shared_prefix.push_back(token(rng));
  std::vector<v1::GenerateRequest> requests(options.requests);
  for (int i = 0; i < options.requests; ++i) {
    v1::GenerateRequest& r = requests[i];
    r.set_request_id("load-" + std::to_string(i));
    if (text.empty()) {
      auto* ids = r.mutable_prompt_token_ids()->mutable_ids();
      ids->Add(shared_prefix.begin(), shared_prefix.end());
      for (int k = 0; k < options.prompt_len; ++k) ids->Add(token(rng));
    } else {
      r.set_prompt(random_slice(text, slice_length, rng));
    }
    r.mutable_stopping()->set_max_new_tokens(options.max_new_tokens);
    r.mutable_stopping()->set_ignore_eos(options.ignore_eos);
    if (options.temperature) r.mutable_sampling()->set_temperature(*options.temperature);
  }
  return requests;
}

nlohmann::json run_load(GenerateApi& client, const LoadOptions& options,
                        const ProgressCallback& progress) {
  validate(options);
  v1::ModelInfo info;
  const grpc::Status asked =
      client.GetModelInfo(options.timeout_s > 0 ? options.timeout_s : 10, &info);
  if (!asked.ok())
    throw std::runtime_error("cannot get the server's model info: " + describe(asked));
  std::vector<v1::GenerateRequest> requests = make_requests(options, info.vocab_size());
  const std::vector<double> offsets = arrival_offsets(options.requests, options.rate, options.seed);

  // One dispatching thread (this one) sleeps until each arrival time, then waits for a free slot;
  // the streams themselves run on gRPC's callback threads, which only record and count.
  std::vector<GenerateOutcome> outcomes(options.requests);
  std::mutex mutex;
  std::condition_variable changed;
  LoadProgress state;
  state.total = options.requests;
  int in_flight = 0;
  const Clock::time_point start = Clock::now();
  for (int i = 0; i < options.requests; ++i) {
    std::this_thread::sleep_until(start + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(offsets[i])));
    {
      std::unique_lock<std::mutex> lock(mutex);
      changed.wait(lock, [&] { return in_flight < options.concurrency; });
      ++in_flight;
      ++state.started;
    }
    client.StartGenerate(std::move(requests[i]), options.timeout_s, nullptr,
                         [&, i](GenerateOutcome outcome) {
                           std::lock_guard<std::mutex> lock(mutex);
                           if (!outcome.status.ok()) ++state.failed;
                           outcomes[i] = std::move(outcome);
                           --in_flight;
                           ++state.completed;
                           if (progress) progress(state);
                           changed.notify_all();
                         });
  }
  {
    std::unique_lock<std::mutex> lock(mutex);
    changed.wait(lock, [&] { return state.completed == state.total; });
  }

  Clock::time_point last_end = start;
  std::vector<double> ttft, tpot, itl, e2el;
  uint64_t input_tokens = 0, output_tokens = 0;
  int completed = 0;
  nlohmann::json errors = nlohmann::json::object();
  for (const GenerateOutcome& outcome : outcomes) {
    last_end = std::max(last_end, outcome.timing.end);
    if (!outcome.status.ok()) {
      const std::string code = status_code_name(outcome.status.error_code());
      errors[code] = errors.value(code, 0) + 1;
      continue;
    }
    ++completed;
    const RequestMeasures m = measure(outcome);
    input_tokens += m.prompt_tokens;
    output_tokens += m.output_tokens;
    if (m.ttft) ttft.push_back(*m.ttft);
    if (m.tpot) tpot.push_back(*m.tpot);
    itl.insert(itl.end(), m.itl.begin(), m.itl.end());
    e2el.push_back(m.e2e);
  }
  const double duration = seconds(last_end - start);

  nlohmann::json out;
  out["config"] = {
      {"requests", options.requests},
      {"request_rate",
       std::isinf(options.rate) ? nlohmann::json("inf") : nlohmann::json(options.rate)},
      {"max_concurrency", options.concurrency},
      {"prompt_len", options.prompt_len},
      {"shared_prefix_len", options.shared_prefix_len},
      {"max_new_tokens", options.max_new_tokens},
      {"prompts", options.prompts_file.empty() ? "random token ids" : options.prompts_file},
      {"seed", options.seed},
      {"ignore_eos", options.ignore_eos},
      {"temperature", options.temperature ? nlohmann::json(*options.temperature)
                                          : nlohmann::json("server default")},
  };
  out["model"] = to_json(info);
  out["duration"] = duration;
  out["completed"] = completed;
  out["failed"] = options.requests - completed;
  out["total_input_tokens"] = input_tokens;
  out["total_output_tokens"] = output_tokens;
  out["request_throughput"] = completed / duration;
  out["output_throughput"] = static_cast<double>(output_tokens) / duration;
  out["total_token_throughput"] = static_cast<double>(input_tokens + output_tokens) / duration;
  add_latency(out, "ttft", ttft);
  add_latency(out, "tpot", tpot);
  add_latency(out, "itl", itl);
  add_latency(out, "e2el", e2el);
  out["errors"] = errors;
  return out;
}

}  // namespace kvserve::client
