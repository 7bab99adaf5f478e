// A decode step of a whole Llama-family decoder stack in one call, for fp32 activations on the C++
// kernels (the cpp backend with fp32, int8 or int4 linears).
//
// At batch 1 a layer is ten kernels of a few to a few hundred microseconds each; run from Python,
// every one also paid a module call, attribute reads, views and the GIL (a fifth of an int4 step on
// the 2-core dev VM: docs/benchmarks.md). Here the same kernels run back to back from C++, with the GIL
// released for the whole stack. Each op is the very function the per-module path calls (same
// arithmetic, so the two paths agree bit for bit); only the Python between them is gone.
//
// DecodeStack owns references to every layer's weights (the modules' own tensors, no copies) and to
// the paged K/V caches (set_caches). Invariant: the model's modules are neither moved nor converted
// after the stack is built (LlamaForCausalLM.bind builds it last, and again on a new bind).
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "parallel.h"

namespace py = pybind11;

// The kernels of cpu_kernels.cpp, paged_attention.cpp and quant_gemv.cpp.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor add_rms_norm_(const torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& weight, double eps);
void rotary_(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads);
torch::Tensor silu_mul(const torch::Tensor& x);
torch::Tensor int8_gemv(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& scales, int64_t n);
torch::Tensor f32_gemv(const torch::Tensor& x, const torch::Tensor& weight);
torch::Tensor q4_gemv(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& scales,
                      const torch::Tensor& mins, int64_t group_size, int64_t n);
void write_kv(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_cache, torch::Tensor& v_cache,
              const torch::Tensor& slot_mapping);
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale);

namespace {

// One linear's decode kernel and operands: what CppF32Linear, CppInt8Linear and CppInt4Linear run
// for a few rows (their ``decode_linear()``).
struct DecodeLinear {
  enum Kind { kF32, kInt8, kQ4 } kind = kF32;
  torch::Tensor weight, scales, mins;  // f32: weight; int8: qs, scales; q4: qs, scales, mins
  int64_t group_size = 0, out_features = 0;  // int8 and q4
  c10::optional<torch::Tensor> bias;

  torch::Tensor operator()(const torch::Tensor& x) const {
    torch::Tensor y;
    switch (kind) {
      case kF32: y = f32_gemv(x, weight); break;
      case kInt8: y = int8_gemv(x, weight, scales, out_features); break;
      case kQ4: y = q4_gemv(x, weight, scales, mins, group_size, out_features); break;
    }
    if (bias) y.add_(*bias);
    return y;
  }
};

struct DecodeLayer {
  torch::Tensor input_norm, post_norm;
  DecodeLinear qkv, o, gate_up, down;
};

class DecodeStack {
 public:
  DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scale, torch::Tensor final_norm)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), eps_(eps), scale_(scale),
        final_norm_(std::move(final_norm)) {
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0, "bad head configuration");
  }

  void add_layer(torch::Tensor input_norm, DecodeLinear qkv, DecodeLinear o, torch::Tensor post_norm,
                 DecodeLinear gate_up, DecodeLinear down) {
    layers_.push_back({std::move(input_norm), std::move(post_norm), std::move(qkv), std::move(o), std::move(gate_up),
                       std::move(down)});
  }

  void set_caches(std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches) {
    TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(),
                "one K and one V cache per layer");
    k_caches_ = std::move(k_caches);
    v_caches_ = std::move(v_caches);
    caches_set_ = true;
  }

  // x [T, hidden] fp32 (the embeddings of the step's decode rows; consumed: it becomes the residual
  // stream), cos/sin [T, head_dim], and the decode rows' slots, block tables and context lengths ->
  // the final norm's output [T, hidden], as LlamaForCausalLM.forward returns it.
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
                        const torch::Tensor& context_lens) {
    TORCH_CHECK(caches_set_ && !layers_.empty(), "add the layers, then set_caches first");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [T, hidden] tensor");
    const int64_t T = x.size(0), qkv_heads = heads_ + 2 * kv_heads_;
    const kubeinfer::DecodeStackScope on_the_pool;  // the norms, rotary, SwiGLU and attention beside the GEMVs
    torch::Tensor residual = x, h;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const DecodeLayer& L = layers_[i];
      h = i == 0 ? rms_norm(x, L.input_norm, eps_) : add_rms_norm_(x, residual, L.input_norm, eps_);
      torch::Tensor qkv = L.qkv(h).view({T, qkv_heads, head_dim_});
      rotary_(qkv, cos, sin, heads_ + kv_heads_);  // q and k heads are adjacent
      const torch::Tensor q = qkv.narrow(1, 0, heads_), k = qkv.narrow(1, heads_, kv_heads_),
                          v = qkv.narrow(1, heads_ + kv_heads_, kv_heads_);
      write_kv(k, v, k_caches_[i], v_caches_[i], slot_mapping);
      const torch::Tensor attn = decode_attention(q, k_caches_[i], v_caches_[i], block_tables, context_lens, scale_);
      h = add_rms_norm_(L.o(attn.view({T, heads_ * head_dim_})), residual, L.post_norm, eps_);
      x = L.down(silu_mul(L.gate_up(h)));
    }
    return add_rms_norm_(x, residual, final_norm_, eps_);
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  int64_t heads_, kv_heads_, head_dim_;
  double eps_, scale_;
  torch::Tensor final_norm_;
  std::vector<DecodeLayer> layers_;
  std::vector<torch::Tensor> k_caches_, v_caches_;
  bool caches_set_ = false;
};

