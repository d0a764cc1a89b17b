"""The Llama-family model the engine runs: fused projections with multi-LoRA slices."""
