"""A watchdog process tied to the server's life, so a server killed with SIGKILL leaves nothing.

At start the server spawns `python -m sandbox_env.server.reaper` in a session of its own, with
the read end of a pipe as its stdin; only the server holds the write end (close-on-exec, so no
kernel or container process inherits it). The reaper blocks reading it. A graceful shutdown,
after closing every kernel itself, writes `quit` and the reaper exits. Any other end of the
server (SIGKILL, the OOM killer, a crash) closes the pipe without it: the reaper then removes,
within seconds, everything the server's pid names:

* docker: the containers labelled with this server instance (`sandbox-env.server=<pid>:<start>`);
* jupyter: the kernels' cgroups `<pid>-*` (every process in them is killed first), any process
  still naming one of the server's work directories (the rlimit-only fallback), and the work
  directories `sandbox-env-<pid>-*` themselves.

The same sweeps run at the next start anyway; the reaper makes them happen now.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger("sandbox_env.reaper")
QUIT = b"quit\n"


class Reaper:
    """The server's side: start the watchdog, and stand it down after a clean shutdown."""

    def __init__(self, process: subprocess.Popen[bytes], fd: int) -> None:
        self.process = process
        self._fd: int | None = fd

    @classmethod
    def start(cls, *, backend: str, workdir_root: str | None) -> Reaper:
        argv = [sys.executable, "-m", "sandbox_env.server.reaper", "--pid", str(os.getpid()),
                "--backend", backend]
        if workdir_root:
            argv += ["--workdir-root", workdir_root]
        if backend == "docker":
            from sandbox_env.kernels.docker.containers import default_owner, server_instance

            argv += ["--docker-owner", default_owner(), "--docker-server", server_instance()]
        read_end, write_end = os.pipe()  # both close-on-exec: nothing the server starts inherits them
        try:
            process = subprocess.Popen(argv, stdin=read_end, stdout=subprocess.DEVNULL,
                                       start_new_session=True, close_fds=True)
        finally:
            os.close(read_end)
        return cls(process, write_end)

    def stand_down(self) -> None:
        """Everything was closed in order: the reaper leaves without sweeping."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, QUIT)
        except OSError:
            pass
        finally:
            os.close(fd)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def sweep_docker(owner: str, server: str) -> None:
    from sandbox_env.kernels.docker.containers import cleanup_orphans

    cleanup_orphans(owner, server=server)


def sweep_jupyter(pid: int, workdir_root: str | None) -> None:
    from sandbox_env.kernels.jupyter.limits import remove_cgroups
    from sandbox_env.kernels.jupyter.workdirs import remove_workdirs

    dead = str(pid)
    remove_cgroups(lambda owner: owner == dead)  # kills every process in them, then removes them
    _kill_processes_naming(f"sandbox-env-{pid}-".encode())
    remove_workdirs(workdir_root, lambda owner: owner == dead)


def processes_naming(marker: bytes) -> list[int]:
    """Processes (but this one) whose command line, environment or working directory holds
    `marker`: for a work directory's, kernels outside cgroups and what they started."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                named = marker in f.read()
            if not named:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    named = marker in f.read()
            if not named:
                named = marker in os.readlink(f"/proc/{entry}/cwd").encode()
        except OSError:
            continue
        if named:
            found.append(int(entry))
    return found


def _kill_processes_naming(marker: bytes) -> None:
    for pid in processes_naming(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandbox_env.server.reaper")
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--workdir-root")
    parser.add_argument("--docker-owner")
    parser.add_argument("--docker-server")
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the pipe decides; a group signal is the server's
    received = sys.stdin.buffer.read()  # until the server closes its end, one way or another
    if received.endswith(QUIT):
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.warning("server %d is gone without shutting down: removing what it left", args.pid)
    try:
        if args.docker_server:
            sweep_docker(args.docker_owner, args.docker_server)
        else:
            sweep_jupyter(args.pid, args.workdir_root)
    except Exception:  # noqa: BLE001 - the next start sweeps again
        log.exception("sweep after server %d failed", args.pid)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
