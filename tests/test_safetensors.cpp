#include <peft/io/safetensors.hpp>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <sys/resource.h>
#include <sys/wait.h>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

namespace {

// A fresh folder per test case, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() /
           ("peft_safetensors_" + std::to_string(::getpid()) + "_" + std::to_string(counter()++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
  static int& counter() {
    static int n = 0;
    return n;
  }
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((v >> (8 * i)) & 0xFF);
  return out;
}

// A file whose header length field says `length` (the real length when not given).
std::string safetensors_bytes(const std::string& header, const std::string& data,
                              std::optional<uint64_t> length = std::nullopt) {
  return le64(length ? *length : header.size()) + header + data;
}

std::string bytes(std::initializer_list<int> values) {
  std::string out;
  for (int v : values) out.push_back(static_cast<char>(v));
  return out;
}

int run_python(const std::string& args) {
  const std::string command =
      "python3 " PEFT_SOURCE_DIR "/tests/python/safetensors_corrupt.py " + args;
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// The values tests/python/safetensors_corrupt.py writes and expects, spelled out again here.
NamedTensors reference_tensors() {
  const std::vector<double> floats{0.5, -1.25, 3.0, -4.75, 1024.0, 0.0078125};
  auto f = [&](torch::Dtype dtype) {
    return torch::tensor(floats, torch::kDouble).to(dtype).reshape({2, 3});
  };
  auto ints = [](std::vector<int64_t> v, torch::Dtype dtype) {
    return torch::tensor(v, torch::kLong).to(dtype).reshape({2, 3});
  };
  return {
      {"t.f64", f(torch::kDouble)},
      {"t.f32", f(torch::kFloat)},
      {"t.f16", f(torch::kHalf)},
      {"t.bf16", f(torch::kBFloat16)},
      {"t.i64", ints({-(int64_t{1} << 40), (int64_t{1} << 40) + 1, -1, 0, 7,
                      std::numeric_limits<int64_t>::max()},
                     torch::kLong)},
      {"t.i32", ints({-2147483648LL, 2147483647LL, -1, 0, 1, 12345}, torch::kInt)},
      {"t.i16", ints({-32768, 32767, -1, 0, 1, 300}, torch::kShort)},
      {"t.i8", ints({-128, 127, -1, 0, 1, 42}, torch::kChar)},
      {"t.u8", ints({0, 255, 1, 128, 7, 200}, torch::kByte)},
      {"t.bool", ints({1, 0, 1, 1, 0, 0}, torch::kBool)},
      {"scalar", torch::tensor(3.5f)},
      {"empty", torch::zeros({0, 4})},
  };
}

const std::map<std::string, std::string> kReferenceMetadata{{"format", "pt"},
                                                            {"note", "h\xc3\xa9llo"}};

// Same names, dtypes, shapes and values, in any order.
void require_same(const NamedTensors& got, const NamedTensors& want) {
  REQUIRE(got.size() == want.size());
  for (const auto& [name, w] : want) {
    INFO("tensor " << name);
    auto it = std::find_if(got.begin(), got.end(), [&](const auto& p) { return p.first == name; });
    REQUIRE(it != got.end());
    CHECK(it->second.scalar_type() == w.scalar_type());
    CHECK(it->second.sizes() == w.sizes());
    CHECK(torch::equal(it->second, w));
  }
}

void require_same_order(const NamedTensors& got, const NamedTensors& want) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < want.size(); ++i) CHECK(got[i].first == want[i].first);
}

}  // namespace

