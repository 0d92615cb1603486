"""Built-in tasks: encoders, LLMs and the multimodal LLM composite.

Each module holds one family's unit tasks with their descriptors beside them, and is registered
under the `flyte_cornserve.unit_tasks` entry-point group like any third-party plugin.
"""
