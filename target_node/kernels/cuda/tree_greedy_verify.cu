// Tree greedy verify in two launches: one block per (request, row) reduces that row's argmax (a
// row is 600 KB at a 152k vocabulary: rows must run on many SMs at once, not one after another in
// one block), then one block per request judges nodes, walks their ancestors and picks the path.
#include "verify_kernels.h"

#include <cmath>

namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

// services.sampling.top1's rule: NaN counts as -inf, the larger value wins, on ties the lower index
// (so a row with no number at all gives index 0).
__device__ void better(float& value, int& index, float other_value, int other_index) {
  if (isnan(other_value)) other_value = -INFINITY;
  if (other_value > value || (other_value == value && other_index < index)) {
    value = other_value;
    index = other_index;
  }
}

__device__ void warp_best(float& value, int& index) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    float other_value = __shfl_down_sync(0xffffffff, value, offset);
    int other_index = __shfl_down_sync(0xffffffff, index, offset);
    better(value, index, other_value, other_index);
  }
}

__global__ void row_argmax_kernel(const float* __restrict__ logits, int32_t* argmax, int rows,
                                  int vocab) {
  __shared__ float warp_value[kThreads / kWarp];
  __shared__ int warp_index[kThreads / kWarp];
  const int64_t row = static_cast<int64_t>(blockIdx.y) * rows + blockIdx.x;
  const float* x = logits + row * vocab;
  float value = -INFINITY;
  int index = vocab;
  for (int v = threadIdx.x; v < vocab; v += kThreads) better(value, index, x[v], v);
  warp_best(value, index);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) {
    warp_value[warp] = value;
    warp_index[warp] = index;
  }
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / kWarp ? warp_value[lane] : -INFINITY;
    index = lane < kThreads / kWarp ? warp_index[lane] : vocab;
    warp_best(value, index);
    if (lane == 0) argmax[row] = index < vocab ? index : 0;  // an empty row (vocab 0)
  }
}

__global__ void tree_paths_kernel(const int32_t* __restrict__ parents,
                                  const int32_t* __restrict__ tokens,
                                  const int32_t* __restrict__ num_nodes,
                                  const int32_t* __restrict__ argmax, int8_t* accepted,
                                  int32_t* path_end, int32_t* path_length, int rows, int width) {
  extern __shared__ int32_t shared[];  // reach[width], depth[width]
  int32_t* reach = shared;
  int32_t* depth = shared + width;
  const int b = blockIdx.x;
  const int n = num_nodes[b];

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
  if (rows > 0 && batch > 0) {
    row_argmax_kernel<<<dim3(rows, batch), kThreads, 0, stream>>>(logits, argmax, rows, vocab);
  }
  const size_t shared_bytes = 2 * sizeof(int32_t) * static_cast<size_t>(width);
  tree_paths_kernel<<<batch, kThreads, shared_bytes, stream>>>(
      parents, tokens, num_nodes, argmax, accepted, path_end, path_length, rows, width);
}
