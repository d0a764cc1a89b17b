"""The demo adapters (one PEFT directory each), shipped in the wheel as ``lorry.demo_adapters``."""
