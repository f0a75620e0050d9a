#pragma once

// Reading and writing GGUF (the file format of llama.cpp and ggml): a header ("GGUF", version,
// counts), typed key/value metadata, a tensor table (name, dimensions innermost first, ggml type,
// offset) and the aligned tensor data, many of them block-quantised.
//
// Reading memory-maps the file and validates everything before handing out anything: the
// version, every length and count against the bytes that remain, the alignment, every tensor's
// offset and size against the data section, overlaps. A damaged file gives a peft::Error naming
// the file and what is wrong with it. Dequantisation follows ggml's reference arithmetic in
// float32, operation for operation, so it is bit-exact with the `gguf` Python package.
//
// Writing (F32, F16 and Q8_0 tensors) goes through io::write_file_atomically, so a failed save
// leaves no half-written file.

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/detail/shape.hpp>
#include <peft/io/safetensors.hpp>

PEFT_NAMESPACE_BEGIN
namespace io {

/// ggml tensor types (the numbering of ggml.h; only those with a fixed block layout are listed).
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  BF16 = 30,
};

/// GGUF metadata value types.
enum class GgufValueType : uint32_t {
  U8 = 0,
  I8 = 1,
  U16 = 2,
  I16 = 3,
  U32 = 4,
  I32 = 5,
  F32 = 6,
  Bool = 7,
  String = 8,
  Array = 9,
  U64 = 10,
  I64 = 11,
  F64 = 12,
};

