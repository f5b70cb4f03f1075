"""What an operator runs: the CLI, model export, the simulator, training and benchmarks."""

from pathlib import Path

ROOT = (
    Path(__file__).resolve().parent.parent
)  # the checkout: docker/, models/, schemas/ beside tools/
