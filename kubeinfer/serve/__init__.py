"""Ray Serve glue: the Worker and Router deployments and the application builder.

``kubeinfer.serve.config`` is pure data (importable without Ray), so the operator can render it.
"""
