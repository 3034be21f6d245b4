// kvserve serve's connections: TLS and mutual TLS (a throwaway CA and certificates made with
// openssl at test time; clients with and without the right credentials) and connection lifetime.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include "common/text_io.h"
#include "tests/server_harness.h"
#include "tests/test_support.h"

namespace kvserve {
namespace {

using namespace std::chrono_literals;
using grpc::health::v1::HealthCheckResponse;
using testing::ServerProcess;

void write_file(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
}

// The exit code of a shell command, or -1 when it did not exit by itself within 30 s.
int exit_code(const std::string& command) {
  const int status = std::system(("timeout 30 " + command + " >/dev/null 2>&1").c_str());
  const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return code == 124 ? -1 : code;
}

void openssl(const std::string& args) {
  const std::string command = "openssl " + args + " >/dev/null 2>&1";
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
}

// ca.pem/ca.key, server.pem/server.key (CN localhost, SAN localhost and 127.0.0.1),
// client.pem/client.key and elsewhere.pem/elsewhere.key (a server certificate for another name),
// signed by the CA; other-ca.pem, a CA that signed none of them.
class Tls : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(testing::make_temp_dir("kvserve-tls"));
    const std::string& d = *dir_;
    const std::string key = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    for (const std::string ca : {"ca", "other-ca"}) {
      openssl("req -x509" + key + " -days 1 -subj /CN=kvserve-test-" + ca + " -keyout " + d + "/" +
              ca + ".key -out " + d + "/" + ca + ".pem");
    }
    write_file(d + "/server.ext",
               "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n");
    write_file(d + "/client.ext", "extendedKeyUsage=clientAuth\n");
    write_file(d + "/elsewhere.ext",
               "subjectAltName=DNS:elsewhere.example\nextendedKeyUsage=serverAuth\n");
    for (const std::string who : {"server", "client", "elsewhere"}) {
      const std::string cn = who == "server"   ? "localhost"
                             : who == "client" ? "kvserve-test-client"
                                               : "elsewhere.example";
      openssl("req" + key + " -subj /CN=" + cn + " -keyout " + d + "/" + who + ".key -out " + d +
              "/" + who + ".csr");
      openssl("x509 -req -days 1 -in " + d + "/" + who + ".csr -CA " + d + "/ca.pem -CAkey " + d +
              "/ca.key -CAcreateserial -extfile " + d + "/" + who + ".ext -out " + d + "/" + who +
              ".pem");
    }
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }

  static std::string file(const std::string& name) { return *dir_ + "/" + name; }

  static std::shared_ptr<grpc::ChannelCredentials> tls(const std::string& ca,
                                                       bool with_client_cert) {
    grpc::SslCredentialsOptions options;
    options.pem_root_certs = read_file(file(ca));
    if (with_client_cert) {
      options.pem_cert_chain = read_file(file("client.pem"));
      options.pem_private_key = read_file(file("client.key"));
    }
    return grpc::SslCredentials(options);
  }

  static std::vector<std::string> server_args(bool mutual) {
    std::vector<std::string> args = {"--model",    testing::shared_model_dir(),
                                     "--tls-cert", file("server.pem"),
                                     "--tls-key",  file("server.key")};
    if (mutual) args.insert(args.end(), {"--tls-client-ca", file("ca.pem")});
    return args;
  }

  // A Generate call on a fresh channel; the status only.
  static grpc::Status generate(int port, std::shared_ptr<grpc::ChannelCredentials> credentials) {
    auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port), credentials);
    v1::GenerateRequest request;
    request.set_prompt("Memory is");
    request.mutable_stopping()->set_max_new_tokens(4);
    return testing::generate(*v1::Generation::NewStub(channel), request, 20s).status;
  }

  static std::string* dir_;
};
std::string* Tls::dir_ = nullptr;

int run_cli(const std::string& args) {
  return exit_code(testing::kvserve_cli_binary() + " " + args);
}

TEST_F(Tls, TlsClientIsServedAndPlaintextOrUntrustingClientsAreRefused) {
  // The harness's own channel (health, SERVING) is a TLS one.
  ServerProcess server(server_args(false), true, tls("ca.pem", false));
  EXPECT_NE(server.process().log().find("over TLS"), std::string::npos);
  const grpc::Status ok = generate(server.port(), tls("ca.pem", false));
  EXPECT_TRUE(ok.ok()) << ok.error_message();

  const grpc::Status plaintext = generate(server.port(), grpc::InsecureChannelCredentials());
  EXPECT_EQ(plaintext.error_code(), grpc::StatusCode::UNAVAILABLE) << plaintext.error_message();
  // A client that does not trust the server's CA does not talk to it.
  const grpc::Status untrusted = generate(server.port(), tls("other-ca.pem", false));
  EXPECT_EQ(untrusted.error_code(), grpc::StatusCode::UNAVAILABLE) << untrusted.error_message();

  const std::string addr = " --addr 127.0.0.1:" + std::to_string(server.port());
  EXPECT_EQ(run_cli("health" + addr + " --tls-ca " + file("ca.pem")), 0);
  EXPECT_EQ(run_cli("generate" + addr + " --tls-ca " + file("ca.pem") +
                    " --prompt 'Memory is' --max-new-tokens 4"),
            0);
  EXPECT_NE(run_cli("health" + addr + " --timeout-s 2"), 0);
  // The client refuses a certificate without its key before connecting.
  EXPECT_NE(run_cli("health" + addr + " --tls-ca " + file("ca.pem") + " --tls-cert " +
                    file("client.pem")),
            0);
}

