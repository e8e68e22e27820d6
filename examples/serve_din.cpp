// din_ops_serve: scores one request with an AOTInductor package of DIN.serving(), without Python.
//
//   python examples/serve_din.py --out /tmp/din.pt2     # makes the package
//   build/din_ops_serve /tmp/din.pt2 C T                # C candidates, T behaviours
//
// The request is examples/serve_din.py's request(C, T), built from the vocabulary sizes that
// serve_din.py stores in the package metadata (num_items, num_categories, user_fields):
//
//   users[0, f]           = 1 + f % user_fields[f]
//   items[c]              = 1 + (7 * c) % num_items          categories[c]         = 1 + (3 * c) % num_categories
//   hist_items[0, t]      = 1 + (5 * t + 2) % num_items      hist_categories[0, t] = 1 + (2 * t + 1) % num_categories
//   lengths[0]            = T - T / 3
//
// and the C logits are printed one a line (%.9g). The package calls din_ops:: operators, which
// libdin_ops.so registers from its static initializers: this program links the CMake target
// din_ops, whose --no-as-needed keeps the library although no symbol of it is referenced.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cstdio>
#include <exception>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using Metadata = std::unordered_map<std::string, std::string>;

const std::string& meta(const Metadata& m, const std::string& key) {
  auto it = m.find(key);
  if (it == m.end())
    throw std::runtime_error("the package metadata has no '" + key + "' (make the package with examples/serve_din.py)");
  return it->second;
}

std::vector<int64_t> user_fields(const std::string& s) {  // "50,3" -> {50, 3}; "" -> {}
  std::vector<int64_t> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');)
    out.push_back(std::stoll(item));
  return out;
}

std::vector<at::Tensor> request(int64_t C, int64_t T, int64_t num_items, int64_t num_categories,
                                const std::vector<int64_t>& fields) {
  auto opts = at::TensorOptions().dtype(at::kLong);
  const int64_t F = static_cast<int64_t>(fields.size());
  at::Tensor users = at::empty({1, F}, opts), items = at::empty({C}, opts), categories = at::empty({C}, opts);
  at::Tensor hist_items = at::empty({1, T}, opts), hist_categories = at::empty({1, T}, opts);
  for (int64_t f = 0; f < F; ++f) users.data_ptr<int64_t>()[f] = 1 + f % fields[f];
  for (int64_t c = 0; c < C; ++c) {
    items.data_ptr<int64_t>()[c] = 1 + (7 * c) % num_items;
    categories.data_ptr<int64_t>()[c] = 1 + (3 * c) % num_categories;
  }
  for (int64_t t = 0; t < T; ++t) {
    hist_items.data_ptr<int64_t>()[t] = 1 + (5 * t + 2) % num_items;
    hist_categories.data_ptr<int64_t>()[t] = 1 + (2 * t + 1) % num_categories;
  }
  at::Tensor lengths = at::full({1}, T - T / 3, opts);
  return {users, items, categories, hist_items, hist_categories, lengths};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s PACKAGE.pt2 C T   (C candidates >= 1, T behaviours >= 1)\n", argv[0]);
    return 2;
  }
  try {
    const int64_t C = std::stoll(argv[2]), T = std::stoll(argv[3]);
    if (C < 1 || T < 1) throw std::invalid_argument("C and T must be >= 1");
    c10::InferenceMode no_autograd;
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    const Metadata m = loader.get_metadata();
    std::vector<at::Tensor> out = loader.run(request(C, T, std::stoll(meta(m, "num_items")),
                                                     std::stoll(meta(m, "num_categories")),
                                                     user_fields(meta(m, "user_fields"))));
    at::Tensor logits = out.at(0).to(at::kFloat).contiguous();
    if (logits.numel() != C) throw std::runtime_error("expected " + std::to_string(C) + " logits");
    for (int64_t c = 0; c < C; ++c) std::printf("%.9g\n", logits.data_ptr<float>()[c]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "din_ops_serve: %s\n", e.what());
    return 1;
  }
  return 0;
}
