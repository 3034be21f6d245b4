#include "server/serve.h"

#include <fcntl.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <poll.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>

#include "common/text_io.h"
#include "engine/backend_factory.h"
#include "engine/checkpoint.h"
#include "engine/engine.h"
#include "server/engine_loop.h"
#include "server/http_server.h"
#include "server/metrics.h"

namespace kvserve {
namespace {

std::string join_host_port(const std::string& host, int port) {
  // IPv6 literals need brackets in a URI authority.
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

// SIGTERM/SIGINT reach a handler that only writes the signal number to a pipe; the main thread
// reads the pipe. (Blocking the signals instead is not enough: OpenBLAS and OpenMP start threads
// before main, and a process-directed signal may be delivered to one of them.)
int signal_pipe[2] = {-1, -1};

extern "C" void on_signal(int signal) {
  const char byte = static_cast<char>(signal);
  const ssize_t written = write(signal_pipe[1], &byte, 1);  // async-signal-safe
  (void)written;
}

void install_signal_handlers() {
  if (pipe2(signal_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    throw std::runtime_error(std::string("pipe2: ") + std::strerror(errno));
  }
  struct sigaction action {};
  action.sa_handler = on_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
}

// What the engine thread writes to the pipe when it has lost the device (no signal is 0), so that
// the main thread wakes as it does for a signal.
constexpr int kDeviceLostWakeup = 0;

void wake_for_device_lost() {
  const char byte = static_cast<char>(kDeviceLostWakeup);
  const ssize_t written = write(signal_pipe[1], &byte, 1);
  (void)written;
}

// Waits up to `timeout` for SIGTERM/SIGINT or the device-lost wake-up; true (and which: a signal
// number or kDeviceLostWakeup) when one came.
bool wait_for_signal(std::chrono::milliseconds timeout, int& signal) {
  pollfd fd{signal_pipe[0], POLLIN, 0};
  if (poll(&fd, 1, static_cast<int>(timeout.count())) <= 0) return false;
  char byte = 0;
  if (read(signal_pipe[0], &byte, 1) != 1) return false;
  signal = byte;
  return true;
}

v1::ModelInfo model_info(const std::string& model, const ModelConfig& config,
                         const KvCacheConfig& kv, const std::string& device) {
  v1::ModelInfo info;
  info.set_model(model);
  info.set_architecture("gpt2");
  info.set_n_layer(config.n_layer);
  info.set_n_head(config.n_head);
  info.set_n_embd(config.n_embd);
  info.set_context_length(config.n_positions);
  info.set_vocab_size(config.vocab_size);
  info.set_kv_format(to_string(kv.format));
  info.set_kv_bits(kv_bits(kv.format));
  info.set_kv_key_group(kv.key_group);
  info.set_kv_value_group(kv.value_group);
  info.set_kv_residual(kv.residual);
  info.set_kv_page_tokens(kv.page_tokens);
  info.set_kv_params(to_string(kv.params));
  info.set_kv_residual_format(to_string(kv.residual_format));
  info.set_device(device);
  info.set_version(KVSERVE_VERSION);
  return info;
}

std::shared_ptr<grpc::ServerCredentials> server_credentials(const ServeFlags& flags) {
  if (flags.tls_cert.empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions options(
      flags.tls_client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                  : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_key_cert_pairs.push_back({read_file(flags.tls_key), read_file(flags.tls_cert)});
  if (!flags.tls_client_ca.empty()) options.pem_root_certs = read_file(flags.tls_client_ca);
  return grpc::SslServerCredentials(options);
}

// Waits up to `timeout` for the streams to write their last messages and end.
void wait_for_streams(const GenerationService& service, std::chrono::seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int signal = 0;
  while (service.open_streams() > 0 && std::chrono::steady_clock::now() < deadline) {
    wait_for_signal(std::chrono::milliseconds(10), signal);
  }
}

void set_keepalive(const KeepaliveFlags& k, grpc::ServerBuilder& builder) {
  constexpr int kMsPerS = 1000;
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS,
                             k.time_s > 0 ? k.time_s * kMsPerS : std::numeric_limits<int>::max());
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, k.timeout_s * kMsPerS);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS,
                             k.permit_without_calls ? 1 : 0);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             k.min_ping_interval_s * kMsPerS);
  if (k.max_connection_idle_s > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS, k.max_connection_idle_s * kMsPerS);
  }
  if (k.max_connection_age_s > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, k.max_connection_age_s * kMsPerS);
  }
  if (k.max_connection_age_grace_s > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                               k.max_connection_age_grace_s * kMsPerS);
  }
}

}  // namespace

