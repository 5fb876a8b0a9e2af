"""Ambit on Kubernetes: the image, the kustomize base, the sample app (see README.md); entrypoint.py runs in the
agent container."""
