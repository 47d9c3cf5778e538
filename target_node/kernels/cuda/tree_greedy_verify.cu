// Tree greedy verify: one block per request; each warp takes rows and reduces their argmax with
// shuffles, then every thread judges nodes and walks their ancestors; thread 0 picks the path.
#include "verify_kernels.h"

#include <cfloat>

namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

__device__ void better(float& value, int& index, float other_value, int other_index) {
  // larger value wins; on ties the lower index (torch.argmax returns the first maximum)
  if (other_value > value || (other_value == value && other_index < index)) {
    value = other_value;
    index = other_index;
  }
}

__global__ void tree_greedy_verify_kernel(const float* __restrict__ logits,
                                          const int32_t* __restrict__ parents,
                                          const int32_t* __restrict__ tokens,
                                          const int32_t* __restrict__ num_nodes, int32_t* argmax,
                                          int8_t* accepted, int32_t* path_end, int32_t* path_length,
                                          int rows, int vocab, int width) {
  extern __shared__ int32_t shared[];  // reach[width], depth[width]
  int32_t* reach = shared;
  int32_t* depth = shared + width;
  const int b = blockIdx.x;
  const int n = num_nodes[b];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;

  for (int r = warp; r < rows; r += kThreads / kWarp) {
    const float* row = logits + (static_cast<int64_t>(b) * rows + r) * vocab;
    float value = -FLT_MAX;
    int index = vocab;
    for (int v = lane; v < vocab; v += kWarp) better(value, index, row[v], v);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      float other_value = __shfl_down_sync(0xffffffff, value, offset);
      int other_index = __shfl_down_sync(0xffffffff, index, offset);
      better(value, index, other_value, other_index);
    }
    if (lane == 0) argmax[b * rows + r] = index < vocab ? index : 0;
  }
  __syncthreads();

  const int32_t* tree_parents = parents + b * width;
  const int32_t* tree_tokens = tokens + b * width;
  const int32_t* row_argmax = argmax + b * rows;
  for (int i = threadIdx.x; i < width; i += kThreads) {
    bool ok = i < n && tree_tokens[i] == row_argmax[tree_parents[i] + 1];
    accepted[b * width + i] = ok;
    int d = i < n;
    for (int up = i < n ? tree_parents[i] : -1; up >= 0 && ok; up = tree_parents[up]) {
      ok = tree_tokens[up] == row_argmax[tree_parents[up] + 1];
      ++d;
    }
    reach[i] = ok;
    depth[i] = d;
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    int best = -1, best_depth = 0;
    for (int i = 0; i < n; ++i) {
      if (reach[i] && depth[i] > best_depth) {
        best = i;
        best_depth = depth[i];
      }
    }
    path_end[b] = best;
    path_length[b] = best_depth;
  }
}

}  // namespace

void launch_tree_greedy_verify(const float* logits, const int32_t* parents, const int32_t* tokens,
                               const int32_t* num_nodes, int32_t* argmax, int8_t* accepted,
                               int32_t* path_end, int32_t* path_length, int batch, int rows,
                               int vocab, int width, cudaStream_t stream) {
  const size_t shared_bytes = 2 * sizeof(int32_t) * static_cast<size_t>(width);
  tree_greedy_verify_kernel<<<batch, kThreads, shared_bytes, stream>>>(
      logits, parents, tokens, num_nodes, argmax, accepted, path_end, path_length, rows, vocab,
      width);
}
