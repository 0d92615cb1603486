"""Persistent executors: the runtime loop and the handlers that host a model (encoder, vLLM)."""
