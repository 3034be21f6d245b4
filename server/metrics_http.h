// Serves a Prometheus registry at http://HOST:PORT/metrics (text exposition format 0.0.4).
//
// Why not prometheus::Exposer (civetweb): Debian's civetweb 1.15 runs its workers on fixed
// 100 KiB stacks, and glibc carves every thread's static TLS out of its stack. In kvserve that
// TLS is ~65 KiB (OpenBLAS alone has 60 KiB), so a civetweb worker overflows its stack on the
// first scrape and the process dies. Scrapes are rare and tiny: one thread with a normal stack,
// one connection at a time, HTTP/1.0 semantics (the response closes the connection), is enough.
// The exposition itself is prometheus-cpp's TextSerializer.
#pragma once

#include <prometheus/registry.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>

namespace kvserve {

class MetricsHttpServer {
 public:
  // Listens on host:port (port 0 picks a free one); throws when it cannot.
  MetricsHttpServer(const std::string& host, int port,
                    std::shared_ptr<prometheus::Registry> registry);
  ~MetricsHttpServer();  // stops the thread, closes the socket
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  int port() const { return port_; }

 private:
  void run();
  void serve_one(int connection) const;

  std::shared_ptr<prometheus::Registry> registry_;
  int listen_fd_ = -1;
  int stop_pipe_[2] = {-1, -1};
  int port_ = 0;
  std::thread thread_;
};

}  // namespace kvserve
