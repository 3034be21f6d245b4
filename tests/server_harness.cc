#include "tests/server_harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <regex>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "common/text_io.h"
#include "tests/test_support.h"

namespace kvserve::testing {

using namespace std::chrono_literals;

ChildProcess::ChildProcess(const std::vector<std::string>& argv, const std::string& log_path)
    : log_path_(log_path) {
  std::vector<char*> args;
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);
  const int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw std::runtime_error("cannot create " + log_path);
  pid_ = fork();
  if (pid_ == 0) {
    dup2(fd, 1);
    dup2(fd, 2);
    execv(args[0], args.data());
    _exit(127);
  }
  close(fd);
  if (pid_ < 0) throw std::runtime_error("fork failed");
}

ChildProcess::~ChildProcess() {
  if (!reaped_ && pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

void ChildProcess::signal(int sig) const {
  kill(pid_, sig);
}

int ChildProcess::wait(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!reaped_) {
    int status = 0;
    const pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      reaped_ = true;
      return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }
    if (std::chrono::steady_clock::now() >= deadline) return -1;
    std::this_thread::sleep_for(10ms);
  }
  return -1;
}

std::string ChildProcess::log() const {
  return read_file(log_path_);
}

ServerProcess::ServerProcess(const std::vector<std::string>& args, bool wait_serving,
                             std::shared_ptr<grpc::ChannelCredentials> credentials) {
  std::vector<std::string> argv = {kvserve_binary(), "serve", "--host",         "127.0.0.1",
                                   "--port",         "0",     "--metrics-port", "0"};
  argv.insert(argv.end(), args.begin(), args.end());
  process_ = std::make_unique<ChildProcess>(argv, make_temp_dir("kvserve-serve") + "/log");
  const std::regex listening(
      R"(listening on 127\.0\.0\.1:(\d+) \(gRPC[^)]*\), metrics on http://127\.0\.0\.1:(\d+)/metrics)");
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  // `match` points into `log`, which must outlive it (ASan caught a use after free here).
  std::string log;
  std::smatch match;
  while (true) {
    log = process_->log();
    if (std::regex_search(log, match, listening)) break;
    if (process_->wait(0ms) != -1 || std::chrono::steady_clock::now() > deadline) {
      throw std::runtime_error("kvserve serve did not start:\n" + log);
    }
    std::this_thread::sleep_for(5ms);
  }
  port_ = std::stoi(match[1]);
  metrics_port_ = std::stoi(match[2]);
  if (!credentials) credentials = grpc::InsecureChannelCredentials();
  channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(port_), credentials);
  if (wait_serving) this->wait_serving();
}

std::unique_ptr<kvserve::v1::Generation::Stub> ServerProcess::stub() const {
  return kvserve::v1::Generation::NewStub(channel_);
}

grpc::health::v1::HealthCheckResponse::ServingStatus ServerProcess::health() const {
  auto health = grpc::health::v1::Health::NewStub(channel_);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 5s);
  grpc::health::v1::HealthCheckRequest request;
  grpc::health::v1::HealthCheckResponse response;
  if (!health->Check(&context, request, &response).ok()) {
    return grpc::health::v1::HealthCheckResponse::UNKNOWN;
  }
  return response.status();
}

void ServerProcess::wait_serving(std::chrono::seconds timeout) const {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (health() != grpc::health::v1::HealthCheckResponse::SERVING) {
    if (std::chrono::steady_clock::now() > deadline) {
      throw std::runtime_error("kvserve never became SERVING:\n" + process_->log());
    }
    std::this_thread::sleep_for(10ms);
  }
}

kvserve::v1::CacheStats ServerProcess::cache_stats() const {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 5s);
  kvserve::v1::CacheStats stats;
  const grpc::Status status = stub()->GetCacheStats(&context, {}, &stats);
  if (!status.ok()) throw std::runtime_error("GetCacheStats: " + status.error_message());
  return stats;
}

std::string ServerProcess::metrics_text() const {
  return http_get(metrics_port_, "/metrics");
}

std::string http_get(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval timeout{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
    close(fd);
    throw std::runtime_error("cannot connect to port " + std::to_string(port));
  }
  const std::string request = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    throw std::runtime_error("cannot send the HTTP request");
  }
  std::string response;
  char buffer[65536];
  for (ssize_t n; (n = read(fd, buffer, sizeof buffer)) > 0;) response.append(buffer, n);
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  if (response.compare(0, 12, "HTTP/1.1 200") != 0 &&
      response.compare(0, 12, "HTTP/1.0 200") != 0) {
    throw std::runtime_error("GET " + path + ": " + response.substr(0, 200));
  }
  return body == std::string::npos ? "" : response.substr(body + 4);
}

int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address);
  socklen_t length = sizeof address;
  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  close(fd);
  return ntohs(address.sin_port);
}

double metric_value(const std::string& exposition, const std::string& name_and_labels) {
  std::istringstream in(exposition);
  for (std::string line; std::getline(in, line);) {
    if (line.compare(0, name_and_labels.size() + 1, name_and_labels + " ") == 0) {
      return std::stod(line.substr(name_and_labels.size() + 1));
    }
  }
  throw std::runtime_error("no sample " + name_and_labels + " in /metrics");
}

StreamResult generate(kvserve::v1::Generation::Stub& stub, const kvserve::v1::GenerateRequest& r,
                      std::chrono::milliseconds timeout) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  auto reader = stub.Generate(&context, r);
  StreamResult result;
  kvserve::v1::GenerateResponse response;
  while (reader->Read(&response)) {
    if (response.has_chunk()) {
      ++result.chunks;
      result.ids.insert(result.ids.end(), response.chunk().token_ids().begin(),
                        response.chunk().token_ids().end());
      result.text += response.chunk().text();
      result.logprobs.insert(result.logprobs.end(), response.chunk().logprobs().begin(),
                             response.chunk().logprobs().end());
    } else if (response.has_final()) {
      result.has_final = true;
      result.final = response.final();
    }
  }
  result.status = reader->Finish();
  return result;
}

}  // namespace kvserve::testing