void add_serve_flags(CLI::App* app, ServeFlags& flags) {
  app->footer(
      "Exit status: 0 after a SIGTERM/SIGINT drain, 1 on a startup error, 2 on a usage "
      "error, " +
      std::to_string(kExitDeviceLost) +
      " when the device was lost (a sticky CUDA error: restart the server).");
  add_model_flags(app, flags.model);
  add_kv_flags(app, flags.kv);
  add_engine_flags(app, flags.engine);
  add_kv_error_sample_rate_flag(app, flags.engine);
  app->add_option("--host", flags.host, "address to listen on (gRPC and metrics)");
  app->add_option("--port", flags.port, "gRPC port (0: pick a free one; the log says which)")
      ->check(CLI::Range(0, 65535));
  app->add_option("--metrics-port", flags.metrics_port,
                  "HTTP port: /metrics, /health and the OpenAI API /v1/* (0: pick a free one; the "
                  "log says which)")
      ->check(CLI::Range(0, 65535));
  app->add_option("--api-key", flags.api_key,
                  "HTTP API key: /v1/* requests need 'Authorization: Bearer KEY' (/health and "
                  "/metrics stay open)")
      ->envname("KVSERVE_API_KEY");
  app->add_option("--http-threads", flags.http_threads,
                  "HTTP connections served at once; 4 stay for /metrics and /health, completions "
                  "beyond the rest get 429")
      ->check(CLI::Range(kReservedHttpThreads + 1, 100000))
      ->capture_default_str();
  app->add_option("--max-queued-requests", flags.max_queued_requests,
                  "requests waiting for admission; beyond it RESOURCE_EXHAUSTED")
      ->check(positive());
  app->add_option("--max-concurrent-streams", flags.limits.max_concurrent_streams,
                  "open Generate streams; beyond it RESOURCE_EXHAUSTED")
      ->check(positive());
  app->add_option("--max-new-tokens-limit", flags.limits.max_new_tokens,
                  "largest max_new_tokens a request may ask for (0: the model's context)")
      ->check(non_negative());
  app->add_option("--max-prompt-tokens", flags.limits.max_prompt_tokens,
                  "longest prompt in tokens (0: the model's context)")
      ->check(non_negative());
  app->add_option("--stream-buffer-messages", flags.limits.stream_buffer_messages,
                  "messages buffered per stream before tokens are merged into one chunk")
      ->check(positive());
  app->add_option("--write-stall-timeout-s", flags.limits.write_stall_timeout_s,
                  "cancel a stream whose write has made no progress this long: the client "
                  "stopped reading (0: never)")
      ->check(non_negative());
  app->add_option("--drain-timeout-s", flags.drain_timeout_s,
                  "on SIGTERM/SIGINT, how long streams in flight may run before they are "
                  "cancelled")
      ->check(non_negative());
  app->add_option("--max-receive-message-bytes", flags.max_receive_message_bytes,
                  "largest request message accepted")
      ->check(positive());

  CLI::Option* cert = app->add_option("--tls-cert", flags.tls_cert,
                                      "PEM certificate chain: serve gRPC over TLS only")
                          ->check(CLI::ExistingFile);
  CLI::Option* key = app->add_option("--tls-key", flags.tls_key, "PEM private key of --tls-cert")
                         ->check(CLI::ExistingFile);
  cert->needs(key);
  key->needs(cert);
  app->add_option("--tls-client-ca", flags.tls_client_ca,
                  "PEM CA bundle: mutual TLS, clients must present a certificate it signed")
      ->check(CLI::ExistingFile)
      ->needs(cert);

  KeepaliveFlags& k = flags.keepalive;
  app->add_option("--keepalive-time-s", k.time_s,
                  "ping a connection after this long without activity (0: never)")
      ->check(non_negative())
      ->capture_default_str();
  app->add_option("--keepalive-timeout-s", k.timeout_s,
                  "close the connection when a ping is not answered within this")
      ->check(positive())
      ->capture_default_str();
  app->add_flag("--keepalive-permit-without-calls", k.permit_without_calls,
                "allow keepalive pings on connections with no open call");
  app->add_option("--keepalive-min-ping-interval-s", k.min_ping_interval_s,
                  "shortest interval between client pings the server tolerates")
      ->check(non_negative())
      ->capture_default_str();
  app->add_option("--max-connection-idle-s", k.max_connection_idle_s,
                  "close a connection with no open call after this long (0: never)")
      ->check(non_negative())
      ->capture_default_str();
  app->add_option("--max-connection-age-s", k.max_connection_age_s,
                  "ask clients to reconnect (GOAWAY) after this long, to rebalance (0: never)")
      ->check(non_negative())
      ->capture_default_str();
  app->add_option("--max-connection-age-grace-s", k.max_connection_age_grace_s,
                  "after --max-connection-age-s, how long open calls may run on (0: unbounded)")
      ->check(non_negative())
      ->capture_default_str();

  // An empty group hides these from --help: they are for the tests only (TestHookFlags). CLI11
  // leaves a hidden option's name out of its errors, so the check names it.
  const auto add_hook = [app](const std::string& name, auto& target) {
    const CLI::Validator check = non_negative();
    app->add_option(name, target)
        ->check(CLI::Validator(
            [check, name](std::string& value) {
              const std::string problem = check(value);
              return problem.empty() ? problem : name + ": " + problem;
            },
            ""))
        ->group("");
  };
  add_hook("--test-lose-device-at-forward", flags.test_hooks.lose_device_at_forward);
  add_hook("--test-engine-pause-ms", flags.test_hooks.engine_pause_ms);
  add_hook("--test-write-done-delay-ms", flags.test_hooks.write_done_delay_ms);
}

