// `kvserve serve`: the gRPC server, its metrics exporter and the engine thread.
#pragma once

#include <CLI/CLI.hpp>
#include <cstddef>
#include <string>

#include "server/cli_flags.h"
#include "server/generation_service.h"

namespace kvserve {

struct ServeFlags {
  ModelFlags model;
  KvFlags kv;
  EngineFlags engine;
  ServiceLimits limits;
  std::string host = "0.0.0.0";
  int port = 50051;
  int metrics_port = 9464;
  size_t max_queued_requests = 256;
  double drain_timeout_s = 30;
  int max_receive_message_bytes = 4 << 20;
};

void add_serve_flags(CLI::App* app, ServeFlags& flags);

// Serves until SIGTERM or SIGINT, then drains; returns 0 after a clean drain. Throws on startup
// errors (no model, port taken, ...).
int run_serve(const ServeFlags& flags);

}  // namespace kvserve
