#include <peft/text/wordpiece.hpp>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using peft::text::EncodeOptions;
using peft::text::WordPieceTokenizer;
using Tokens = std::vector<std::string>;
using Ids = std::vector<int64_t>;
using namespace std::string_literals;

namespace {

// id = position. Small enough to work every expectation out by hand.
const Tokens kVocab = {
    "[PAD]", "[UNK]", "[CLS]",  "[SEP]",  "[MASK]",  // 0-4
    "un",    "##aff", "##able", "hello",  ",",       // 5-9
    "world", "!",     "creme",  "brulee", "北",      // 10-14
    "京",    "the",   "##s",    "cat",    ".",       // 15-19
    "$",     "a",     "##a",    "'",      "t",       // 20-24
    "don",   "οδος",  "σοφος",  "b",      "Crème",   // 25-29
};

// A fresh folder under the system temp directory, removed when the test ends.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() /
           ("peft_tokenizer_" + std::to_string(reinterpret_cast<uintptr_t>(this)) + "_" +
            std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  void write(const std::string& name, const std::string& content) const {
    std::ofstream(path / name, std::ios::binary) << content;
  }
};

std::string lines(const Tokens& tokens) {
  std::string out;
  for (const auto& t : tokens) out += t + "\n";
  return out;
}

Ids row(const torch::Tensor& t, int64_t i) {
  auto r = t[i].contiguous();
  return Ids(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel());
}

}  // namespace

TEST_CASE("basic tokenization: cleaning, case, accents, punctuation, CJK", "[tokenizer]") {
  WordPieceTokenizer tok(kVocab);
  CHECK(tok.basic_tokenize("Hello, World!") == Tokens{"hello", ",", "world", "!"});
  CHECK(tok.basic_tokenize("  Crème\tBRÛLÉE \n") == Tokens{"creme", "brulee"});
  // A decomposed accent (e + U+0301) strips like the composed one.
  CHECK(tok.basic_tokenize("Cre\xcc\x80me") == Tokens{"creme"});
  // Every ASCII non-alphanumeric counts as punctuation, $ ^ ` included.
  CHECK(tok.basic_tokenize("don't$x^y`z") == Tokens{"don", "'", "t", "$", "x", "^", "y", "`", "z"});
  // Each CJK ideograph is its own word; kana and hangul are not split.
  CHECK(tok.basic_tokenize("北京大学") == Tokens{"北", "京", "大", "学"});
  CHECK(tok.basic_tokenize("東京タワー") == Tokens{"東", "京", "タワー"});
  // Accent stripping's NFD also splits Hangul syllables into conjoining jamo, as the reference
  // does (안 -> U+110B U+1161 U+11AB).
  CHECK(tok.basic_tokenize("안녕 하") ==
        Tokens{"\u110b\u1161\u11ab\u1102\u1167\u11bc", "\u1112\u1161"});
  // NUL, U+FFFD, zero-width space (Cf) and BEL vanish; tab and NBSP separate words.
  CHECK(tok.basic_tokenize("a\0b\xef\xbf\xbd"
                           "c\xe2\x80\x8b"
                           "d\x07"
                           "e\tf\xc2\xa0g"s) == Tokens{"abcde", "f", "g"});
  // Python's str.split() also splits on U+2028 although BERT's cleaning keeps it.
  CHECK(tok.basic_tokenize("ab\xe2\x80\xa8"
                           "cd") == Tokens{"ab", "cd"});
  // str.lower(): a word-final capital sigma becomes the final form.
  CHECK(tok.basic_tokenize("ΟΔΟΣ ΣΟΦΟΣ") == Tokens{"οδος", "σοφος"});
  // Special tokens written in the text stay whole, even glued to other text.
  CHECK(tok.basic_tokenize("x[SEP]y [cls]") == Tokens{"x", "[SEP]", "y", "[", "cls", "]"});
  CHECK(tok.basic_tokenize("").empty());
  CHECK(tok.basic_tokenize(" \t\n").empty());

  WordPieceTokenizer cased(kVocab, peft::text::WordPieceOptions().do_lower_case(false));
  CHECK(cased.basic_tokenize("Crème, Brûlée") == Tokens{"Crème", ",", "Brûlée"});
  CHECK(cased.tokenize("Crème") == Tokens{"Crème"});
  CHECK(cased.basic_tokenize("안녕") == Tokens{"안녕"});
  WordPieceTokenizer no_cjk(kVocab, peft::text::WordPieceOptions().tokenize_chinese_chars(false));
  CHECK(no_cjk.basic_tokenize("北京") == Tokens{"北京"});

  CHECK_THROWS_WITH(
      tok.tokenize("bad \xff byte"),
      Catch::Contains("[peft::text]") && Catch::Contains("not valid UTF-8 at byte 4"));
  // The offset counts from the start of the text, across special tokens.
  CHECK_THROWS_WITH(tok.tokenize("[CLS] ok \xc3"), Catch::Contains("at byte 9"));
}

