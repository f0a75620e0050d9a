#pragma once

// Reading and writing the safetensors format (https://github.com/huggingface/safetensors):
// an 8-byte little-endian header length N, N bytes of UTF-8 JSON describing each tensor, then
// the raw little-endian row-major bytes of every tensor.
//
// Reading memory-maps the file and validates the whole header before handing out anything, so a
// damaged or hostile file gives a peft::Error naming the file and the problem, never a crash or
// a partial result. Writing goes through a temporary file in the same folder that is renamed into
// place, so a failed save never leaves a half-written file behind.

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/detail/shape.hpp>

PEFT_NAMESPACE_BEGIN
namespace io {

/// Where a tensor lives in a safetensors file and what it holds.
struct SafetensorsEntry {
  std::string name;            ///< tensor name, as written in the header
  std::string dtype_name;      ///< safetensors dtype string, e.g. "F32"
  at::ScalarType dtype;        ///< the matching torch dtype
  std::vector<int64_t> shape;  ///< empty for a scalar
  uint64_t begin = 0;          ///< byte offset of the first byte, relative to the data buffer
  uint64_t end = 0;            ///< one past the last byte, relative to the data buffer
};

namespace detail {

// Rust's safetensors refuses headers above 100 MB; a larger N is a corrupt length, not a model.
inline constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;
// Real headers nest three deep ({name: {"shape": [..]}}); deeper input is malformed, and the
// limit keeps a hostile header from building a huge tree.
inline constexpr int kMaxSafetensorsDepth = 8;

struct SafetensorsDtype {
  std::string_view name;
  at::ScalarType type;
};

inline constexpr SafetensorsDtype kSafetensorsDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool},
};

inline std::string supported_dtypes() {
  std::string out;
  for (const auto& d : kSafetensorsDtypes) {
    if (!out.empty()) out += ", ";
    out += d.name;
  }
  return out;
}

inline bool dtype_from_name(std::string_view name, at::ScalarType& out) {
  for (const auto& d : kSafetensorsDtypes) {
    if (d.name == name) {
      out = d.type;
      return true;
    }
  }
  return false;
}

inline bool dtype_to_name(at::ScalarType type, std::string_view& out) {
  for (const auto& d : kSafetensorsDtypes) {
    if (d.type == type) {
      out = d.name;
      return true;
    }
  }
  return false;
}

// Index of the first byte that breaks UTF-8 (overlongs, surrogates and code points above
// U+10FFFF included), or npos when `s` is valid.
inline size_t invalid_utf8_at(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      n = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return i;
    }
    if (i + n >= s.size()) return i;
    for (size_t k = 1; k <= n; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (cc & 0x3F);
    }
    const uint32_t min_cp = n == 1 ? 0x80 : n == 2 ? 0x800 : 0x10000;
    if (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += n + 1;
  }
  return std::string_view::npos;
}

inline bool host_is_little_endian() {
  const uint16_t probe = 1;
  unsigned char first = 0;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

// A read-only view of a whole file; the pages are private copy-on-write so that in-place edits
// of a zero-copy tensor stay in memory instead of faulting or reaching the file.
class Mapping {
 public:
  Mapping(void* addr, size_t size) : addr_(addr), size_(size) {}
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { munmap(addr_, size_); }
  unsigned char* data() const { return static_cast<unsigned char*>(addr_); }
  size_t size() const { return size_; }

 private:
  void* addr_;
  size_t size_;
};

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

// Maps the whole regular file at `path` read-only in effect (private copy-on-write pages). A file
// that cannot be opened, is not a regular file, or is shorter than `min_size` bytes (`min_what`
// names what those bytes are) is reported through `fail(message)`, which must throw.
template <class Fail>
std::shared_ptr<Mapping> map_file(const std::string& path, uint64_t min_size, const char* min_what,
                                  Fail&& fail) {
  if (!host_is_little_endian()) fail(std::string("reading needs a little-endian host"));
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) fail(fmt::format("cannot open: {}", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) fail(fmt::format("cannot stat: {}", std::strerror(errno)));
  if (!S_ISREG(st.st_mode)) fail(std::string("not a regular file"));
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size < min_size) fail(fmt::format("file is {} bytes, shorter than {}", size, min_what));
  void* addr =
      ::mmap(nullptr, static_cast<size_t>(size), PROT_READ | PROT_WRITE, MAP_PRIVATE, fd.get(), 0);
  if (addr == MAP_FAILED) fail(fmt::format("cannot mmap: {}", std::strerror(errno)));
  return std::make_shared<Mapping>(addr, static_cast<size_t>(size));
}

