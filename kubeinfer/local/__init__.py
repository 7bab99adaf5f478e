"""The serving stack in one process, without Ray: engines wrapped as router replicas
(``replica``), the pool that picks among them (``pool``), and the builder of a whole router over
them (``router``). Used by tests, by benchmarks that measure the router against the engine, by
`kubeinfer bench`, and by anyone embedding the router in a program of their own; the Ray Serve
worker deployment wraps its engine in the same EngineReplica.

It depends on the router and the worker (and reads the application's settings from the pure-data
``kubeinfer.serve.config``); the router depends on none of it.
"""
