"""Interoperability with other frameworks' checkpoints (Hugging Face transformers)."""
