// kvserve: entry point. The command line lives in tools/commands.cc.
#include "tools/commands.h"

int main(int argc, char** argv) {
  return kvserve::run_command_line(argc, argv);
}
