// Loading GPT-2 models: a Hugging Face directory (config.json + model.safetensors, with or without
// the `transformer.` key prefix) or a `dummy:NAME` geometry with deterministic random weights (for
// benchmarks, like vLLM's --load-format dummy).
#pragma once

#include <string>

#include "engine/model_config.h"
#include "engine/model_weights.h"

namespace kvserve {

// Parses a GPT-2 config.json. Throws std::runtime_error whose message starts with the file path
// when it is unreadable, malformed, inconsistent, or asks for a GPT-2 variant the engine does not
// implement (cross-layer attention scaling, upcast reordering, unscaled attention).
ModelConfig parse_model_config(const std::string& config_json_path);

// True for "dummy:..." specs (whether or not the name is a known one).
bool is_dummy_model(const std::string& spec);

// The geometry of dummy:gpt2, dummy:gpt2-medium, dummy:gpt2-large or dummy:gpt2-xl. Throws on any
// other name, listing the valid ones.
ModelConfig dummy_model_config(const std::string& spec);

// Loads a model directory or a dummy spec into fp32 weights; `source` is `spec`. Every tensor the
// config implies must be present with its exact shape, and nothing else may be (mask buffers
// h.N.attn.bias / h.N.attn.masked_bias aside); a stored lm_head.weight must equal wte. Errors name
// the offending file and the problem.
ModelWeights load_model(const std::string& spec);

}  // namespace kvserve