TEST_CASE("every dtype round-trips with its values, in the given order", "[safetensors]") {
  TempDir dir;
  const auto path = dir.file("all.safetensors");
  const auto want = reference_tensors();
  peft::io::save_safetensors(path, want, kReferenceMetadata);

  peft::io::SafetensorsFile file(path);
  CHECK(file.metadata() == kReferenceMetadata);
  const std::vector<std::string> dtype_names{"F64", "F32", "F16", "BF16", "I64", "I32",
                                             "I16", "I8",  "U8",  "BOOL", "F32", "F32"};
  REQUIRE(file.entries().size() == dtype_names.size());
  for (size_t i = 0; i < dtype_names.size(); ++i) {
    CHECK(file.entries()[i].dtype_name == dtype_names[i]);
    CHECK(file.dtype(want[i].first) == want[i].second.scalar_type());
    CHECK(file.shape(want[i].first) == want[i].second.sizes().vec());
  }
  const auto got = file.load_all();
  require_same_order(got, want);
  require_same(got, want);
  require_same_order(peft::io::load_safetensors(path), want);

  // Known values, not just "what went in came out".
  const auto i64 = file.tensor("t.i64");
  CHECK(i64[1][2].item<int64_t>() == std::numeric_limits<int64_t>::max());
  CHECK(file.tensor("t.bf16")[1][1].item<float>() == 1024.0f);
  CHECK(file.tensor("scalar").dim() == 0);
  CHECK(file.tensor("scalar").item<float>() == 3.5f);
}

TEST_CASE("empty tensors, scalars, no tensors and non-contiguous input", "[safetensors]") {
  TempDir dir;
  const auto path = dir.file("edge.safetensors");
  auto base = torch::arange(12, torch::kInt).reshape({3, 4});
  NamedTensors in{{"scalar_i64", torch::tensor(int64_t{-7})},
                  {"zero", torch::zeros({0})},
                  {"zero3d", torch::zeros({2, 0, 3}, torch::kShort)},
                  {"transposed", base.t()},
                  {"strided", base.slice(1, 0, 4, 2)}};
  peft::io::save_safetensors(path, in);
  peft::io::SafetensorsFile file(path);
  CHECK(file.metadata().empty());
  CHECK(file.shape("scalar_i64").empty());
  CHECK(file.tensor("scalar_i64").item<int64_t>() == -7);
  CHECK(file.tensor("zero").sizes() == torch::IntArrayRef{0});
  CHECK(file.tensor("zero3d").sizes() == torch::IntArrayRef{2, 0, 3});
  CHECK(file.tensor("zero3d").scalar_type() == torch::kShort);
  CHECK(torch::equal(
      file.tensor("transposed"),
      torch::tensor({0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11}, torch::kInt).reshape({4, 3})));
  CHECK(torch::equal(file.tensor("strided"),
                     torch::tensor({0, 2, 4, 6, 8, 10}, torch::kInt).reshape({3, 2})));

  const auto none = dir.file("none.safetensors");
  peft::io::save_safetensors(none, {}, {{"only", "metadata"}});
  peft::io::SafetensorsFile empty(none);
  CHECK(empty.size() == 0);
  CHECK(empty.metadata().at("only") == "metadata");
  // Header "{"__metadata__":{"only":"metadata"}}" is 36 bytes, padded to 40; no data.
  CHECK(read_bytes(none).size() == 8 + 40);
}

