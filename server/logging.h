// Logging setup for every kvserve command: spdlog to stderr, as text or as JSON lines.
#pragma once

#include <string>

namespace kvserve {

// level: trace, debug, info, warn, error or off. json: one JSON object per line
// ({"time", "level", "msg"}), for log collectors.
void configure_logging(const std::string& level, bool json);

}  // namespace kvserve