template <class... Args>
[[noreturn]] void save_fail(const std::string& path, fmt::format_string<Args...> format,
                            Args&&... args) {
  peft::fail("safetensors", "{}: {}", path, fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace detail

/// A safetensors file opened for reading: the header is parsed and fully validated on open, the
/// data stay memory-mapped and are read on demand.
///
/// Tensors whose data are suitably aligned are returned without a copy: they point into the
/// mapping and keep it alive, so they outlive this object. The mapping is private, so writing to
/// such a tensor changes neither the file nor other processes' view of it, but it is seen by every
/// tensor obtained for the same name from the same SafetensorsFile. Truncating the file while it
/// is mapped is outside what any reader can defend against (the OS raises SIGBUS).
class SafetensorsFile {
 public:
  /// Opens and validates `path`. Throws peft::Error naming the file and the problem when it
  /// cannot be read or is not a well-formed safetensors file.
  explicit SafetensorsFile(const std::filesystem::path& path) : path_(path.string()) {
    mapping_ = detail::map_file(path_, 8, "the 8-byte header length",
                                [this](const std::string& m) { fail("{}", m); });
    const auto file_size = static_cast<uint64_t>(mapping_->size());

    uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | mapping_->data()[i];
    if (header_size > detail::kMaxSafetensorsHeader) {
      fail("header length {} is absurd (limit {})", header_size, detail::kMaxSafetensorsHeader);
    }
    if (header_size > file_size - 8) {
      fail("header length {} exceeds the {} bytes that follow it", header_size, file_size - 8);
    }
    data_offset_ = 8 + header_size;
    data_size_ = file_size - data_offset_;
    parse_header(std::string_view(reinterpret_cast<const char*>(mapping_->data() + 8),
                                  static_cast<size_t>(header_size)));
  }

  /// The path the file was opened from.
  const std::string& path() const { return path_; }

  /// Tensor names in the order the header lists them.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(entries_.size());
    for (const auto& e : entries_) out.push_back(e.name);
    return out;
  }

  /// Number of tensors in the file.
  size_t size() const { return entries_.size(); }

  /// Whether the file holds a tensor called `name`.
  bool contains(const std::string& name) const { return index_.count(name) != 0; }

  /// Header entries in file order.
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }

  /// The header entry of `name`; throws peft::Error when there is none.
  const SafetensorsEntry& entry(const std::string& name) const {
    auto it = index_.find(name);
    if (it == index_.end()) {
      std::vector<std::string> shown;
      for (size_t i = 0; i < entries_.size() && i < 10; ++i) shown.push_back(entries_[i].name);
      fail("no tensor \"{}\"; the file holds {} tensors: {}{}", name, entries_.size(),
           fmt::join(shown, ", "), entries_.size() > shown.size() ? ", ..." : "");
    }
    return entries_[it->second];
  }

  /// Torch dtype of `name`.
  at::ScalarType dtype(const std::string& name) const { return entry(name).dtype; }

  /// Shape of `name` (empty for a scalar).
  const std::vector<int64_t>& shape(const std::string& name) const { return entry(name).shape; }

  /// The `__metadata__` strings (empty when the header has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// The tensor `name` on CPU. Zero-copy when its offset in the file is a multiple of its
  /// element size (always true for files written by save_safetensors), a private copy otherwise.
  at::Tensor tensor(const std::string& name) const {
    const auto& e = entry(name);
    const auto nbytes = static_cast<size_t>(e.end - e.begin);
    const auto options = at::TensorOptions().dtype(e.dtype).device(at::kCPU);
    if (nbytes == 0) return at::empty(e.shape, options);
    unsigned char* src = mapping_->data() + data_offset_ + e.begin;
    const auto itemsize = static_cast<uintptr_t>(c10::elementSize(e.dtype));
    if (reinterpret_cast<uintptr_t>(src) % itemsize == 0) {
      auto keep = mapping_;
      return at::from_blob(
          src, e.shape, [keep](void*) {}, options);
    }
    auto out = at::empty(e.shape, options);
    std::memcpy(out.data_ptr(), src, nbytes);
    return out;
  }

  /// Copies tensor `name` into `target` (a contiguous tensor of as many elements, any dtype: the
  /// values are converted) a slice of at most `chunk_bytes` at a time, and hands each slice's
  /// pages of the mapping back to the OS once it is copied (madvise MADV_DONTNEED, whole pages
  /// inside the tensor only). Loading a model this way holds the model and one slice, not the
  /// model and every page of the file read so far (the mapping stays resident until the file is
  /// closed otherwise: for a 470 MB checkpoint, 470 MB more at the peak). Reading the tensor
  /// again later reads the file again; changes written through zero-copy tensors of it are lost.
  void copy_to(const std::string& name, at::Tensor target,
               size_t chunk_bytes = size_t{16} << 20) const {
    const auto& e = entry(name);
    const auto numel =
        static_cast<int64_t>(e.end - e.begin) / static_cast<int64_t>(c10::elementSize(e.dtype));
    if (!target.is_contiguous() || target.numel() != numel) {
      fail("tensor \"{}\" ({} elements) cannot be copied into a {}tensor of shape {}", name, numel,
           target.is_contiguous() ? "" : "non-contiguous ", peft::detail::shape(target.sizes()));
    }
    const auto source = tensor(name).reshape({-1});
    auto flat = target.view({-1});
    const auto itemsize = static_cast<int64_t>(c10::elementSize(e.dtype));
    const auto step = std::max<int64_t>(1, static_cast<int64_t>(chunk_bytes) / itemsize);
    const auto* at = static_cast<const unsigned char*>(source.data_ptr());
    const bool mapped = at >= mapping_->data() && at < mapping_->data() + mapping_->size();
    const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const auto base = reinterpret_cast<uintptr_t>(at);
    // Released so far: whole pages from the first one inside the tensor; a page shared with a
    // neighbouring tensor (before the first, after the last) stays.
    uintptr_t released = (base + page - 1) / page * page;
    for (int64_t start = 0; start < numel; start += step) {
      const int64_t n = std::min(step, numel - start);
      flat.narrow(0, start, n).copy_(source.narrow(0, start, n));
      if (!mapped) continue;
      const uintptr_t copied =
          (base + static_cast<uintptr_t>((start + n) * itemsize)) / page * page;
      if (copied > released) {
        ::madvise(reinterpret_cast<void*>(released), static_cast<size_t>(copied - released),
                  MADV_DONTNEED);
        released = copied;
      }
    }
  }

  /// Every tensor, in file order.
  std::vector<std::pair<std::string, at::Tensor>> load_all() const {
    std::vector<std::pair<std::string, at::Tensor>> out;
    out.reserve(entries_.size());
    for (const auto& e : entries_) out.emplace_back(e.name, tensor(e.name));
    return out;
  }

  /// Start of the mapped file: lets callers tell zero-copy tensors from copies.
  const void* mapped_data() const { return mapping_->data(); }

  /// Size of the mapping in bytes (the whole file).
  size_t mapped_size() const { return mapping_->size(); }

 private:
  template <class... Args>
  [[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) const {
    peft::fail("safetensors", "{}: {}", path_, fmt::format(format, std::forward<Args>(args)...));
  }

  using Json = nlohmann::ordered_json;

  void parse_header(std::string_view text) {
    const size_t bad = detail::invalid_utf8_at(text);
    if (bad != std::string_view::npos) fail("header is not valid UTF-8 (byte {})", bad);

    // nlohmann::json keeps one value of a repeated key without a word, so repeated names are
    // caught while parsing: one set of keys per open object.
    std::vector<std::set<std::string>> keys;
    std::string current;
    Json::parser_callback_t callback = [&](int depth, nlohmann::json::parse_event_t event,
                                           Json& parsed) {
      using Event = nlohmann::json::parse_event_t;
      if (depth > detail::kMaxSafetensorsDepth) fail("header nests deeper than any tensor entry");
      if (event == Event::object_start) {
        keys.emplace_back();
      } else if (event == Event::object_end) {
        keys.pop_back();
      } else if (event == Event::key) {
        const auto& key = parsed.get_ref<const std::string&>();
        if (depth == 1) current = key;
        if (!keys.back().insert(key).second) {
          if (depth == 1) fail("duplicate tensor name \"{}\"", key);
          fail("\"{}\": duplicate key \"{}\"", current, key);
        }
      }
      return true;
    };
    Json header;
    try {
      header = Json::parse(text.begin(), text.end(), callback);
    } catch (const nlohmann::json::exception& e) {
      fail("header is not valid JSON: {}", e.what());
    }
    if (!header.is_object()) fail("header is not a JSON object but {}", header.type_name());

    for (auto it = header.begin(); it != header.end(); ++it) {
      if (it.key() == "__metadata__") {
        read_metadata(it.value());
      } else {
        entries_.push_back(read_entry(it.key(), it.value()));
      }
    }
    check_ranges();
    for (size_t i = 0; i < entries_.size(); ++i) index_.emplace(entries_[i].name, i);
  }

  void read_metadata(const Json& value) {
    if (!value.is_object()) fail("\"__metadata__\" is not an object but {}", value.type_name());
    for (auto it = value.begin(); it != value.end(); ++it) {
      if (!it.value().is_string()) {
        fail("\"__metadata__\" must map strings to strings; key \"{}\" holds {}", it.key(),
             it.value().dump());
      }
      metadata_.emplace(it.key(), it.value().get<std::string>());
    }
  }

  SafetensorsEntry read_entry(const std::string& name, const Json& value) const {
    if (!value.is_object())
      fail("tensor \"{}\": entry is not an object but {}", name, value.type_name());
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      if (!value.contains(key)) fail("tensor \"{}\": missing \"{}\"", name, key);
    }
    SafetensorsEntry e;
    e.name = name;
    const auto& dtype = value["dtype"];
    if (!dtype.is_string())
      fail("tensor \"{}\": \"dtype\" is not a string but {}", name, dtype.dump());
    e.dtype_name = dtype.get<std::string>();
    if (!detail::dtype_from_name(e.dtype_name, e.dtype)) {
      fail("tensor \"{}\": unsupported dtype \"{}\" (supported: {})", name, e.dtype_name,
           detail::supported_dtypes());
    }

    const auto& shape = value["shape"];
    auto bad_shape = [&] {
      fail("tensor \"{}\": \"shape\" must be an array of non-negative integers, got {}", name,
           shape.dump());
    };
    if (!shape.is_array()) bad_shape();
    uint64_t numel = 1;
    bool overflow = false;
    for (const auto& d : shape) {
      if (!d.is_number_unsigned()) bad_shape();
      const auto dim = d.get<uint64_t>();
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) bad_shape();
      e.shape.push_back(static_cast<int64_t>(dim));
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / dim) overflow = true;
      numel *= dim;
    }

    const auto& offsets = value["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      fail("tensor \"{}\": \"data_offsets\" must be two non-negative integers [begin, end], got {}",
           name, offsets.dump());
    }
    e.begin = offsets[0].get<uint64_t>();
    e.end = offsets[1].get<uint64_t>();
    if (e.begin > e.end) {
      fail("tensor \"{}\": data_offsets [{}, {}] begin after end", name, e.begin, e.end);
    }
    if (e.end > data_size_) {
      fail("tensor \"{}\": data_offsets [{}, {}] end beyond the data buffer of {} bytes", name,
           e.begin, e.end, data_size_);
    }
    const auto itemsize = static_cast<uint64_t>(c10::elementSize(e.dtype));
    if (overflow || numel > std::numeric_limits<uint64_t>::max() / itemsize ||
        numel * itemsize != e.end - e.begin) {
      fail("tensor \"{}\": data_offsets [{}, {}] hold {} bytes but shape {} of {} needs {}", name,
           e.begin, e.end, e.end - e.begin, peft::detail::shape(e.shape), e.dtype_name,
           overflow ? std::string("more than 2^64") : std::to_string(numel * itemsize));
    }
    return e;
  }

  // Tensors may leave gaps between them (the format does not forbid padding) but never share
  // bytes: an in-place edit of one would otherwise silently change another.
  void check_ranges() const {
    std::vector<const SafetensorsEntry*> sorted;
    for (const auto& e : entries_) {
      if (e.end > e.begin) sorted.push_back(&e);
    }
    std::sort(sorted.begin(), sorted.end(),
              [](const auto* a, const auto* b) { return a->begin < b->begin; });
    for (size_t i = 1; i < sorted.size(); ++i) {
      const auto& prev = *sorted[i - 1];
      const auto& cur = *sorted[i];
      if (cur.begin < prev.end) {
        fail("tensor \"{}\": data_offsets [{}, {}] overlap tensor \"{}\" [{}, {}]", cur.name,
             cur.begin, cur.end, prev.name, prev.begin, prev.end);
      }
    }
  }

  std::string path_;
  std::shared_ptr<detail::Mapping> mapping_;
  uint64_t data_offset_ = 0;
  uint64_t data_size_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// Every tensor of the safetensors file at `path`, in file order. Throws peft::Error when the
