// Runs peft's GGUF reader and Llama decoder for the Python parity checks
// (tests/python/llama_parity.py). Tensors go in and out as safetensors files.
//
//   peft_llama_tool dequant <file.gguf> <out> [names...]  the named tensors (all when none are
//                                                    named) dequantised to float32, torch order
//   peft_llama_tool logits <model> <in> <out>       logits of "input_ids" [N, L] (and optional
//                                                    "attention_mask") -> "logits" [N, L, V]
//   peft_llama_tool generate <model> <in> <n> <out> greedy continuation of "input_ids" [1, L]
//                                                    with the key/value cache -> "tokens" [n']
//   peft_llama_tool save-lora <model> <in> <adapter> <out>  attaches LoRA (r 4, alpha 8, every
//       projection of the decoder) with random non-zero B, saves the adapter (Hugging Face PEFT
//       layout) and a llama.cpp LoRA GGUF (<adapter>/adapter.gguf), writes the logits
//   peft_llama_tool load <model> <adapter> <in> <out>  loads an adapter and writes the logits
//   peft_llama_tool save-method <model> <in> <adapter> <out> <method> <json>  attaches a
//       registered method by name with JSON options, draws its trainable values at random
//       (normal, std 0.05; seed 0), saves the adapter and writes the logits
//   peft_llama_tool save-cls <model> <in> <adapter> <out>  a LlamaForSequenceClassification (2
//       labels, random score) with LoRA (r 4, q/v, random B): saves the adapter, writes the logits
//   peft_llama_tool load-cls <model> <adapter> <in> <out>  loads such an adapter into a fresh one
//   peft_llama_tool merge-export <model.gguf> <adapter or -> <out.gguf> [f32|f16|q8_0]  loads an
//       adapter (none for -), merges it and writes the model as a GGUF file of that type (F32
//       when not given) with the base file's metadata

#include <peft/io/adapter_format.hpp>
#include <peft/io/gguf.hpp>
#include <peft/models/llama_cpp.hpp>
#include <peft/methods/lora.hpp>
#include <peft/peft.hpp>  // every registered method, for save-method
#include <peft/models/llama.hpp>

#include <cstdint>
#include <iostream>
#include <string>
#include <vector>

namespace {

void write(const std::string& path, const std::string& name, const torch::Tensor& t) {
  peft::io::save_safetensors(path, {{name, t.detach().contiguous()}});
}

torch::Tensor logits_of(peft::models::LlamaImpl& model, const std::string& in) {
  peft::io::SafetensorsFile f(in);
  auto ids = f.tensor("input_ids").clone();
  torch::Tensor mask;
  if (f.contains("attention_mask")) mask = f.tensor("attention_mask").clone();
  torch::NoGradGuard no_grad;
  model.eval();
  return model.logits(model.forward(ids, mask));
}

int run(const std::vector<std::string>& a) {
  const std::string& cmd = a.at(0);
  if (cmd == "dequant") {
    peft::io::GgufFile f(a.at(1));
    std::vector<std::pair<std::string, torch::Tensor>> out;
    std::vector<std::string> names(a.begin() + 3, a.end());
    if (names.empty()) {
      for (const auto& t : f.tensors()) names.push_back(t.name);
    }
    for (const auto& name : names) out.emplace_back(name, f.tensor(name));
    peft::io::save_safetensors(a.at(2), out);
    return 0;
  }
  if (cmd == "save-cls" || cmd == "load-cls") {
    auto cls = peft::models::LlamaForSequenceClassification::from_pretrained(a.at(1), 2);
    const bool save = cmd == "save-cls";
    if (save) {
      torch::manual_seed(0);
      peft::attach(*cls, peft::LoRAOptions(4).alpha(8).targets({"q_proj", "v_proj"}));
      torch::NoGradGuard no_grad;
      for (auto& p : peft::trainable_parameters(*cls)) p.normal_(0.0, 0.05);
    } else {
      peft::load_adapter(*cls, a.at(2));
    }
    peft::io::SafetensorsFile f(save ? a.at(2) : a.at(3));
    torch::NoGradGuard no_grad;
    cls->eval();
    auto logits = cls(f.tensor("input_ids").clone(), f.tensor("attention_mask").clone());
    if (save) peft::save_adapter(*cls, a.at(3));
    write(a.at(4), "logits", logits);
    return 0;
  }
  auto model = peft::models::LlamaImpl::from_pretrained(a.at(1));
  if (cmd == "logits") {
    write(a.at(3), "logits", logits_of(*model, a.at(2)));
    return 0;
  }
  if (cmd == "generate") {
    peft::io::SafetensorsFile f(a.at(2));
    auto ids = f.tensor("input_ids").contiguous();
    std::vector<int64_t> prompt(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
    auto tokens = peft::models::generate(
        *model, prompt, peft::models::GenerateOptions().max_new_tokens(std::stoll(a.at(3))));
    write(a.at(4), "tokens", torch::tensor(tokens, torch::kLong));
    return 0;
  }
  if (cmd == "save-lora") {
    torch::manual_seed(0);
    peft::attach(
        *model, peft::LoRAOptions(4).alpha(8).targets(
                    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}));
    {
      torch::NoGradGuard no_grad;
      for (auto& p : peft::trainable_parameters(*model)) p.normal_(0.0, 0.05);
    }
    peft::save_adapter(*model, a.at(3));
    peft::models::save_llama_cpp_lora(*model, std::filesystem::path(a.at(3)) / "adapter.gguf");
    write(a.at(4), "logits", logits_of(*model, a.at(2)));
    return 0;
  }
  if (cmd == "save-method") {
    torch::manual_seed(0);
    peft::attach(*model, a.at(5), nlohmann::json::parse(a.at(6)));
    {
      torch::NoGradGuard no_grad;
      for (auto& p : peft::trainable_parameters(*model)) p.normal_(0.0, 0.05);
    }
    peft::save_adapter(*model, a.at(3));
    write(a.at(4), "logits", logits_of(*model, a.at(2)));
    return 0;
  }
  if (cmd == "load") {
    peft::load_adapter(*model, a.at(2));
    write(a.at(4), "logits", logits_of(*model, a.at(3)));
    return 0;
  }
  if (cmd == "merge-export") {
    if (a.at(2) != "-") {
      peft::load_adapter(*model, a.at(2));
      peft::merge(*model);
    }
    const std::string type = a.size() > 4 ? a.at(4) : "f32";
    const auto ggml = type == "f16"    ? peft::io::GgmlType::F16
                      : type == "q8_0" ? peft::io::GgmlType::Q8_0
                                       : peft::io::GgmlType::F32;
    if (ggml == peft::io::GgmlType::F32 && type != "f32") {
      std::cerr << "merge-export: unknown type " << type << " (f32, f16 or q8_0)\n";
      return 2;
    }
    peft::models::save_llama_cpp_model(*model, a.at(1), a.at(3), ggml);
    return 0;
  }
  std::cerr << "unknown command " << cmd << "\n";
  return 2;
}

}  // namespace

int main(int argc, char* argv[]) {
  if (argc < 3) {
    std::cerr << "usage: see the comment at the top of tests/llama_tool.cpp\n";
    return 2;
  }
  try {
    return run(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
}