TEST_CASE("a hand-built file reads back the values its bytes spell", "[safetensors]") {
  TempDir dir;
  // Header order b, a is kept; a's F32 data start at byte 8 + 136 + 4, a multiple of 4.
  std::string header = R"({"b":{"dtype":"I16","shape":[2],"data_offsets":[0,4]},)"
                       R"("a":{"dtype":"F32","shape":[2,1],"data_offsets":[4,12]},)"
                       R"("__metadata__":{"k":"v"}})";
  REQUIRE(header.size() == 135);
  header.append(1, ' ');
  // I16 -2, 258; F32 1.5 (0x3FC00000), -2.0 (0xC0000000).
  const auto data = bytes({0xFE, 0xFF, 0x02, 0x01, 0x00, 0x00, 0xC0, 0x3F, 0x00, 0x00, 0x00, 0xC0});
  const auto path = dir.file("hand.safetensors");
  write_bytes(path, safetensors_bytes(header, data));

  peft::io::SafetensorsFile file(path);
  CHECK(file.names() == std::vector<std::string>{"b", "a"});
  CHECK(file.metadata() == std::map<std::string, std::string>{{"k", "v"}});
  CHECK(torch::equal(file.tensor("b"), torch::tensor({-2, 258}, torch::kShort)));
  CHECK(torch::equal(file.tensor("a"), torch::tensor({1.5f, -2.0f}).reshape({2, 1})));

  // A header of odd length puts the F32 data at an odd address: the reader copies instead.
  std::string odd = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} )";
  REQUIRE(odd.size() % 2 == 1);
  const auto odd_path = dir.file("odd.safetensors");
  write_bytes(odd_path, safetensors_bytes(odd, data.substr(4)));
  peft::io::SafetensorsFile odd_file(odd_path);
  const auto a = odd_file.tensor("a");
  CHECK(torch::equal(a, torch::tensor({1.5f, -2.0f})));
  const auto* begin = static_cast<const char*>(odd_file.mapped_data());
  const auto* p = static_cast<const char*>(a.data_ptr());
  CHECK_FALSE((p >= begin && p < begin + odd_file.mapped_size()));
}

TEST_CASE("the writer produces the exact bytes of a hand-built file", "[safetensors]") {
  TempDir dir;
  const auto path = dir.file("out.safetensors");
  // Given order u, x is the header order; the F32 data go first so that they stay aligned.
  peft::io::save_safetensors(
      path, {{"u", torch::tensor({1, 2, 255}, torch::kByte)}, {"x", torch::tensor({1.5f, -2.0f})}},
      {{"k", "v"}});
  std::string header = R"({"__metadata__":{"k":"v"},)"
                       R"("u":{"dtype":"U8","shape":[3],"data_offsets":[8,11]},)"
                       R"("x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  REQUIRE(header.size() == 132);
  header.append(4, ' ');
  const auto data = bytes({0x00, 0x00, 0xC0, 0x3F, 0x00, 0x00, 0x00, 0xC0, 0x01, 0x02, 0xFF});
  CHECK(read_bytes(path) == safetensors_bytes(header, data));
}

TEST_CASE("Python's safetensors reads what peft writes", "[safetensors]") {
  TempDir dir;
  const auto path = dir.file("from_cpp.safetensors");
  peft::io::save_safetensors(path, reference_tensors(), kReferenceMetadata);
  CHECK(run_python("check " + path) == 0);

  // The check must be able to fail: one changed value is reported.
  auto changed = reference_tensors();
  changed[1].second = changed[1].second.clone();
  changed[1].second[0][0] = 0.75f;
  const auto wrong = dir.file("wrong.safetensors");
  peft::io::save_safetensors(wrong, changed, kReferenceMetadata);
  CHECK(run_python("check " + wrong + " 2>/dev/null") == 1);
}

TEST_CASE("peft reads what Python's safetensors writes", "[safetensors]") {
  TempDir dir;
  const auto path = dir.file("from_python.safetensors");
  REQUIRE(run_python("write " + path) == 0);
  peft::io::SafetensorsFile file(path);
  CHECK(file.metadata() == kReferenceMetadata);
  require_same(file.load_all(), reference_tensors());
}

