"""fedsim: federated instruction tuning of LLMs with LoRA, simulated on Ray."""

__version__ = "0.1.0"
