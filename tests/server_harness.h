// Runs the real `kvserve serve` binary for end-to-end tests: loopback only, bounded waits, and
// every process it starts is killed when the harness goes away.
#pragma once

#include <grpcpp/grpcpp.h>
#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "kvserve/v1/generation.grpc.pb.h"

namespace kvserve::testing {

// A child process with stdout and stderr in a file; killed (SIGKILL) on destruction if alive.
class ChildProcess {
 public:
  ChildProcess(const std::vector<std::string>& argv, const std::string& log_path);
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  void signal(int sig) const;
  // Waits up to `timeout` for the exit; returns the exit code, or -1 (timeout or killed).
  int wait(std::chrono::milliseconds timeout);
  std::string log() const;

 private:
  pid_t pid_ = -1;
  bool reaped_ = false;
  std::string log_path_;
};

// `kvserve serve --host 127.0.0.1 --port 0 --metrics-port 0 ARGS...`; waits for the
// "listening on" line (ports) and, unless told not to, for health SERVING. channel() and the
// checks use `credentials` (default: plaintext).
class ServerProcess {
 public:
  explicit ServerProcess(const std::vector<std::string>& args, bool wait_serving = true,
                         std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr);

  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  ChildProcess& process() { return *process_; }
  std::shared_ptr<grpc::Channel> channel() const { return channel_; }
  std::unique_ptr<kvserve::v1::Generation::Stub> stub() const;
  // SERVING, NOT_SERVING, or UNKNOWN when the check itself failed.
  grpc::health::v1::HealthCheckResponse::ServingStatus health() const;
  void wait_serving(std::chrono::seconds timeout = std::chrono::seconds(60)) const;
  kvserve::v1::CacheStats cache_stats() const;
  std::string metrics_text() const;

 private:
  std::unique_ptr<ChildProcess> process_;
  int port_ = 0;
  int metrics_port_ = 0;
  std::shared_ptr<grpc::Channel> channel_;
};

// The body of http://127.0.0.1:port/path (plain HTTP/1.0, no dependencies); throws on failure.
std::string http_get(int port, const std::string& path);
// A port that was free a moment ago (for programs that cannot pick their own).
int free_port();
// The value of the sample `name_and_labels` (e.g. `kvserve_request_success_total{finish_reason=
// "length"}`) in a Prometheus text exposition; throws when it is missing.
double metric_value(const std::string& exposition, const std::string& name_and_labels);

// One Generate call, read to the end.
struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> ids;
  std::string text;
  std::vector<float> logprobs;
  int chunks = 0;
  bool has_final = false;
  kvserve::v1::GenerateFinal final;
};
StreamResult generate(kvserve::v1::Generation::Stub& stub, const kvserve::v1::GenerateRequest& r,
                      std::chrono::milliseconds timeout = std::chrono::seconds(120));

}  // namespace kvserve::testing