TEST_CASE("corrupt files are rejected with a message naming the file and the problem",
          "[safetensors]") {
  TempDir dir;
  const std::string entry_a = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::string eight(8, '\0');
  struct Case {
    std::string name;
    std::string bytes;
    std::string phrase;
    bool python_rejects;  // Python's safetensors also refuses the file
  };
  auto file = [&](const std::string& header, const std::string& data = std::string(8, '\0')) {
    return safetensors_bytes(header, data);
  };
  auto entry = [&](const std::string& body) { return file("{\"a\":{" + body + "}}"); };
  const std::vector<Case> cases{
      {"short", std::string("\x05\0\0\0\0", 5),
       "file is 5 bytes, shorter than the 8-byte header length", true},
      {"absurd_length", safetensors_bytes("{}", "", uint64_t{1} << 40),
       "header length 1099511627776 is absurd", true},
      {"length_past_end", safetensors_bytes("{}", "", 100),
       "header length 100 exceeds the 2 bytes that follow it", true},
      {"bad_utf8", file("{\"a\xff\":1}"), "header is not valid UTF-8 (byte 3)", true},
      {"bad_json", file("{\"a\": "), "header is not valid JSON", true},
      {"trailing_json", file("{} x"), "header is not valid JSON", true},
      {"empty_header", file(""), "header is not valid JSON", true},
      {"not_object", file("[1,2]"), "header is not a JSON object but array", true},
      {"entry_not_object", file(R"({"a":3})"), "tensor \"a\": entry is not an object but number",
       true},
      {"missing_dtype", entry(R"("shape":[2],"data_offsets":[0,8])"),
       "tensor \"a\": missing \"dtype\"", true},
      {"missing_shape", entry(R"("dtype":"F32","data_offsets":[0,8])"),
       "tensor \"a\": missing \"shape\"", true},
      {"missing_offsets", entry(R"("dtype":"F32","shape":[2])"),
       "tensor \"a\": missing \"data_offsets\"", true},
      {"dtype_number", entry(R"("dtype":5,"shape":[2],"data_offsets":[0,8])"),
       "tensor \"a\": \"dtype\" is not a string but 5", true},
      {"shape_not_array", entry(R"("dtype":"F32","shape":2,"data_offsets":[0,8])"),
       "tensor \"a\": \"shape\" must be an array of non-negative integers, got 2", true},
      {"shape_negative", entry(R"("dtype":"F32","shape":[-2],"data_offsets":[0,8])"),
       "\"shape\" must be an array of non-negative integers, got [-2]", true},
      {"shape_fraction", entry(R"("dtype":"F32","shape":[1.5],"data_offsets":[0,8])"),
       "\"shape\" must be an array of non-negative integers, got [1.5]", true},
      {"shape_string", entry(R"("dtype":"F32","shape":["2"],"data_offsets":[0,8])"),
       "\"shape\" must be an array of non-negative integers, got [\"2\"]", true},
      {"offsets_one", entry(R"("dtype":"F32","shape":[2],"data_offsets":[8])"),
       "tensor \"a\": \"data_offsets\" must be two non-negative integers [begin, end], got [8]",
       true},
      {"offsets_negative", entry(R"("dtype":"F32","shape":[2],"data_offsets":[-8,0])"),
       "\"data_offsets\" must be two non-negative integers [begin, end], got [-8,0]", true},
      {"offsets_float", entry(R"("dtype":"F32","shape":[2],"data_offsets":[0,8.0])"),
       "\"data_offsets\" must be two non-negative integers [begin, end], got [0,8.0]", true},
      {"dtype_f8", entry(R"("dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2])"),
       "tensor \"a\": unsupported dtype \"F8_E4M3\" (supported: F64, F32, F16, BF16", false},
      {"dtype_u16", entry(R"("dtype":"U16","shape":[2],"data_offsets":[0,4])"),
       "tensor \"a\": unsupported dtype \"U16\"", false},
      {"dtype_unknown", entry(R"("dtype":"f32","shape":[2],"data_offsets":[0,8])"),
       "tensor \"a\": unsupported dtype \"f32\"", true},
      {"begin_after_end", entry(R"("dtype":"F32","shape":[0],"data_offsets":[8,4])"),
       "tensor \"a\": data_offsets [8, 4] begin after end", true},
      {"end_past_buffer", entry(R"("dtype":"F32","shape":[4],"data_offsets":[0,16])"),
       "tensor \"a\": data_offsets [0, 16] end beyond the data buffer of 8 bytes", true},
      {"size_mismatch",
       file(R"({"a.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,12]}})",
            std::string(12, '\0')),
       "tensor \"a.weight\": data_offsets [0, 12] hold 12 bytes but shape [2, 3] of F32 needs 24",
       true},
      {"shape_overflow",
       entry(R"("dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8])"),
       "hold 8 bytes but shape [4294967296, 4294967296, 16] of F32 needs more than 2^64", true},
      {"overlap", file("{" + entry_a + R"(,"b":{"dtype":"I32","shape":[1],"data_offsets":[4,8]}})"),
       "tensor \"b\": data_offsets [4, 8] overlap tensor \"a\" [0, 8]", true},
      {"duplicate_name", file("{" + entry_a + "," + entry_a + "}"), "duplicate tensor name \"a\"",
       false},
      {"duplicate_field", entry(R"("dtype":"F32","dtype":"I8","shape":[2],"data_offsets":[0,8])"),
       "\"a\": duplicate key \"dtype\"", false},
      {"metadata_string", file(R"({"__metadata__":"x"})"),
       "\"__metadata__\" is not an object but string", true},
      {"metadata_number", file(R"({"__metadata__":{"k":1}})"),
       "\"__metadata__\" must map strings to strings; key \"k\" holds 1", true},
      {"deep", file(R"({"a":{"dtype":"F32","shape":[[[[[[[[[[2]]]]]]]]]],"data_offsets":[0,8]}})"),
       "header nests deeper than any tensor entry", true},
  };

  std::vector<std::string> python_rejects;
  for (const auto& c : cases) {
    INFO("case " << c.name);
    const auto path = dir.file(c.name + ".safetensors");
    write_bytes(path, c.bytes);
    if (c.python_rejects) python_rejects.push_back(path);
    try {
      peft::io::SafetensorsFile f(path);
      FAIL("accepted " << f.size() << " tensors");
    } catch (const peft::Error& e) {
      const std::string message = e.what();
      CHECK(message.rfind("[peft::safetensors] " + path + ": ", 0) == 0);
      CHECK_THAT(message, Catch::Contains(c.phrase));
    }
    CHECK_THROWS_AS(peft::io::load_safetensors(path), peft::Error);
  }
  CHECK_THROWS_WITH(peft::io::SafetensorsFile(dir.file("missing.safetensors")),
                    Catch::Contains("missing.safetensors: cannot open: No such file"));
  CHECK_THROWS_WITH(peft::io::SafetensorsFile(dir.path), Catch::Contains("not a regular file"));

  // The cases are corrupt for the reference implementation too (it tolerates repeated keys and
  // only knows other dtypes, so those are left out).
  std::string args = "reject";
  for (const auto& p : python_rejects) args += " " + p;
  CHECK(run_python(args) == 0);
}

