"""The Docker backend: a hardened container per episode, driven over an authenticated channel
on the container's attached stdio.

`kernel` (DockerKernel), `images` (building the sandbox images offline from Debian packages)."""