namespace detail {

struct GgmlTypeInfo {
  GgmlType type;
  const char* name;
  int64_t block;  ///< values per block
  int64_t bytes;  ///< bytes per block
  bool dequantizes;
};

inline constexpr GgmlTypeInfo kGgmlTypes[] = {
    {GgmlType::F32, "F32", 1, 4, true},       {GgmlType::F16, "F16", 1, 2, true},
    {GgmlType::Q4_0, "Q4_0", 32, 18, true},   {GgmlType::Q4_1, "Q4_1", 32, 20, true},
    {GgmlType::Q5_0, "Q5_0", 32, 22, true},   {GgmlType::Q5_1, "Q5_1", 32, 24, true},
    {GgmlType::Q8_0, "Q8_0", 32, 34, true},   {GgmlType::Q8_1, "Q8_1", 32, 36, false},
    {GgmlType::Q2_K, "Q2_K", 256, 84, false}, {GgmlType::Q3_K, "Q3_K", 256, 110, false},
    {GgmlType::Q4_K, "Q4_K", 256, 144, true}, {GgmlType::Q5_K, "Q5_K", 256, 176, true},
    {GgmlType::Q6_K, "Q6_K", 256, 210, true}, {GgmlType::Q8_K, "Q8_K", 256, 292, false},
    {GgmlType::I8, "I8", 1, 1, false},        {GgmlType::I16, "I16", 1, 2, false},
    {GgmlType::I32, "I32", 1, 4, false},      {GgmlType::I64, "I64", 1, 8, false},
    {GgmlType::F64, "F64", 1, 8, false},      {GgmlType::BF16, "BF16", 1, 2, true},
};

inline const GgmlTypeInfo* ggml_type_info(uint32_t type) {
  for (const auto& t : kGgmlTypes) {
    if (static_cast<uint32_t>(t.type) == type) return &t;
  }
  return nullptr;
}

inline const char* value_type_name(GgufValueType t) {
  static const char* names[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                "bool", "string", "array", "u64", "i64", "f64"};
  const auto i = static_cast<uint32_t>(t);
  return i < 13 ? names[i] : "?";
}

// Little-endian fp16 bytes [.., 2] of a uint8 tensor -> float32 [..].
inline at::Tensor half_at(const at::Tensor& blocks, int64_t offset) {
  return blocks.narrow(1, offset, 2).contiguous().view(at::kHalf).to(at::kFloat);
}

// Low then high nibbles of each group of `group` bytes: [nb, n] -> [nb, 2n] in ggml's order
// (the 2 * group values of a group are its low nibbles followed by its high nibbles).
inline at::Tensor nibbles(const at::Tensor& q, int64_t group) {
  const int64_t nb = q.size(0), n = q.size(1);
  auto g = q.reshape({nb, n / group, 1, group});
  auto both = at::cat({g.bitwise_and(0x0F), g.bitwise_right_shift(4)}, 2);
  return both.reshape({nb, 2 * n});
}

// Q4_K/Q5_K's eight 6-bit scales and mins packed in 12 bytes -> two [nb, 8] uint8 tensors.
inline std::pair<at::Tensor, at::Tensor> k_scale_min(const at::Tensor& scales) {
  const int64_t nb = scales.size(0);
  auto s = scales.reshape({nb, 3, 4});
  auto d = s.select(1, 0), m = s.select(1, 1), md = s.select(1, 2);
  auto sc = at::cat({d.bitwise_and(0x3F),
                     md.bitwise_and(0x0F).bitwise_or(d.bitwise_right_shift(2).bitwise_and(0x30))},
                    1);
  auto mn =
      at::cat({m.bitwise_and(0x3F),
               md.bitwise_right_shift(4).bitwise_or(m.bitwise_right_shift(2).bitwise_and(0x30))},
              1);
  return {sc, mn};
}

// Dequantises `blocks` [nb, bytes] of `type` to float32 [nb, block]. The float operations and
// their order are ggml's (and the gguf package's): d * q, then - m or + m.
inline at::Tensor dequantize_blocks(GgmlType type, const at::Tensor& blocks) {
  const int64_t nb = blocks.size(0);
  auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
  switch (type) {
    case GgmlType::F32:
      return blocks.contiguous().view(at::kFloat).reshape({nb, 1}).clone();
    case GgmlType::F16:
      return blocks.contiguous().view(at::kHalf).to(at::kFloat).reshape({nb, 1});
    case GgmlType::BF16:
      return blocks.contiguous().view(at::kBFloat16).to(at::kFloat).reshape({nb, 1});
    case GgmlType::Q8_0: {
      auto d = half_at(blocks, 0);
      auto q = blocks.narrow(1, 2, 32).contiguous().view(at::kChar);
      return f(q) * d;
    }
    case GgmlType::Q4_0: {
      auto d = half_at(blocks, 0);
      auto q = nibbles(blocks.narrow(1, 2, 16), 16).to(at::kChar) - 8;
      return d * f(q);
    }
    case GgmlType::Q4_1: {
      auto d = half_at(blocks, 0), m = half_at(blocks, 2);
      return d * f(nibbles(blocks.narrow(1, 4, 16), 16)) + m;
    }
    case GgmlType::Q5_0:
    case GgmlType::Q5_1: {
      const bool with_min = type == GgmlType::Q5_1;
      const int64_t at_qh = with_min ? 4 : 2;
      auto d = half_at(blocks, 0);
      // 32 high bits, little-endian: value j takes bit j.
      auto qh_bytes = blocks.narrow(1, at_qh, 4).to(at::kLong);
      auto qh = qh_bytes.select(1, 0) + qh_bytes.select(1, 1) * 256 +
                qh_bytes.select(1, 2) * 65536 + qh_bytes.select(1, 3) * 16777216;
      auto bits = qh.unsqueeze(1)
                      .bitwise_right_shift(at::arange(32, qh.options()).unsqueeze(0))
                      .bitwise_and(1)
                      .to(at::kByte);
      auto q = nibbles(blocks.narrow(1, at_qh + 4, 16), 16).bitwise_or(bits.bitwise_left_shift(4));
      if (with_min) return d * f(q) + half_at(blocks, 2);
      return d * f(q.to(at::kChar) - 16);
    }
    case GgmlType::Q4_K:
    case GgmlType::Q5_K: {
      auto d = half_at(blocks, 0), dmin = half_at(blocks, 2);
      auto [sc, mn] = k_scale_min(blocks.narrow(1, 4, 12));
      auto ds = (d * f(sc)).reshape({nb, 8, 1});
      auto dm = (dmin * f(mn)).reshape({nb, 8, 1});
      at::Tensor q;
      if (type == GgmlType::Q4_K) {
        q = nibbles(blocks.narrow(1, 16, 128), 32).reshape({nb, 8, 32});
      } else {
        auto ql = nibbles(blocks.narrow(1, 48, 128), 32).reshape({nb, 8, 32});
        auto qh = blocks.narrow(1, 16, 32).reshape({nb, 1, 32});
        auto shifts = at::arange(8, blocks.options()).reshape({1, 8, 1});
        auto hb = qh.bitwise_right_shift(shifts).bitwise_and(1);
        q = ql.bitwise_or(hb.bitwise_left_shift(4));
      }
      return (ds * f(q) - dm).reshape({nb, 256});
    }
    case GgmlType::Q6_K: {
      auto ql = blocks.narrow(1, 0, 128).reshape({nb, 2, 1, 64});
      auto qh = blocks.narrow(1, 128, 64).reshape({nb, 2, 1, 32});
      auto sc = blocks.narrow(1, 192, 16).contiguous().view(at::kChar);
      auto d = half_at(blocks, 208);
      auto ds = (d * f(sc)).reshape({nb, 16, 1});
      auto low = at::cat({ql.bitwise_and(0x0F), ql.bitwise_right_shift(4)}, 2).reshape({nb, 8, 32});
      auto shifts = at::tensor({0, 2, 4, 6}, blocks.options()).reshape({1, 1, 4, 1});
      auto high = qh.bitwise_right_shift(shifts).bitwise_and(3).reshape({nb, 8, 32});
      auto q = low.bitwise_or(high.bitwise_left_shift(4)).to(at::kChar) - 32;
      return (ds * f(q).reshape({nb, 16, 16})).reshape({nb, 256});
    }
    default:
      break;
  }
  return {};
}

inline uint16_t float_to_half_bits(float x) {
  at::Half h(x);
  return h.x;
}

}  // namespace detail

