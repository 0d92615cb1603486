"""What the control plane and the executors share: the Redis keys, records and scripts both sides use.

`invocations`: the invocation protocol (states, records, the Lua transition, the store; see
docs/protocol.md). `deployments`: what an executor writes about its deployment (its start-up phases).
Both sides import this package; it imports neither side (`services`, `executors`), only redis.
"""
