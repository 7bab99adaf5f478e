"""`kubeinfer operator`: run the ModelDeployment operator (in a pod, or against a kubeconfig)."""

from __future__ import annotations

import argparse
import logging

from kubeinfer.operator.settings import MODES


def cmd_operator(args: argparse.Namespace) -> int:
    import kopf

    from kubeinfer.operator.handlers import registry
    from kubeinfer.operator.settings import OperatorConfig

    config = OperatorConfig.from_env(mode=args.mode, ray_address=args.ray_address)  # bad values fail here
    kopf.configure(verbose=args.verbose)
    logging.getLogger("kubeinfer").info("operator mode %s, namespaces %s", config.mode,
                                        "all" if not args.namespace else ", ".join(args.namespace))
    # One operator replica (the chart runs one): no KopfPeering resources to coordinate through.
    kopf.run(registry=registry, standalone=True, clusterwide=not args.namespace,
             namespaces=args.namespace or (), liveness_endpoint=args.liveness, memo=kopf.Memo(config=config))
    return 0


def add_operator_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("operator", help="run the operator that turns ModelDeployments into Ray Serve replicas")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable; globs allowed)")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="watch every namespace (the default when no --namespace is given)")
    p.add_argument("--liveness", default=None, metavar="URL",
                   help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="kuberay: a RayService per ModelDeployment; serve-api: apply to an existing Ray "
                        "cluster; auto (default): kuberay when the RayService API is served "
                        "[env KUBEINFER_OPERATOR_MODE]")
    p.add_argument("--ray-address", default=None, metavar="URL",
                   help="the Ray dashboard for serve-api mode (default http://127.0.0.1:8265) "
                        "[env KUBEINFER_RAY_ADDRESS]")
    p.add_argument("--verbose", "-v", action="store_true", help="log kopf's debug output")
    p.set_defaults(func=cmd_operator)
