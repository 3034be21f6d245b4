// Delays injected for the tests of timing races (like KVSERVE_INJECT_DEVICE_LOST_AT_FORWARD for
// device loss): races that show only when threads wait for a core are made to happen every time.
// Unset (production) they are zero and cost one branch.
//
//   KVSERVE_INJECT_ENGINE_PAUSE_MS      the engine thread pauses this long after each step's
//                                       messages, before it reads its inbox again
//   KVSERVE_INJECT_WRITE_DONE_DELAY_MS  a stream's OnWriteDone waits this long before it acts
//                                       (as when gRPC's threads are starved of CPU)
#pragma once

#include <chrono>
#include <cstdlib>

namespace kvserve {

// The environment variable `name` in milliseconds, or zero when unset.
inline std::chrono::milliseconds injected_delay(const char* name) {
  const char* value = std::getenv(name);
  return std::chrono::milliseconds(value != nullptr ? std::atoi(value) : 0);
}

}  // namespace kvserve
