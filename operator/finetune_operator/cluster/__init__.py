"""The embedded cluster: a real Kubernetes control plane on loopback and a local node agent."""
