#include "client/cli.h"

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "client/generation_client.h"
#include "client/http_client.h"
#include "client/load_generator.h"
#include "common/command_line.h"

namespace kvserve::client {
namespace {

struct GenerateArgs {
  std::string addr;
  TlsFiles tls;
  std::string prompt;
  std::vector<std::string> prompt_ids;
  uint32_t max_new_tokens = 0;
  float temperature = 0, top_p = 0, repetition_penalty = 0;
  int32_t top_k = 0;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool greedy = false, ignore_eos = false, logprobs = false;
  double timeout_s = 0;
  // Options whose absence must leave the proto field unset (the server's default applies).
  CLI::Option *max_new_tokens_opt, *temperature_opt, *top_k_opt, *top_p_opt, *penalty_opt,
      *seed_opt, *prompt_ids_opt;
};

struct HealthArgs {
  std::string addr, service;
  TlsFiles tls;
  double timeout_s = 5;
};

struct LoadArgs {
  std::string addr, output;
  TlsFiles tls;
  LoadOptions options;
  std::string api = "grpc";  // or "http": the OpenAI completions API on the server's HTTP port
  std::string api_key;
};

struct InfoArgs {
  std::string addr;
  TlsFiles tls;
  double timeout_s = 10;
};

std::string finish_reason_name(v1::FinishReason reason) {
  const std::string name = v1::FinishReason_Name(reason);
  const std::string prefix = "FINISH_REASON_";
  return name.compare(0, prefix.size(), prefix) == 0 ? name.substr(prefix.size()) : name;
}

double ms(Clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

int fail(const std::string& what, const grpc::Status& status, const TlsFiles& tls) {
  std::cerr << "kvserve-cli: " << what << ": " << describe(status) << "\n";
  if (const std::string why = explain_connection_failure(status, !tls.ca.empty()); !why.empty()) {
    std::cerr << "kvserve-cli: " << why << "\n";
  }
  return 1;
}

int run_generate(const GenerateArgs& a) {
  v1::GenerateRequest request;
  if (*a.prompt_ids_opt) {
    const std::vector<int32_t> ids = parse_token_ids(a.prompt_ids);
    request.mutable_prompt_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
  } else {
    request.set_prompt(a.prompt);
  }
  v1::SamplingParams& sampling = *request.mutable_sampling();
  if (*a.temperature_opt) sampling.set_temperature(a.temperature);
  if (a.greedy) sampling.set_temperature(0.0f);
  if (*a.top_k_opt) sampling.set_top_k(a.top_k);
  if (*a.top_p_opt) sampling.set_top_p(a.top_p);
  if (*a.penalty_opt) sampling.set_repetition_penalty(a.repetition_penalty);
  if (*a.seed_opt) sampling.set_seed(a.seed);
  v1::StoppingCriteria& stopping = *request.mutable_stopping();
  if (*a.max_new_tokens_opt) stopping.set_max_new_tokens(a.max_new_tokens);
  for (const std::string& s : a.stop) stopping.add_stop(s);
  for (int32_t id : a.stop_token_ids) stopping.add_stop_token_ids(id);
  stopping.set_ignore_eos(a.ignore_eos);
  request.set_return_logprobs(a.logprobs);

  std::ostringstream logprobs;
  GenerationClient client(a.addr, a.tls);
  const GenerateOutcome outcome = client.Generate(
      std::move(request), a.timeout_s, [&](const v1::TokenChunk& chunk, Clock::time_point) {
        std::fwrite(chunk.text().data(), 1, chunk.text().size(), stdout);
        std::fflush(stdout);
        for (int i = 0; i < chunk.logprobs_size() && i < chunk.token_ids_size(); ++i) {
          logprobs << " " << chunk.token_ids(i) << ":" << chunk.logprobs(i);
        }
      });
  // The text carries no newline of its own; a terminal still wants the summary on its own line.
  if (isatty(STDOUT_FILENO)) std::fputc('\n', stdout);
  std::fflush(stdout);
  if (!outcome.status.ok()) return fail("generate failed", outcome.status, a.tls);

  const v1::GenerateFinal& final = *outcome.final;
  const StreamTiming& t = outcome.timing;
  std::cerr << "finish_reason=" << finish_reason_name(final.finish_reason());
  if (!final.matched_stop().empty()) std::cerr << " matched_stop=" << final.matched_stop();
  std::cerr << " prompt_tokens=" << final.prompt_tokens()
            << " completion_tokens=" << final.completion_tokens();
  if (!t.chunks.empty()) std::cerr << " ttft_ms=" << ms(t.chunks.front().time - t.start);
  std::cerr << " e2e_ms=" << ms(t.end - t.start)
            << " server_ttft_ms=" << final.time_to_first_token_seconds() * 1e3
            << " server_queue_ms=" << final.queue_seconds() * 1e3 << "\n";
  if (a.logprobs) std::cerr << "logprobs:" << logprobs.str() << "\n";
  return 0;
}

int run_health(const HealthArgs& a) {
  GenerationClient client(a.addr, a.tls);
  ServingStatus status = grpc::health::v1::HealthCheckResponse::UNKNOWN;
  const grpc::Status result = client.CheckHealth(a.service, a.timeout_s, &status);
  if (!result.ok()) return fail("health check failed", result, a.tls);
  std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(status) << "\n";
  return status == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

// A one-line bar redrawn in place, at most ten times a second (and always for the last request).
class ProgressBar {
 public:
  void operator()(const LoadProgress& p) {
    const Clock::time_point now = Clock::now();
    if (p.completed < p.total && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    constexpr int kWidth = 40;
    const int filled = kWidth * p.completed / p.total;
    std::fprintf(stderr, "\r[%s%s] %d/%d done, %d failed, %d in flight",
                 std::string(filled, '#').c_str(), std::string(kWidth - filled, '.').c_str(),
                 p.completed, p.total, p.failed, p.started - p.completed);
    if (p.completed == p.total) std::fputc('\n', stderr);
    std::fflush(stderr);
  }

 private:
  Clock::time_point last_;
};

int run_load_command(const LoadArgs& a) {
  std::unique_ptr<GenerateApi> client;
  if (a.api == "http") {
    client = std::make_unique<HttpGenerationClient>(a.addr, a.api_key);
  } else {
    client = std::make_unique<GenerationClient>(a.addr, a.tls);
  }
  ProgressCallback progress;
  if (isatty(STDERR_FILENO)) progress = ProgressBar();
  nlohmann::json result = run_load(*client, a.options, progress);
  result["config"]["api"] = a.api;
  const std::string text = result.dump(2);
  std::cout << text << std::endl;
  if (!a.output.empty()) {
    std::ofstream out(a.output);
    out << text << "\n";
    if (!out) {
      std::cerr << "kvserve-cli: cannot write " << a.output << "\n";
      return 1;
    }
  }
  return 0;
}

int run_info(const InfoArgs& a) {
  GenerationClient client(a.addr, a.tls);
  v1::ModelInfo model;
  grpc::Status status = client.GetModelInfo(a.timeout_s, &model);
  if (!status.ok()) return fail("GetModelInfo failed", status, a.tls);
  v1::CacheStats cache;
  status = client.GetCacheStats(a.timeout_s, &cache);
  if (!status.ok()) return fail("GetCacheStats failed", status, a.tls);
  std::cout << nlohmann::json{{"model", to_json(model)}, {"cache", to_json(cache)}}.dump(2)
            << std::endl;
  return 0;
}

// CLI11 reads the number with strtold, which takes "inf"; PositiveNumber would turn inf away.
std::string check_rate(const std::string& text) {
  char* end = nullptr;
  const double rate = std::strtod(text.c_str(), &end);
  const bool ok = !text.empty() && *end == '\0' && rate > 0;
  return ok ? "" : "must be a positive number of requests per second or inf, got " + text;
}

void add_addr(CLI::App* command, std::string& addr, TlsFiles& tls) {
  command->add_option("--addr", addr, "the server, HOST:PORT")->required();
  CLI::Option* ca =
      command
          ->add_option("--tls-ca", tls.ca, "PEM CA bundle: connect over TLS and verify the server")
          ->check(CLI::ExistingFile);
  CLI::Option* cert =
      command->add_option("--tls-cert", tls.cert, "PEM client certificate, for mutual TLS")
          ->check(CLI::ExistingFile);
  CLI::Option* key = command->add_option("--tls-key", tls.key, "PEM private key of --tls-cert")
                         ->check(CLI::ExistingFile);
  cert->needs(key)->needs(ca);
  key->needs(cert);
}

}  // namespace

int run_cli(int argc, char** argv) {
  CLI::App app{"kvserve-cli: streaming generation, health checks and load tests against kvserve"};
  configure_app(app, "kvserve-cli");
  app.require_subcommand(1);
  app.footer(
      "Exit status: 0 on success, 1 when the call failed (or health is not SERVING), 2 on a "
      "usage error.");

  GenerateArgs g;
  CLI::App* generate = app.add_subcommand("generate", "stream one completion to stdout");
  add_addr(generate, g.addr, g.tls);
  CLI::Option_group* input = generate->add_option_group("prompt", "the prompt");
  input->add_option("--prompt", g.prompt, "prompt text");
  g.prompt_ids_opt = input->add_option("--prompt-ids", g.prompt_ids, kPromptIdsHelp)
                         ->check(token_ids())
                         ->default_str("");
  input->require_option(1);
  // Unset sampling and stopping fields take the server's defaults (docs/design.md section 5).
  const std::string server_default = "the server's";
  g.max_new_tokens_opt = generate
                             ->add_option("--max-new-tokens", g.max_new_tokens,
                                          "tokens to generate at most (server default 16)")
                             ->default_str(server_default);
  g.temperature_opt = generate->add_option("--temperature", g.temperature, "0 means greedy")
                          ->default_str(server_default);
  generate->add_flag("--greedy", g.greedy, "greedy decoding (temperature 0)")
      ->excludes(g.temperature_opt);
  g.top_k_opt = generate->add_option("--top-k", g.top_k, "0: off")->default_str(server_default);
  g.top_p_opt = generate->add_option("--top-p", g.top_p, "1: off")->default_str(server_default);
  g.penalty_opt = generate->add_option("--repetition-penalty", g.repetition_penalty, "1: off")
                      ->default_str(server_default);
  g.seed_opt = generate->add_option("--seed", g.seed, "sampling seed")->default_str(server_default);
  generate->add_option("--stop", g.stop, "stop strings");
  generate->add_option("--stop-token-id", g.stop_token_ids, "stop token ids");
  generate->add_flag("--ignore-eos", g.ignore_eos, "keep going past end-of-text");
  generate->add_flag("--logprobs", g.logprobs, "print each token's log-probability on stderr");
  generate->add_option("--timeout-s", g.timeout_s, "deadline of the call in seconds (0: none)");

  HealthArgs h;
  CLI::App* health = app.add_subcommand(
      "health", "grpc.health.v1 check: prints the status, exits 0 only when SERVING");
  add_addr(health, h.addr, h.tls);
  health->add_option("--service", h.service,
                     "service name: kvserve.v1.Generation, or empty for the whole server");
  health->add_option("--timeout-s", h.timeout_s, "deadline in seconds")->capture_default_str();

  LoadArgs l;
  LoadOptions& o = l.options;
  CLI::App* load = app.add_subcommand(
      "load",
      "benchmark: many concurrent streams; one JSON result (vLLM's metric names) on stdout");
  add_addr(load, l.addr, l.tls);
  load->add_option("--requests", o.requests, "requests to send")
      ->check(positive())
      ->capture_default_str();
  load->add_option("--rate", o.rate,
                   "requests per second, Poisson arrivals; inf sends all at once (closed loop)")
      ->check(CLI::Validator(check_rate, "RATE|inf"))
      ->capture_default_str();
  load->add_option("--concurrency", o.concurrency, "requests in flight at most")
      ->check(positive())
      ->capture_default_str();
  load->add_option("--prompt-len", o.prompt_len,
                   "prompt tokens (random ids), or that times --chars-per-token characters of "
                   "--prompts-file")
      ->check(positive())
      ->capture_default_str();
  load->add_option("--shared-prefix-len", o.shared_prefix_len,
                   "random token ids that every prompt starts with, before its own --prompt-len "
                   "(prefix caching's case)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  load->add_option("--max-new-tokens", o.max_new_tokens, "tokens to generate per request")
      ->check(positive())
      ->capture_default_str();
  load->add_option("--prompts-file", o.prompts_file,
                   "text (.xz is decompressed) to cut prompts from, e.g. "
                   "../shared/data/docs-val.txt.xz; default: random token ids")
      ->check(CLI::ExistingFile);
  load->add_option("--chars-per-token", o.chars_per_token,
                   "characters of --prompts-file per prompt token")
      ->check(positive())
      ->capture_default_str();
  load->add_option("--seed", o.seed, "seed of prompts and arrival times")->capture_default_str();
  load->add_flag("--ignore-eos,!--no-ignore-eos", o.ignore_eos,
                 "generate exactly --max-new-tokens tokens (default on)");
  load->add_option("--temperature", o.temperature,
                   "sampling temperature of every request, 0 for greedy")
      ->check(CLI::Range(0.0f, 100.0f))
      ->default_str("the server's");
  load->add_option("--timeout-s", o.timeout_s, "deadline of each request in seconds (0: none)");
  load->add_option("--output", l.output, "also write the JSON result to this file");
  load->add_option("--api", l.api,
                   "grpc, or http: the OpenAI completions API (streamed) at --addr, the server's "
                   "HTTP port")
      ->check(CLI::IsMember({"grpc", "http"}))
      ->capture_default_str();
  load->add_option("--api-key", l.api_key, "--api http: the server's --api-key")
      ->envname("KVSERVE_API_KEY");

  InfoArgs i;
  CLI::App* info = app.add_subcommand("info", "the server's model info and cache stats as JSON");
  add_addr(info, i.addr, i.tls);
  info->add_option("--timeout-s", i.timeout_s, "deadline in seconds")->capture_default_str();

  if (const std::optional<int> status = parse_command_line(app, argc, argv, "kvserve-cli")) {
    return *status;
  }
  try {
    if (*generate) return run_generate(g);
    if (*health) return run_health(h);
    if (*load) return run_load_command(l);
    return run_info(i);
  } catch (const std::invalid_argument& e) {
    std::cerr << "kvserve-cli: " << e.what() << "\n";
    return kExitUsage;
  } catch (const std::exception& e) {
    std::cerr << "kvserve-cli: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace kvserve::client
