"""Control plane: the invocation protocol over Redis (and, later, resource and task managers)."""
