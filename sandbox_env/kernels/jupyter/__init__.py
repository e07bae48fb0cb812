"""The Jupyter backend: a local ipykernel per episode, in a bwrap sandbox with its own uid,
cgroup (or rlimits) and seccomp filter, reached only through a relay process of its own.

`kernel` (JupyterKernel: start, execute, interrupt, restart), `process` (a kernel process, its
relay and connection), `steps` (a step's messages and verdict), `programs` (run_program's process),
`workdirs` (the kernels' folders), `sandbox` (bwrap, uid leases), `limits` (Confinement: cgroups
and rlimits), `cgroups` (the machine's cgroup layout), `procfs` (/proc scans), `seccomp` (the
filter), `relay` (the per-kernel zmq relay, run as a script)."""
