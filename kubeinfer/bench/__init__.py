"""Load testing a running kubeinfer server over gRPC: workloads, an open-loop load generator and
its report (``kubeinfer bench``). Imports neither torch nor the router."""
