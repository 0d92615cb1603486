"""What flytekit loads through our `flytekit.plugins` entry point, on every `import flytekit`: the
`TensorRef` type transformer and the two connectors (`cornserve`, `cornserve_batch` task types).
So `pyflyte serve connector` serves them, and `TensorRef` literals convert, with no `--modules`."""

from . import batch_connector, connector, tensor_ref_type  # noqa: F401  each registers itself on import