/// file cannot be read or is malformed; nothing is returned in that case.
inline std::vector<std::pair<std::string, at::Tensor>> load_safetensors(
    const std::filesystem::path& path) {
  return SafetensorsFile(path).load_all();
}

/// Writes the concatenation of `parts` to `path` atomically: into a new temporary file in the same
/// folder, flushed to disk (fsync), then renamed over `path`, and the folder flushed; on failure
/// `path` is left as it was (absent or the previous file) and the temporary file removed. Throws
/// peft::Error from `where`, naming the file and the system's reason.
inline void write_file_atomically(const std::filesystem::path& path,
                                  const std::vector<std::string_view>& parts,
                                  const char* where = "io") {
  const std::string target = path.string();
  auto fail_with = [&](const std::string& what) { peft::fail(where, "{}: {}", target, what); };
  // O_EXCL on a random name rather than mkstemp: the file gets the usual 0666 & ~umask mode.
  std::string tmp;
  int raw_fd = -1;
  std::random_device entropy;
  std::mt19937_64 rng((static_cast<uint64_t>(entropy()) << 32) ^ static_cast<uint64_t>(::getpid()));
  for (int attempt = 0; attempt < 100 && raw_fd < 0; ++attempt) {
    tmp = fmt::format("{}.tmp-{:016x}", target, rng());
    raw_fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (raw_fd < 0 && errno != EEXIST) break;
  }
  if (raw_fd < 0) {
    fail_with(fmt::format("cannot create temporary file {}: {}", tmp, std::strerror(errno)));
  }
  detail::Fd fd(raw_fd);
  auto abandon = [&](const std::string& what) {
    const std::string reason = std::strerror(errno);
    ::close(fd.release());
    ::unlink(tmp.c_str());
    fail_with(fmt::format("{} {}: {}", what, tmp, reason));
  };
  for (auto part : parts) {
    const char* p = part.data();
    size_t size = part.size();
    while (size > 0) {
      const ssize_t n = ::write(fd.get(), p, size);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) abandon("cannot write");
      p += n;
      size -= static_cast<size_t>(n);
    }
  }
  if (::fsync(fd.get()) != 0) abandon("cannot flush");
  if (::close(fd.release()) != 0) {
    const std::string reason = std::strerror(errno);
    ::unlink(tmp.c_str());
    fail_with(fmt::format("cannot close {}: {}", tmp, reason));
  }
  if (::rename(tmp.c_str(), target.c_str()) != 0) {
    const std::string reason = std::strerror(errno);
    ::unlink(tmp.c_str());
    fail_with(fmt::format("cannot rename {} into place: {}", tmp, reason));
  }
  // The rename is durable only once the folder itself reaches the disk; a failure here leaves a
  // complete file either way, so it is not an error.
  auto folder = path.parent_path();
  detail::Fd dir(::open(folder.empty() ? "." : folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir.get() >= 0) ::fsync(dir.get());
}

