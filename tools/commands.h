// The kvserve command line (docs/design.md section 7): parses flags and runs one command.
#pragma once

namespace kvserve {

// Returns the process exit code; never throws.
int run_command_line(int argc, char** argv);

}  // namespace kvserve
