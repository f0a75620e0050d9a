#pragma once

// The Unicode questions BERT's tokenizer asks of each character, answered by utf8proc, with the
// semantics of the Python reference (unicodedata categories, str.isspace, str.lower) so that
// token ids match Hugging Face's BertTokenizer.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <utf8proc.h>

#include <peft/config.hpp>
#include <peft/core/error.hpp>

PEFT_NAMESPACE_BEGIN
namespace text {
namespace unicode {

/// Decodes UTF-8. Malformed input (bad bytes, overlong forms, surrogates, truncated sequences)
/// is a peft::Error naming `what` and the byte offset (plus `offset`, where `s` starts in the
/// text the caller reports); nothing is silently replaced.
inline std::u32string decode_utf8(std::string_view s, std::string_view what = "text",
                                  size_t offset = 0) {
  std::u32string out;
  out.reserve(s.size());
  const auto* bytes = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  auto size = static_cast<utf8proc_ssize_t>(s.size());
  utf8proc_ssize_t at = 0;
  while (at < size) {
    utf8proc_int32_t cp = 0;
    utf8proc_ssize_t n = utf8proc_iterate(bytes + at, size - at, &cp);
    if (n <= 0 || cp < 0) {
      fail("text", "{} is not valid UTF-8 at byte {} (byte 0x{:02x})", what,
           offset + static_cast<size_t>(at), static_cast<unsigned>(bytes[at]));
    }
    out.push_back(static_cast<char32_t>(cp));
    at += n;
  }
  return out;
}

/// Appends the UTF-8 encoding of `cp` to `out`.
inline void append_utf8(char32_t cp, std::string& out) {
  utf8proc_uint8_t buf[4];
  auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
  out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
}

/// UTF-8 encoding of a code point sequence.
inline std::string encode_utf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t cp : s) append_utf8(cp, out);
  return out;
}

/// General category of `cp` (UTF8PROC_CATEGORY_CN for unassigned code points).
inline utf8proc_category_t category(char32_t cp) {
  return utf8proc_category(static_cast<utf8proc_int32_t>(cp));
}

/// BERT's notion of a control character: any category C* (Cc, Cf, Cn, Co, Cs) except tab,
/// newline and carriage return, which BERT treats as whitespace.
inline bool is_control(char32_t cp) {
  if (cp == U'\t' || cp == U'\n' || cp == U'\r') return false;
  switch (category(cp)) {
    case UTF8PROC_CATEGORY_CC:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_CN:
    case UTF8PROC_CATEGORY_CO:
    case UTF8PROC_CATEGORY_CS:
      return true;
    default:
      return false;
  }
}

/// BERT's notion of whitespace when cleaning text: space, tab, newline, carriage return, Zs.
inline bool is_bert_whitespace(char32_t cp) {
  if (cp == U' ' || cp == U'\t' || cp == U'\n' || cp == U'\r') return true;
  return category(cp) == UTF8PROC_CATEGORY_ZS;
}

/// What Python's str.split() splits on (str.isspace): Zs, and the characters whose bidirectional
/// class is WS, B or S. It differs from is_bert_whitespace on U+001C..U+001F, U+0085, U+2028 and
/// U+2029; the reference splits words on those too.
inline bool is_split_space(char32_t cp) {
  if ((cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x1F) || cp == 0x20 || cp == 0x85 ||
      cp == 0x2028 || cp == 0x2029) {
    return true;
  }
  return category(cp) == UTF8PROC_CATEGORY_ZS;
}

/// BERT's punctuation: every non-alphanumeric printable ASCII character (so `$`, `^`, `` ` ``
/// and friends count) plus every Unicode category P*.
inline bool is_punctuation(char32_t cp) {
  if ((cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96) ||
      (cp >= 123 && cp <= 126)) {
    return true;
  }
  auto c = category(cp);
  return c >= UTF8PROC_CATEGORY_PC && c <= UTF8PROC_CATEGORY_PO;
}