int run_serve(const ServeFlags& flags) {
  // First, so that a SIGTERM during loading still drains (right after loading) instead of
  // killing the process.
  install_signal_handlers();

  EngineSpec spec = engine_spec(flags.model, flags.kv, flags.engine);
  spec.backend.lose_device_at_forward = flags.test_hooks.lose_device_at_forward;
  std::string device_reason;
  spec.device = resolve_device(spec.device, device_reason);
  Metrics metrics({KVSERVE_VERSION, spec.device, flags.kv.format, spec.model});
  HttpOptions http_options;
  http_options.host = flags.host;
  http_options.port = flags.metrics_port;
  http_options.api_key = flags.api_key;
  http_options.threads = flags.http_threads;
  http_options.max_body_bytes = static_cast<size_t>(flags.max_receive_message_bytes);
  http_options.limits = flags.limits;
  HttpServer http(http_options, metrics);
  const int metrics_port = http.port();

  // The server listens while the model loads: health says NOT_SERVING and calls get
  // UNAVAILABLE, which is what load balancers and Kubernetes probes expect.
  GenerationService service(metrics, flags.limits,
                            std::chrono::milliseconds(flags.test_hooks.write_done_delay_ms));
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(join_host_port(flags.host, flags.port), server_credentials(flags),
                           &port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(flags.max_receive_message_bytes);
  // gRPC sets SO_REUSEPORT by default on Linux: a second server on a port in use would start and
  // silently take a share of its connections. Without it, binding a port in use fails.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  set_keepalive(flags.keepalive, builder);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    // gRPC logs why a certificate or key was refused just above; this says what to look at.
    throw std::runtime_error("cannot listen on " + join_host_port(flags.host, flags.port) +
                             (flags.tls_cert.empty()
                                  ? ": the port is in use (another server?) or the address is "
                                    "not local"
                                  : ": the port is in use (another server?), the address is not "
                                    "local, or --tls-cert/--tls-key were refused (see gRPC's "
                                    "error above)"));
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  // grpc.health.v1 answers for the whole server ("") and, as the health protocol expects, for
  // the service by name; SetServingStatus(bool) below moves both together.
  health->SetServingStatus(v1::Generation::service_full_name(), false);
  health->SetServingStatus(false);
  spdlog::info(
      "listening on {} (gRPC{}), metrics on http://{}/metrics (and /health, /v1); NOT_SERVING "
      "until the model is "
      "loaded "
      "and warm",
      join_host_port(flags.host, port),
      flags.tls_cert.empty() ? ""
                             : (flags.tls_client_ca.empty() ? " over TLS" : " over mutual TLS"),
      join_host_port(flags.host, metrics_port));

  const Tokenizer tokenizer = load_tokenizer(spec.model, flags.model.tokenizer);
  BuiltBackend built = build_backend(spec);
  const ModelConfig model = built.model;
  const KvCacheConfig kv = built.kv;
  const int32_t pool_blocks = built.cache->num_blocks();
  auto engine = build_engine(std::move(built), spec.engine);
  EngineLoopOptions loop_options;
  loop_options.max_queued_requests = flags.max_queued_requests;
  loop_options.on_device_lost = [](const std::string&) { wake_for_device_lost(); };
  loop_options.pause_after_step = std::chrono::milliseconds(flags.test_hooks.engine_pause_ms);
  EngineLoop loop(std::move(engine), tokenizer, loop_options, metrics);
  const auto warm_start = std::chrono::steady_clock::now();
  loop.start();
  loop.wait_until_warm();
  const v1::ModelInfo info = model_info(spec.model, model, kv, spec.device);
  service.start_serving(loop, tokenizer, info);
  http.start_serving(loop, tokenizer, info);
  health->SetServingStatus(true);
  spdlog::info(
      "SERVING: model {} ({} layers, d={}, ctx {}), device {}, kv {}, pool {} blocks ({} MiB), "
      "gRPC {}, metrics :{}, warm-up {:.3f} s",
      spec.model, model.n_layer, model.n_embd, model.n_positions, spec.device, describe(kv),
      pool_blocks, flags.kv.pool_mb, join_host_port(flags.host, port), metrics_port,
      std::chrono::duration<double>(std::chrono::steady_clock::now() - warm_start).count());

  int signal = 0;
  while (!wait_for_signal(std::chrono::hours(1), signal)) continue;
  if (signal == kDeviceLostWakeup) {
    // The engine thread has already failed every request in flight with INTERNAL and refuses new
    // ones; a server whose device is gone must not look alive, and only a restart brings the
    // device back.
    health->SetServingStatus(false);
    service.start_draining();
    http.start_draining();
    spdlog::error(
        "device lost: {}; NOT_SERVING, shutting down and exiting with status {} so that the "
        "orchestrator restarts the server",
        loop.device_lost(), kExitDeviceLost);
    wait_for_streams(service, std::chrono::seconds(2));
    server->Shutdown(std::chrono::system_clock::now());
    http.shutdown(std::chrono::seconds(2));
    loop.stop();
    return kExitDeviceLost;
  }
  spdlog::info("{} received: draining (no new requests; up to {} s for {} in flight)",
               strsignal(signal), flags.drain_timeout_s, loop.in_flight());
  service.start_draining();
  http.start_draining();
  health->SetServingStatus(false);

  // Poll: in-flight requests end on the engine thread; a second signal cuts the wait short.
  const auto drain_deadline = std::chrono::steady_clock::now() +
                              std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                  std::chrono::duration<double>(flags.drain_timeout_s));
  bool second_signal = false;
  while (loop.in_flight() > 0 && std::chrono::steady_clock::now() < drain_deadline &&
         !second_signal) {
    second_signal = wait_for_signal(std::chrono::milliseconds(20), signal);
  }
  if (loop.in_flight() > 0) {
    spdlog::warn("drain: cancelling {} requests still in flight (finish_reason CANCELLED)",
                 loop.in_flight());
    loop.cancel_all();
    const auto cancel_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (loop.in_flight() > 0 && std::chrono::steady_clock::now() < cancel_deadline) {
      wait_for_signal(std::chrono::milliseconds(10), signal);
    }
  }
  // Up to 5 s for the streams to write their final messages; a stream still open after that (a
  // client that stopped reading) is cancelled by the shutdown.
  wait_for_streams(service, std::chrono::seconds(5));
  server->Shutdown(std::chrono::system_clock::now());
  http.shutdown(std::chrono::seconds(5));
  loop.stop();
  if (const std::string lost = loop.device_lost(); !lost.empty()) {
    spdlog::error("device lost while draining: {}; exiting with status {}", lost, kExitDeviceLost);
    return kExitDeviceLost;
  }
  spdlog::info("drained; exiting");
  return 0;
}

}  // namespace kvserve
