"""atoll: train large language models across islands of compute joined by the internet."""

__version__ = "0.1.0"
