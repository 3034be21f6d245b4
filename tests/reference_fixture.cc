#include "tests/reference_fixture.h"

#include "common/text_io.h"
#include "engine/checkpoint.h"
#include "tests/test_support.h"

namespace kvserve::testing {

const nlohmann::json& logits_fixture() {
  static const nlohmann::json data =
      nlohmann::json::parse(read_file(source_path("tests/fixtures/logits.json.xz")));
  return data;
}

const ModelWeights& shared_weights() {
  static const ModelWeights weights = load_model(shared_model_dir());
  return weights;
}

KvCacheConfig fixture_format(const std::string& name) {
  const nlohmann::json& f = logits_fixture()["formats"][name];
  KvCacheConfig c;
  const std::string kind = f["kind"];
  if (kind == "fp16") {
    c.format = KvFormat::kFp16;
  } else if (kind == "int8") {
    c.format = KvFormat::kInt8;
  } else {
    c.format = f["bits"] == 2 ? KvFormat::kKivi2 : KvFormat::kKivi4;
    c.key_group = f["group"];
    c.value_group = f["value_group"];
    c.residual = f["residual"];
    c.page_tokens = c.key_group;
    c.per_token_keys = f.value("per_token_keys", false);
  }
  return c;
}

std::vector<int32_t> ids_of(const nlohmann::json& array) {
  return array.get<std::vector<int32_t>>();
}

}  // namespace kvserve::testing
