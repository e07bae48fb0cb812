"""The Docker backend: a hardened container per episode, driven over an authenticated channel
on the container's attached stdio.

`kernel` (DockerKernel), `channel` (the framed, authenticated channel), `containers` (options,
labels, removal, orphan sweeps), `daemon` (the docker-py client, its thread pool, the runtime
report, waiting for a restarting daemon), `recycling` (a container made fit for another episode),
`images` (building the sandbox images offline from Debian packages)."""
