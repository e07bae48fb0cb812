"""The seccomp filter of a sandboxed Jupyter kernel: everything allowed but a deny list.

Built once in the server with libseccomp (through `pyseccomp`, ctypes) and handed to bwrap as a
compiled BPF program (`--seccomp FD`); bwrap loads it just before exec, so it binds the uid switch
and everything the kernel runs afterwards, children included. Denied calls fail with EPERM (the
code gets an error, nobody is killed), except clone3: its flags sit in memory seccomp cannot read,
so it fails with ENOSYS and libc falls back to clone, whose flags are checked. Syscalls of another
ABI (i386, x32) fail with EPERM as a whole.

Owns only the filter; no other module imports pyseccomp.
"""

from __future__ import annotations

import errno
import functools
import socket
import tempfile

DENIED = (
    # the sandbox's shape is fixed at launch: no namespaces, mounts or root changes
    "setns", "unshare", "mount", "umount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # other processes' memory and descriptors
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # kernel attack surface plain Python never needs
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "name_to_handle_at", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "io_setup", "io_submit", "io_getevents", "io_pgetevents", "io_cancel", "io_destroy",
    "acct", "swapon", "swapoff", "reboot", "syslog", "quotactl", "lookup_dcookie", "uselib", "vhangup",
    "iopl", "ioperm", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "sethostname", "setdomainname",
)
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
# socket(): AF_UNIX, AF_INET, AF_INET6, and AF_NETLINK (glibc's getaddrinfo asks it for addresses).
ALLOWED_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK)


@functools.lru_cache(maxsize=1)
def bpf_program() -> bytes:
    """The compiled filter (a few hundred bytes). Raises ImportError/OSError without libseccomp."""
    import pyseccomp as sc

    deny = sc.ERRNO(errno.EPERM)
    arch = sc.system_arch()
    rules = sc.SyscallFilter(sc.ALLOW)
    rules.set_attr(sc.Attr.ACT_BADARCH, deny)
    for name in DENIED:
        if sc.resolve_syscall(arch, name) >= 0:  # not every syscall exists on every architecture
            rules.add_rule(deny, name)
    for flag in NAMESPACE_FLAGS:
        rules.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    rules.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    rules.add_rule(deny, "personality", sc.Arg(0, sc.NE, 0))  # only the default, PER_LINUX
    # One comparison per rule (libseccomp's limit): deny every family outside the allowed ones.
    top = max(ALLOWED_FAMILIES)
    for family in range(top):
        if family not in ALLOWED_FAMILIES:
            rules.add_rule(deny, "socket", sc.Arg(0, sc.EQ, family))
    rules.add_rule(deny, "socket", sc.Arg(0, sc.GT, top))
    with tempfile.TemporaryFile() as out:
        rules.export_bpf(out)
        out.seek(0)
        return out.read()
