"""Lightning callbacks."""

from lightning_metric.callbacks.recall import RecallAtK

__all__ = ["RecallAtK"]
