"""Running quantized layers: the W4A4 linear and its backends, the per-expert state.

* :mod:`~wanquant.runtime.linear`: ``W4A4Linear`` (reference / unpack-bf16 / fast backends);
* :mod:`~wanquant.runtime.state`: timestep bins and the per-context k/v cache of an expert;
* :mod:`~wanquant.runtime.expert`: an expert's quantized layers as a group;
* :mod:`~wanquant.runtime.memory`: cache release and byte accounting.

Model-independent (no diffusers): the model adapter (:mod:`wanquant.model`) puts these
layers into Wan experts.
"""
