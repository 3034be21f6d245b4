#include "engine/checkpoint.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <unordered_set>
#include <vector>

#include "common/text_io.h"
#include "engine/safetensors.h"

namespace kvserve {
namespace {

using nlohmann::json;

[[noreturn]] void fail(const std::string& path, const std::string& problem) {
  throw std::runtime_error(path + ": " + problem);
}

// ---- config.json ----

int positive_int(const json& config, const std::string& path, const std::string& key) {
  const json& v = config.at(key);
  if (!v.is_number_integer() || v.get<int64_t>() <= 0 || v.get<int64_t>() > INT_MAX) {
    fail(path, key + " must be a positive integer, got " + v.dump());
  }
  return static_cast<int>(v.get<int64_t>());
}

int required_positive_int(const json& config, const std::string& path, const std::string& key) {
  if (!config.contains(key) || config.at(key).is_null()) fail(path, "missing " + key);
  return positive_int(config, path, key);
}

// Absent and null both mean "the Hugging Face default".
bool optional_bool(const json& config, const std::string& path, const std::string& key,
                   bool fallback) {
  if (!config.contains(key) || config.at(key).is_null()) return fallback;
  if (!config.at(key).is_boolean())
    fail(path, key + " must be true or false, got " + config.at(key).dump());
  return config.at(key).get<bool>();
}

Activation parse_activation(const std::string& name, const std::string& path) {
  // gelu_new, gelu_pytorch_tanh and gelu_fast are the same tanh approximation up to rounding.
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_fast") {
    return Activation::kGeluTanh;
  }
  if (name == "gelu") return Activation::kGeluErf;
  fail(path, "unsupported activation_function \"" + name +
                 "\" (supported: gelu_new, gelu_pytorch_tanh, gelu_fast, gelu)");
}

// ---- the tensors a GPT-2 of a given config holds ----

enum class Init { kRandom, kZeros, kOnes };  // what a dummy model puts in the tensor

struct TensorSlot {
  std::string name;  // without the `transformer.` prefix, e.g. "h.3.mlp.c_fc.weight"
  std::vector<int64_t> shape;
  std::vector<float>* dst;
  Init init;
};

// Every tensor of `w` (whose config is set), in a fixed order: a slot's position is also its dummy
// random stream, so the order is part of the dummy models' definition.
std::vector<TensorSlot> tensor_slots(ModelWeights& w) {
  const ModelConfig& cfg = w.config;
  const int64_t V = cfg.vocab_size, P = cfg.n_positions, C = cfg.n_embd, F = cfg.n_inner;
  w.layers.resize(cfg.n_layer);
  std::vector<TensorSlot> slots = {
      {"wte.weight", {V, C}, &w.token_embedding, Init::kRandom},     // [V, C]
      {"wpe.weight", {P, C}, &w.position_embedding, Init::kRandom},  // [P, C]
  };
  for (int l = 0; l < cfg.n_layer; ++l) {
    LayerWeights& L = w.layers[l];
    const std::string h = "h." + std::to_string(l) + ".";
    slots.insert(
        slots.end(),
        {
            {h + "ln_1.weight", {C}, &L.ln_1_weight, Init::kOnes},                      // [C]
            {h + "ln_1.bias", {C}, &L.ln_1_bias, Init::kZeros},                         // [C]
            {h + "attn.c_attn.weight", {C, 3 * C}, &L.attn_qkv_weight, Init::kRandom},  // [C, 3C]
            {h + "attn.c_attn.bias", {3 * C}, &L.attn_qkv_bias, Init::kZeros},          // [3C]
            {h + "attn.c_proj.weight", {C, C}, &L.attn_proj_weight, Init::kRandom},     // [C, C]
            {h + "attn.c_proj.bias", {C}, &L.attn_proj_bias, Init::kZeros},             // [C]
            {h + "ln_2.weight", {C}, &L.ln_2_weight, Init::kOnes},                      // [C]
            {h + "ln_2.bias", {C}, &L.ln_2_bias, Init::kZeros},                         // [C]
            {h + "mlp.c_fc.weight", {C, F}, &L.mlp_fc_weight, Init::kRandom},           // [C, F]
            {h + "mlp.c_fc.bias", {F}, &L.mlp_fc_bias, Init::kZeros},                   // [F]
            {h + "mlp.c_proj.weight", {F, C}, &L.mlp_proj_weight, Init::kRandom},       // [F, C]
            {h + "mlp.c_proj.bias", {C}, &L.mlp_proj_bias, Init::kZeros},               // [C]
        });
  }
  slots.push_back({"ln_f.weight", {C}, &w.ln_f_weight, Init::kOnes});  // [C]
  slots.push_back({"ln_f.bias", {C}, &w.ln_f_bias, Init::kZeros});     // [C]
  return slots;
}

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string list_names(const std::vector<std::string>& names) {
  constexpr size_t kShown = 8;  // enough to see the pattern without a wall of text
  std::string s;
  for (size_t i = 0; i < names.size() && i < kShown; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > kShown) s += ", ... (" + std::to_string(names.size() - kShown) + " more)";
  return s;
}

// ---- model.safetensors ----

void load_safetensors(const std::string& path, ModelWeights& w) {
  const SafetensorsFile file(path);
  const std::vector<TensorSlot> slots = tensor_slots(w);
  const std::string kPrefix = "transformer.";

  // Key names with and without the prefix (save_pretrained vs the hub's original uploads) map to
  // one canonical name; lm_head.weight never carries the prefix.
  std::map<std::string, const SafetensorsTensor*> by_name;
  bool prefixed = false;
  for (const SafetensorsTensor& t : file.tensors()) {
    std::string name = t.name;
    if (name.compare(0, kPrefix.size(), kPrefix) == 0) {
      name.erase(0, kPrefix.size());
      prefixed = true;
    }
    if (!by_name.emplace(name, &t).second) {
      fail(path, "tensor " + name + " is stored twice, with and without the transformer. prefix");
    }
  }

  std::unordered_set<std::string> known;
  for (const TensorSlot& s : slots) known.insert(s.name);
  // Causal-mask buffers older exports saved; the engine builds its own mask.
  for (int l = 0; l < w.config.n_layer; ++l) {
    known.insert("h." + std::to_string(l) + ".attn.bias");
    known.insert("h." + std::to_string(l) + ".attn.masked_bias");
  }
  known.insert("lm_head.weight");

  std::vector<std::string> missing, unexpected;
  for (const TensorSlot& s : slots) {
    if (!by_name.count(s.name)) missing.push_back((prefixed ? kPrefix : "") + s.name);
  }
  for (const SafetensorsTensor& t : file.tensors()) {
    const bool has_prefix = t.name.compare(0, kPrefix.size(), kPrefix) == 0;
    const std::string name = has_prefix ? t.name.substr(kPrefix.size()) : t.name;
    if (!known.count(name) || (has_prefix && name == "lm_head.weight"))
      unexpected.push_back(t.name);
  }
  if (!missing.empty() || !unexpected.empty()) {
    std::string problem;
    if (!missing.empty()) problem = "missing tensors: " + list_names(missing);
    if (!unexpected.empty()) {
      problem += (problem.empty() ? "" : "; ") + std::string("unexpected tensors: ") +
                 list_names(unexpected) + " (not a GPT-2 of this config.json's geometry)";
    }
    fail(path, problem);
  }

  // Check every shape before converting anything: a wrong file should fail in milliseconds.
  const auto check_shape = [&](const SafetensorsTensor& t, const std::vector<int64_t>& expected) {
    if (t.shape != expected) {
      fail(path, "tensor " + t.name + ": expected shape " + format_shape(expected) + ", got " +
                     format_shape(t.shape));
    }
  };
  for (const TensorSlot& s : slots) check_shape(*by_name.at(s.name), s.shape);
  const auto lm_head = by_name.find("lm_head.weight");
  if (lm_head != by_name.end()) {
    check_shape(*lm_head->second, {w.config.vocab_size, w.config.n_embd});  // [V, C]
  }

  for (const TensorSlot& s : slots) {
    const SafetensorsTensor& t = *by_name.at(s.name);
    s.dst->resize(static_cast<size_t>(t.numel()));
    file.to_fp32(t, 0, t.numel(), s.dst->data());
  }

  // The engine ties the LM head to wte; a stored head must be that same matrix. Compared in
  // chunks so a 6 GB checkpoint does not need a second [V, C] copy.
  if (lm_head != by_name.end()) {
    const SafetensorsTensor& t = *lm_head->second;
    constexpr int64_t kChunk = 1 << 16;
    std::vector<float> chunk(kChunk);
    for (int64_t first = 0; first < t.numel(); first += kChunk) {
      const int64_t count = std::min(kChunk, t.numel() - first);
      file.to_fp32(t, first, count, chunk.data());
      if (std::memcmp(chunk.data(), w.token_embedding.data() + first, count * sizeof(float)) != 0) {
        fail(path, "lm_head.weight differs from wte.weight: untied LM head not supported");
      }
    }
  }
}

// ---- dummy models ----

// Deterministic on every machine: an integer hash, then one exact int->float conversion and one
// multiply (no FMA contraction possible, no library distributions whose output varies).
uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform on [-a, a) with a = 0.02 * sqrt(3), i.e. standard deviation 0.02 (GPT-2's
// initializer_range): element i of stream k is the top 24 bits of splitmix64(k << 40 | i),
// centred and scaled. 2^40 elements per tensor is far beyond gpt2-xl's largest (80M).
void fill_random(uint64_t stream, float* out, int64_t n) {
  const float scale = static_cast<float>(0.034641016151377546 / 8388608.0);  // a / 2^23
  const uint64_t base = stream << 40;
  for (int64_t i = 0; i < n; ++i) {
    const auto bits = static_cast<int32_t>(splitmix64(base | static_cast<uint64_t>(i)) >> 40);
    out[i] = static_cast<float>(bits - (1 << 23)) * scale;
  }
}

ModelWeights make_dummy(const std::string& spec) {
  ModelWeights w;
  w.config = dummy_model_config(spec);
  w.source = spec;
  const std::vector<TensorSlot> slots = tensor_slots(w);
  for (size_t k = 0; k < slots.size(); ++k) {
    const TensorSlot& s = slots[k];
    const int64_t n = numel(s.shape);
    switch (s.init) {
      case Init::kRandom:
        s.dst->resize(static_cast<size_t>(n));
        fill_random(k, s.dst->data(), n);
        break;
      case Init::kZeros:
        s.dst->assign(static_cast<size_t>(n), 0.0f);
        break;
      case Init::kOnes:
        s.dst->assign(static_cast<size_t>(n), 1.0f);
        break;
    }
  }
  return w;
}

}  // namespace

ModelConfig parse_model_config(const std::string& path) {
  const json config = json::parse(read_file(path), nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded()) fail(path, "not valid JSON");
  if (!config.is_object()) fail(path, "not a JSON object");

  if (config.contains("model_type") && config["model_type"] != "gpt2") {
    fail(path, "model_type is " + config["model_type"].dump() + "; only \"gpt2\" is supported");
  }

  ModelConfig c;
  c.n_layer = required_positive_int(config, path, "n_layer");
  c.n_head = required_positive_int(config, path, "n_head");
  c.n_embd = required_positive_int(config, path, "n_embd");
  c.vocab_size = required_positive_int(config, path, "vocab_size");
  // n_ctx is the older name; transformers itself reads n_positions.
  if (config.contains("n_positions") && !config["n_positions"].is_null()) {
    c.n_positions = positive_int(config, path, "n_positions");
  } else if (config.contains("n_ctx") && !config["n_ctx"].is_null()) {
    c.n_positions = positive_int(config, path, "n_ctx");
  } else {
    fail(path, "missing n_positions (or n_ctx)");
  }
  if (c.n_embd % c.n_head != 0) {
    fail(path, "n_embd " + std::to_string(c.n_embd) + " is not divisible by n_head " +
                   std::to_string(c.n_head));
  }
  const bool has_inner = config.contains("n_inner") && !config["n_inner"].is_null();
  c.n_inner = has_inner ? positive_int(config, path, "n_inner") : 4 * c.n_embd;

  if (config.contains("layer_norm_epsilon")) {
    const json& eps = config["layer_norm_epsilon"];
    if (!eps.is_number() || !(eps.get<double>() > 0) || !std::isfinite(eps.get<double>())) {
      fail(path, "layer_norm_epsilon must be a positive number, got " + eps.dump());
    }
    c.layer_norm_epsilon = eps.get<float>();
  }

  // transformers' GPT2Config default.
  std::string activation = "gelu_new";
  if (config.contains("activation_function")) {
    if (!config["activation_function"].is_string()) {
      fail(path,
           "activation_function must be a string, got " + config["activation_function"].dump());
    }
    activation = config["activation_function"].get<std::string>();
  }
  c.activation = parse_activation(activation, path);

  if (config.contains("eos_token_id") && !config["eos_token_id"].is_null()) {
    const json& eos = config["eos_token_id"];
    if (!eos.is_number_integer() || eos.get<int64_t>() < 0 || eos.get<int64_t>() >= c.vocab_size) {
      fail(path, "eos_token_id must be a token id below vocab_size " +
                     std::to_string(c.vocab_size) + ", got " + eos.dump());
    }
    c.eos_token_id = eos.get<int>();
  }

  // Attention variants the kernels do not implement; loading them would silently give wrong logits.
  if (optional_bool(config, path, "scale_attn_by_inverse_layer_idx", false)) {
    fail(path, "scale_attn_by_inverse_layer_idx = true is not supported");
  }
  if (optional_bool(config, path, "reorder_and_upcast_attn", false)) {
    fail(path, "reorder_and_upcast_attn = true is not supported");
  }
  if (!optional_bool(config, path, "scale_attn_weights", true)) {
    fail(path,
         "scale_attn_weights = false is not supported (attention is always scaled by "
         "1/sqrt(head_dim))");
  }
  return c;
}

bool is_dummy_model(const std::string& spec) {
  return spec.compare(0, 6, "dummy:") == 0;
}

ModelConfig dummy_model_config(const std::string& spec) {
  struct Geometry {
    const char* name;
    int n_layer, n_head, n_embd;
  };
  static constexpr Geometry kGeometries[] = {
      {"dummy:gpt2", 12, 12, 768},
      {"dummy:gpt2-medium", 24, 16, 1024},
      {"dummy:gpt2-large", 36, 20, 1280},
      {"dummy:gpt2-xl", 48, 25, 1600},
  };
  std::string valid;
  for (const Geometry& g : kGeometries) {
    if (spec == g.name) {
      ModelConfig c;
      c.n_layer = g.n_layer;
      c.n_head = g.n_head;
      c.n_embd = g.n_embd;
      c.n_inner = 4 * g.n_embd;
      c.n_positions = 1024;
      c.vocab_size = 50257;
      c.layer_norm_epsilon = 1e-5f;
      c.activation = Activation::kGeluTanh;
      c.eos_token_id = 50256;
      return c;
    }
    valid += (valid.empty() ? "" : ", ") + std::string(g.name);
  }
  fail(spec, "unknown dummy model (valid: " + valid + ")");
}

ModelWeights load_model(const std::string& spec) {
  const auto start = std::chrono::steady_clock::now();
  ModelWeights w;
  if (is_dummy_model(spec)) {
    w = make_dummy(spec);
  } else {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (!fs::exists(spec, ec)) fail(spec, "model directory not found");
    if (!fs::is_directory(spec, ec)) {
      fail(spec, "not a directory (--model takes a Hugging Face GPT-2 directory or dummy:NAME)");
    }
    const std::string config_path = spec + "/config.json";
    const std::string weights_path = spec + "/model.safetensors";
    for (const std::string& p : {config_path, weights_path}) {
      if (!fs::exists(p, ec)) {
        fail(p, "not found (a model directory holds config.json and model.safetensors)");
      }
    }
    w.config = parse_model_config(config_path);
    w.source = spec;
    load_safetensors(weights_path, w);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  spdlog::info("loaded {}: {} layers, {} heads, n_embd {}, {} parameters in {:.2f} s", spec,
               w.config.n_layer, w.config.n_head, w.config.n_embd, w.config.parameter_count(),
               seconds);
  return w;
}

}  // namespace kvserve
