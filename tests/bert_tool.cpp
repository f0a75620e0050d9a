// Runs peft's Bert for the Python parity checks (tests/python/bert_parity.py and
// adapter_parity.py). Inputs and outputs are safetensors files holding input_ids,
// attention_mask and token_type_ids ([N, L], int64) and the result.
//
//   peft_bert_tool hidden <model> <in> <out>         last hidden state -> "hidden"
//   peft_bert_tool save-lora <model> <in> <adapter> <out>
//       classification model (2 labels) with a LoRA (r 4, alpha 8, query/value, random non-zero
//       B) and a random head; saves the adapter and writes its logits -> "logits"
//   peft_bert_tool save <method> <options json> <model> <in> <adapter> <out>  the same with any
//       registered method attached from JSON options, its parameters perturbed by N(0, 0.05)
//   peft_bert_tool load <model> <adapter> <in> <out>  loads an adapter into a fresh
//       classification model (2 labels) and writes its logits -> "logits"
//   peft_bert_tool train <spec.json> <out>  trains with peft::Trainer (tests/python/
//       train_parity.py writes the spec: model folder, initial adapter, batches file, pooling,
//       labels, optimizer settings) and writes the loss of every step -> "losses" (float64)

#include <peft/io/adapter_format.hpp>
#include <torch/nn/functional/loss.h>
#include <peft/models/bert.hpp>
#include <peft/models/heads.hpp>
#include <peft/peft.hpp>

#include <cstdint>
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

// Trains the model the spec describes on its batches, in their order, and writes each step's loss.
// Batch i is input_ids.i, attention_mask.i, token_type_ids.i and labels.i in the batches file.
void train(const std::string& spec_path, const std::string& out) {
  const auto spec = peft::io::read_json(spec_path, "peft_bert_tool");
  const int64_t num_labels = spec.at("num_labels").get<int64_t>();
  auto model = peft::models::BertForSequenceClassification::from_pretrained(
      spec.at("model").get<std::string>(), num_labels,
      peft::models::pooling_from_string(spec.at("pooling").get<std::string>()));
  peft::load_adapter(*model, spec.at("adapter").get<std::string>());

  using Batch = std::vector<torch::Tensor>;
  peft::io::SafetensorsFile file(spec.at("batches").get<std::string>());
  std::vector<Batch> batches;
  for (int64_t i = 0; i < spec.at("steps").get<int64_t>(); ++i) {
    const auto n = "." + std::to_string(i);
    batches.push_back(
        {file.tensor("input_ids" + n).clone(), file.tensor("attention_mask" + n).clone(),
         file.tensor("token_type_ids" + n).clone(), file.tensor("labels" + n).clone()});
  }
  std::vector<double> losses;
  auto loss_fn = [&](const Batch& b) {
    auto logits = model(b[0], b[1], b[2]);
    auto loss = num_labels == 1 ? torch::mse_loss(logits.squeeze(-1), b[3])
                                : torch::nn::functional::cross_entropy(logits, b[3]);
    losses.push_back(loss.item<double>());
    return loss;
  };
  auto options = peft::TrainerOptions()
                     .epochs(1)
                     .lr(spec.at("lr").get<double>())
                     .weight_decay(spec.at("weight_decay").get<double>())
                     .warmup_ratio(spec.at("warmup_ratio").get<double>())
                     .grad_clip(spec.at("grad_clip").get<double>())
                     .shuffle(false)
                     .log_every(0)
                     .progress(false);
  peft::Trainer<Batch> trainer(model, loss_fn, options);
  trainer.fit(batches);
  write(out, "losses", torch::tensor(losses, torch::kDouble));
}

}  // namespace

int main(int argc, char* argv[]) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    torch::manual_seed(1234);
    if (args.size() == 3 && args[0] == "train") {
      train(args[1], args[2]);
      return 0;
    }
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
    if (args.size() == 7 && args[0] == "save") {
      // Any registered method from its JSON options, every parameter moved off its identity
      // start so the adapter changes the logits.
      auto model = peft::models::BertForSequenceClassification::from_pretrained(args[3], 2);
      peft::attach(*model, args[1], nlohmann::json::parse(args[2]));
      torch::manual_seed(3);
      {
        torch::NoGradGuard no_grad;
        for (auto& [path, m] : peft::attached_methods(*model)) {
          for (auto& p : m->parameters()) p.add_(torch::randn_like(p) * 0.05);
        }
        model->classifier->weight.normal_(0.0, 0.5);
        model->classifier->bias.normal_(0.0, 0.5);
      }
      model->eval();
      peft::save_adapter(*model, args[5],
                         peft::SaveAdapterOptions().base_model_name_or_path(args[3]));
      auto in = read_inputs(args[4]);
      write(args[6], "logits", model(in.ids, in.mask, in.types));
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
                 "       peft_bert_tool save <method> <options json> <model> <in> <adapter> <out>\n"
                 "       peft_bert_tool load <model> <adapter> <in> <out>\n"
                 "       peft_bert_tool train <spec.json> <out>\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << e.what() << '\n';
    return 1;
  }
}