TEST_CASE("WordPiece: longest match first, ## continuations, unknown words", "[tokenizer]") {
  WordPieceTokenizer tok(kVocab);
  CHECK(tok.tokenize("unaffable") == Tokens{"un", "##aff", "##able"});
  CHECK(tok.tokenize("Unaffables cats.") ==
        Tokens{"un", "##aff", "##able", "##s", "cat", "##s", "."});
  // One unmatched remainder makes the whole word unknown, not just the rest.
  CHECK(tok.tokenize("unaffablex hello") == Tokens{"[UNK]", "hello"});
  CHECK(tok.tokenize("zzz") == Tokens{"[UNK]"});
  CHECK(tok.tokenize("北京大") == Tokens{"北", "京", "[UNK]"});
  CHECK(tok.tokenize("x[MASK]") == Tokens{"[UNK]", "[MASK]"});
  // 100 characters are still split; 101 are one unknown word.
  auto hundred = tok.tokenize(std::string(100, 'a'));
  REQUIRE(hundred.size() == 100);
  CHECK(hundred.front() == "a");
  CHECK(hundred.back() == "##a");
  CHECK(tok.tokenize(std::string(101, 'a')) == Tokens{"[UNK]"});

  CHECK(tok.convert_tokens_to_ids({"hello", "##s", "nope"}) == Ids{8, 17, 1});
  CHECK(tok.convert_ids_to_tokens({2, 5, 6, 7, 3}) ==
        Tokens{"[CLS]", "un", "##aff", "##able", "[SEP]"});
  CHECK_THROWS_WITH(tok.id_to_token(30), Catch::Contains("token id 30 is outside"));
  CHECK_THROWS_WITH(tok.id_to_token(-1), Catch::Contains("token id -1 is outside"));
  CHECK(tok.decode({2, 5, 6, 7, 9, 10, 11, 3}) == "unaffable, world!");
  CHECK(tok.decode({2, 8, 3}, /*skip_special_tokens=*/false) == "[CLS] hello [SEP]");
}

