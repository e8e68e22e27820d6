// The din_ops operator schemas. Every backend (C++ CPU here, Triton and CUDA from
// din_ops/triton and csrc/cuda) implements exactly these; din_ops/ops/*.py adds the fake
// kernels and the autograd formulas (csrc/autograd.cpp those of attention_pooling and
// attention_pooling_stats). Sections refer to SPEC.md.
#include <torch/library.h>

TORCH_LIBRARY(din_ops, m) {
  // --- 1. attention_pooling -------------------------------------------------------------
  // query [B, D] or [B, C, D]; keys [B, T, D] (+ lengths [B]) or jagged [N, D] (+ offsets [B+1]).
  // weights/biases: the MLP in nn.Linear layout, the last pair being the [1, H] output layer.
  // act_weights: per hidden layer, PReLU or Dice alpha (empty for other activations).
  // norm_*: per hidden layer, Dice normalization (mean, var, optional affine weight/bias).
  // The lists that may be empty are optional, and None means empty: AOTInductor's proxy
  // executor hands an empty Tensor[] to the kernel as None, but an absent Tensor[]? as None
  // is what the schema says (so callers pass None for an empty list).
  // Returns the pooled vectors (shaped like query) and the attention weights
  // ([B, T] / [N], or [B, C, T] / [N, C] for several candidates).
  m.def(
      "attention_pooling(Tensor query, Tensor keys, Tensor? lengths, Tensor? offsets, "
      "Tensor[] weights, Tensor[] biases, Tensor[]? act_weights, Tensor[]? norm_mean, "
      "Tensor[]? norm_var, Tensor[]? norm_weight, Tensor[]? norm_bias, str activation, "
      "str normalization, float scale, float eps) -> (Tensor, Tensor)");
  m.def(
      "attention_pooling_backward(Tensor grad_out, Tensor? grad_attn, Tensor attn, "
      "Tensor query, Tensor keys, Tensor? lengths, Tensor? offsets, Tensor[] weights, "
      "Tensor[] biases, Tensor[] act_weights, Tensor[] norm_mean, Tensor[] norm_var, "
      "Tensor[] norm_weight, Tensor[] norm_bias, str activation, str normalization, "
      "float scale, float eps) -> (Tensor, Tensor, Tensor[], Tensor[], Tensor[], Tensor[], "
      "Tensor[], Tensor[], Tensor[])");
  // Batch statistics (mean, biased var) over valid positions of the pre-activation of hidden
  // layer L = len(norm_mean); weights/biases hold layers 0..L. Used by Dice in training.
  // One valid pair: var is -0.0, which every norm_var consumer reads as rstd = 0 (exact 0
  // normalized value and statistics gradient, not a residue times 1/sqrt(eps)).
  m.def(
      "attention_pooling_stats(Tensor query, Tensor keys, Tensor? lengths, Tensor? offsets, "
      "Tensor[] weights, Tensor[] biases, Tensor[]? act_weights, Tensor[]? norm_mean, "
      "Tensor[]? norm_var, Tensor[]? norm_weight, Tensor[]? norm_bias, str activation, "
      "float eps) -> (Tensor, Tensor)");
  m.def(
      "attention_pooling_stats_backward(Tensor grad_mean, Tensor grad_var, Tensor mean, "
      "Tensor query, Tensor keys, Tensor? lengths, Tensor? offsets, Tensor[] weights, "
      "Tensor[] biases, Tensor[] act_weights, Tensor[] norm_mean, Tensor[] norm_var, "
      "Tensor[] norm_weight, Tensor[] norm_bias, str activation, float eps) -> (Tensor, "
      "Tensor, Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor[])");

  // --- 4. embedding_attention_pooling -----------------------------------------------------
  // attention_pooling with keys[p] = concat_f tables[f][ids[f][p]], never stored. tables:
  // [E_f, D_f] (sum D_f = D); ids: one int32/int64 tensor per table, [B, T] (+ lengths) or
  // [N] (+ offsets); padding positions of [B, T] ids are never read. Same outputs as
  // attention_pooling. padding_idx: one per table, -1 for none; the forward reads those rows
  // like any other (nn.Embedding does), the backward gives them no gradient.
  m.def(
      "embedding_attention_pooling(Tensor query, Tensor[] tables, Tensor[] ids, Tensor? lengths, "
      "Tensor? offsets, int[] padding_idx, Tensor[] weights, Tensor[] biases, Tensor[]? act_weights, "
      "Tensor[]? norm_mean, Tensor[]? norm_var, Tensor[]? norm_weight, Tensor[]? norm_bias, "
      "str activation, str normalization, float scale, float eps) -> (Tensor, Tensor)");
  // Returns (grad_query, grad_indices, grad_values, then the parameter gradients as
  // attention_pooling_backward): per table, the distinct ids of valid positions other than
  // padding_idx in ascending order (int64 [U_f]) and their summed key gradients [U_f, D_f],
  // a coalesced sparse gradient.
  m.def(
      "embedding_attention_pooling_backward(Tensor grad_out, Tensor? grad_attn, Tensor attn, "
      "Tensor query, Tensor[] tables, Tensor[] ids, Tensor? lengths, Tensor? offsets, "
      "int[] padding_idx, Tensor[] weights, Tensor[] biases, Tensor[] act_weights, "
      "Tensor[] norm_mean, Tensor[] norm_var, Tensor[] norm_weight, Tensor[] norm_bias, "
      "str activation, str normalization, float scale, float eps) -> (Tensor, Tensor[], "
      "Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def(
      "embedding_attention_pooling_stats(Tensor query, Tensor[] tables, Tensor[] ids, "
      "Tensor? lengths, Tensor? offsets, int[] padding_idx, Tensor[] weights, Tensor[] biases, "
      "Tensor[]? act_weights, "
      "Tensor[]? norm_mean, Tensor[]? norm_var, Tensor[]? norm_weight, Tensor[]? norm_bias, "
      "str activation, float eps) -> (Tensor, Tensor)");
  m.def(
      "embedding_attention_pooling_stats_backward(Tensor grad_mean, Tensor grad_var, Tensor mean, "
      "Tensor query, Tensor[] tables, Tensor[] ids, Tensor? lengths, Tensor? offsets, "
      "int[] padding_idx, Tensor[] weights, Tensor[] biases, Tensor[] act_weights, "
      "Tensor[] norm_mean, Tensor[] norm_var, Tensor[] norm_weight, Tensor[] norm_bias, "
      "str activation, float eps) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], "
      "Tensor[], Tensor[], Tensor[], Tensor[])");

  // --- 2. dice ---------------------------------------------------------------------------
  // x [N, C] or [B, T, C] (+ lengths). Training: statistics over valid rows; eval: the given
  // running statistics. Returns (y, mean, var) with var biased; running statistics are
  // updated by the caller from (mean, var).
  m.def(
      "dice(Tensor x, Tensor? lengths, Tensor alpha, Tensor? gamma, Tensor? beta, "
      "Tensor? running_mean, Tensor? running_var, bool training, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "dice_backward(Tensor grad_y, Tensor x, Tensor? lengths, Tensor alpha, Tensor? gamma, "
      "Tensor? beta, Tensor mean, Tensor var, bool training, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // --- 3. mini-batch aware regularization --------------------------------------------------
  // In place: w_j <- optimizer step with g_j + lam / max(n_j, 1) * w_j for each distinct
  // index j of the batch (duplicates summed); other rows untouched. optimizer: "sgd",
  // "adagrad_rowwise" (state [num_embeddings]) or "adagrad" (state like weight).
  m.def(
      "mba_sparse_update_(Tensor(a!) weight, Tensor indices, Tensor grad, Tensor freq, "
      "Tensor(b!)? state, float lr, float lam, str optimizer, int? padding_idx, float eps) -> ()");
  // (lam / 2) * sum over distinct batch indices j of ||w_j||^2 / max(n_j, 1).
  m.def("mba_penalty(Tensor weight, Tensor indices, Tensor freq, float lam, int? padding_idx) -> Tensor");
  m.def(
      "mba_penalty_backward(Tensor grad, Tensor weight, Tensor indices, Tensor freq, float lam, "
      "int? padding_idx) -> Tensor");
}
