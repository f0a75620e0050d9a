#pragma once

// Names of enum values, in one table per enum: what adapter files, command lines and messages
// write, and what parsing them accepts. An enum gets its table from a function `enum_table(E)`
// in the enum's own namespace (found by argument-dependent lookup), next to the enum:
//
//   constexpr EnumTable<Pooling, 2> enum_table(Pooling) {
//     return {"pooling", "models::bert", {{{Pooling::Cls, "cls"}, {Pooling::Mean, "mean"}}}};
//   }
//
// "pooling" is the noun errors use, "models::bert" peft::Error's component. A value may be
// listed more than once: the first entry is its name, later ones are spellings that parsing
// also accepts (e.g. "bfloat16" for bf16).

#include <array>
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <peft/config.hpp>
#include <peft/core/error.hpp>

PEFT_NAMESPACE_BEGIN

/// An enum's names (see the header comment).
template <class E, std::size_t N>
struct EnumTable {
  const char* what;   ///< the noun in errors, e.g. "pooling"
  const char* where;  ///< the component errors name, e.g. "models::bert"
  std::array<std::pair<E, const char*>, N> names;
};

/// The name of `value` (its first entry in its table); "?" for a value without one.
template <class E>
constexpr const char* enum_name(E value) {
  for (const auto& entry : enum_table(E{}).names) {
    if (entry.first == value) return entry.second;
  }
  return "?";
}

/// Every value's name, in table order, without the extra spellings: e.g. for CLI11's IsMember.
template <class E>
std::vector<std::string> enum_names() {
  std::vector<std::string> out;
  for (const auto& [value, name] : enum_table(E{}).names) {
    if (std::string_view(enum_name(value)) == name) out.emplace_back(name);
  }
  return out;
}

/// The names for a message: `"a", "b" or "c"`.
template <class E>
std::string enum_names_text() {
  const auto names = enum_names<E>();
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += i + 1 == names.size() ? " or " : ", ";
    out += fmt::format("\"{}\"", names[i]);
  }
  return out;
}

/// The value named `name` (a name or an extra spelling). Otherwise throws peft::Error
/// `[peft::<where>] <context>: unknown <what> "<name>" (expected "a", "b" or "c")`; `context`
/// (e.g. the file and key the name came from) is left out when empty.
template <class E>
E enum_from_name(std::string_view name, std::string_view context = {}) {
  for (const auto& [value, spelling] : enum_table(E{}).names) {
    if (name == spelling) return value;
  }
  constexpr auto table = enum_table(E{});
  fail(table.where, "{}{}unknown {} \"{}\" (expected {})", context, context.empty() ? "" : ": ",
       table.what, name, enum_names_text<E>());
}

PEFT_NAMESPACE_END