TEST_CASE("encoding sentences and pairs with longest-first truncation", "[tokenizer]") {
  WordPieceTokenizer tok(kVocab);
  auto one = tok.encode("Hello, world!");
  CHECK(one.input_ids == Ids{2, 8, 9, 10, 11, 3});
  CHECK(one.token_type_ids == Ids{0, 0, 0, 0, 0, 0});
  CHECK(one.attention_mask == Ids{1, 1, 1, 1, 1, 1});
  CHECK(tok.encode("").input_ids == Ids{2, 3});

  // a = un ##aff ##able ##s . (5), b = the cat ##s (3); max 8 leaves 5 for both.
  auto pair = tok.encode("unaffables.", "the cats", EncodeOptions().max_length(8));
  // Two from a evens them at 3/3; the last one comes from the second sequence.
  CHECK(pair.input_ids == Ids{2, 5, 6, 7, 3, 16, 18, 3});
  CHECK(pair.token_type_ids == Ids{0, 0, 0, 0, 0, 1, 1, 1});
  CHECK(pair.attention_mask == Ids(8, 1));
  // Equal lengths (4/4), three to remove: second, first, second.
  auto even = tok.encode("hello , world !", "the cat un hello", EncodeOptions().max_length(8));
  CHECK(even.input_ids == Ids{2, 8, 9, 10, 3, 16, 18, 3});
  // The shorter first sequence is left alone while the second is longer.
  auto longer_b = tok.encode("hello", "the cats , world !", EncodeOptions().max_length(7));
  CHECK(longer_b.input_ids == Ids{2, 8, 3, 16, 18, 17, 3});
  CHECK(longer_b.token_type_ids == Ids{0, 0, 0, 1, 1, 1, 1});
  // Untruncated when it fits, and when truncation is off.
  CHECK(tok.encode("hello", "world", EncodeOptions().max_length(5)).input_ids ==
        Ids{2, 8, 3, 10, 3});
  CHECK(tok.encode("hello , world !", EncodeOptions().max_length(4)).input_ids == Ids{2, 8, 9, 3});
  CHECK(tok.encode("hello , world !", EncodeOptions().max_length(4).truncation(false))
            .input_ids.size() == 6);
  CHECK(tok.encode("hello", "world", EncodeOptions().max_length(3)).input_ids == Ids{2, 3, 3});
  CHECK_THROWS_WITH(tok.encode("hello", "world", EncodeOptions().max_length(2)),
                    Catch::Contains("max_length 2 cannot hold the 3 special tokens"));
}

TEST_CASE("batches pad to the longest encoding", "[tokenizer]") {
  WordPieceTokenizer tok(kVocab);
  auto batch = tok.encode_batch({"hello", "the cats, world!", ""});
  REQUIRE(batch.input_ids.sizes() == torch::IntArrayRef{3, 8});
  CHECK(batch.input_ids.scalar_type() == torch::kLong);
  CHECK(batch.token_type_ids.scalar_type() == torch::kLong);
  CHECK(batch.attention_mask.scalar_type() == torch::kLong);
  CHECK(row(batch.input_ids, 0) == Ids{2, 8, 3, 0, 0, 0, 0, 0});
  CHECK(row(batch.input_ids, 1) == Ids{2, 16, 18, 17, 9, 10, 11, 3});
  CHECK(row(batch.input_ids, 2) == Ids{2, 3, 0, 0, 0, 0, 0, 0});
  CHECK(row(batch.attention_mask, 0) == Ids{1, 1, 1, 0, 0, 0, 0, 0});
  CHECK(row(batch.attention_mask, 1) == Ids(8, 1));
  CHECK(row(batch.token_type_ids, 1) == Ids(8, 0));

  auto pairs = tok.encode_batch({"hello", "the cats"}, {"world", "hello , world !"},
                                EncodeOptions().max_length(7));
  REQUIRE(pairs.input_ids.sizes() == torch::IntArrayRef{2, 7});
  CHECK(row(pairs.input_ids, 0) == Ids{2, 8, 3, 10, 3, 0, 0});
  CHECK(row(pairs.token_type_ids, 0) == Ids{0, 0, 0, 1, 1, 0, 0});
  CHECK(row(pairs.attention_mask, 0) == Ids{1, 1, 1, 1, 1, 0, 0});
  // the cat ##s (3) + hello , world ! (4) -> 4 fit: 2 and 2.
  CHECK(row(pairs.input_ids, 1) == Ids{2, 16, 18, 3, 8, 9, 3});
  CHECK(row(pairs.token_type_ids, 1) == Ids{0, 0, 0, 0, 1, 1, 1});

  auto fixed = tok.encode_batch({"hello"}, EncodeOptions().max_length(5).pad_to_max_length(true));
  CHECK(row(fixed.input_ids, 0) == Ids{2, 8, 3, 0, 0});
  CHECK(tok.encode_batch(std::vector<std::string>{}).input_ids.sizes() == torch::IntArrayRef{0, 0});
  CHECK_THROWS_WITH(tok.encode_batch({"a", "b"}, {"c"}),
                    Catch::Contains("2 first sentences but 1 second sentences"));
}

