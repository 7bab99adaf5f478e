"""The kubeinfer operator: reconciles ModelDeployment objects (``kubeinfer.io/v1alpha1``) into Ray Serve
replicas of the engine, through a KubeRay RayService or a Ray cluster's Serve REST API.

Pure parts: ``spec`` (the CR as validated dataclasses, mapped onto the serving application's
settings), ``render`` (the objects to create), ``capacity`` (the pre-flight memory check).
The kopf handlers live in ``handlers``. Importing this package imports nothing else.
"""
