// Paths the tests share: the source tree's fixtures and ../shared beside the checkout.
#pragma once

#include <string>

namespace kvserve::testing {

// A path inside the source tree, e.g. source_path("tests/fixtures/ppl.json"); the environment
// variable KVSERVE_TEST_SOURCE_DIR moves the root (a binary run on another machine, as the GPU
// one).
std::string source_path(const std::string& relative);
// The trained test model ../shared/models/gpt2-tiny-docs, or $KVSERVE_TEST_MODEL when set (tests
// that need it fail, not skip, when it is missing: CI always has ../shared).
std::string shared_model_dir();
// The kvserve executable the tests start: the build's, or $KVSERVE_TEST_BINARY when set (the GPU
// machine runs the bundled copy).
std::string kvserve_binary();
// kvserve-cli, beside kvserve_binary().
std::string kvserve_cli_binary();
// ../shared/data/docs-val.txt.xz
std::string shared_eval_text();
// A fresh empty directory under the system temp dir, removed by the OS / test runner at will.
std::string make_temp_dir(const std::string& prefix);

// What a command started by run_command did.
struct CommandResult {
  int status = -1;  // its exit status; -1 when a signal ended it
  std::string out, err;
};
// Runs the shell command line `command` with `stdin_text` as its standard input.
CommandResult run_command(const std::string& command, const std::string& stdin_text = "");

}  // namespace kvserve::testing