/// The name of a ggml type ("Q4_1"), or "type <n>" for one peft does not know.
inline std::string ggml_type_name(uint32_t type) {
  const auto* info = detail::ggml_type_info(type);
  return info ? info->name : fmt::format("type {}", type);
}

/// A metadata value: its GGUF type (and element type for arrays) and the value as JSON (numbers,
/// bool, string, or an array of them).
struct GgufValue {
  GgufValueType type = GgufValueType::String;
  GgufValueType element_type = GgufValueType::U8;  ///< arrays only
  nlohmann::json value;

  static GgufValue string(std::string s) { return {GgufValueType::String, {}, std::move(s)}; }
  static GgufValue u32(uint32_t v) { return {GgufValueType::U32, {}, v}; }
  static GgufValue f32(float v) { return {GgufValueType::F32, {}, v}; }
  static GgufValue boolean(bool v) { return {GgufValueType::Bool, {}, v}; }
  static GgufValue strings(const std::vector<std::string>& v) {
    return {GgufValueType::Array, GgufValueType::String, v};
  }
};

/// One entry of a GGUF file's tensor table.
struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> shape;  ///< torch order (outermost first): ggml's dimensions reversed
  uint32_t type = 0;           ///< ggml type number (see GgmlType)
  uint64_t offset = 0;         ///< byte offset in the data section
  uint64_t nbytes = 0;         ///< bytes the tensor occupies
};

/// A GGUF file opened for reading: header, metadata and tensor table parsed and validated on
/// open; tensor data memory-mapped and dequantised on demand.
///
///     peft::io::GgufFile gguf("SmolLM2-135M-Instruct.Q4_1.gguf");
///     auto layers = gguf.get_int("llama.block_count");
///     at::Tensor w = gguf.tensor("blk.0.attn_q.weight");   // float32 [576, 576]
class GgufFile {
 public:
  /// Opens and validates `path`; throws peft::Error naming the file and the problem.
  explicit GgufFile(const std::filesystem::path& path) : path_(path.string()) {
    mapping_ = detail::map_file(path_, 24, "a GGUF header (24)",
                                [this](const std::string& m) { fail("{}", m); });
    parse();
  }

  const std::string& path() const { return path_; }
  /// The format version (2 or 3).
  uint32_t version() const { return version_; }
  /// The data alignment ("general.alignment", 32 when absent).
  uint64_t alignment() const { return alignment_; }

