// Python bindings of the CPU kernels (gguf_matmul.cpp, decoder_ops.cpp): one extension module.
#include <torch/extension.h>

#include <vector>

torch::Tensor gguf_repack(torch::Tensor blocks, int64_t type, int64_t k);
std::vector<torch::Tensor> gguf_linear(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<int64_t> types,
                                       std::vector<int64_t> out_features, std::vector<c10::optional<torch::Tensor>> biases);
torch::Tensor gguf_dequantize_rows(torch::Tensor blocks, int64_t type, int64_t k, torch::Tensor ids);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor attention_step(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                             torch::Tensor k_cache, torch::Tensor v_cache, int64_t prefix,
                             c10::optional<torch::Tensor> visible);
torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gguf_repack", &gguf_repack, "regroup a GGUF matrix's blocks for gguf_linear", py::arg("blocks"), py::arg("type"),
        py::arg("in_features"));
  m.def("gguf_linear", &gguf_linear, "x @ W_i^T (+ b_i) for repacked GGUF weights sharing x", py::arg("x"),
        py::arg("weights"), py::arg("types"), py::arg("out_features"), py::arg("biases"));
  m.def("gguf_dequantize_rows", &gguf_dequantize_rows, "rows of a GGUF matrix (file layout) as float32",
        py::arg("blocks"), py::arg("type"), py::arg("in_features"), py::arg("ids"));
  m.def("rms_norm", &rms_norm, "RMSNorm per row", py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("attention_step", &attention_step, "RoPE, KV write and attention of one layer for one sequence's new rows",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("prefix"), py::arg("visible") = py::none());
  m.def("silu_mul", &silu_mul, "silu(gate) * up, elementwise", py::arg("gate"), py::arg("up"));
}
