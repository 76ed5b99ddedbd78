"""devmig's test bed: the real control plane and helpers around it."""
