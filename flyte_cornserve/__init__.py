"""flyte-cornserve: serve multimodal ML pipelines on Flyte.

`task/` is the framework-free task abstraction; `descriptors/` says how a unit task is executed;
`flyte/` compiles tasks to Flyte entities.
"""