TEST_CASE("asking for a tensor the file lacks names what it holds", "[safetensors]") {
  TempDir dir;
  const auto path = dir.file("two.safetensors");
  peft::io::save_safetensors(path, {{"alpha", torch::ones({1})}, {"beta", torch::ones({2})}});
  peft::io::SafetensorsFile file(path);
  CHECK(file.contains("beta"));
  CHECK_FALSE(file.contains("gamma"));
  CHECK_THROWS_WITH(file.tensor("gamma"),
                    "[peft::safetensors] " + path +
                        ": no tensor \"gamma\"; the file holds 2 tensors: alpha, beta");
}

TEST_CASE("save refuses bad input and never leaves a partial file", "[safetensors]") {
  TempDir dir;
  const auto path = dir.file("model.safetensors");
  peft::io::save_safetensors(path, {{"w", torch::ones({2, 2})}});
  const auto original = read_bytes(path);
  REQUIRE(original.size() > 8);
  auto only_original_left = [&] {
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(dir.path)) files.push_back(e.path());
    CHECK(files == std::vector<fs::path>{fs::path(path)});
    CHECK(read_bytes(path) == original);
  };

  SECTION("undefined tensor") {
    CHECK_THROWS_WITH(
        peft::io::save_safetensors(path, {{"w", torch::zeros({3})}, {"bad", torch::Tensor()}}),
        "[peft::safetensors] " + path + ": tensor \"bad\" is undefined");
  }
  SECTION("unsupported dtype") {
    CHECK_THROWS_WITH(
        peft::io::save_safetensors(path, {{"c", torch::zeros({2}, torch::kComplexFloat)}}),
        Catch::Contains("tensor \"c\": dtype ComplexFloat cannot be stored"));
  }
  SECTION("duplicate and reserved names") {
    CHECK_THROWS_WITH(
        peft::io::save_safetensors(path, {{"w", torch::zeros({1})}, {"w", torch::zeros({1})}}),
        Catch::Contains("duplicate tensor name \"w\""));
    CHECK_THROWS_WITH(peft::io::save_safetensors(path, {{"__metadata__", torch::zeros({1})}}),
                      Catch::Contains("\"__metadata__\" is reserved"));
    CHECK_THROWS_WITH(peft::io::save_safetensors(path, {{"bad\xff", torch::zeros({1})}}),
                      Catch::Contains("is not valid UTF-8"));
  }
  SECTION("a write that fails half-way") {
    // The file-size limit makes write() fail with EFBIG after the first 4 KiB.
    struct rlimit old {};
    REQUIRE(getrlimit(RLIMIT_FSIZE, &old) == 0);
    auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
    struct rlimit small = old;
    small.rlim_cur = 4096;
    REQUIRE(setrlimit(RLIMIT_FSIZE, &small) == 0);
    std::string message;
    try {
      peft::io::save_safetensors(path, {{"big", torch::ones({4096})}});
    } catch (const peft::Error& e) {
      message = e.what();
    }
    setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, old_handler);
    CHECK_THAT(message, Catch::StartsWith("[peft::safetensors] " + path + ": cannot write " + path +
                                          ".tmp-"));
    CHECK_THAT(message, Catch::Contains("File too large"));
  }
  only_original_left();

  const auto elsewhere = dir.file("no/such/folder/model.safetensors");
  CHECK_THROWS_WITH(peft::io::save_safetensors(elsewhere, {{"w", torch::ones({1})}}),
                    Catch::Contains(elsewhere + ": cannot create temporary file"));
  only_original_left();

  // A good save replaces the file as a whole.
  peft::io::save_safetensors(path, {{"w", torch::full({3}, 2.0)}});
  CHECK(torch::equal(peft::io::SafetensorsFile(path).tensor("w"), torch::full({3}, 2.0)));
}

