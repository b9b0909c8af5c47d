"""`openalign demo`: generate, filter, tokenize, train and evaluate a small ALIGN in minutes on a CPU."""

from openalign.demo.pipeline import DemoConfig, DemoResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "run_demo"]
