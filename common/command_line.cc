#include "common/command_line.h"

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <stdexcept>

namespace kvserve {
namespace {

// The number in `text`, or nullopt when it is not one (CLI11 then reports the type error).
std::optional<long double> number(const std::string& text) {
  errno = 0;
  char* end = nullptr;
  const long double value = std::strtold(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno != 0) return std::nullopt;
  return value;
}

// The ids in `text` (separated by spaces or commas); the error names the first word that is not
// one.
std::vector<int32_t> split_ids(const std::string& text, std::string& error) {
  std::vector<int32_t> ids;
  std::string spaced = text;
  for (char& c : spaced) {
    if (c == ',') c = ' ';
  }
  std::istringstream in(spaced);
  for (std::string word; in >> word;) {
    errno = 0;
    char* end = nullptr;
    const long value = std::strtol(word.c_str(), &end, 10);
    if (*end != '\0' || errno != 0 || value < 0 || value > INT32_MAX) {
      error = "'" + word + "' is not a token id";
      return {};
    }
    ids.push_back(static_cast<int32_t>(value));
  }
  return ids;
}

}  // namespace

std::string version_text(const std::string& program) {
  return program + " " + KVSERVE_VERSION + " (git " + KVSERVE_GIT_COMMIT + ", CUDA " +
         (KVSERVE_CUDA_BUILD ? "on" : "off") + ", " + KVSERVE_BUILD_TYPE + " build)";
}

void configure_app(CLI::App& app, const std::string& program) {
  app.option_defaults()->always_capture_default();
  app.set_version_flag("--version", version_text(program),
                       "print the version and build, then exit");
}

CLI::Validator positive() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        const std::optional<long double> value = number(text);
        if (value && *value > 0) return "";
        return "must be a positive number (got " + text + ")";
      },
      "POSITIVE");
}

CLI::Validator non_negative() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        const std::optional<long double> value = number(text);
        if (value && *value >= 0) return "";
        return "must be zero or a positive number (got " + text + ")";
      },
      "NONNEGATIVE");
}

CLI::Validator token_ids() {
  return CLI::Validator(
      [](std::string& text) {
        std::string error;
        split_ids(text, error);
        return error;
      },
      "ID ...");
}

std::vector<int32_t> parse_token_ids(const std::vector<std::string>& arguments) {
  std::vector<int32_t> ids;
  for (const std::string& argument : arguments) {
    std::string error;
    const std::vector<int32_t> some = split_ids(argument, error);
    if (!error.empty()) throw std::invalid_argument("--prompt-ids: " + error);
    ids.insert(ids.end(), some.begin(), some.end());
  }
  return ids;
}

std::optional<int> parse_command_line(CLI::App& app, int argc, char** argv,
                                      const std::string& program) {
  try {
    app.parse(argc, argv);
    return std::nullopt;
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::string reason = e.what();
    // CLI11 names a hidden option (the test hooks) with "", which leaves a bare ": " in front.
    if (reason.rfind(": ", 0) == 0) reason.erase(0, 2);
    for (char& c : reason) {
      if (c == '\n') c = ' ';
    }
    std::cerr << program << ": " << reason << " (see " << program << " --help)\n";
    return kExitUsage;
  }
}

}  // namespace kvserve
