"""SIMULATION: gpunode lab stand-in for vLLM 0.33.0 (no model is loaded or run)."""

__version__ = "0.33.0+gpunodesim"
