// What both executables (kvserve, kvserve-cli) share on their command line: --version, every
// default shown in --help, validators whose messages fit on one line, and the exit status of a
// usage error (2, with a one-line reason on stderr).
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace kvserve {

// Exit status of a usage error (a bad flag or value), as documented for both binaries.
constexpr int kExitUsage = 2;

// "<program> <version> (git <commit>, CUDA on|off, <build type> build)".
std::string version_text(const std::string& program);

// Adds --version and makes every option added afterwards show its default in --help. Call it
// before adding options and subcommands (subcommands copy the defaults when they are made).
void configure_app(CLI::App& app, const std::string& program);

// "must be positive (got 0)" rather than CLI11's "Value 0 not in range 0.000000 to 1.79e+308".
CLI::Validator positive();
CLI::Validator non_negative();

// Token ids as both binaries take them: `--prompt-ids 464 318` or `--prompt-ids "464 318"` (ids
// separated by spaces or commas, in one argument or several). token_ids() checks each argument
// while parsing; parse_token_ids joins them (and throws std::invalid_argument on a bad id).
constexpr const char* kPromptIdsHelp =
    "prompt as token ids: --prompt-ids 464 318 (or one quoted argument, spaces or commas)";
CLI::Validator token_ids();
std::vector<int32_t> parse_token_ids(const std::vector<std::string>& arguments);

// Parses the command line. nullopt when the command should run; otherwise the exit status:
// 0 after --help or --version (printed to stdout), kExitUsage after a usage error, whose reason
// goes to stderr as one line "<program>: <reason> (see --help)".
std::optional<int> parse_command_line(CLI::App& app, int argc, char** argv,
                                      const std::string& program);

}  // namespace kvserve