TEST_CASE("from_pretrained reads vocab.txt and tokenizer_config.json", "[tokenizer]") {
  TempDir dir;
  dir.write("vocab.txt", lines(kVocab));
  dir.write("tokenizer_config.json",
            R"({"do_lower_case": false, "model_max_length": 5, "cls_token": "[CLS]",
                "unk_token": {"content": "[UNK]", "lstrip": false}})");
  auto tok = WordPieceTokenizer::from_pretrained(dir.path);
  CHECK(tok.vocab_size() == 30);
  CHECK(tok.pad_id() == 0);
  CHECK(tok.unk_id() == 1);
  CHECK(tok.cls_id() == 2);
  CHECK(tok.sep_id() == 3);
  CHECK_FALSE(tok.options().do_lower_case());
  CHECK(tok.tokenize("Crème hello") == Tokens{"Crème", "hello"});
  // model_max_length truncates when no max_length is given.
  CHECK(tok.encode("hello , world !").input_ids == Ids{2, 8, 9, 10, 3});

  // Windows line ends and a missing final newline give the same ids.
  TempDir crlf;
  std::string text;
  for (const auto& t : kVocab) text += t + "\r\n";
  crlf.write("vocab.txt", text.substr(0, text.size() - 2));
  auto tok2 = WordPieceTokenizer::from_pretrained(crlf.path);
  CHECK(tok2.vocab_size() == 30);
  CHECK(tok2.encode("unaffable").input_ids == Ids{2, 5, 6, 7, 3});
  CHECK(tok2.options().do_lower_case());
  CHECK_FALSE(tok2.options().model_max_length().has_value());
}

TEST_CASE("bad model folders fail with the file named", "[tokenizer]") {
  TempDir dir;
  auto vocab = (dir.path / "vocab.txt").string();
  CHECK_THROWS_WITH(WordPieceTokenizer::from_pretrained(dir.path / "nope"),
                    Catch::Contains("[peft::wordpiece] model folder") && Catch::Contains("nope"));
  CHECK_THROWS_WITH(WordPieceTokenizer::from_pretrained(dir.path),
                    Catch::Contains("cannot open vocabulary file " + vocab));
  dir.write("vocab.txt", "");
  CHECK_THROWS_WITH(WordPieceTokenizer::from_pretrained(dir.path),
                    Catch::Contains(vocab + " is empty"));
  for (const char* missing : {"[UNK]", "[CLS]", "[SEP]", "[PAD]"}) {
    Tokens v;
    for (const auto& t : kVocab) {
      if (t != missing) v.push_back(t);
    }
    dir.write("vocab.txt", lines(v));
    CHECK_THROWS_WITH(
        WordPieceTokenizer::from_pretrained(dir.path),
        Catch::Contains(vocab + " has no") && Catch::Contains(std::string("\"") + missing + "\""));
  }
  dir.write("vocab.txt", lines(kVocab) + "ok\nbad\xc3(\n");
  CHECK_THROWS_WITH(WordPieceTokenizer::from_pretrained(dir.path),
                    Catch::Contains(vocab + " line 32 is not valid UTF-8"));

  dir.write("vocab.txt", lines(kVocab));
  auto config = (dir.path / "tokenizer_config.json").string();
  dir.write("tokenizer_config.json", "{\"do_lower_case\": tru");
  CHECK_THROWS_WITH(WordPieceTokenizer::from_pretrained(dir.path),
                    Catch::Contains(config + " is not valid JSON"));
  dir.write("tokenizer_config.json", R"({"do_lower_case": "yes"})");
  CHECK_THROWS_WITH(WordPieceTokenizer::from_pretrained(dir.path),
                    Catch::Contains(config + ": \"do_lower_case\" must be true, false or null"));
  dir.write("tokenizer_config.json", R"({"sep_token": "[SEPARATOR]"})");
  CHECK_THROWS_WITH(WordPieceTokenizer::from_pretrained(dir.path),
                    Catch::Contains("no separator token \"[SEPARATOR]\""));
}
