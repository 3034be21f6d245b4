#include "tests/test_support.h"

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <utility>

#include "common/text_io.h"

namespace kvserve::testing {

std::string source_path(const std::string& relative) {
  const char* root = std::getenv("KVSERVE_TEST_SOURCE_DIR");
  return std::string(root && *root ? root : KVSERVE_SOURCE_DIR) + "/" + relative;
}

std::string kvserve_binary() {
  const char* binary = std::getenv("KVSERVE_TEST_BINARY");
  return binary && *binary ? binary : KVSERVE_BINARY;
}

std::string kvserve_cli_binary() {
  return (std::filesystem::path(kvserve_binary()).parent_path() / "kvserve-cli").string();
}

std::string shared_model_dir() {
  const char* model = std::getenv("KVSERVE_TEST_MODEL");
  const std::string dir =
      model && *model ? std::string(model) : source_path("../shared/models/gpt2-tiny-docs");
  if (!std::filesystem::exists(dir + "/model.safetensors")) {
    throw std::runtime_error("test model missing: " + dir +
                             " (../shared must sit beside the checkout)");
  }
  return dir;
}

std::string shared_eval_text() {
  return source_path("../shared/data/docs-val.txt.xz");
}

std::string make_temp_dir(const std::string& prefix) {
  std::random_device entropy;
  const auto dir = std::filesystem::temp_directory_path() /
                   (prefix + "-" + std::to_string(entropy()) + std::to_string(entropy()));
  std::filesystem::create_directories(dir);
  return dir.string();
}

CommandResult run_command(const std::string& command, const std::string& stdin_text) {
  const std::string dir = make_temp_dir("kvserve-command");
  { std::ofstream(dir + "/stdin") << stdin_text; }
  const int raw = std::system(
      (command + " <" + dir + "/stdin >" + dir + "/stdout 2>" + dir + "/stderr").c_str());
  CommandResult result;
  result.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  result.out = read_file(dir + "/stdout");
  result.err = read_file(dir + "/stderr");
  return result;
}

}  // namespace kvserve::testing
