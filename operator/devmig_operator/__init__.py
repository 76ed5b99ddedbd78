"""devmig operator."""

__version__ = "0.1.0"

# The API group and version of devmig's custom resources (crds/).
GROUP = "devmig.io"
VERSION = "v1alpha1"
