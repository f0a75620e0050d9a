#include <peft/text/bpe.hpp>
#include <peft/text/chat.hpp>
#include <peft/text/load.hpp>
#include <peft/text/unigram.hpp>
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

namespace {

// A Unigram tokenizer.json small enough to work every cut out by hand. Scores: the best cut of
// "▁abc" is ▁a|bc (-2 - 1 = -3), not the longest first piece ▁ab|c (-5 - 2 = -7) nor ▁|abc
// (-1 - 4 = -5). The lowest score is -5, so an unknown character scores -15.
nlohmann::json unigram_json() {
  nlohmann::json vocab = nlohmann::json::array();
  for (auto [piece, score] : std::vector<std::pair<std::string, double>>{{"<s>", 0},
                                                                         {"<pad>", 0},
                                                                         {"</s>", 0},
                                                                         {"<unk>", 0},  // 0-3
                                                                         {"\u2581", -1},
                                                                         {"\u2581a", -2},
                                                                         {"\u2581ab", -5},
                                                                         {"bc", -1},  // 4-7
                                                                         {"c", -2},
                                                                         {"b", -2},
                                                                         {"abc", -4}}) {  // 8-10
    vocab.push_back({piece, score});
  }
  auto special = [](const char* id) {
    return nlohmann::json{{"SpecialToken", {{"id", id}, {"type_id", 0}}}};
  };
  auto sequence = [](const char* id) {
    return nlohmann::json{{"Sequence", {{"id", id}, {"type_id", 0}}}};
  };
  nlohmann::json added = nlohmann::json::array();
  for (auto [id, content] : std::vector<std::pair<int, std::string>>{
           {0, "<s>"}, {1, "<pad>"}, {2, "</s>"}, {3, "<unk>"}}) {
    added.push_back({{"id", id},
                     {"content", content},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  return {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer",
       {{"type", "Sequence"},
        {"normalizers",
         {{{"type", "Replace"}, {"pattern", {{"String", "\uff22"}}}, {"content", "b"}},
          {{"type", "Replace"}, {"pattern", {{"String", "\x01"}}}, {"content", ""}},
          {{"type", "Replace"}, {"pattern", {{"Regex", " {2,}"}}}, {"content", " "}}}}}},
      {"pre_tokenizer",
       {{"type", "Metaspace"},
        {"replacement", "\u2581"},
        {"prepend_scheme", "always"},
        {"split", true}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", {special("<s>"), sequence("A"), special("</s>")}},
        {"pair",
         {special("<s>"), sequence("A"), special("</s>"), special("</s>"), sequence("B"),
          special("</s>")}}}},
      {"model", {{"type", "Unigram"}, {"unk_id", 3}, {"vocab", vocab}, {"byte_fallback", false}}},
  };
}

}  // namespace

TEST_CASE("Unigram: highest-scoring cut, unknown runs fused, normaliser and metaspace",
          "[tokenizer][unigram]") {
  peft::text::UnigramTokenizer tok(unigram_json());
  CHECK(tok.vocab_size() == 11);
  CHECK(tok.tokenize("abc") == Tokens{"\u2581a", "bc"});
  // U+FF22 becomes "b", U+0001 disappears, two spaces become one.
  CHECK(tok.normalize("a\uff22\x01"
                      "c  x") == "abc x");
  CHECK(tok.tokenize("a\uff22c") == Tokens{"\u2581a", "bc"});
  // Each word starts at a metaspace; x, y and z are in no piece: one <unk> for the run.
  CHECK(tok.encode_ids("xyz") == Ids{4, 3});
  CHECK(tok.encode_ids("x  abc") == Ids{4, 3, 5, 7});
  CHECK(tok.encode_ids("xbcy") == Ids{4, 3, 7, 3});
  // A leading space is the metaspace itself (nothing prepended twice); a trailing one is "▁".
  CHECK(tok.encode_ids(" abc ") == Ids{5, 7, 4});
  CHECK(tok.encode_ids("").empty());
  // Special tokens written in the text stay whole; the text on either side is its own segment.
  CHECK(tok.encode_ids("abc<s>abc") == Ids{5, 7, 0, 5, 7});
  CHECK(tok.decode({0, 5, 7, 4, 8, 2}) == "abc c");
  // prepend_scheme "first": only text at the very start of the input gets the metaspace, as in
  // the tokenizers library ("<s>abc" has none: "abc" is one piece then).
  auto first_json = unigram_json();
  first_json["pre_tokenizer"]["prepend_scheme"] = "first";
  peft::text::UnigramTokenizer first(first_json);
  CHECK(first.encode_ids("abc<s>abc") == Ids{5, 7, 0, 10});
  CHECK(first.encode_ids("<s>abc") == Ids{0, 10});
  // As the tokenizers library decodes: only the first token loses its metaspace.
  CHECK(tok.decode({0, 5, 7, 2}, false) == "<s> abc</s>");
}

TEST_CASE("Unigram: XLM-R pairs and the tokenizers library's longest-first truncation",
          "[tokenizer][unigram]") {
  peft::text::UnigramTokenizer tok(unigram_json());
  CHECK(tok.special_tokens_added(true) == 4);
  auto e = tok.encode("abc", "c");
  CHECK(e.input_ids == Ids{0, 5, 7, 2, 2, 4, 8, 2});
  CHECK(e.token_type_ids == Ids(8, 0));
  // "abc abc abc" is 6 tokens, "abc" 2; 7 leave room for 3. The shorter cannot keep both its
  // tokens (that would leave the longer 1), so each gets half: shorter 1, longer 2.
  e = tok.encode("abc abc abc", "abc", EncodeOptions().max_length(7));
  CHECK(e.input_ids == Ids{0, 5, 7, 2, 2, 5, 2});
  // Equal lengths: the second keeps the odd token (WordPiece's Python rule gives it the first).
  e = tok.encode("abc", "abc", EncodeOptions().max_length(7));
  CHECK(e.input_ids == Ids{0, 5, 2, 2, 5, 7, 2});
  // The shorter keeps all it has when the longer still gets as much.
  e = tok.encode("abc abc abc", "c", EncodeOptions().max_length(8));
  CHECK(e.input_ids == Ids{0, 5, 7, 2, 2, 4, 8, 2});
  CHECK_THROWS_WITH(tok.encode("a", "b", EncodeOptions().max_length(3)),
                    Catch::Contains("max_length 3 cannot hold the 4 special tokens"));
  auto batch = tok.encode_batch({"abc abc", "x"});
  CHECK(row(batch.input_ids, 1) == Ids{0, 4, 3, 2, 1, 1});  // padded with <pad>, id 1
}

TEST_CASE("Unigram: unsupported or malformed tokenizer.json is refused by name",
          "[tokenizer][unigram]") {
  auto refused = [](nlohmann::json j) {
    try {
      peft::text::UnigramTokenizer tok(j, "t.json");
    } catch (const peft::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  auto j = unigram_json();
  j["model"]["type"] = "BPE";
  CHECK_THAT(refused(j), Catch::Contains("t.json: model type \"BPE\" is not a Unigram model"));
  j = unigram_json();
  j["normalizer"] = {{"type", "Precompiled"}, {"precompiled_charsmap", "AAAA"}};
  CHECK_THAT(refused(j), Catch::Contains("normalizer \"Precompiled\" is not supported"));
  j = unigram_json();
  j["pre_tokenizer"] = {{"type", "ByteLevel"}};
  CHECK_THAT(refused(j), Catch::Contains("pre_tokenizer \"ByteLevel\" is not supported"));
  j = unigram_json();
  j["model"]["vocab"][4] = {"\u2581", "high"};
  CHECK_THAT(refused(j), Catch::Contains("model.vocab[4] must be [piece, score]"));
  j = unigram_json();
  j["model"]["unk_id"] = 99;
  CHECK_THAT(refused(j), Catch::Contains("model.unk_id must be an id in the vocabulary"));
  j = unigram_json();
  j["added_tokens"][0]["id"] = 5;
  CHECK_THAT(refused(j), Catch::Contains("added token \"<s>\" has id 5"));
  j = unigram_json();
  j["post_processor"]["pair"].erase(3);
  j["post_processor"]["pair"][0]["SpecialToken"]["id"] = "</s>";
  CHECK_THAT(refused(j), Catch::Contains("is not of the supported shape"));
  j = unigram_json();
  j.erase("post_processor");
  CHECK_THAT(refused(j), Catch::Contains("no post_processor"));
}

TEST_CASE("load_tokenizer picks the tokenizer from the folder's files", "[tokenizer][unigram]") {
  TempDir dir;
  CHECK_THROWS_WITH(peft::text::load_tokenizer(dir.path),
                    Catch::Contains("neither vocab.txt (WordPiece) nor tokenizer.json"));
  dir.write("tokenizer.json", unigram_json().dump());
  dir.write("tokenizer_config.json", R"({"model_max_length": 6, "pad_token": "<unk>"})");
  auto tok = peft::text::load_tokenizer(dir.path);
  CHECK(std::string(tok->kind()) == "unigram");
  CHECK(tok->pad_id() == 3);
  CHECK(tok->encode("abc abc abc").input_ids == Ids{0, 5, 7, 5, 7, 2});
  dir.write("tokenizer.json", "{\"model\": ");
  CHECK_THROWS_WITH(peft::text::load_tokenizer(dir.path),
                    Catch::Contains((dir.path / "tokenizer.json").string() + " is not valid JSON"));
  dir.write("tokenizer.json", unigram_json().dump());
  dir.write("tokenizer_config.json", R"({"pad_token": "[PAD]"})");
  CHECK_THROWS_WITH(peft::text::load_tokenizer(dir.path),
                    Catch::Contains("pad_token \"[PAD]\" is not in the vocabulary"));
  TempDir bert;
  bert.write("vocab.txt", lines(kVocab));
  CHECK(std::string(peft::text::load_tokenizer(bert.path)->kind()) == "wordpiece");
}

namespace {

// A byte-level BPE small enough to work out by hand: id 0 is a control token, ids 1..256 spell
// the bytes 0..255 in GPT-2's alphabet (byte b is id b + 1), then five merges by rank.
peft::text::BpeVocabulary tiny_bpe() {
  peft::text::BpeVocabulary v;
  v.tokens.push_back("<|endoftext|>");
  for (char32_t cp : peft::text::detail::byte_chars()) {
    v.tokens.push_back(peft::text::unicode::encode_utf8(std::u32string(1, cp)));
  }
  for (const char* t : {"lo", "low", "\u0120low", "er", "lower"}) v.tokens.push_back(t);
  v.merges = peft::text::BpeVocabulary::split_merges({"l o", "lo w", "\u0120 low", "e r", "low er"},
                                                     "tiny");
  v.special_ids = {0};
  v.eos_id = 0;
  v.source = "tiny";
  return v;
}

nlohmann::json tiny_bpe_json() {
  const auto v = tiny_bpe();
  nlohmann::json vocab = nlohmann::json::object();
  for (size_t i = 0; i < v.tokens.size(); ++i) vocab[v.tokens[i]] = i;
  nlohmann::json merges = nlohmann::json::array();
  for (const auto& [a, b] : v.merges) merges.push_back({a, b});
  nlohmann::json byte_level = {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  return {{"added_tokens",
           {{{"id", 0}, {"content", "<|endoftext|>"}, {"special", true}, {"normalized", false}}}},
          {"normalizer", nullptr},
          {"pre_tokenizer",
           {{"type", "Sequence"},
            {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}, byte_level}}}},
          {"post_processor", byte_level},
          {"decoder", byte_level},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
}

}  // namespace

TEST_CASE("BPE: merges by rank, byte-level spelling, special tokens kept whole",
          "[tokenizer][bpe]") {
  const peft::text::BpeTokenizer tok(tiny_bpe());
  CHECK(tok.vocab_size() == 262);
  // "lower": l o w e r -> lo w e r -> low e r -> low er -> lower (rank 4 waits for rank 3).
  // " low": the space is spelled U+0120 and merges last.
  CHECK(tok.encode_ids("lower low") == Ids{261, 259});
  CHECK(tok.tokenize("lower low") == Tokens{"lower", "\u0120low"});
  // No merge covers "ow", "e" + "l", or "é" (bytes C3 A9): each byte is its own symbol.
  CHECK(tok.encode_ids("owel") == Ids{112, 120, 102, 109});
  CHECK(tok.tokenize("\u00e9\n") == Tokens{"\u00c3", "\u00a9", "\u010a"});
  CHECK(tok.encode_ids("\u00e9\n") == Ids{0xC3 + 1, 0xA9 + 1, 0x0A + 1});
  // The control token is matched whole; decode leaves it out unless asked not to.
  const Ids ids = tok.encode_ids("low<|endoftext|>er");
  CHECK(ids == Ids{258, 0, 260});
  CHECK(tok.decode(ids) == "lower");
  CHECK(tok.decode(ids, false) == "low<|endoftext|>er");
  CHECK(tok.decode(tok.encode_ids("\u00e9\n lower")) == "\u00e9\n lower");
  // One byte of a two-byte character decodes to U+FFFD, like the tokenizers library.
  CHECK(tok.decode({0xC3 + 1, 109}) == "\ufffdl");
  // A decoder adds no special tokens around a sentence; pairs are concatenated.
  CHECK(tok.encode("low").input_ids == Ids{258});
  CHECK(tok.encode("low", "er").input_ids == Ids{258, 260});
  CHECK(tok.encode("low", "er").token_type_ids == Ids{0, 1});
  CHECK(tok.pad_id() == 0);
  CHECK_THROWS_WITH(tok.encode_ids("a\xff"), Catch::Contains("not valid UTF-8 at byte 1"));
}

TEST_CASE("BPE: pre-tokenizers put digits apart and split with Unicode classes",
          "[tokenizer][bpe]") {
  auto v = tiny_bpe();
  v.pre_tokenizer = peft::text::BpePreTokenizer::smollm();
  const peft::text::BpeTokenizer smollm(v);
  using Pieces = std::vector<std::string>;
  CHECK(smollm.pre_tokenize("don't 123  x") == Pieces{"don", "'t", " ", "1", "2", "3", " ", " x"});
  CHECK(smollm.pre_tokenize("caf\u00e9 \u0663\u0664") ==
        Pieces{"caf\u00e9", " ", "\u0663", "\u0664"});
  const peft::text::BpeTokenizer gpt2(tiny_bpe());
  CHECK(gpt2.pre_tokenize("don't 123  x") == Pieces{"don", "'t", " 123", " ", " x"});
  v.pre_tokenizer = peft::text::BpePreTokenizer::split("[0-9]+|(?");
  CHECK_THROWS_WITH(peft::text::BpeTokenizer(v), Catch::Contains("tiny: split pattern"));
  CHECK_THROWS_WITH(peft::text::BpePreTokenizer::from_gguf("unheard-of"),
                    Catch::Contains("GGUF pre-tokenizer \"unheard-of\" is not supported"));
}

TEST_CASE("BPE: tokenizer.json is read, and refused by name when malformed", "[tokenizer][bpe]") {
  TempDir dir;
  dir.write("tokenizer.json", tiny_bpe_json().dump());
  dir.write("tokenizer_config.json", R"({"model_max_length": 3, "pad_token": "<|endoftext|>"})");
  auto tok = peft::text::load_tokenizer(dir.path);
  CHECK(std::string(tok->kind()) == "bpe");
  CHECK(tok->encode("lower 12").input_ids == Ids{261, 33, 50});
  CHECK(tok->encode_ids("lower 12") == Ids{261, 33, 50, 51});

  const auto file = (dir.path / "tokenizer.json").string();
  auto refused = [&](const nlohmann::json& j) {
    dir.write("tokenizer.json", j.dump());
    try {
      peft::text::BpeTokenizer::from_pretrained(dir.path);
    } catch (const peft::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  auto j = tiny_bpe_json();
  j["model"]["merges"].push_back({"lower", "zz"});
  CHECK_THAT(refused(j), Catch::Contains(file + ": merge 5 \"lower zz\" uses \"zz\""));
  j = tiny_bpe_json();
  j["model"]["merges"][0] = "l o w";
  CHECK_THAT(refused(j), Catch::Contains(file + ": model.merges mixes"));
  j = tiny_bpe_json();
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  CHECK_THAT(refused(j), Catch::Contains(file + ": pre_tokenizer \"Whitespace\" is not supported"));
  j = tiny_bpe_json();
  j["model"]["byte_fallback"] = true;
  CHECK_THAT(refused(j), Catch::Contains(file + ": BPE byte_fallback"));
  j = tiny_bpe_json();
  j["model"]["vocab"].erase("lo");
  CHECK_THAT(refused(j), Catch::Contains(file + ": no token has id 257"));
  j = tiny_bpe_json();
  j["decoder"] = {{"type", "WordPiece"}};
  CHECK_THAT(refused(j), Catch::Contains(file + ": decoder \"WordPiece\" is not supported"));
  j = tiny_bpe_json();
  j["pre_tokenizer"] = {
      {"type", "Split"}, {"pattern", {{"Regex", "(?<"}}}, {"behavior", "Isolated"}};
  CHECK_THAT(refused(j), Catch::Contains(file + ": the pre_tokenizer must end with ByteLevel"));
}

TEST_CASE("ChatTemplate renders SmolLM2's ChatML and refuses other templates",
          "[tokenizer][chat]") {
  const std::string smollm =
      "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
      "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
      "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
      "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
      "'<|im_start|>assistant\n' }}{% endif %}";
  const peft::text::ChatTemplate chat(smollm);
  REQUIRE(chat.default_system().has_value());
  CHECK(*chat.default_system() ==
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  CHECK(chat.render({{"user", "Hi"}}, true) ==
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  CHECK(chat.render({{"system", "Be brief."}, {"user", "Hi"}}) ==
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
  CHECK_THROWS_WITH(peft::text::ChatTemplate("{{ bos_token }}{{ messages[0]['content'] }}"),
                    Catch::Contains("only ChatML chat templates"));
  CHECK_THROWS_WITH(peft::text::ChatTemplate(smollm + "{{ eos_token }}"),
                    Catch::Contains("only ChatML chat templates are supported, in SmolLM2's form"));
}