/// Writes `tensors` and `metadata` to `path` in the safetensors format.
///
/// The header lists the tensors in the given order, which is the order load_safetensors returns
/// them in. Their data are laid out by decreasing element size (stable), so every tensor starts
/// at a multiple of its element size and reads back without a copy; the buffer has no gaps, as
/// the reference implementation requires. Tensors may live on any device and be non-contiguous:
/// they are written as contiguous CPU copies.
///
/// Every tensor is checked before anything is written, and the bytes go to a temporary file in
/// the same folder that is flushed to disk and renamed over `path`, so on failure `path` is left
/// as it was (absent or the previous file). Throws peft::Error naming the file and the problem.
inline void save_safetensors(const std::filesystem::path& path,
                             const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                             const std::map<std::string, std::string>& metadata = {}) {
  const std::string target = path.string();
  if (!detail::host_is_little_endian())
    detail::save_fail(target, "writing needs a little-endian host");

  struct Item {
    std::string_view dtype_name;
    at::Tensor data;
    uint64_t begin = 0;
  };
  std::vector<Item> items;
  items.reserve(tensors.size());
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__")
      detail::save_fail(target, "\"__metadata__\" is reserved and cannot name a tensor");
    if (detail::invalid_utf8_at(name) != std::string_view::npos) {
      detail::save_fail(target, "tensor name \"{}\" is not valid UTF-8", name);
    }
    if (!seen.insert(name).second) detail::save_fail(target, "duplicate tensor name \"{}\"", name);
    if (!t.defined()) detail::save_fail(target, "tensor \"{}\" is undefined", name);
    if (t.layout() != at::kStrided)
      detail::save_fail(target, "tensor \"{}\" is not a dense strided tensor", name);
    std::string_view dtype_name;
    if (!detail::dtype_to_name(t.scalar_type(), dtype_name)) {
      detail::save_fail(target, "tensor \"{}\": dtype {} cannot be stored (supported: {})", name,
                        c10::toString(t.scalar_type()), detail::supported_dtypes());
    }
    items.push_back({dtype_name, t.detach().to(at::kCPU).contiguous(), 0});
  }
  for (const auto& [key, value] : metadata) {
    if (detail::invalid_utf8_at(key) != std::string_view::npos ||
        detail::invalid_utf8_at(value) != std::string_view::npos) {
      detail::save_fail(target, "metadata \"{}\" is not valid UTF-8", key);
    }
  }

  std::vector<size_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return items[a].data.element_size() > items[b].data.element_size();
  });
  uint64_t offset = 0;
  for (size_t i : order) {
    items[i].begin = offset;
    offset += static_cast<uint64_t>(items[i].data.nbytes());
  }

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  for (size_t i = 0; i < items.size(); ++i) {
    const auto& item = items[i];
    header[tensors[i].first] = {
        {"dtype", std::string(item.dtype_name)},
        {"shape", item.data.sizes().vec()},
        {"data_offsets", {item.begin, item.begin + static_cast<uint64_t>(item.data.nbytes())}}};
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string prefix(8, '\0');
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((text.size() >> (8 * i)) & 0xFF);

  std::vector<std::string_view> parts = {prefix, text};
  for (size_t i : order) {
    parts.emplace_back(static_cast<const char*>(items[i].data.data_ptr()), items[i].data.nbytes());
  }
  write_file_atomically(path, parts, "safetensors");
}

}  // namespace io
PEFT_NAMESPACE_END
