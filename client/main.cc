// kvserve-cli: entry point. Every command lives in client/cli.cc.
#include "client/cli.h"

int main(int argc, char** argv) {
  return kvserve::client::run_cli(argc, argv);
}