TEST_F(Tls, MutualTlsRefusesClientsWithoutACertificate) {
  ServerProcess server(server_args(true), true, tls("ca.pem", true));
  EXPECT_NE(server.process().log().find("over mutual TLS"), std::string::npos);
  const grpc::Status ok = generate(server.port(), tls("ca.pem", true));
  EXPECT_TRUE(ok.ok()) << ok.error_message();

  const grpc::Status no_cert = generate(server.port(), tls("ca.pem", false));
  EXPECT_EQ(no_cert.error_code(), grpc::StatusCode::UNAVAILABLE) << no_cert.error_message();
  const grpc::Status plaintext = generate(server.port(), grpc::InsecureChannelCredentials());
  EXPECT_EQ(plaintext.error_code(), grpc::StatusCode::UNAVAILABLE) << plaintext.error_message();

  const std::string addr = " --addr 127.0.0.1:" + std::to_string(server.port());
  const std::string tls_ca = " --tls-ca " + file("ca.pem");
  EXPECT_EQ(run_cli("health" + addr + tls_ca + " --tls-cert " + file("client.pem") + " --tls-key " +
                    file("client.key")),
            0);
  EXPECT_NE(run_cli("health" + addr + tls_ca + " --timeout-s 2"), 0);
}

// kvserve-cli says which side refused a connection and why, instead of gRPC's "Socket closed".
TEST_F(Tls, CliSaysWhichSideRefusedAndWhy) {
  ServerProcess server(server_args(true), true, tls("ca.pem", true));
  const std::string addr = " --addr 127.0.0.1:" + std::to_string(server.port());
  auto health_error = [&](const std::string& flags) {
    const testing::CommandResult r =
        testing::run_command(testing::kvserve_cli_binary() + " health" + addr + flags);
    EXPECT_EQ(r.status, 1) << flags << "\n" << r.err;
    return r.err;
  };
  const std::string untrusted = health_error(" --timeout-s 5 --tls-ca " + file("other-ca.pem"));
  EXPECT_NE(untrusted.find("the client refused the server"), std::string::npos) << untrusted;
  EXPECT_NE(untrusted.find("untrusted CA"), std::string::npos) << untrusted;
  const std::string no_cert = health_error(" --timeout-s 5 --tls-ca " + file("ca.pem"));
  EXPECT_NE(no_cert.find("client certificate"), std::string::npos) << no_cert;
  const std::string plaintext = health_error(" --timeout-s 5");
  EXPECT_NE(plaintext.find("requires TLS"), std::string::npos) << plaintext;

  // A certificate for another name than the address dialled.
  ServerProcess elsewhere({"--model", testing::shared_model_dir(), "--tls-cert",
                           file("elsewhere.pem"), "--tls-key", file("elsewhere.key")},
                          false);
  const testing::CommandResult mismatch = testing::run_command(
      testing::kvserve_cli_binary() + " health --timeout-s 5 --addr 127.0.0.1:" +
      std::to_string(elsewhere.port()) + " --tls-ca " + file("ca.pem"));
  EXPECT_EQ(mismatch.status, 1) << mismatch.err;
  EXPECT_NE(mismatch.err.find("does not name the address dialled"), std::string::npos)
      << mismatch.err;
}

TEST_F(Tls, ServeRefusesHalfATlsConfiguration) {
  const std::string serve = kvserve::testing::kvserve_binary() + " serve --model " +
                            testing::shared_model_dir() + " --port 0 --metrics-port 0";
  // A certificate without its key, or a client CA without a certificate: exit before listening.
  EXPECT_GT(exit_code(serve + " --tls-cert " + file("server.pem")), 0);
  EXPECT_GT(exit_code(serve + " --tls-client-ca " + file("ca.pem")), 0);
  // A key that is not the certificate's: exit instead of serving.
  EXPECT_GT(
      exit_code(serve + " --tls-cert " + file("server.pem") + " --tls-key " + file("client.key")),
      0);
}

TEST(Connection, IdleConnectionIsClosedAndTheClientReconnects) {
  ServerProcess server({"--model", testing::shared_model_dir(), "--max-connection-idle-s", "1"});
  ASSERT_EQ(server.channel()->GetState(false), GRPC_CHANNEL_READY);
  // The server's GOAWAY after 1 s without a call sends the channel back to IDLE.
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (server.channel()->GetState(false) == GRPC_CHANNEL_READY &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_EQ(server.channel()->GetState(false), GRPC_CHANNEL_IDLE);
  EXPECT_EQ(server.health(), HealthCheckResponse::SERVING);
}

TEST(Connection, OversizedRequestIsResourceExhausted) {
  ServerProcess server(
      {"--model", testing::shared_model_dir(), "--max-receive-message-bytes", "4096"});
  v1::GenerateRequest request;
  request.set_prompt(std::string(8192, 'a'));
  const grpc::Status status = testing::generate(*server.stub(), request, 20s).status;
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_EQ(server.health(), HealthCheckResponse::SERVING);
}

}  // namespace
}  // namespace kvserve
