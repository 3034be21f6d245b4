// kvserve: entry point. Every command lives in server/commands.cc.
#include "server/commands.h"

int main(int argc, char** argv) {
  return kvserve::run_command_line(argc, argv);
}
