"""The tensor sidecar: big intermediate tensors move between services through it, so that only
small `TensorRef`s travel through Flyte.

- `client`: `SidecarClient.put / get / release`, what executors use (imports torch).
- `server`, `cli`: the per-node process (`cornserve sidecar`).
- `directory`: the Redis keys: membership, tensor directory, readiness, release queues.
- `arena`, `allocator`: the shared-memory arena of a sidecar and the placement of tensors in it.
- `wire`: the TCP protocol (control frames and raw tensor streams); `tensors`: torch/numpy <-> bytes.
- `errors`: exception classes, also carried over the wire.
"""
