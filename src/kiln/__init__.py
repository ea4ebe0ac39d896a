"""kiln: take a Hugging Face LLM and make it run fast on the user's GPU (and, slowly, on a CPU)."""

__version__ = "0.1.0"
