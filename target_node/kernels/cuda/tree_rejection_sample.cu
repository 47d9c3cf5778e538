// Tree rejection sampling: one block per request. The walk down the trie is sequential, so the
// decisions are taken by thread 0 and broadcast through shared memory; the O(vocab) steps (row
// copy, sums, the final inverse-CDF search) are spread over the block.
#include "verify_kernels.h"

namespace {

constexpr int kThreads = 256;

__device__ float block_sum(float value, float* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  float total = scratch[0];
  __syncthreads();
  return total;
}

// residual <- row; returns the row's mass
__device__ float copy_row(const float* row, float* residual, int vocab, float* scratch) {
  float partial = 0.f;
  for (int v = threadIdx.x; v < vocab; v += kThreads) {
    residual[v] = row[v];
    partial += row[v];
  }
  return block_sum(partial, scratch);
}

// First index whose cumulative weight exceeds u * total; each thread owns one contiguous chunk.
__device__ int inverse_cdf(const float* weights, float u, int vocab, float* scratch) {
  __shared__ int chosen;
  const int chunk = (vocab + kThreads - 1) / kThreads;
  const int begin = min(vocab, static_cast<int>(threadIdx.x) * chunk);
  const int end = min(vocab, begin + chunk);
  float partial = 0.f;
  for (int v = begin; v < end; ++v) partial += weights[v];
  scratch[threadIdx.x] = partial;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int t = 0; t < kThreads; ++t) total += scratch[t];
    const float threshold = u * total;
    float running = 0.f;
    chosen = -1;
    int last_positive = 0;
    for (int t = 0; t < kThreads && chosen < 0; ++t) {
      if (running + scratch[t] > threshold) {
        for (int v = min(vocab, t * chunk); v < min(vocab, (t + 1) * chunk); ++v) {
          running += weights[v];
          if (running > threshold) {
            chosen = v;
            break;
          }
        }
      } else {
        running += scratch[t];
      }
    }
    if (chosen < 0) {
      for (int v = vocab - 1; v >= 0; --v) {
        if (weights[v] > 0.f) {
          last_positive = v;
          break;
        }
      }
      chosen = last_positive;
    }
  }
  __syncthreads();
  return chosen;
}

__global__ void tree_rejection_sample_kernel(
    const float* __restrict__ probs, const int32_t* __restrict__ parents,
    const int32_t* __restrict__ tokens, const int32_t* __restrict__ num_nodes,
    const int32_t* __restrict__ q_tokens, const float* __restrict__ q_probs,
    const float* __restrict__ accept_uniforms, const float* __restrict__ sample_uniforms,
    float* residual_all, int32_t* path_end, int32_t* path_length, int32_t* next_token, int rows,
    int vocab, int width, int support) {
  __shared__ float scratch[kThreads];
  __shared__ int child_shared;
  __shared__ int accept_shared;
  const int b = blockIdx.x;
  const int n = num_nodes[b];
  const float* request_rows = probs + static_cast<int64_t>(b) * rows * vocab;
  float* residual = residual_all + static_cast<int64_t>(b) * vocab;
  const int32_t* tree_parents = parents + b * width;

  float mass = copy_row(request_rows, residual, vocab, scratch);
  int node = -1, length = 0, after = -1;
  while (true) {
    if (threadIdx.x == 0) {
      child_shared = -1;
      for (int i = after + 1; i < n; ++i) {
        if (tree_parents[i] == node) {
          child_shared = i;
          break;
        }
      }
    }
    __syncthreads();
    const int child = child_shared;
    if (child < 0) break;
    after = child;
    const int32_t* child_q_tokens = q_tokens + (static_cast<int64_t>(b) * width + child) * support;
    const float* child_q_probs = q_probs + (static_cast<int64_t>(b) * width + child) * support;
    if (threadIdx.x == 0) {
      const int token = tokens[b * width + child];
      float q_x = 0.f;
      for (int s = 0; s < support; ++s) q_x += child_q_tokens[s] == token ? child_q_probs[s] : 0.f;
      accept_shared = __fmul_rn(__fmul_rn(accept_uniforms[b * width + child], q_x), mass) < residual[token];
      if (!accept_shared) {  // residual <- max(residual - mass * q, 0) on q's support
        float removed = 0.f;
        for (int s = 0; s < support; ++s) {
          if (child_q_tokens[s] < 0) continue;
          const float old = residual[child_q_tokens[s]];
          removed += old - fmaxf(__fsub_rn(old, __fmul_rn(mass, child_q_probs[s])), 0.f);
        }
        if (mass - removed > 0.f) {
          for (int s = 0; s < support; ++s) {
            if (child_q_tokens[s] < 0) continue;
            float& value = residual[child_q_tokens[s]];
            value = fmaxf(__fsub_rn(value, __fmul_rn(mass, child_q_probs[s])), 0.f);
          }
          scratch[0] = mass - removed;
        } else {
          scratch[0] = mass;
        }
      }
    }
    __syncthreads();
    if (accept_shared) {
      node = child;
      ++length;
      mass = copy_row(request_rows + static_cast<int64_t>(child + 1) * vocab, residual, vocab, scratch);
    } else {
      mass = scratch[0];
      __syncthreads();
    }
  }
  const int token = inverse_cdf(residual, sample_uniforms[b], vocab, scratch);
  if (threadIdx.x == 0) {
    path_end[b] = node;
    path_length[b] = length;
    next_token[b] = token;
  }
}

}  // namespace

void launch_tree_rejection_sample(const float* probs, const int32_t* parents, const int32_t* tokens,
                                  const int32_t* num_nodes, const int32_t* q_tokens,
                                  const float* q_probs, const float* accept_uniforms,
                                  const float* sample_uniforms, float* residual, int32_t* path_end,
                                  int32_t* path_length, int32_t* next_token, int batch, int rows,
                                  int vocab, int width, int support, cudaStream_t stream) {
  tree_rejection_sample_kernel<<<batch, kThreads, 0, stream>>>(
      probs, parents, tokens, num_nodes, q_tokens, q_probs, accept_uniforms, sample_uniforms,
      residual, path_end, path_length, next_token, rows, vocab, width, support);
}
