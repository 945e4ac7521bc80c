"""lightning-metric: PyTorch Lightning modules for deep metric learning."""

__version__ = "0.1.0"
