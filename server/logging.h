// Logging setup for every kvserve command: spdlog to stderr, as text or as JSON lines.
#pragma once

#include <string>
#include <string_view>

namespace kvserve {

// level: trace, debug, info, warn, error or off. json: one JSON object per line
// ({"time", "level", "msg"}), for log collectors. Plain text escapes control characters in
// messages (escape_control_characters), so that text a client chose (a request_id with a newline)
// cannot forge log lines; JSON escapes them as JSON does.
void configure_logging(const std::string& level, bool json);

// `text` with every ASCII control character written out: \n, \r, \t, else \xHH (DEL too).
std::string escape_control_characters(std::string_view text);

}  // namespace kvserve
