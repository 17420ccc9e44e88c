"""Hopper (sm_90) Triton kernels that run MXFP4 x MXFP4 layers as exact FP8 GEMMs.

* :mod:`~wanquant.kernels.act_quant`: smoothing + low-rank down projection + activation
  quantization to e4m3 rows with one scale per row (the "quantize" step);
* :mod:`~wanquant.kernels.weight_prep`: packed 4-bit weights to e4m3 rows;
* :mod:`~wanquant.kernels.gemm`: the FP8 GEMM with the low-rank up projection and bias
  fused in its epilogue (the "GEMM" step);
* :mod:`~wanquant.kernels.dispatch`: which formats and devices the fast path serves, and
  ``FastW4A4``, a layer prepared for it;
* :mod:`~wanquant.kernels.attention`: 8-bit attention (INT8 Q.K^T with K smoothed by its
  token mean, FP8 P.V), used by Wan's self-attention when asked for: the launchers, with
  its options in :mod:`~wanquant.kernels.attention_config`, its PyTorch reference in
  :mod:`~wanquant.kernels.attention_reference`, its Triton kernels in
  :mod:`~wanquant.kernels.attention_triton` and its warp-specialized Gluon main loop in
  :mod:`~wanquant.kernels.attention_ws`;
* :mod:`~wanquant.kernels.rope`: Wan's q/k RMS-norm (over all heads) and rotary in one
  pass, before the 8-bit attention;
* :mod:`~wanquant.kernels.adaln`: a block's residual + LayerNorm + AdaLN modulation steps
  in one pass per row (a candidate: the block calls it only when compiled with
  ``fused_norms=True``);
* :mod:`~wanquant.kernels.ops`: the W4A4 fast path, the 8-bit attention and the q/k norm +
  rotary as
  ``torch.library`` custom ops (fake implementations for ``torch.compile``, PyTorch
  references on CPU).

Every kernel has a PyTorch reference beside it; DESIGN.md section 4 gives the identity.
"""
