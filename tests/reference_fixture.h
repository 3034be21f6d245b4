// The PyTorch reference dump (tests/fixtures/logits.json.xz) and the trained test model, shared
// by the CPU reference tests and the GPU tests.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/kv_format.h"
#include "engine/model_weights.h"

namespace kvserve::testing {

// The parsed dump: prompts, greedy continuations, per-format logits (tests/README.md).
const nlohmann::json& logits_fixture();
// ../shared/models/gpt2-tiny-docs, loaded once.
const ModelWeights& shared_weights();
// The cache configuration of one of the dump's formats ("fp16", "kivi2", "kivi2_gv64", ...).
KvCacheConfig fixture_format(const std::string& name);
std::vector<int32_t> ids_of(const nlohmann::json& array);

}  // namespace kvserve::testing
