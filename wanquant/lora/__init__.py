"""LoRAs on W4A4 experts (DESIGN.md section 9): a LoRA is more rank in the 16-bit branch.

* :mod:`wanquant.lora.files`: reading LoRA files in the forms people have (diffusers/PEFT,
  original Wan, ComfyUI, Kohya/musubi); key conversion is the model adapter's
  (:mod:`wanquant.model.lora_keys`, which calls diffusers' own converters).
* :mod:`wanquant.lora.apply`: attaching LoRAs to a pipeline's experts, strengths,
  unloading; the public functions are re-exported by :mod:`wanquant.api`.

The math (appending a LoRA to a layer's branch) is pure and sits below the runtime, in
:mod:`wanquant.numerics.lora`; the layer side is :meth:`wanquant.runtime.linear.W4A4Linear.set_lora`.
"""
