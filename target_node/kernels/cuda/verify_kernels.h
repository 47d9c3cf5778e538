// Launchers for the CUDA verify kernels (raw pointers, so the .cu files need no torch headers).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

void launch_tree_greedy_verify(const float* logits, const int32_t* parents, const int32_t* tokens,
                               const int32_t* num_nodes, int32_t* argmax, int8_t* accepted,
                               int32_t* path_end, int32_t* path_length, int batch, int rows,
                               int vocab, int width, cudaStream_t stream);

void launch_tree_rejection_sample(const float* probs, const int32_t* parents, const int32_t* tokens,
                                  const int32_t* num_nodes, const int32_t* q_tokens,
                                  const float* q_probs, const float* accept_uniforms,
                                  const float* sample_uniforms, float* residual, int32_t* path_end,
                                  int32_t* path_length, int32_t* next_token, int batch, int rows,
                                  int vocab, int width, int support, cudaStream_t stream);

void launch_compact_kv(const int64_t* tensor_ptrs, int num_tensors, int element_size, int64_t heads,
                       int64_t seq_len, int64_t head_dim, const int32_t* src, int num_src,
                       int dst_start, cudaStream_t stream);
