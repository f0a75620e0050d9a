// Encodes requests read as JSON lines with the tokenizer of a model folder (WordPiece, Unigram or
// BPE, chosen by peft::text::load_tokenizer), for the Python parity checks
// (tests/python/tokenizer_parity.py, unigram_parity.py, bpe_parity.py). Usage: peft_tokenize
// <model folder> < requests.jsonl
//
// Request: {"a": "text"} or {"a": "text", "b": "pair", "max_length": 16}, or for a padded batch
// {"batch": ["t1", "t2"], "pairs": ["p1", "p2"], "max_length": 16} ("pairs" optional).
// Reply, one line each: {"input_ids": [...], "token_type_ids": [...], "attention_mask": [...],
// "tokens": [...], "decode": "...", "decode_all": "..."} (batch: nested lists), or
// {"error": "message"}. "decode_all" keeps the special tokens.
// Also: {"a_hex": "68ff"} encodes those bytes (JSON strings cannot hold invalid UTF-8);
// {"decode": [ids], "skip_special": true} replies {"text": "..."}; {"chat_template": "...",
// "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": true} replies
// {"text": "..."} from peft::text::ChatTemplate.

#include <peft/text/chat.hpp>
#include <peft/text/load.hpp>

#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace {

std::vector<std::vector<int64_t>> rows(const torch::Tensor& t) {
  std::vector<std::vector<int64_t>> out;
  auto c = t.contiguous();
  for (int64_t i = 0; i < c.size(0); ++i) {
    const auto* p = c.data_ptr<int64_t>() + i * c.size(1);
    out.emplace_back(p, p + c.size(1));
  }
  return out;
}

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    out += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
  }
  return out;
}

nlohmann::json handle(const peft::text::Tokenizer& tok, const nlohmann::json& request) {
  if (request.contains("chat_template")) {
    peft::text::ChatTemplate chat(request["chat_template"].get<std::string>());
    std::vector<peft::text::ChatMessage> messages;
    for (const auto& m : request["messages"]) {
      messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    }
    return {{"text", chat.render(messages, request.value("add_generation_prompt", false))}};
  }
  if (request.contains("decode")) {
    return {{"text", tok.decode(request["decode"].get<std::vector<int64_t>>(),
                                request.value("skip_special", true))}};
  }
  peft::text::EncodeOptions options;
  if (request.contains("max_length")) options.max_length(request["max_length"].get<int64_t>());
  if (request.contains("batch")) {
    auto texts = request["batch"].get<std::vector<std::string>>();
    auto batch =
        request.contains("pairs")
            ? tok.encode_batch(texts, request["pairs"].get<std::vector<std::string>>(), options)
            : tok.encode_batch(texts, options);
    return {{"input_ids", rows(batch.input_ids)},
            {"token_type_ids", rows(batch.token_type_ids)},
            {"attention_mask", rows(batch.attention_mask)}};
  }
  auto a = request.contains("a_hex") ? from_hex(request["a_hex"].get<std::string>())
                                     : request["a"].get<std::string>();
  auto e = request.contains("b") ? tok.encode(a, request["b"].get<std::string>(), options)
                                 : tok.encode(a, options);
  return {{"input_ids", e.input_ids},           {"token_type_ids", e.token_type_ids},
          {"attention_mask", e.attention_mask}, {"tokens", tok.tokenize(a)},
          {"decode", tok.decode(e.input_ids)},  {"decode_all", tok.decode(e.input_ids, false)}};
}

}  // namespace

int main(int argc, char* argv[]) {
  if (argc != 2) {
    std::cerr << "usage: peft_tokenize <model folder> < requests.jsonl\n";
    return 2;
  }
  try {
    auto tok_ptr = peft::text::load_tokenizer(argv[1]);
    const auto& tok = *tok_ptr;
    std::string line;
    while (std::getline(std::cin, line)) {
      nlohmann::json reply;
      try {
        reply = handle(tok, nlohmann::json::parse(line));
      } catch (const peft::Error& e) {
        reply = {{"error", e.what()}};
      }
      std::cout << reply.dump() << '\n';
    }
  } catch (const std::exception& e) {
    std::cerr << e.what() << '\n';
    return 1;
  }
  return 0;
}