DecodeLinear make_linear(DecodeLinear::Kind kind, torch::Tensor weight, torch::Tensor scales, torch::Tensor mins,
                         int64_t group_size, int64_t out_features, c10::optional<torch::Tensor> bias) {
  DecodeLinear l;
  l.kind = kind;
  l.weight = std::move(weight);
  l.scales = std::move(scales);
  l.mins = std::move(mins);
  l.group_size = group_size;
  l.out_features = out_features;
  l.bias = std::move(bias);
  return l;
}

}  // namespace

void register_decode_stack(py::module& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  py::class_<DecodeLinear>(m, "DecodeLinear", "one linear's decode kernel and operands")
      .def_static("f32", [](torch::Tensor w, c10::optional<torch::Tensor> bias) {
        return make_linear(DecodeLinear::kF32, std::move(w), {}, {}, 0, 0, std::move(bias));
      }, py::arg("weight"), py::arg("bias") = py::none())
      .def_static("int8", [](torch::Tensor qs, torch::Tensor scales, int64_t n, c10::optional<torch::Tensor> bias) {
        return make_linear(DecodeLinear::kInt8, std::move(qs), std::move(scales), {}, 0, n, std::move(bias));
      }, py::arg("qs"), py::arg("scales"), py::arg("n"), py::arg("bias") = py::none())
      .def_static("q4", [](torch::Tensor qs, torch::Tensor scales, torch::Tensor mins, int64_t group_size,
                           int64_t n, c10::optional<torch::Tensor> bias) {
        return make_linear(DecodeLinear::kQ4, std::move(qs), std::move(scales), std::move(mins), group_size, n,
                           std::move(bias));
      }, py::arg("qs"), py::arg("scales"), py::arg("mins"), py::arg("group_size"), py::arg("n"),
         py::arg("bias") = py::none())
      .def("__call__", &DecodeLinear::operator(), py::arg("x"), nogil);
  py::class_<DecodeStack>(m, "DecodeStack", "a Llama-family decoder stack's decode step in one call")
      .def(py::init<int64_t, int64_t, int64_t, double, double, torch::Tensor>(), py::arg("heads"),
           py::arg("kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("scale"), py::arg("final_norm"))
      .def("add_layer", &DecodeStack::add_layer, py::arg("input_norm"), py::arg("qkv"), py::arg("o"),
           py::arg("post_norm"), py::arg("gate_up"), py::arg("down"))
      .def("set_caches", &DecodeStack::set_caches, py::arg("k_caches"), py::arg("v_caches"))
      .def("forward", &DecodeStack::forward, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("slot_mapping"),
           py::arg("block_tables"), py::arg("context_lens"), nogil)
      .def_property_readonly("num_layers", &DecodeStack::num_layers);
}
