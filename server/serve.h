// `kvserve serve`: the gRPC server, its metrics exporter and the engine thread.
#pragma once

#include <CLI/CLI.hpp>
#include <cstddef>
#include <cstdint>
#include <string>

#include "server/cli_flags.h"
#include "server/generation_service.h"

namespace kvserve {

struct KeepaliveFlags {
  // A PING on a connection idle this long finds a client that vanished mid-stream (no FIN, e.g. a
  // crashed host) long before TCP would; gRPC's default is 2 h.
  int time_s = 60;
  int timeout_s = 20;
  // Whether clients may ping (and the server pings) while no call is open.
  bool permit_without_calls = false;
  // Client pings closer together than this count as abuse (after 2, GOAWAY); gRPC's default is
  // 5 min, too strict for clients that ping during long generations with no data flowing.
  int min_ping_interval_s = 10;
  int max_connection_idle_s = 0;
  int max_connection_age_s = 0;
  int max_connection_age_grace_s = 0;
};

// Test hooks: hidden flags (--test-*, absent from --help) that make faults and timing races happen
// on cue in the tests (tests/device_lost_test.cc, server_reliability_test.cc, gpu_fault_test.cc).
// Zero, their default, turns each off; production never sets them.
struct TestHookFlags {
  int64_t lose_device_at_forward = 0;  // BackendOptions::lose_device_at_forward
  int engine_pause_ms = 0;             // EngineLoopOptions::pause_after_step
  int write_done_delay_ms = 0;         // GenerationService's write_done_delay
};

struct ServeFlags {
  ModelFlags model;
  KvFlags kv;
  EngineFlags engine;
  ServiceLimits limits;
  std::string host = "0.0.0.0";
  int port = 50051;
  int metrics_port = 9464;  // HTTP: /metrics, /health and the OpenAI API (server/http_server.h)
  std::string api_key;  // --api-key or $KVSERVE_API_KEY: the HTTP API needs it as a Bearer token
  int http_threads = 128;
  size_t max_queued_requests = 256;
  double drain_timeout_s = 30;
  int max_receive_message_bytes = 4 << 20;
  // PEM files; TLS when tls_cert is set, mutual TLS when tls_client_ca is set too.
  std::string tls_cert;
  std::string tls_key;
  std::string tls_client_ca;
  // HTTP/2 keepalive and connection lifetime (server/README.md); 0 turns a limit off.
  KeepaliveFlags keepalive;
  TestHookFlags test_hooks;
};

void add_serve_flags(CLI::App* app, ServeFlags& flags);

// run_serve's status when the device was lost (a sticky CUDA error): requests in flight failed
// with INTERNAL, health went NOT_SERVING and the server shut down, for the orchestrator to
// restart it. Distinct from 1 (startup errors) and 2 (usage errors).
constexpr int kExitDeviceLost = 3;

// Serves until SIGTERM or SIGINT, then drains; returns 0 after a clean drain, kExitDeviceLost
// once the device is lost. Throws on startup errors (no model, port taken, ...).
int run_serve(const ServeFlags& flags);

}  // namespace kvserve
