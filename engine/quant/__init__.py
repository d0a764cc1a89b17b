"""Quantized base weights under full-precision LoRA: bitsandbytes, torchao, GPTQ and AWQ.

``engine.model.loader`` calls ``engine.quant.apply``; backends are imported only when asked for.
"""