TEST_CASE("aligned tensors are read without a copy and outlive the file object", "[safetensors]") {
  TempDir dir;
  const auto path = dir.file("mapped.safetensors");
  const auto values = torch::arange(6, torch::kFloat).reshape({2, 3});
  peft::io::save_safetensors(path, {{"u", torch::ones({3}, torch::kByte)}, {"w", values}});

  torch::Tensor w;
  {
    peft::io::SafetensorsFile file(path);
    w = file.tensor("w");
    const auto* begin = static_cast<const char*>(file.mapped_data());
    const auto* p = static_cast<const char*>(w.data_ptr());
    REQUIRE(p >= begin);
    REQUIRE(p + w.nbytes() <= begin + file.mapped_size());
    // Two reads of one name share the mapped bytes.
    CHECK(file.tensor("w").data_ptr() == w.data_ptr());
    CHECK(file.tensor("u").data_ptr() != nullptr);
  }
  CHECK(torch::equal(w, values));

  // The mapping is private: writing to the tensor never reaches the file.
  w.mul_(10);
  CHECK(torch::equal(w, values * 10));
  CHECK(torch::equal(peft::io::load_safetensors(path)[1].second, values));
}

namespace {

// Resident kilobytes of the mapping holding `addr`, from /proc/self/smaps (-1 when not found).
long mapping_rss_kb(const void* addr) {
  std::ifstream smaps("/proc/self/smaps");
  const auto a = reinterpret_cast<uintptr_t>(addr);
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    uintptr_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream range(line);
    if (range >> std::hex >> lo >> dash >> hi && dash == '-') {
      inside = a >= lo && a < hi;
    } else if (inside && line.rfind("Rss:", 0) == 0) {
      return std::stol(line.substr(4));
    }
  }
  return -1;
}

}  // namespace

