// The chunk size of the embedding_attention_pooling CPU kernels (csrc/cpu/embedding_attention_pooling.cpp).
#pragma once

#include <cstdint>

namespace din_ops {
namespace cpu {

// Key elements gathered per chunk of rows (default 2^21, 8 MB in fp32); returns the previous
// value. For tests: small chunks run the multi-chunk paths on small inputs.
int64_t set_embedding_chunk_elems(int64_t elems);

}  // namespace cpu
}  // namespace din_ops
