// kvserve-cli's command line (docs/design.md section 7): generate, health, load, info.
#pragma once

namespace kvserve::client {

// Parses argv, runs the command and returns the process exit code: 0 on success; 1 when the call
// failed or (health) the server is not SERVING, so `kvserve-cli health` works as a Docker
// HEALTHCHECK; CLI11's codes for command-line errors.
int run_cli(int argc, char** argv);

}  // namespace kvserve::client
