#pragma once

// Chat prompts for instruction-tuned decoders. A model's chat template is a Jinja program
// (tokenizer_config.json "chat_template", GGUF tokenizer.chat_template); rather than embed a Jinja
// interpreter, ChatTemplate recognises the ChatML templates it knows, text for text, and renders
// them natively. A template it does not know is refused, never approximated: a prompt that differs
// from the one the model was tuned on degrades it silently.

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/error.hpp>

PEFT_NAMESPACE_BEGIN
namespace text {

/// One turn of a conversation.
struct ChatMessage {
  std::string role;     ///< "system", "user", "assistant", ...
  std::string content;  ///< the text of the turn
};

/// A ChatML chat template (`<|im_start|>role\ncontent<|im_end|>\n` per message), rendered exactly
/// as transformers' apply_chat_template renders the Jinja source it was made from.
///
/// Recognised: SmolLM2's template (a default system message when the first message is not a
/// system one; the message's text is read from the template) and the plain ChatML template.
///
///     peft::text::ChatTemplate chat(gguf_chat_template);
///     auto prompt = chat.render({{"user", "Hi!"}}, /*add_generation_prompt=*/true);
class ChatTemplate {
 public:
  /// Recognises `source`, a chat template's Jinja text; anything but a known ChatML template is a
  /// peft::Error.
  explicit ChatTemplate(std::string_view source) {
    // A Jinja string literal may hold a newline or its escape "\n"; both render as a newline.
    std::string text;
    for (size_t i = 0; i < source.size(); ++i) {
      if (source[i] == '\\' && i + 1 < source.size() && source[i + 1] == 'n') {
        text += '\n';
        ++i;
      } else {
        text += source[i];
      }
    }
    check(text.find(kStart) != std::string::npos && text.find(kEnd) != std::string::npos,
          "text::chat",
          "only ChatML chat templates (<|im_start|>role\\ncontent<|im_end|>) are supported; this "
          "one is not ChatML: \"{}\"",
          excerpt(source));
    const std::string body = std::string(kBody);
    if (text == std::string(kLoop) + body) return;
    const std::string head = std::string(kLoop) + std::string(kSystemOpen);
    const std::string tail = std::string(kSystemClose) + body;
    if (text.size() > head.size() + tail.size() && text.compare(0, head.size(), head) == 0 &&
        text.compare(text.size() - tail.size(), tail.size(), tail) == 0) {
      std::string system = text.substr(head.size(), text.size() - head.size() - tail.size());
      // Quotes or escapes in the message would change the Jinja literal it sits in.
      if (system.find_first_of("'\\") == std::string::npos &&
          system.find(kEnd) == std::string::npos) {
        default_system_ = std::move(system);
        return;
      }
    }
    fail("text::chat",
         "only ChatML chat templates are supported, in SmolLM2's form or the plain one; this "
         "ChatML template has another shape: \"{}\"",
         excerpt(source));
  }

  /// The system message put first when a conversation does not start with one (unset: none).
  const std::optional<std::string>& default_system() const { return default_system_; }

  /// The prompt for `messages`; `add_generation_prompt` opens the assistant's turn after them.
  std::string render(const std::vector<ChatMessage>& messages,
                     bool add_generation_prompt = false) const {
    std::string out;
    for (size_t i = 0; i < messages.size(); ++i) {
      if (i == 0 && default_system_ && messages[0].role != "system") {
        turn("system", *default_system_, out);
      }
      turn(messages[i].role, messages[i].content, out);
    }
    if (add_generation_prompt) out += "<|im_start|>assistant\n";
    return out;
  }

 private:
  static constexpr std::string_view kStart = "<|im_start|>";
  static constexpr std::string_view kEnd = "<|im_end|>";
  static constexpr std::string_view kLoop = "{% for message in messages %}";
  static constexpr std::string_view kSystemOpen =
      "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n";
  static constexpr std::string_view kSystemClose = "<|im_end|>\n' }}{% endif %}";
  static constexpr std::string_view kBody =
      "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
      "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

  static void turn(const std::string& role, const std::string& content, std::string& out) {
    out += kStart;
    out += role;
    out += '\n';
    out += content;
    out += kEnd;
    out += '\n';
  }

  static std::string excerpt(std::string_view source) {
    return std::string(source.substr(0, 160)) + (source.size() > 160 ? "..." : "");
  }

  std::optional<std::string> default_system_;
};

}  // namespace text
PEFT_NAMESPACE_END