  /// Metadata keys in file order.
  const std::vector<std::string>& keys() const { return key_order_; }
  bool has(const std::string& key) const { return metadata_.count(key) != 0; }
  /// The value of `key`; throws peft::Error naming the file and the key when absent.
  const GgufValue& value(const std::string& key) const {
    auto it = metadata_.find(key);
    if (it == metadata_.end()) fail("no metadata \"{}\"", key);
    return it->second;
  }
  /// A string value.
  std::string get_string(const std::string& key) const {
    const auto& v = value(key);
    if (v.type != GgufValueType::String) wrong_type(key, v, "string");
    return v.value.get<std::string>();
  }
  std::string get_string(const std::string& key, const std::string& fallback) const {
    return has(key) ? get_string(key) : fallback;
  }
  /// An integer value of any integer type.
  int64_t get_int(const std::string& key) const {
    const auto& v = value(key);
    if (!v.value.is_number_integer()) wrong_type(key, v, "integer");
    return v.value.get<int64_t>();
  }
  int64_t get_int(const std::string& key, int64_t fallback) const {
    return has(key) ? get_int(key) : fallback;
  }
  /// A number (integer or float).
  double get_float(const std::string& key) const {
    const auto& v = value(key);
    if (!v.value.is_number()) wrong_type(key, v, "number");
    return v.value.get<double>();
  }
  double get_float(const std::string& key, double fallback) const {
    return has(key) ? get_float(key) : fallback;
  }
  bool get_bool(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    const auto& v = value(key);
    if (v.type != GgufValueType::Bool) wrong_type(key, v, "bool");
    return v.value.get<bool>();
  }
  /// An array of strings.
  std::vector<std::string> get_strings(const std::string& key) const {
    const auto& v = value(key);
    if (v.type != GgufValueType::Array || v.element_type != GgufValueType::String) {
      wrong_type(key, v, "array of strings");
    }
    return v.value.get<std::vector<std::string>>();
  }
  /// An array of integers.
  std::vector<int64_t> get_ints(const std::string& key) const {
    const auto& v = value(key);
    if (v.type != GgufValueType::Array || !(v.value.empty() || v.value[0].is_number_integer())) {
      wrong_type(key, v, "array of integers");
    }
    return v.value.get<std::vector<int64_t>>();
  }

  /// The tensor table in file order.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  /// The table entry of `name`; throws peft::Error naming the file and the tensor when absent.
  const GgufTensorInfo& info(const std::string& name) const {
    auto it = index_.find(name);
    if (it == index_.end()) fail("no tensor \"{}\" (the file holds {})", name, tensors_.size());
    return tensors_[it->second];
  }
  /// The raw bytes of `name` as a uint8 tensor [nbytes] (zero-copy; keeps the mapping alive).
  at::Tensor raw(const std::string& name) const {
    const auto& t = info(name);
    auto keep = mapping_;
    return at::from_blob(
        mapping_->data() + data_offset_ + t.offset, {static_cast<int64_t>(t.nbytes)},
        [keep](void*) {}, at::TensorOptions().dtype(at::kByte));
  }
  /// `name` dequantised to float32, in torch order. Supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0,
  /// Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; other types throw peft::Error naming the tensor and the type.
  at::Tensor tensor(const std::string& name) const {
    const auto& t = info(name);
    const auto* type = detail::ggml_type_info(t.type);
    if (!type->dequantizes) {
      fail(
          "tensor \"{}\" is {}, which peft cannot dequantise (supported: F32, F16, BF16, Q4_0, "
          "Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
          name, type->name);
    }
    const int64_t blocks = static_cast<int64_t>(t.nbytes) / type->bytes;
    auto bytes = raw(name).view({blocks, type->bytes});
    return detail::dequantize_blocks(type->type, bytes).reshape(t.shape);
  }

