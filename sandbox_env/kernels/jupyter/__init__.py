"""The Jupyter backend: a local ipykernel per episode, in a bwrap sandbox with its own uid,
cgroup (or rlimits) and seccomp filter, reached only through a relay process of its own.

`kernel` (JupyterKernel: start, execute, interrupt, restart), `sandbox` (bwrap, uid leases),
`limits` (cgroups and rlimits), `seccomp` (the filter), `relay` (the per-kernel zmq relay)."""
