"""LoRA adapters: requests, torch-free validation (spec), resolution, loading and caches."""
