// The safetensors reader and the GPT-2 checkpoint loader: tiny checkpoints written here in every
// supported dtype and key naming, each malformed variant the loader must reject, the shared trained
// model, and the dummy geometries.
#include "engine/checkpoint.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "engine/safetensors.h"
#include "tests/test_support.h"

namespace kvserve {
namespace {

using nlohmann::json;
using testing::make_temp_dir;

// ---- a minimal safetensors writer ----

struct RawTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// As the reference writer does: tensors back to back in the given order, header padded with
// spaces to a multiple of 8 bytes.
void write_safetensors(const std::string& path, const std::vector<RawTensor>& tensors,
                       const json& metadata = nullptr) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.is_null()) header["__metadata__"] = metadata;
  std::string data;
  for (const RawTensor& t : tensors) {
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  write_bytes(path, le64(text.size()) + text + data);
}

// ---- encoders for values the test chooses to be exactly representable ----

std::string f32_bytes(const std::vector<float>& values) {
  std::string s(values.size() * 4, '\0');
  std::memcpy(s.data(), values.data(), s.size());
  return s;
}

std::string u16_bytes(const std::vector<uint16_t>& values) {
  std::string s(values.size() * 2, '\0');
  std::memcpy(s.data(), values.data(), s.size());
  return s;
}

// Only for normal values whose significand fits 11 bits (the test's values are k/128).
uint16_t to_half_exact(float v) {
  if (v == 0) return std::signbit(v) ? 0x8000 : 0;
  int exponent;
  const double fraction = std::frexp(std::fabs(v), &exponent);  // v = fraction * 2^exponent
  const double significand = fraction * 2048;                   // 11 bits, leading one included
  EXPECT_EQ(significand, std::floor(significand)) << v << " is not exact in fp16";
  const int biased = exponent - 1 + 15;
  EXPECT_TRUE(biased > 0 && biased < 31) << v << " is outside fp16's normal range";
  const auto mantissa = static_cast<uint16_t>(static_cast<int>(significand) - 1024);
  return static_cast<uint16_t>((v < 0 ? 0x8000 : 0) | (biased << 10) | mantissa);
}

uint16_t to_bf16_exact(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  EXPECT_EQ(bits & 0xffffu, 0u) << v << " is not exact in bf16";
  return static_cast<uint16_t>(bits >> 16);
}

std::string encode(const std::vector<float>& values, const std::string& dtype) {
  if (dtype == "F32") return f32_bytes(values);
  std::vector<uint16_t> halves;
  for (float v : values) halves.push_back(dtype == "F16" ? to_half_exact(v) : to_bf16_exact(v));
  return u16_bytes(halves);
}

// Reference decoders written from the format definitions (not from the loader's bit tricks).
double half_reference(uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  double magnitude;
  if (exponent == 31) {
    magnitude = mantissa ? NAN : INFINITY;
  } else if (exponent == 0) {
    magnitude = std::ldexp(mantissa, -24);
  } else {
    magnitude = std::ldexp(1024 + mantissa, exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

double bf16_reference(uint16_t b) {
  const int sign = b >> 15, exponent = (b >> 7) & 0xff, mantissa = b & 0x7f;
  double magnitude;
  if (exponent == 255) {
    magnitude = mantissa ? NAN : INFINITY;
  } else if (exponent == 0) {
    magnitude = std::ldexp(mantissa, -133);
  } else {
    magnitude = std::ldexp(128 + mantissa, exponent - 134);
  }
  return sign ? -magnitude : magnitude;
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// The error message `f` throws; fails the test when it does not throw.
template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an exception";
  return "";
}

// ---- the tiny GPT-2 ----

constexpr int kLayers = 2, kHeads = 2, kEmbd = 8, kVocab = 11, kPositions = 16;

json tiny_config() {
  return {{"model_type", "gpt2"},
          {"n_layer", kLayers},
          {"n_head", kHeads},
          {"n_embd", kEmbd},
          {"n_positions", kPositions},
          {"vocab_size", kVocab},
          {"n_inner", nullptr},
          {"layer_norm_epsilon", 1e-5},
          {"activation_function", "gelu_new"},
          {"eos_token_id", 10},
          {"scale_attn_weights", true},
          {"reorder_and_upcast_attn", false},
          {"scale_attn_by_inverse_layer_idx", false}};
}

struct Tensor {
  std::string name;  // without the transformer. prefix
  std::vector<int64_t> shape;
  std::vector<float> values;
};

// Every GPT-2 tensor, each with distinct values k/128 (exact in F16 and BF16).
std::vector<Tensor> tiny_tensors(int inner = 4 * kEmbd) {
  const int64_t C = kEmbd, F = inner;
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes = {
      {"wte.weight", {kVocab, C}}, {"wpe.weight", {kPositions, C}}};
  for (int l = 0; l < kLayers; ++l) {
    const std::string h = "h." + std::to_string(l) + ".";
    for (const auto& [suffix, shape] : std::vector<std::pair<std::string, std::vector<int64_t>>>{
             {"ln_1.weight", {C}},
             {"ln_1.bias", {C}},
             {"attn.c_attn.weight", {C, 3 * C}},
             {"attn.c_attn.bias", {3 * C}},
             {"attn.c_proj.weight", {C, C}},
             {"attn.c_proj.bias", {C}},
             {"ln_2.weight", {C}},
             {"ln_2.bias", {C}},
             {"mlp.c_fc.weight", {C, F}},
             {"mlp.c_fc.bias", {F}},
             {"mlp.c_proj.weight", {F, C}},
             {"mlp.c_proj.bias", {C}}}) {
      shapes.push_back({h + suffix, shape});
    }
  }
  shapes.push_back({"ln_f.weight", {C}});
  shapes.push_back({"ln_f.bias", {C}});
  std::vector<Tensor> tensors;
  for (size_t k = 0; k < shapes.size(); ++k) {
    Tensor t{shapes[k].first, shapes[k].second, {}};
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    for (int64_t i = 0; i < n; ++i) {
      t.values.push_back(static_cast<float>((static_cast<int64_t>(k) * 131 + i * 37) % 251 - 125) /
                         128.0f);
    }
    tensors.push_back(std::move(t));
  }
  return tensors;
}

std::vector<RawTensor> raw_tensors(const std::vector<Tensor>& tensors, const std::string& dtype,
                                   const std::string& prefix) {
  std::vector<RawTensor> raw;
  for (const Tensor& t : tensors)
    raw.push_back({prefix + t.name, dtype, t.shape, encode(t.values, dtype)});
  return raw;
}

// A model directory with `config` and `tensors`; returns its path.
std::string write_model(const json& config, const std::vector<RawTensor>& tensors) {
  const std::string dir = make_temp_dir("kvserve-checkpoint");
  write_bytes(dir + "/config.json", config.dump(2));
  write_safetensors(dir + "/model.safetensors", tensors);
  return dir;
}

std::string write_tiny_model(const std::string& dtype = "F32",
                             const std::string& prefix = "transformer.") {
  return write_model(tiny_config(), raw_tensors(tiny_tensors(), dtype, prefix));
}

// The loaded weights by checkpoint name, mapped independently of the loader's own table.
std::map<std::string, const std::vector<float>*> by_name(const ModelWeights& w) {
  std::map<std::string, const std::vector<float>*> m = {{"wte.weight", &w.token_embedding},
                                                        {"wpe.weight", &w.position_embedding},
                                                        {"ln_f.weight", &w.ln_f_weight},
                                                        {"ln_f.bias", &w.ln_f_bias}};
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& L = w.layers[l];
    const std::string h = "h." + std::to_string(l) + ".";
    m[h + "ln_1.weight"] = &L.ln_1_weight;
    m[h + "ln_1.bias"] = &L.ln_1_bias;
    m[h + "attn.c_attn.weight"] = &L.attn_qkv_weight;
    m[h + "attn.c_attn.bias"] = &L.attn_qkv_bias;
    m[h + "attn.c_proj.weight"] = &L.attn_proj_weight;
    m[h + "attn.c_proj.bias"] = &L.attn_proj_bias;
    m[h + "ln_2.weight"] = &L.ln_2_weight;
    m[h + "ln_2.bias"] = &L.ln_2_bias;
    m[h + "mlp.c_fc.weight"] = &L.mlp_fc_weight;
    m[h + "mlp.c_fc.bias"] = &L.mlp_fc_bias;
    m[h + "mlp.c_proj.weight"] = &L.mlp_proj_weight;
    m[h + "mlp.c_proj.bias"] = &L.mlp_proj_bias;
  }
  return m;
}

void expect_weights_equal(const ModelWeights& w, const std::vector<Tensor>& expected) {
  const auto loaded = by_name(w);
  ASSERT_EQ(loaded.size(), expected.size());
  for (const Tensor& t : expected) {
    ASSERT_TRUE(loaded.count(t.name)) << t.name;
    EXPECT_EQ(*loaded.at(t.name), t.values) << t.name;
  }
}

// ---- safetensors reader ----

TEST(SafetensorsTest, ReadsTensorsInHeaderOrderAndIgnoresMetadata) {
  const std::string path = make_temp_dir("kvserve-st") + "/t.safetensors";
  write_safetensors(path,
                    {{"zeta", "F32", {2, 3}, f32_bytes({1, 2, 3, 4, 5, 6})},
                     {"alpha", "F16", {2}, u16_bytes({0x3c00, 0xc000})},
                     {"ids", "I64", {1}, std::string(8, '\x07')}},
                    {{"format", "pt"}});
  const SafetensorsFile file(path);
  EXPECT_EQ(file.path(), path);
  ASSERT_EQ(file.tensors().size(), 3u);
  EXPECT_EQ(file.tensors()[0].name, "zeta");
  EXPECT_EQ(file.tensors()[1].name, "alpha");
  EXPECT_EQ(file.tensors()[2].name, "ids");
  EXPECT_EQ(file.find("__metadata__"), nullptr);
  EXPECT_EQ(file.find("absent"), nullptr);

  const SafetensorsTensor* zeta = file.find("zeta");
  ASSERT_NE(zeta, nullptr);
  EXPECT_EQ(zeta->dtype, "F32");
  EXPECT_EQ(zeta->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(zeta->numel(), 6);
  EXPECT_EQ(zeta->nbytes, 24u);
  EXPECT_EQ(file.to_fp32(*zeta), (std::vector<float>{1, 2, 3, 4, 5, 6}));
  float middle[2];
  file.to_fp32(*zeta, 2, 2, middle);
  EXPECT_EQ(middle[0], 3);
  EXPECT_EQ(middle[1], 4);
  EXPECT_PRED2(contains, error_of([&] { file.to_fp32(*zeta, 5, 2, middle); }), "outside");

  EXPECT_EQ(file.to_fp32(*file.find("alpha")), (std::vector<float>{1, -2}));
  const std::string dtype_error = error_of([&] { file.to_fp32(*file.find("ids")); });
  EXPECT_PRED2(contains, dtype_error, path);
  EXPECT_PRED2(contains, dtype_error, "ids");
  EXPECT_PRED2(contains, dtype_error, "I64");
}

// An unpadded header leaves the F32 data at an odd address; values must still come out right.
TEST(SafetensorsTest, ReadsUnalignedData) {
  const std::string path = make_temp_dir("kvserve-st") + "/t.safetensors";
  const std::string header = R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})";
  ASSERT_NE(header.size() % 4, 0u);
  write_bytes(path, le64(header.size()) + header + f32_bytes({0.5f, -1.25f, 3e38f}));
  const SafetensorsFile file(path);
  EXPECT_EQ(file.to_fp32(*file.find("x")), (std::vector<float>{0.5f, -1.25f, 3e38f}));
}

// Found by fuzz/safetensors_fuzzer: an empty F32 tensor used to memcpy into a null pointer.
TEST(SafetensorsTest, ConvertsEmptyTensors) {
  const std::string path = make_temp_dir("kvserve-st") + "/t.safetensors";
  const std::string header = R"({"e":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
                             R"("h":{"dtype":"F16","shape":[2,0],"data_offsets":[0,0]}})";
  write_bytes(path, le64(header.size()) + header);
  const SafetensorsFile file(path);
  EXPECT_TRUE(file.to_fp32(*file.find("e")).empty());
  EXPECT_TRUE(file.to_fp32(*file.find("h")).empty());
}

TEST(SafetensorsTest, ConvertsEveryF16ValueExactly) {
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  const std::string path = make_temp_dir("kvserve-st") + "/t.safetensors";
  write_safetensors(path, {{"all", "F16", {65536}, u16_bytes(all)}});
  const SafetensorsFile file(path);
  const std::vector<float> got = file.to_fp32(file.tensors()[0]);
  for (size_t i = 0; i < all.size(); ++i) {
    const double want = half_reference(all[i]);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got[i])) << std::hex << i;
    } else {
      EXPECT_EQ(got[i], want) << std::hex << i;
      EXPECT_EQ(std::signbit(got[i]), std::signbit(want)) << std::hex << i;
    }
  }
}

