"""omni: streaming Qwen2.5-Omni inference."""

__version__ = "0.1.0"
