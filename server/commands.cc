#include "server/commands.h"

#include <CLI/CLI.hpp>

namespace kvserve {

int run_command_line(int argc, char** argv) {
  CLI::App app{"kvserve: GPT-2 serving with a paged KIVI-quantized KV cache"};
  app.require_subcommand(1);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return 0;
}

}  // namespace kvserve
