// Runs peft's Bert for the Python parity checks (tests/python/bert_parity.py and
// adapter_parity.py). Inputs and outputs are safetensors files holding input_ids,
// attention_mask and token_type_ids ([N, L], int64) and the result.
//
//   peft_bert_tool hidden <model> <in> <out>         last hidden state -> "hidden"
//   peft_bert_tool save-lora <model> <in> <adapter> <out>
//       classification model (2 labels) with a LoRA (r 4, alpha 8, query/value, random non-zero
//       B) and a random head; saves the adapter and writes its logits -> "logits"
//   peft_bert_tool load <model> <adapter> <in> <out>  loads an adapter into a fresh
//       classification model (2 labels) and writes its logits -> "logits"

#include <peft/io/adapter_format.hpp>
#include <peft/models/bert.hpp>
#include <peft/models/heads.hpp>
#include <peft/peft.hpp>

#include <iostream>
#include <string>
#include <vector>

namespace {

struct Inputs {
  torch::Tensor ids, mask, types;
};

Inputs read_inputs(const std::string& path) {
  peft::io::SafetensorsFile f(path);
  return {f.tensor("input_ids").clone(), f.tensor("attention_mask").clone(),
          f.tensor("token_type_ids").clone()};
}

void write(const std::string& path, const std::string& name, const torch::Tensor& t) {
  peft::io::save_safetensors(path, {{name, t.detach().contiguous()}});
}

}  // namespace

int main(int argc, char* argv[]) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    torch::manual_seed(1234);
    torch::NoGradGuard no_grad;
    if (args.size() == 4 && args[0] == "hidden") {
      auto bert = peft::models::Bert::from_pretrained(args[1]);
      bert->eval();
      auto in = read_inputs(args[2]);
      write(args[3], "hidden", bert(in.ids, in.mask, in.types));
      return 0;
    }
    if (args.size() == 5 && args[0] == "save-lora") {
      auto model = peft::models::BertForSequenceClassification::from_pretrained(args[1], 2);
      peft::attach(*model, peft::LoRAOptions(4).alpha(8).targets({"query", "value"}));
      for (auto& [path, m] : peft::attached_methods(*model)) {
        auto lora = std::dynamic_pointer_cast<peft::LoRAImpl>(m);
        lora->lora_B->weight.normal_(0.0, 0.05);
      }
      model->classifier->weight.normal_(0.0, 0.5);
      model->classifier->bias.normal_(0.0, 0.5);
      model->eval();
      peft::save_adapter(*model, args[3],
                         peft::SaveAdapterOptions().base_model_name_or_path(args[1]));
      auto in = read_inputs(args[2]);
      write(args[4], "logits", model(in.ids, in.mask, in.types));
      return 0;
    }
    if (args.size() == 5 && args[0] == "load") {
      auto model = peft::models::BertForSequenceClassification::from_pretrained(args[1], 2);
      peft::load_adapter(*model, args[2]);
      model->eval();
      auto in = read_inputs(args[3]);
      write(args[4], "logits", model(in.ids, in.mask, in.types));
      return 0;
    }
    std::cerr << "usage: peft_bert_tool hidden <model> <in> <out>\n"
                 "       peft_bert_tool save-lora <model> <in> <adapter> <out>\n"
                 "       peft_bert_tool load <model> <adapter> <in> <out>\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << e.what() << '\n';
    return 1;
  }
}
