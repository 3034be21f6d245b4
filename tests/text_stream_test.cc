// TextStream: the streamed text of a completion, checked against the tokenizer's decode of the
// whole completion (the reference): whatever the token boundaries, the pieces concatenate to it,
// cut before the earliest stop string.
#include "engine/text_stream.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tests/test_support.h"

namespace kvserve {
namespace {

const Tokenizer& tokenizer() {
  static const Tokenizer loaded = Tokenizer::from_model_dir(testing::shared_model_dir());
  return loaded;
}

StepEvent token_event(int32_t token, FinishReason finish = FinishReason::kNone) {
  StepEvent event;
  event.has_token = true;
  event.token = token;
  event.finish = finish;
  return event;
}

struct Streamed {
  std::vector<std::string> pieces;  // one per pushed token
  std::string text;
};

// Streams `ids`, the last one finishing with `last_finish`, stopping at a matched stop string.
Streamed stream(TextStream& text_stream, const std::vector<int32_t>& ids,
                FinishReason last_finish = FinishReason::kLength) {
  Streamed out;
  for (size_t i = 0; i < ids.size() && !text_stream.stopped(); ++i) {
    const bool last = i + 1 == ids.size();
    out.pieces.push_back(
        text_stream.push(token_event(ids[i], last ? last_finish : FinishReason::kNone)));
    out.text += out.pieces.back();
  }
  return out;
}

TEST(TextStream, WithoutStopStringsTheTextIsTheDecodeOfTheTokens) {
  const std::string text = "Caf\xc3\xa9 na\xc3\xafve \xe2\x82\xac 42 \xf0\x9f\x98\x80 end";
  const std::vector<int32_t> ids = tokenizer().encode(text);
  TextStream text_stream(tokenizer(), {});
  EXPECT_EQ(stream(text_stream, ids).text, text);
  EXPECT_FALSE(text_stream.stopped());
}

TEST(TextStream, AStopStringAcrossTokensCutsTheTextBeforeIt) {
  const std::string text = "The kernel schedules tasks on every core of the machine.";
  const std::vector<int32_t> ids = tokenizer().encode(text);
  ASSERT_GT(ids.size(), 6u);
  // From the middle of one token into the middle of a later one.
  const size_t begin = text.find("dules"), end = text.find("ry core") + 3;
  const std::string stop = text.substr(begin, end - begin);
  TextStream text_stream(tokenizer(), {"absent", stop});
  const Streamed out = stream(text_stream, ids);
  EXPECT_EQ(out.text, text.substr(0, begin));
  EXPECT_TRUE(text_stream.stopped());
  EXPECT_EQ(text_stream.matched_stop(), stop);
  EXPECT_LT(out.pieces.size(), ids.size()) << "the stream goes on after the stop string";
}

TEST(TextStream, TextThatMayStartAStopStringIsHeldBackUntilDecided) {
  const std::vector<int32_t> ids = tokenizer().encode("alpha beta gamma");
  TextStream text_stream(tokenizer(), {" beta delta"});
  const Streamed out = stream(text_stream, ids);
  EXPECT_EQ(out.text, "alpha beta gamma");
  EXPECT_FALSE(text_stream.stopped());
  // " beta" could begin the stop string: it must not go out with the token that made it.
  std::string before_gamma;
  for (size_t i = 0; i + 1 < out.pieces.size(); ++i) before_gamma += out.pieces[i];
  EXPECT_EQ(before_gamma.find("beta"), std::string::npos) << before_gamma;
}

TEST(TextStream, OfTwoStopStringsCompletedAtOnePlaceTheLongerWins) {
  const std::vector<int32_t> ids = tokenizer().encode("one two three four");
  ASSERT_EQ(tokenizer().decode({ids[1]}), " two") << "both stop strings end inside one token";
  TextStream text_stream(tokenizer(), {" t", " tw"});
  const Streamed out = stream(text_stream, ids);
  EXPECT_EQ(out.text, "one");
  EXPECT_EQ(text_stream.matched_stop(), " tw");
}

TEST(TextStream, AStopStringMatchesAsSoonAsItIsComplete) {
  // " two" is complete one token before " two three" could be: the stream does not wait.
  const std::vector<int32_t> ids = tokenizer().encode("one two three four");
  TextStream text_stream(tokenizer(), {" two three", " two"});
  const Streamed out = stream(text_stream, ids);
  EXPECT_EQ(out.text, "one");
  EXPECT_EQ(text_stream.matched_stop(), " two");
  EXPECT_EQ(out.pieces.size(), 2u);
}

TEST(TextStream, TheTokenThatEndsGenerationIsNotText) {
  const std::vector<int32_t> ids = tokenizer().encode("hello world");
  std::vector<int32_t> with_eos = ids;
  with_eos.push_back(tokenizer().eos_token_id());
  TextStream text_stream(tokenizer(), {});
  EXPECT_EQ(stream(text_stream, with_eos, FinishReason::kEos).text, "hello world");
}

TEST(TextStream, WithoutStopStringsTheLastTokenEndsAnIncompleteCharacterAsReplacement) {
  const std::vector<int32_t> lead_byte = tokenizer().encode(std::string("\xe2"));
  ASSERT_EQ(lead_byte.size(), 1u);
  std::vector<int32_t> ids = tokenizer().encode("ab");
  ids.push_back(lead_byte[0]);
  TextStream by_length(tokenizer(), {});
  const Streamed streamed = stream(by_length, ids);
  EXPECT_EQ(streamed.pieces.back(), "\xef\xbf\xbd") << "held until the last token, then replaced";
  EXPECT_EQ(streamed.text, "ab\xef\xbf\xbd");

  ids.push_back(tokenizer().eos_token_id());
  TextStream by_eos(tokenizer(), {});
  EXPECT_EQ(stream(by_eos, ids, FinishReason::kEos).text, "ab\xef\xbf\xbd");
}

TEST(TextStream, FlushGivesTheHeldTextAndAnIncompleteCharacterAsReplacement) {
  // The first byte of a three-byte character, alone: GPT-2's byte-level vocabulary has a token
  // for every byte.
  const std::vector<int32_t> lead_byte = tokenizer().encode(std::string("\xe2"));
  ASSERT_EQ(lead_byte.size(), 1u);
  TextStream text_stream(tokenizer(), {"x y"});
  std::string text = text_stream.push(token_event(tokenizer().encode("x")[0]));
  EXPECT_EQ(text, "") << "'x' may begin the stop string";
  text += text_stream.push(token_event(lead_byte[0]));
  EXPECT_EQ(text, "") << "the incomplete character does not yet decide the stop string";
  EXPECT_EQ(text_stream.flush(), "x\xef\xbf\xbd");
  EXPECT_EQ(text_stream.flush(), "");
}

}  // namespace
}  // namespace kvserve
