// Fine-tunes the default model (or --model) on your own labelled CSV/TSV files with any method:
//
//   peft_custom_task --train reviews/train.csv --dev reviews/dev.csv --method lora --output
//   out/lora
//
// Each file has a header row naming a text column (--text, default "text"), optionally a second
// text column (--text-b) and a label column (--label); labels are class names, or numbers with
// --regression. The last line printed is the dev metrics as JSON.

#include <peft/data/table.hpp>
#include <peft/peft.hpp>
#include <peft/tasks/text_classifier.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <iostream>
#include <string>

#include "common/model_path.hpp"

int main(int argc, char** argv) {
  std::string train_file, dev_file, model, output, method = "lora", method_options = "{}";
  std::string text = "text", text_b, label = "label";
  int64_t epochs = 3;
  bool regression = false;
  CLI::App app("peft_custom_task: fine-tune a model on your own labelled CSV/TSV files");
  app.add_option("--train", train_file, "training file (.csv or .tsv)")->required();
  app.add_option("--dev", dev_file, "validation file, same columns")->required();
  app.add_option("--model", model, "Hugging Face BERT folder (default: the installed model)");
  app.add_option("--method", method, "a registered method or full")->capture_default_str();
  app.add_option("--method-options", method_options, "the method's options as JSON");
  app.add_option("--epochs", epochs, "passes over the training data")->capture_default_str();
  app.add_option("--text", text, "text column")->capture_default_str();
  app.add_option("--text-b", text_b, "second text column, for sentence pairs");
  app.add_option("--label", label, "label column")->capture_default_str();
  app.add_flag("--regression", regression, "labels are numbers (one score per row)");
  app.add_option("--output", output, "folder for the trained adapter");
  CLI11_PARSE(app, argc, argv);
  try {
    auto columns = peft::data::TableOptions().text_column(text).text_b_column(text_b);
    columns.label_column(label).regression(regression);
    const auto train = peft::data::read_table(train_file, columns);
    const auto dev = peft::data::read_table(dev_file, columns.labels(train.labels));
    std::cout << "train " << train.examples.size() << " rows, dev " << dev.examples.size()
              << " rows, "
              << (regression ? "regression" : std::to_string(train.num_labels()) + " classes")
              << "\n";

    peft::TextClassifier classifier(examples::default_model_dir(model), train.num_labels(),
                                    peft::TextClassifierOptions()
                                        .method(method)
                                        .method_options(nlohmann::json::parse(method_options))
                                        .epochs(epochs));
    peft::print_trainable(classifier.model());
    classifier.fit(train.examples, dev.examples);
    const auto scores = classifier.evaluate(dev.examples);
    if (!output.empty()) classifier.save(output);
    std::cout << nlohmann::json(scores).dump() << "\n";
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
  return 0;
}