/// The CJK ideograph blocks BERT surrounds with spaces. Hangul, Hiragana and Katakana are not
/// among them: those scripts separate words with spaces already.
inline bool is_cjk_ideograph(char32_t cp) {
  return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) ||
         (cp >= 0x20000 && cp <= 0x2A6DF) || (cp >= 0x2A700 && cp <= 0x2B73F) ||
         (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B820 && cp <= 0x2CEAF) ||
         (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

/// Unicode's Case_Ignorable property: Mn, Me, Cf, Lm, Sk and the word-break MidLetter,
/// MidNumLet and Single_Quote characters.
inline bool is_case_ignorable(char32_t cp) {
  switch (category(cp)) {
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_SK:
      return true;
    default:
      break;
  }
  switch (cp) {
    case 0x0027:
    case 0x002E:
    case 0x003A:
    case 0x00B7:
    case 0x0387:
    case 0x055F:
    case 0x05F4:
    case 0x2018:
    case 0x2019:
    case 0x2024:
    case 0x2027:
    case 0xFE13:
    case 0xFE52:
    case 0xFE55:
    case 0xFF07:
    case 0xFF0E:
    case 0xFF1A:
      return true;
    default:
      return false;
  }
}

/// Unicode's Cased property. Letters with a case mapping cover nearly all of it; the rest are the
/// few Other_Lowercase/Other_Uppercase characters that are not themselves case-ignorable.
inline bool is_cased(char32_t cp) {
  switch (category(cp)) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
      return true;
    default:
      break;
  }
  auto c = static_cast<utf8proc_int32_t>(cp);
  if (utf8proc_tolower(c) != c || utf8proc_toupper(c) != c) return true;
  return cp == 0x00AA || cp == 0x00BA || (cp >= 0x1F130 && cp <= 0x1F149) ||
         (cp >= 0x1F150 && cp <= 0x1F169) || (cp >= 0x1F170 && cp <= 0x1F189);
}

/// Lower-cases like Python's str.lower(): the full mapping (U+0130 becomes "i" + U+0307) and the
/// final-sigma rule (capital sigma after a cased letter and not before one becomes U+03C2).
inline std::u32string lower(std::u32string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    char32_t cp = s[i];
    if (cp == 0x0130) {
      out += U'i';
      out += static_cast<char32_t>(0x0307);
      continue;
    }
    if (cp == 0x03A3) {
      // Final_Sigma: \p{cased} \p{case-ignorable}* SIGMA !(\p{case-ignorable}* \p{cased})
      size_t j = i;
      while (j > 0 && is_case_ignorable(s[j - 1])) --j;
      bool final_sigma = j > 0 && is_cased(s[j - 1]);
      if (final_sigma) {
        size_t k = i + 1;
        while (k < s.size() && is_case_ignorable(s[k])) ++k;
        final_sigma = k == s.size() || !is_cased(s[k]);
      }
      out += static_cast<char32_t>(final_sigma ? 0x03C2 : 0x03C3);
      continue;
    }
    out += static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(cp)));
  }
  return out;
}

namespace detail {
inline std::u32string normalize(std::u32string_view s, utf8proc_option_t options) {
  if (s.empty()) return {};
  std::string utf8 = encode_utf8(s);
  const auto* bytes = reinterpret_cast<const utf8proc_uint8_t*>(utf8.data());
  auto size = static_cast<utf8proc_ssize_t>(utf8.size());
  auto needed = utf8proc_decompose(bytes, size, nullptr, 0, options);
  check(needed >= 0, "text", "normalization failed: {}", utf8proc_errmsg(needed));
  std::vector<utf8proc_int32_t> buffer(static_cast<size_t>(needed) + 1);
  auto n = utf8proc_decompose(bytes, size, buffer.data(), needed, options);
  check(n >= 0, "text", "normalization failed: {}", utf8proc_errmsg(n));
  n = utf8proc_normalize_utf32(buffer.data(), n, options);
  check(n >= 0, "text", "normalization failed: {}", utf8proc_errmsg(n));
  std::u32string out;
  out.reserve(static_cast<size_t>(n));
  for (utf8proc_ssize_t i = 0; i < n; ++i) out.push_back(static_cast<char32_t>(buffer[i]));
  return out;
}
}  // namespace detail

/// Canonical decomposition (NFD).
inline std::u32string nfd(std::u32string_view s) {
  return detail::normalize(s, static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE));
}

/// Canonical composition (NFC).
inline std::u32string nfc(std::u32string_view s) {
  return detail::normalize(s, static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
}

/// NFD with the nonspacing marks (Mn) dropped: "Crème" -> "Creme".
inline std::u32string strip_accents(std::u32string_view s) {
  std::u32string out;
  for (char32_t cp : nfd(s)) {
    if (category(cp) != UTF8PROC_CATEGORY_MN) out.push_back(cp);
  }
  return out;
}

}  // namespace unicode
}  // namespace text
PEFT_NAMESPACE_END
