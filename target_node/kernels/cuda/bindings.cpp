// Python bindings for the CUDA verify kernels: checks arguments, then calls the launchers.
// The caller passes the current CUDA stream and has made the tensors' device current, so this file
// needs only torch's CPU headers.
#include <torch/extension.h>

#include "verify_kernels.h"

namespace {

void check(const torch::Tensor& t, torch::ScalarType type, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == type, name, " has dtype ", t.scalar_type(), ", expected ", type);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void tree_greedy_verify(torch::Tensor logits, torch::Tensor parents, torch::Tensor tokens,
                        torch::Tensor num_nodes, torch::Tensor argmax, torch::Tensor accepted,
                        torch::Tensor path_end, torch::Tensor path_length, int64_t stream) {
  check(logits, torch::kFloat32, "logits");
  for (auto* t : {&parents, &tokens, &num_nodes, &argmax, &path_end, &path_length}) check(*t, torch::kInt32, "int tensor");
  check(accepted, torch::kInt8, "accepted");
  launch_tree_greedy_verify(logits.data_ptr<float>(), parents.data_ptr<int32_t>(), tokens.data_ptr<int32_t>(),
                            num_nodes.data_ptr<int32_t>(), argmax.data_ptr<int32_t>(),
                            accepted.data_ptr<int8_t>(), path_end.data_ptr<int32_t>(),
                            path_length.data_ptr<int32_t>(), logits.size(0), logits.size(1),
                            logits.size(2), parents.size(1), reinterpret_cast<cudaStream_t>(stream));
}

void tree_rejection_sample(torch::Tensor probs, torch::Tensor parents, torch::Tensor tokens,
                           torch::Tensor num_nodes, torch::Tensor q_tokens, torch::Tensor q_probs,
                           torch::Tensor accept_uniforms, torch::Tensor sample_uniforms,
                           torch::Tensor residual, torch::Tensor path_end, torch::Tensor path_length,
                           torch::Tensor next_token, int64_t stream) {
  for (auto* t : {&probs, &q_probs, &accept_uniforms, &sample_uniforms, &residual}) check(*t, torch::kFloat32, "float tensor");
  for (auto* t : {&parents, &tokens, &num_nodes, &q_tokens, &path_end, &path_length, &next_token}) check(*t, torch::kInt32, "int tensor");
  launch_tree_rejection_sample(
      probs.data_ptr<float>(), parents.data_ptr<int32_t>(), tokens.data_ptr<int32_t>(),
      num_nodes.data_ptr<int32_t>(), q_tokens.data_ptr<int32_t>(), q_probs.data_ptr<float>(),
      accept_uniforms.data_ptr<float>(), sample_uniforms.data_ptr<float>(), residual.data_ptr<float>(),
      path_end.data_ptr<int32_t>(), path_length.data_ptr<int32_t>(), next_token.data_ptr<int32_t>(),
      probs.size(0), probs.size(1), probs.size(2), parents.size(1), q_tokens.size(2),
      reinterpret_cast<cudaStream_t>(stream));
}

void compact_kv(torch::Tensor tensor_ptrs, int64_t element_size, int64_t heads, int64_t seq_len,
                int64_t head_dim, torch::Tensor src, int64_t dst_start, int64_t stream) {
  check(tensor_ptrs, torch::kInt64, "tensor_ptrs");
  check(src, torch::kInt32, "src");
  TORCH_CHECK(element_size == 2 || element_size == 4, "KV element size must be 2 or 4 bytes");
  launch_compact_kv(tensor_ptrs.data_ptr<int64_t>(), tensor_ptrs.size(0), element_size, heads, seq_len,
                    head_dim, src.data_ptr<int32_t>(), src.size(0), dst_start,
                    reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tree_greedy_verify", &tree_greedy_verify);
  m.def("tree_rejection_sample", &tree_rejection_sample);
  m.def("compact_kv", &compact_kv);
}