 private:
  template <class... Args>
  [[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) const {
    peft::fail("gguf", "{}: {}", path_, fmt::format(format, std::forward<Args>(args)...));
  }
  [[noreturn]] void wrong_type(const std::string& key, const GgufValue& v,
                               const char* expected) const {
    fail("metadata \"{}\" is {}{}, expected {}", key, detail::value_type_name(v.type),
         v.type == GgufValueType::Array
             ? fmt::format(" of {}", detail::value_type_name(v.element_type))
             : std::string(),
         expected);
  }

  // A cursor over the header that never reads past the end of the file.
  struct Cursor {
    const GgufFile* file;
    const unsigned char* data;
    uint64_t size;
    uint64_t pos = 0;
    void need(uint64_t n, const char* what) {
      if (n > size - pos) {
        file->fail("truncated: {} needs {} bytes at offset {}, the file has {}", what, n, pos,
                   size);
      }
    }
    template <class T>
    T read(const char* what) {
      need(sizeof(T), what);
      T v;
      std::memcpy(&v, data + pos, sizeof(T));
      pos += sizeof(T);
      return v;
    }
    std::string string(const char* what) {
      const auto n = read<uint64_t>(what);
      need(n, what);
      std::string s(reinterpret_cast<const char*>(data + pos), static_cast<size_t>(n));
      pos += n;
      return s;
    }
  };

  nlohmann::json scalar(Cursor& c, GgufValueType type, const std::string& key) {
    switch (type) {
      case GgufValueType::U8:
        return c.read<uint8_t>(key.c_str());
      case GgufValueType::I8:
        return c.read<int8_t>(key.c_str());
      case GgufValueType::U16:
        return c.read<uint16_t>(key.c_str());
      case GgufValueType::I16:
        return c.read<int16_t>(key.c_str());
      case GgufValueType::U32:
        return c.read<uint32_t>(key.c_str());
      case GgufValueType::I32:
        return c.read<int32_t>(key.c_str());
      case GgufValueType::F32:
        return c.read<float>(key.c_str());
      case GgufValueType::Bool: {
        const auto b = c.read<uint8_t>(key.c_str());
        if (b > 1) fail("metadata \"{}\": bool byte is {}, expected 0 or 1", key, b);
        return b == 1;
      }
      case GgufValueType::String: {
        auto s = c.string(key.c_str());
        if (detail::invalid_utf8_at(s) != std::string_view::npos) {
          fail("metadata \"{}\": string is not valid UTF-8", key);
        }
        return s;
      }
      case GgufValueType::U64:
        return c.read<uint64_t>(key.c_str());
      case GgufValueType::I64:
        return c.read<int64_t>(key.c_str());
      case GgufValueType::F64:
        return c.read<double>(key.c_str());
      default:
        break;
    }
    fail("metadata \"{}\": unknown value type {}", key, static_cast<uint32_t>(type));
  }

  void parse() {
    Cursor c{this, mapping_->data(), mapping_->size()};
    const auto magic = c.read<uint32_t>("magic");
    if (std::memcmp(&magic, "GGUF", 4) != 0) fail("not a GGUF file (no \"GGUF\" magic)");
    version_ = c.read<uint32_t>("version");
    if (version_ != 2 && version_ != 3) {
      fail("GGUF version {} is not supported (2 and 3 are)", version_);
    }
    const auto n_tensors = c.read<uint64_t>("tensor count");
    const auto n_kv = c.read<uint64_t>("metadata count");
    // Each entry takes at least 8 bytes of name length; larger counts are corrupt.
    if (n_tensors > c.size / 8 || n_kv > c.size / 8) {
      fail("header counts ({} tensors, {} metadata) exceed what the file can hold", n_tensors,
           n_kv);
    }
    for (uint64_t i = 0; i < n_kv; ++i) {
      auto key = c.string("metadata key");
      if (metadata_.count(key)) fail("metadata \"{}\" appears twice", key);
      GgufValue v;
      v.type = static_cast<GgufValueType>(c.read<uint32_t>(key.c_str()));
      if (v.type == GgufValueType::Array) {
        v.element_type = static_cast<GgufValueType>(c.read<uint32_t>(key.c_str()));
        if (v.element_type == GgufValueType::Array) fail("metadata \"{}\": nested arrays", key);
        const auto n = c.read<uint64_t>(key.c_str());
        if (n > c.size - c.pos) fail("metadata \"{}\": array of {} exceeds the file", key, n);
        v.value = nlohmann::json::array();
        for (uint64_t j = 0; j < n; ++j) v.value.push_back(scalar(c, v.element_type, key));
      } else {
        v.value = scalar(c, v.type, key);
      }
      key_order_.push_back(key);
      metadata_.emplace(std::move(key), std::move(v));
    }
    if (has("general.alignment")) {
      const auto a = get_int("general.alignment");
      if (a <= 0 || (a & (a - 1)) != 0) fail("general.alignment {} is not a power of two", a);
      alignment_ = static_cast<uint64_t>(a);
    }
    for (uint64_t i = 0; i < n_tensors; ++i) {
      GgufTensorInfo t;
      t.name = c.string("tensor name");
      if (index_.count(t.name)) fail("tensor \"{}\" appears twice", t.name);
      const auto dims = c.read<uint32_t>(t.name.c_str());
      if (dims == 0 || dims > 4) fail("tensor \"{}\" has {} dimensions (1 to 4)", t.name, dims);
      std::vector<int64_t> ne(dims);
      uint64_t count = 1;
      for (auto& n : ne) {
        const auto v = c.read<uint64_t>(t.name.c_str());
        if (v == 0 || v > (uint64_t{1} << 40) || count > (uint64_t{1} << 62) / v) {
          fail("tensor \"{}\" has an impossible dimension {}", t.name, v);
        }
        n = static_cast<int64_t>(v);
        count *= v;
      }
      t.shape.assign(ne.rbegin(), ne.rend());
      t.type = c.read<uint32_t>(t.name.c_str());
      const auto* type = detail::ggml_type_info(t.type);
      if (!type) fail("tensor \"{}\" has unknown ggml type {}", t.name, t.type);
      if (ne[0] % type->block != 0) {
        fail("tensor \"{}\": row length {} is not a multiple of {}'s block of {}", t.name, ne[0],
             type->name, type->block);
      }
      t.nbytes = count / static_cast<uint64_t>(type->block) * static_cast<uint64_t>(type->bytes);
      t.offset = c.read<uint64_t>(t.name.c_str());
      if (t.offset % alignment_ != 0) {
        fail("tensor \"{}\" starts at {}, not a multiple of the alignment {}", t.name, t.offset,
             alignment_);
      }
      index_.emplace(t.name, tensors_.size());
      tensors_.push_back(std::move(t));
    }
    data_offset_ = (c.pos + alignment_ - 1) / alignment_ * alignment_;
    const uint64_t data_size = c.size >= data_offset_ ? c.size - data_offset_ : 0;
    std::vector<const GgufTensorInfo*> order;
    for (const auto& t : tensors_) order.push_back(&t);
    std::sort(order.begin(), order.end(),
              [](const auto* a, const auto* b) { return a->offset < b->offset; });
    for (size_t i = 0; i < order.size(); ++i) {
      const auto* t = order[i];
      if (t->offset > data_size || t->nbytes > data_size - t->offset) {
        fail(
            "tensor \"{}\" ({} bytes at data offset {}) runs past the end of the file (data "
            "section {} bytes)",
            t->name, t->nbytes, t->offset, data_size);
      }
      if (i > 0 && order[i - 1]->offset + order[i - 1]->nbytes > t->offset) {
        fail("tensors \"{}\" and \"{}\" overlap", order[i - 1]->name, t->name);
      }
    }
  }

  std::string path_;
  std::shared_ptr<detail::Mapping> mapping_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::string> key_order_;
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;
};

/// Builds a GGUF file (version 3, alignment 32): metadata in the order added, tensors stored as
/// F32, F16 or Q8_0 (quantised with ggml's reference rounding).
///
///     peft::io::GgufWriter w;
///     w.add("general.architecture", peft::io::GgufValue::string("llama"));
///     w.add_tensor("blk.0.attn_q.weight.lora_a", a, peft::io::GgmlType::F32);
///     w.write("adapter.gguf");
class GgufWriter {
 public:
  /// Adds (or replaces) a metadata value.
  void add(const std::string& key, GgufValue value) {
    for (auto& kv : metadata_) {
      if (kv.first == key) {
        kv.second = std::move(value);
        return;
      }
    }
    metadata_.emplace_back(key, std::move(value));
  }
  /// Adds a tensor (any float dtype, any device; stored as `type`). Throws peft::Error for an
  /// unsupported type, a repeated name, or a Q8_0 tensor whose rows are not a multiple of 32.
  void add_tensor(const std::string& name, const at::Tensor& tensor, GgmlType type) {
    for (const auto& t : tensors_) {
      if (t.name == name) peft::fail("gguf", "tensor \"{}\" added twice", name);
    }
    check(tensor.defined() && tensor.dim() >= 1 && tensor.dim() <= 4, "gguf",
          "tensor \"{}\" must have 1 to 4 dimensions, got {}", name,
          tensor.defined() ? peft::detail::shape(tensor.sizes()) : std::string("undefined"));
    auto x = tensor.detach().to(at::kCPU, at::kFloat).contiguous();
    std::string bytes;
    if (type == GgmlType::F32) {
      bytes.assign(static_cast<const char*>(x.data_ptr()), static_cast<size_t>(x.nbytes()));
    } else if (type == GgmlType::F16) {
      auto h = x.to(at::kHalf);
      bytes.assign(static_cast<const char*>(h.data_ptr()), static_cast<size_t>(h.nbytes()));
    } else if (type == GgmlType::Q8_0) {
      check(x.size(-1) % 32 == 0, "gguf",
            "tensor \"{}\": Q8_0 needs rows of a multiple of 32, got {}", name, x.size(-1));
      const float* p = x.data_ptr<float>();
      const int64_t blocks = x.numel() / 32;
      bytes.resize(static_cast<size_t>(blocks * 34));
      for (int64_t b = 0; b < blocks; ++b) {
        float amax = 0;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(p[b * 32 + j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t dh = detail::float_to_half_bits(d);
        char* out = &bytes[static_cast<size_t>(b * 34)];
        std::memcpy(out, &dh, 2);
        for (int j = 0; j < 32; ++j) {
          const auto q = static_cast<int8_t>(std::round(p[b * 32 + j] * id));
          std::memcpy(out + 2 + j, &q, 1);
        }
      }
    } else {
      peft::fail("gguf", "tensor \"{}\": writing {} is not supported (F32, F16, Q8_0 are)", name,
                 ggml_type_name(static_cast<uint32_t>(type)));
    }
    tensors_.push_back({name, x.sizes().vec(), type, std::move(bytes)});
  }

  /// Writes the file atomically; throws peft::Error naming the file on failure.
  void write(const std::filesystem::path& path) const {
    std::string head;
    auto put = [&](const void* p, size_t n) { head.append(static_cast<const char*>(p), n); };
    auto put_u32 = [&](uint32_t v) { put(&v, 4); };
    auto put_u64 = [&](uint64_t v) { put(&v, 8); };
    auto put_string = [&](const std::string& s) {
      put_u64(s.size());
      head += s;
    };
    put("GGUF", 4);
    put_u32(3);
    put_u64(tensors_.size());
    put_u64(metadata_.size());
    for (const auto& [key, v] : metadata_) {
      put_string(key);
      put_u32(static_cast<uint32_t>(v.type));
      if (v.type == GgufValueType::Array) {
        put_u32(static_cast<uint32_t>(v.element_type));
        put_u64(v.value.size());
        for (const auto& e : v.value) put_scalar(head, v.element_type, e, key);
      } else {
        put_scalar(head, v.type, v.value, key);
      }
    }
    uint64_t offset = 0;
    std::vector<uint64_t> offsets;
    for (const auto& t : tensors_) {
      put_string(t.name);
      put_u32(static_cast<uint32_t>(t.shape.size()));
      for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) {
        put_u64(static_cast<uint64_t>(*it));
      }
      put_u32(static_cast<uint32_t>(t.type));
      put_u64(offset);
      offsets.push_back(offset);
      offset = (offset + t.bytes.size() + 31) / 32 * 32;
    }
    head.append((32 - head.size() % 32) % 32, '\0');
    static const std::string zeros(32, '\0');
    std::vector<std::string_view> parts = {head};
    for (const auto& t : tensors_) {
      parts.emplace_back(t.bytes);
      parts.emplace_back(zeros.data(), (32 - t.bytes.size() % 32) % 32);
    }
    write_file_atomically(path, parts, "gguf");
  }

 private:
  struct Tensor {
    std::string name;
    std::vector<int64_t> shape;
    GgmlType type;
    std::string bytes;
  };

  static void put_scalar(std::string& out, GgufValueType type, const nlohmann::json& v,
                         const std::string& key) {
    auto put = [&](auto x) { out.append(reinterpret_cast<const char*>(&x), sizeof(x)); };
    switch (type) {
      case GgufValueType::U8:
        return put(v.get<uint8_t>());
      case GgufValueType::I8:
        return put(v.get<int8_t>());
      case GgufValueType::U16:
        return put(v.get<uint16_t>());
      case GgufValueType::I16:
        return put(v.get<int16_t>());
      case GgufValueType::U32:
        return put(v.get<uint32_t>());
      case GgufValueType::I32:
        return put(v.get<int32_t>());
      case GgufValueType::F32:
        return put(v.get<float>());
      case GgufValueType::Bool:
        return put(static_cast<uint8_t>(v.get<bool>() ? 1 : 0));
      case GgufValueType::String: {
        const auto& s = v.get_ref<const std::string&>();
        put(static_cast<uint64_t>(s.size()));
        out += s;
        return;
      }
      case GgufValueType::U64:
        return put(v.get<uint64_t>());
      case GgufValueType::I64:
        return put(v.get<int64_t>());
      case GgufValueType::F64:
        return put(v.get<double>());
      default:
        peft::fail("gguf", "metadata \"{}\": cannot write value type {}", key,
                   static_cast<uint32_t>(type));
    }
  }

  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::vector<Tensor> tensors_;
};

}  // namespace io
PEFT_NAMESPACE_END
