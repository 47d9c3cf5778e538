// KV compaction: every layer's K and V in one launch, one block per (tensor, head). Each thread
// owns fixed elements of the head dimension and copies rows in ascending order, so a write never
// lands on a source row that is still to be read (src[j] >= dst_start + j).
#include "verify_kernels.h"

namespace {

template <typename T>
__global__ void compact_kv_kernel(const int64_t* __restrict__ tensor_ptrs, int64_t seq_len,
                                  int64_t head_dim, const int32_t* __restrict__ src, int num_src,
                                  int dst_start) {
  T* base = reinterpret_cast<T*>(tensor_ptrs[blockIdx.x]) + blockIdx.y * seq_len * head_dim;
  for (int j = 0; j < num_src; ++j) {
    const T* from = base + static_cast<int64_t>(src[j]) * head_dim;
    T* to = base + static_cast<int64_t>(dst_start + j) * head_dim;
    for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) to[d] = from[d];
  }
}

}  // namespace

void launch_compact_kv(const int64_t* tensor_ptrs, int num_tensors, int element_size, int64_t heads,
                       int64_t seq_len, int64_t head_dim, const int32_t* src, int num_src,
                       int dst_start, cudaStream_t stream) {
  const dim3 grid(num_tensors, static_cast<unsigned>(heads));
  const int threads = head_dim >= 128 ? 128 : 64;
  if (element_size == 4) {
    compact_kv_kernel<uint32_t><<<grid, threads, 0, stream>>>(tensor_ptrs, seq_len, head_dim, src,
                                                              num_src, dst_start);
  } else {
    compact_kv_kernel<uint16_t><<<grid, threads, 0, stream>>>(tensor_ptrs, seq_len, head_dim, src,
                                                              num_src, dst_start);
  }
}
