"""`kubeinfer render FILE.yaml`: the objects the operator would create, without a cluster."""

from __future__ import annotations

import argparse
import sys

import yaml


def cmd_render(args: argparse.Namespace) -> int:
    from kubeinfer.operator.render import render_objects, to_yaml
    try:
        with open(args.file, encoding="utf-8") as f:
            documents = list(yaml.safe_load_all(f))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read {args.file}: {e}") from None
    objects = render_objects(documents, mode=args.mode)
    if not objects:
        raise ValueError(f"{args.file} holds no ModelDeployment")
    sys.stdout.write(to_yaml(objects))
    return 0


def add_render_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="print the objects the operator would create for each ModelDeployment "
                                      "in a file (RayService + Service, or the Serve config)")
    p.add_argument("file", help="a YAML file with one or more ModelDeployments")
    p.add_argument("--mode", choices=["kuberay", "serve-api"], default="kuberay",
                   help="kuberay (default): the RayService and Service; serve-api: the Ray Serve config")
    p.set_defaults(func=cmd_render)