TEST_CASE("copy_to fills a tensor slice by slice and hands the copied pages back",
          "[safetensors]") {
  TempDir dir;
  const auto path = dir.file("big.safetensors");
  const auto big = torch::arange(1 << 20, torch::kFloat).reshape({1024, 1024});  // 4 MiB
  const auto half = torch::linspace(-2, 2, 999).to(torch::kHalf);
  peft::io::save_safetensors(path,
                             {{"u", torch::ones({3}, torch::kByte)}, {"big", big}, {"half", half}});
  peft::io::SafetensorsFile file(path);
  // Every page of the big tensor read: the mapping holds them.
  CHECK(file.tensor("big").sum().item<double>() == big.sum().item<double>());
  const long before = mapping_rss_kb(file.mapped_data());
  REQUIRE(before >= 4096);
  auto target = torch::empty({1024, 1024});
  file.copy_to("big", target, /*chunk_bytes=*/64 << 10);
  CHECK(torch::equal(target, big));
  // Only the pages the big tensor shares with its neighbours (and the header's) stay resident.
  CHECK(mapping_rss_kb(file.mapped_data()) <= 64);
  // Read again, the values come from the file.
  CHECK(torch::equal(file.tensor("big"), big));
  // Converted to the target's dtype, whatever the chunk size.
  auto wide = torch::empty({999}, torch::kDouble);
  file.copy_to("half", wide, 100);
  CHECK(torch::equal(wide, half.to(torch::kDouble)));
  CHECK_THROWS_WITH(file.copy_to("big", torch::empty({1024, 1023})),
                    Catch::Contains("big.safetensors") &&
                        Catch::Contains("tensor \"big\" (1048576 elements) cannot be copied into "
                                        "a tensor of shape [1024, 1023]"));
  CHECK_THROWS_WITH(file.copy_to("big", torch::empty({1024, 1024}).t()),
                    Catch::Contains("into a non-contiguous tensor"));
}

TEST_CASE("every truncation and every flipped byte fails cleanly or still loads", "[safetensors]") {
  TempDir dir;
  const auto good = dir.file("good.safetensors");
  peft::io::save_safetensors(good,
                             {{"w", torch::arange(6, torch::kFloat).reshape({2, 3})},
                              {"i", torch::tensor({-1, 2}, torch::kShort)}},
                             {{"k", "v"}});
  const auto original = read_bytes(good);
  const auto path = dir.file("damaged.safetensors");

  for (size_t size = 0; size < original.size(); ++size) {
    INFO("truncated to " << size << " bytes");
    write_bytes(path, original.substr(0, size));
    CHECK_THROWS_AS(peft::io::SafetensorsFile(path), peft::Error);
  }
  // A flipped byte may leave a valid file (a changed value, a renamed tensor); it must never
  // produce anything but a full load or a peft::Error.
  size_t rejected = 0;
  for (size_t at = 0; at < original.size(); ++at) {
    INFO("byte " << at << " flipped");
    auto damaged = original;
    damaged[at] = static_cast<char>(damaged[at] ^ 0xFF);
    write_bytes(path, damaged);
    try {
      peft::io::SafetensorsFile file(path);
      CHECK(file.load_all().size() == 2);
    } catch (const peft::Error&) {
      ++rejected;
    }
  }
  // Flipping an ASCII header byte always breaks UTF-8 and any length byte breaks the length, so
  // exactly the 28 data bytes (6 floats, 2 shorts) survive a flip.
  CHECK(rejected == original.size() - 28);
}
