"""The inference engine. Imports neither Ray nor Kubernetes."""