TEST(SafetensorsTest, ConvertsEveryBF16ValueExactly) {
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  const std::string path = make_temp_dir("kvserve-st") + "/t.safetensors";
  write_safetensors(path, {{"all", "BF16", {65536}, u16_bytes(all)}});
  const SafetensorsFile file(path);
  const std::vector<float> got = file.to_fp32(file.tensors()[0]);
  for (size_t i = 0; i < all.size(); ++i) {
    const double want = bf16_reference(all[i]);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got[i])) << std::hex << i;
    } else {
      EXPECT_EQ(got[i], want) << std::hex << i;
      EXPECT_EQ(std::signbit(got[i]), std::signbit(want)) << std::hex << i;
    }
  }
}

TEST(SafetensorsTest, RejectsMalformedFiles) {
  const std::string good_entry = R"("dtype":"F32","shape":[2],"data_offsets":[0,8])";
  struct Case {
    std::string what, bytes, expected;
  };
  const auto file_with = [](const std::string& header, size_t data_bytes) {
    return le64(header.size()) + header + std::string(data_bytes, '\0');
  };
  const std::vector<Case> cases = {
      {"empty", "", "empty file"},
      {"shorter than the length prefix", "abc", "truncated"},
      {"header length beyond the file", le64(1000) + "{}", "truncated"},
      {"unparsable header", file_with(R"({"x": {)", 0), "corrupt header"},
      {"header not an object", file_with("[1, 2]", 0), "corrupt header"},
      {"entry without data_offsets", file_with(R"({"x":{"dtype":"F32","shape":[2]}})", 8),
       "corrupt header"},
      {"negative dimension",
       file_with(R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "non-negative"},
      {"unknown dtype", file_with(R"({"x":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", 8),
       "tensor x has unknown dtype Q7"},
      {"data offsets beyond the data", file_with("{\"x\":{" + good_entry + "}}", 4),
       "tensor x data_offsets [0, 8] lie outside the 4-byte data section"},
      {"data offsets reversed",
       file_with(R"({"x":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8), "lie outside"},
      {"data offsets inconsistent with the shape",
       file_with(R"({"x":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}})", 8),
       "tensor x data_offsets span 8 bytes but F16 [2] needs 4"},
      {"shape larger than the file",
       file_with(R"({"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
                 8),
       "more than the file holds"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const std::string path = make_temp_dir("kvserve-st") + "/bad.safetensors";
    write_bytes(path, c.bytes);
    const std::string message = error_of([&] { SafetensorsFile file(path); });
    EXPECT_EQ(message.rfind(path + ": ", 0), 0u) << message;
    EXPECT_PRED2(contains, message, c.expected);
  }
  const std::string missing = make_temp_dir("kvserve-st") + "/absent.safetensors";
  EXPECT_PRED2(contains, error_of([&] { SafetensorsFile file(missing); }),
               missing + ": cannot open");
}

// ---- config.json ----

ModelConfig parse(const json& config) {
  const std::string path = make_temp_dir("kvserve-config") + "/config.json";
  write_bytes(path, config.dump());
  return parse_model_config(path);
}

TEST(CheckpointConfig, ParsesEveryField) {
  json config = tiny_config();
  config["n_inner"] = 20;
  config["layer_norm_epsilon"] = 1e-6;
  config["activation_function"] = "gelu";
  const ModelConfig c = parse(config);
  EXPECT_EQ(c.n_layer, kLayers);
  EXPECT_EQ(c.n_head, kHeads);
  EXPECT_EQ(c.n_embd, kEmbd);
  EXPECT_EQ(c.n_inner, 20);
  EXPECT_EQ(c.n_positions, kPositions);
  EXPECT_EQ(c.vocab_size, kVocab);
  EXPECT_EQ(c.layer_norm_epsilon, 1e-6f);
  EXPECT_EQ(c.activation, Activation::kGeluErf);
  EXPECT_EQ(c.eos_token_id, 10);
  EXPECT_EQ(c.head_dim(), 4);
}

// The hub's openai-community/gpt2 config.json: n_ctx beside n_positions, no n_inner, no
// scale_attn_* keys; optional keys fall back to transformers' defaults.
TEST(CheckpointConfig, AppliesDefaults) {
  const json minimal = {
      {"n_layer", 12}, {"n_head", 12}, {"n_embd", 768}, {"n_ctx", 1024}, {"vocab_size", 50257}};
  const ModelConfig c = parse(minimal);
  EXPECT_EQ(c.n_positions, 1024);
  EXPECT_EQ(c.n_inner, 3072);
  EXPECT_EQ(c.layer_norm_epsilon, 1e-5f);
  EXPECT_EQ(c.activation, Activation::kGeluTanh);
  EXPECT_EQ(c.eos_token_id, 50256);
  EXPECT_EQ(c.parameter_count(), 124439808);

  json both = minimal;
  both["n_positions"] = 2048;  // transformers reads n_positions; n_ctx is legacy
  EXPECT_EQ(parse(both).n_positions, 2048);
  json null_eos = tiny_config();
  null_eos["eos_token_id"] = nullptr;
  EXPECT_EQ(parse(null_eos).eos_token_id, 50256);
}

TEST(CheckpointConfig, MapsActivations) {
  for (const auto& [name, activation] :
       std::vector<std::pair<std::string, Activation>>{{"gelu_new", Activation::kGeluTanh},
                                                       {"gelu_pytorch_tanh", Activation::kGeluTanh},
                                                       {"gelu_fast", Activation::kGeluTanh},
                                                       {"gelu", Activation::kGeluErf}}) {
    json config = tiny_config();
    config["activation_function"] = name;
    EXPECT_EQ(parse(config).activation, activation) << name;
  }
}

TEST(CheckpointConfig, RejectsInconsistentOrUnsupportedConfigs) {
  struct Case {
    std::string key;
    json value;  // null with erase = true removes the key
    bool erase;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"n_embd", 9, false, "n_embd 9 is not divisible by n_head 2"},
      {"n_layer", 0, false, "n_layer must be a positive integer, got 0"},
      {"n_head", -2, false, "n_head must be a positive integer, got -2"},
      {"vocab_size", "11", false, "vocab_size must be a positive integer"},
      {"n_embd", 8.5, false, "n_embd must be a positive integer"},
      {"n_positions", 1e12, false, "n_positions must be a positive integer"},
      {"n_inner", 0, false, "n_inner must be a positive integer"},
      {"n_layer", nullptr, true, "missing n_layer"},
      {"n_positions", nullptr, true, "missing n_positions (or n_ctx)"},
      {"model_type", "llama", false, "model_type is \"llama\"; only \"gpt2\" is supported"},
      {"activation_function", "relu", false, "unsupported activation_function \"relu\""},
      {"activation_function", 3, false, "activation_function must be a string"},
      {"layer_norm_epsilon", 0, false, "layer_norm_epsilon must be a positive number"},
      {"eos_token_id", 11, false, "eos_token_id must be a token id below vocab_size 11"},
      {"scale_attn_by_inverse_layer_idx", true, false, "scale_attn_by_inverse_layer_idx"},
      {"reorder_and_upcast_attn", true, false, "reorder_and_upcast_attn"},
      {"scale_attn_weights", false, false, "scale_attn_weights = false is not supported"},
      {"scale_attn_weights", "yes", false, "scale_attn_weights must be true or false"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.key + " = " + c.value.dump());
    json config = tiny_config();
    if (c.erase) {
      config.erase(c.key);
    } else {
      config[c.key] = c.value;
    }
    const std::string path = make_temp_dir("kvserve-config") + "/config.json";
    write_bytes(path, config.dump());
    const std::string message = error_of([&] { parse_model_config(path); });
    EXPECT_EQ(message.rfind(path + ": ", 0), 0u) << message;
    EXPECT_PRED2(contains, message, c.expected);
  }
}

TEST(CheckpointConfig, RejectsUnreadableFiles) {
  const std::string dir = make_temp_dir("kvserve-config");
  EXPECT_EQ(
      error_of([&] { parse_model_config(dir + "/absent.json"); }).rfind(dir + "/absent.json: ", 0),
      0u);
  for (const auto& [text, problem] : std::vector<std::pair<std::string, std::string>>{
           {"{\"n_layer\": ", "not valid JSON"}, {"[1]", "not a JSON object"}}) {
    write_bytes(dir + "/config.json", text);
    const std::string message = error_of([&] { parse_model_config(dir + "/config.json"); });
    EXPECT_PRED2(contains, message, dir + "/config.json: " + problem);
  }
}

// ---- loading model directories ----

// (dtype, key prefix, whether the file also holds mask buffers and a tied lm_head)
class CheckpointRoundTrip
    : public ::testing::TestWithParam<std::tuple<std::string, std::string, bool>> {};

TEST_P(CheckpointRoundTrip, LoadsEveryValue) {
  const auto& [dtype, prefix, extras] = GetParam();
  const std::vector<Tensor> tensors = tiny_tensors();
  std::vector<RawTensor> raw = raw_tensors(tensors, dtype, prefix);
  if (extras) {
    for (int l = 0; l < kLayers; ++l) {
      const std::string h = prefix + "h." + std::to_string(l) + ".attn.";
      // Mask buffers as old exports stored them; their dtype is irrelevant because they are
      // skipped.
      raw.push_back({h + "bias",
                     "BOOL",
                     {1, 1, kPositions, kPositions},
                     std::string(kPositions * kPositions, '\1')});
      raw.push_back({h + "masked_bias", "F32", {}, f32_bytes({-1e4f})});
    }
    raw.push_back({"lm_head.weight", dtype, {kVocab, kEmbd}, encode(tensors[0].values, dtype)});
  }
  const std::string dir = write_model(tiny_config(), raw);
  const ModelWeights w = load_model(dir);
  EXPECT_EQ(w.source, dir);
  EXPECT_EQ(w.config.n_layer, kLayers);
  EXPECT_EQ(w.config.vocab_size, kVocab);
  ASSERT_EQ(w.layers.size(), static_cast<size_t>(kLayers));
  expect_weights_equal(w, tensors);
}

INSTANTIATE_TEST_SUITE_P(CheckpointFormats, CheckpointRoundTrip,
                         ::testing::Combine(::testing::Values("F32", "F16", "BF16"),
                                            ::testing::Values("transformer.", ""),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return std::get<0>(info.param) +
                                  (std::get<1>(info.param).empty() ? "_bare" : "_prefixed") +
                                  (std::get<2>(info.param) ? "_with_buffers_and_lm_head" : "");
                         });

TEST(CheckpointLoad, AcceptsMixedDtypesAndATiedHeadStoredInAnotherDtype) {
  const std::vector<Tensor> tensors = tiny_tensors();
  std::vector<RawTensor> raw;
  const char* dtypes[] = {"F32", "F16", "BF16"};
  for (size_t k = 0; k < tensors.size(); ++k) {
    raw.push_back(raw_tensors({tensors[k]}, dtypes[k % 3], "transformer.")[0]);
  }
  raw.push_back({"lm_head.weight", "F32", {kVocab, kEmbd}, f32_bytes(tensors[0].values)});
  expect_weights_equal(load_model(write_model(tiny_config(), raw)), tensors);
}

TEST(CheckpointLoad, UsesAnExplicitInnerWidth) {
  json config = tiny_config();
  config["n_inner"] = 12;
  const std::vector<Tensor> tensors = tiny_tensors(12);
  const ModelWeights w = load_model(write_model(config, raw_tensors(tensors, "F16", "")));
  EXPECT_EQ(w.config.n_inner, 12);
  EXPECT_EQ(w.layers[1].mlp_fc_weight.size(), static_cast<size_t>(kEmbd * 12));
  expect_weights_equal(w, tensors);
}

// Asserts that loading `spec` fails with a message naming `path` and containing `problem`.
void expect_load_error(const std::string& spec, const std::string& path,
                       const std::string& problem) {
  const std::string message = error_of([&] { load_model(spec); });
  EXPECT_EQ(message.rfind(path + ": ", 0), 0u) << message;
  EXPECT_PRED2(contains, message, problem);
}

TEST(CheckpointLoad, RejectsMissingDirectory) {
  const std::string dir = make_temp_dir("kvserve-checkpoint") + "/absent";
  expect_load_error(dir, dir, "model directory not found");
}

TEST(CheckpointLoad, RejectsAFileInsteadOfADirectory) {
  const std::string dir = write_tiny_model();
  expect_load_error(dir + "/config.json", dir + "/config.json", "not a directory");
}

TEST(CheckpointLoad, RejectsMissingConfig) {
  const std::string dir = write_tiny_model();
  std::remove((dir + "/config.json").c_str());
  expect_load_error(dir, dir + "/config.json", "not found");
}

TEST(CheckpointLoad, RejectsMissingSafetensors) {
  const std::string dir = write_tiny_model();
  std::remove((dir + "/model.safetensors").c_str());
  expect_load_error(dir, dir + "/model.safetensors", "not found");
}

TEST(CheckpointLoad, RejectsEmptySafetensors) {
  const std::string dir = write_tiny_model();
  write_bytes(dir + "/model.safetensors", "");
  expect_load_error(dir, dir + "/model.safetensors", "empty file");
}

TEST(CheckpointLoad, RejectsHeaderLengthBeyondFile) {
  const std::string dir = write_tiny_model();
  write_bytes(dir + "/model.safetensors", le64(1 << 20) + "{}");
  expect_load_error(dir, dir + "/model.safetensors", "truncated");
}

TEST(CheckpointLoad, RejectsCorruptHeader) {
  const std::string dir = write_tiny_model();
  const std::string header = "{\"transformer.wte.weight\": {\"dtype\": \"F32\",";
  write_bytes(dir + "/model.safetensors", le64(header.size()) + header + std::string(64, '\0'));
  expect_load_error(dir, dir + "/model.safetensors", "corrupt header");
}

TEST(CheckpointLoad, RejectsUnsupportedDtype) {
  std::vector<RawTensor> raw = raw_tensors(tiny_tensors(), "F32", "transformer.");
  RawTensor& bias = raw[5];  // h.0.attn.c_attn.bias, [3C]
  ASSERT_EQ(bias.name, "transformer.h.0.attn.c_attn.bias");
  bias.dtype = "I64";
  bias.bytes = std::string(3 * kEmbd * 8, '\0');
  const std::string dir = write_model(tiny_config(), raw);
  expect_load_error(dir, dir + "/model.safetensors",
                    "tensor transformer.h.0.attn.c_attn.bias has dtype I64");
}

TEST(CheckpointLoad, RejectsWrongShape) {
  std::vector<RawTensor> raw = raw_tensors(tiny_tensors(), "F32", "");
  RawTensor& qkv = raw[4];  // h.0.attn.c_attn.weight, stored [3C, C] as a Linear would
  ASSERT_EQ(qkv.name, "h.0.attn.c_attn.weight");
  qkv.shape = {3 * kEmbd, kEmbd};
  const std::string dir = write_model(tiny_config(), raw);
  expect_load_error(dir, dir + "/model.safetensors",
                    "tensor h.0.attn.c_attn.weight: expected shape [8, 24], got [24, 8]");
}

TEST(CheckpointLoad, RejectsMissingTensor) {
  std::vector<RawTensor> raw = raw_tensors(tiny_tensors(), "F16", "transformer.");
  raw.erase(raw.begin() + 1);  // wpe
  const std::string dir = write_model(tiny_config(), raw);
  expect_load_error(dir, dir + "/model.safetensors", "missing tensors: transformer.wpe.weight");
}

TEST(CheckpointLoad, RejectsUnexpectedTensors) {
  std::vector<RawTensor> raw = raw_tensors(tiny_tensors(), "F16", "transformer.");
  raw.push_back({"transformer.h.2.ln_1.weight", "F16", {kEmbd}, std::string(2 * kEmbd, '\0')});
  raw.push_back({"transformer.h.5.attn.bias", "F16", {1}, std::string(2, '\0')});  // no layer 5
  const std::string dir = write_model(tiny_config(), raw);
  expect_load_error(dir, dir + "/model.safetensors",
                    "unexpected tensors: transformer.h.2.ln_1.weight, transformer.h.5.attn.bias");
}

// A three-layer checkpoint with a two-layer config.json: the surplus layer is named.
TEST(CheckpointLoad, RejectsCheckpointOfAnotherGeometry) {
  json config = tiny_config();
  config["n_layer"] = 3;
  const std::string dir = write_model(config, raw_tensors(tiny_tensors(), "F32", ""));
  expect_load_error(dir, dir + "/model.safetensors",
                    "missing tensors: h.2.ln_1.weight, h.2.ln_1.bias");
}

TEST(CheckpointLoad, RejectsKeysStoredTwice) {
  std::vector<RawTensor> raw = raw_tensors(tiny_tensors(), "F32", "transformer.");
  raw.push_back(raw_tensors({tiny_tensors()[0]}, "F32", "")[0]);  // bare wte.weight as well
  const std::string dir = write_model(tiny_config(), raw);
  expect_load_error(dir, dir + "/model.safetensors", "tensor wte.weight is stored twice");
}

TEST(CheckpointLoad, RejectsDataOffsetsBeyondData) {
  const std::vector<Tensor> tensors = tiny_tensors();
  json header = json::object();
  std::string data;
  for (const Tensor& t : tensors) {
    const std::string bytes = f32_bytes(t.values);
    header[t.name] = {{"dtype", "F32"},
                      {"shape", t.shape},
                      {"data_offsets", {data.size(), data.size() + bytes.size()}}};
    data += bytes;
  }
  data.resize(data.size() - 4);  // the last tensor's final element is cut off
  const std::string text = header.dump();
  const std::string dir = write_tiny_model();
  write_bytes(dir + "/model.safetensors", le64(text.size()) + text + data);
  expect_load_error(dir, dir + "/model.safetensors", "lie outside the");
}

TEST(CheckpointLoad, RejectsInconsistentConfig) {
  const std::string dir = write_tiny_model();
  json config = tiny_config();
  config["n_head"] = 3;
  write_bytes(dir + "/config.json", config.dump());
  expect_load_error(dir, dir + "/config.json", "n_embd 8 is not divisible by n_head 3");
}

TEST(CheckpointLoad, RejectsUnsupportedActivation) {
  const std::string dir = write_tiny_model();
  json config = tiny_config();
  config["activation_function"] = "swish";
  write_bytes(dir + "/config.json", config.dump());
  expect_load_error(dir, dir + "/config.json", "unsupported activation_function \"swish\"");
}

TEST(CheckpointLoad, RejectsUntiedLmHead) {
  const std::vector<Tensor> tensors = tiny_tensors();
  std::vector<RawTensor> raw = raw_tensors(tensors, "F32", "transformer.");
  std::vector<float> head = tensors[0].values;
  head.back() += 1.0f;  // differs in the very last element only
  raw.push_back({"lm_head.weight", "F32", {kVocab, kEmbd}, f32_bytes(head)});
  const std::string dir = write_model(tiny_config(), raw);
  expect_load_error(dir, dir + "/model.safetensors", "untied LM head not supported");
}

TEST(CheckpointLoad, RejectsLmHeadOfWrongShape) {
  const std::vector<Tensor> tensors = tiny_tensors();
  std::vector<RawTensor> raw = raw_tensors(tensors, "F32", "");
  raw.push_back({"lm_head.weight", "F32", {kEmbd, kVocab}, f32_bytes(tensors[0].values)});
  const std::string dir = write_model(tiny_config(), raw);
  expect_load_error(dir, dir + "/model.safetensors",
                    "tensor lm_head.weight: expected shape [11, 8], got [8, 11]");
}

// ---- the shared trained model ----

TEST(CheckpointSharedModel, LoadsTheTrainedModel) {
  const std::string dir = testing::shared_model_dir();
  const ModelWeights w = load_model(dir);
  EXPECT_EQ(w.source, dir);
  EXPECT_EQ(w.config.n_layer, 6);
  EXPECT_EQ(w.config.n_head, 4);
  EXPECT_EQ(w.config.n_embd, 256);
  EXPECT_EQ(w.config.n_inner, 1024);
  EXPECT_EQ(w.config.n_positions, 1024);
  EXPECT_EQ(w.config.vocab_size, 50257);
  EXPECT_EQ(w.config.activation, Activation::kGeluTanh);
  EXPECT_EQ(w.config.eos_token_id, 50256);
  EXPECT_EQ(w.config.parameter_count(), 17867008);

  // The formula agrees with what the checkpoint actually stores and with what was loaded.
  const SafetensorsFile file(dir + "/model.safetensors");
  int64_t stored = 0;
  for (const SafetensorsTensor& t : file.tensors()) stored += t.numel();
  EXPECT_EQ(stored, 17867008);
  int64_t loaded = 0;
  for (const auto& [name, values] : by_name(w)) loaded += static_cast<int64_t>(values->size());
  EXPECT_EQ(loaded, 17867008);
}

// Decodes elements straight from the file's bytes (own header parse, reference fp16 decoder) and
// compares them with what the loader produced.
TEST(CheckpointSharedModel, MatchesTheRawFp16Bytes) {
  const std::string path = testing::shared_model_dir() + "/model.safetensors";
  std::ifstream in(path, std::ios::binary);
  ASSERT_TRUE(in) << path;
  char length_bytes[8];
  in.read(length_bytes, 8);
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i)
    header_length = (header_length << 8) | static_cast<uint8_t>(length_bytes[i]);
  std::string header_text(header_length, '\0');
  in.read(header_text.data(), static_cast<std::streamsize>(header_length));
  const json header = json::parse(header_text);
  const auto raw_element = [&](const std::string& name, int64_t index) {
    const json& entry = header.at(name);
    EXPECT_EQ(entry.at("dtype"), "F16");
    const uint64_t offset =
        8 + header_length + entry.at("data_offsets")[0].get<uint64_t>() + 2 * index;
    in.seekg(static_cast<std::streamoff>(offset));
    uint8_t b[2];
    in.read(reinterpret_cast<char*>(b), 2);
    return half_reference(static_cast<uint16_t>(b[0] | (b[1] << 8)));
  };

  const ModelWeights w = load_model(testing::shared_model_dir());
  const int64_t wte_size = int64_t{50257} * 256;
  ASSERT_EQ(static_cast<int64_t>(w.token_embedding.size()), wte_size);
  int nonzero = 0;
  for (int64_t i : {int64_t{0}, int64_t{1}, int64_t{255}, int64_t{256}, int64_t{50256} * 256 + 17,
                    wte_size / 2 + 3, wte_size - 1}) {
    const double want = raw_element("transformer.wte.weight", i);
    EXPECT_EQ(w.token_embedding[i], want) << "wte element " << i;
    nonzero += want != 0;
  }
  EXPECT_GT(nonzero, 3);                                         // a trained embedding, not zeros
  const std::vector<float>& proj = w.layers[5].mlp_proj_weight;  // [1024, 256]
  for (int64_t i : {int64_t{0}, int64_t{1000}, int64_t{1024} * 256 - 1}) {
    EXPECT_EQ(proj[i], raw_element("transformer.h.5.mlp.c_proj.weight", i)) << "h.5 c_proj " << i;
  }
  EXPECT_EQ(w.ln_f_bias[7], raw_element("transformer.ln_f.bias", 7));
}

// ---- dummy models ----

TEST(CheckpointDummy, RecognizesSpecs) {
  EXPECT_TRUE(is_dummy_model("dummy:gpt2"));
  EXPECT_TRUE(is_dummy_model("dummy:nonsense"));
  EXPECT_FALSE(is_dummy_model("dummy"));
  EXPECT_FALSE(is_dummy_model("models/dummy:gpt2"));
}

TEST(CheckpointDummy, HasTheRealGeometries) {
  struct Case {
    std::string spec;
    int n_layer, n_head, n_embd;
    int64_t parameters;  // transformers' GPT2LMHeadModel.num_parameters() for the hub models
  };
  for (const Case& c : std::vector<Case>{{"dummy:gpt2", 12, 12, 768, 124439808},
                                         {"dummy:gpt2-medium", 24, 16, 1024, 354823168},
                                         {"dummy:gpt2-large", 36, 20, 1280, 774030080},
                                         {"dummy:gpt2-xl", 48, 25, 1600, 1557611200}}) {
    const ModelConfig config = dummy_model_config(c.spec);
    EXPECT_EQ(config.n_layer, c.n_layer) << c.spec;
    EXPECT_EQ(config.n_head, c.n_head) << c.spec;
    EXPECT_EQ(config.n_embd, c.n_embd) << c.spec;
    EXPECT_EQ(config.n_inner, 4 * c.n_embd) << c.spec;
    EXPECT_EQ(config.n_positions, 1024) << c.spec;
    EXPECT_EQ(config.vocab_size, 50257) << c.spec;
    EXPECT_EQ(config.layer_norm_epsilon, 1e-5f) << c.spec;
    EXPECT_EQ(config.activation, Activation::kGeluTanh) << c.spec;
    EXPECT_EQ(config.eos_token_id, 50256) << c.spec;
    EXPECT_EQ(config.parameter_count(), c.parameters) << c.spec;
  }
}

TEST(CheckpointDummy, RejectsUnknownNames) {
  for (const std::string spec : {"dummy:gpt3", "dummy:", "dummy:GPT2"}) {
    const std::string message = error_of([&] { dummy_model_config(spec); });
    EXPECT_EQ(message.rfind(spec + ": unknown dummy model", 0), 0u) << message;
    EXPECT_PRED2(contains, message,
                 "dummy:gpt2, dummy:gpt2-medium, dummy:gpt2-large, dummy:gpt2-xl");
    EXPECT_PRED2(contains, error_of([&] { load_model(spec); }), "unknown dummy model");
  }
}

TEST(CheckpointDummy, Gpt2IsDeterministicWithRealisticStatistics) {
  const ModelWeights a = load_model("dummy:gpt2");
  EXPECT_EQ(a.source, "dummy:gpt2");
  EXPECT_EQ(a.config.parameter_count(), 124439808);
  int64_t total = 0;
  for (const auto& [name, values] : by_name(a)) total += static_cast<int64_t>(values->size());
  EXPECT_EQ(total, 124439808);
  EXPECT_EQ(a.token_embedding.size(), 50257u * 768);
  EXPECT_EQ(a.layers[11].mlp_fc_weight.size(), 768u * 3072);

  // Pinned values (computed independently from the splitmix64 definition): any change to the
  // generator, or a platform computing it differently, breaks every benchmark's comparability.
  EXPECT_EQ(a.token_embedding[0], 0.0265565515f);
  EXPECT_EQ(a.token_embedding[1], 0.0046115173f);
  EXPECT_EQ(a.layers[11].mlp_proj_weight.back(), -0.0320421644f);

  const ModelWeights b = load_model("dummy:gpt2");
  EXPECT_TRUE(by_name(a).size() == by_name(b).size());
  for (const auto& [name, values] : by_name(a)) {
    EXPECT_TRUE(*values == *by_name(b).at(name)) << name;
  }

  const std::vector<float>& qkv = a.layers[3].attn_qkv_weight;  // [768, 2304]
  double sum = 0, sum_sq = 0, max_abs = 0;
  for (float v : qkv) {
    sum += v;
    sum_sq += double{v} * v;
    max_abs = std::max(max_abs, std::fabs(double{v}));
  }
  const double mean = sum / qkv.size();
  const double stddev = std::sqrt(sum_sq / qkv.size() - mean * mean);
  EXPECT_NEAR(mean, 0.0, 1e-4);
  EXPECT_NEAR(stddev, 0.02, 2e-4);
  EXPECT_LE(max_abs, 0.02 * std::sqrt(3.0) + 1e-6);  // uniform, bounded

  // Each matrix has its own stream; biases are zero and LayerNorm gains one.
  EXPECT_NE(std::vector<float>(a.token_embedding.begin(), a.token_embedding.begin() + 768),
            std::vector<float>(a.position_embedding.begin(), a.position_embedding.begin() + 768));
  EXPECT_NE(a.layers[0].attn_qkv_weight[0], a.layers[1].attn_qkv_weight[0]);
  for (const LayerWeights& L : a.layers) {
    for (const std::vector<float>* bias : {&L.ln_1_bias, &L.attn_qkv_bias, &L.attn_proj_bias,
                                           &L.ln_2_bias, &L.mlp_fc_bias, &L.mlp_proj_bias}) {
      EXPECT_EQ(*bias, std::vector<float>(bias->size(), 0.0f));
    }
    EXPECT_EQ(L.ln_1_weight, std::vector<float>(768, 1.0f));
    EXPECT_EQ(L.ln_2_weight, std::vector<float>(768, 1.0f));
  }
  EXPECT_EQ(a.ln_f_weight, std::vector<float>(768, 1.0f));
  EXPECT_EQ(a.ln_f_bias, std::vector<float>(768, 0.0f));
}

}  // namespace
}  // namespace kvserve
