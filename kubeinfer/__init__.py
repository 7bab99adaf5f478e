"""kubeinfer: a Kubernetes-native LLM inference platform."""

__version__ = "0.1.0"
