"""How the checker confines itself and the sample, inside the sandbox, before any sample code runs.

Runs in the checker's interpreter (standard library only; see inside_wire.py). System calls Python does not
wrap go through ctypes:

- `build_root` (for `unshare` isolation): the filesystem bubblewrap would build: a small tmpfs as the new
  root holding read-only binds of the system directories, the Python installation and this folder, a fresh
  /proc, a /dev of five device nodes, and a private tmpfs at /tmp; then pivot_root into it and detach the
  host's root, so that nothing else of the host is reachable.
- `block_unix_sockets`: a seccomp filter. Namespaces do not cover a UNIX socket bound on a host path (a
  read-only mount does not stop connect()), so socket(AF_UNIX, ...) fails with EACCES; io_uring, which could
  make the same calls around the filter, fails with EPERM; a foreign system-call ABI kills the process.
- `not_dumpable`: ptrace, /proc/PID/mem and /proc/PID/fd of the checker are closed to the sample even when
  both run under the same uid.
- `become` switches to an unprivileged uid (dropping every capability); `drop_capabilities` is for a uid 0
  that has to stay uid 0 (the root of a user namespace): nothing is regained at exec.
"""

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)

# machine: (AUDIT_ARCH_*, __NR_socket, __NR_pivot_root); io_uring_setup is 425 on every architecture.
_ARCHITECTURES = {"x86_64": (0xC000003E, 41, 155), "aarch64": (0xC00000B7, 198, 41)}
_NR_IO_URING_SETUP = 425
_AF_UNIX = 1

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND = 32, 4096
_MS_KEPT = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC  # a remount in a user namespace may not clear these (atime is kept)
_MNT_DETACH = 2
_DEVICES = ("null", "zero", "full", "random", "urandom")

_PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_SECUREBITS = 4, 24, 28
_PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, _PR_SET_SECCOMP = 38, 47, 4, 22
_SECBIT_NOROOT_AND_LOCKED = 0b11  # a uid 0 gains no capabilities at exec, and this cannot be undone


def _call(what: str, result: int) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _prctl(what: str, *args: int) -> None:
    _call(what, _libc.prctl(*(ctypes.c_ulong(a) for a in (*args, 0, 0, 0, 0)[:5])))


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    strings = (None if text is None else os.fsencode(text) for text in (source, target, fstype))
    result = _libc.mount(*strings, ctypes.c_ulong(flags), None if data is None else data.encode())
    _call(f"mount {fstype or source} on {target}", result)


def _bind_read_only(source: str, target: str, flags: int) -> None:
    """A read-only bind of one mount's worth of `source` (no submounts), keeping the flags a user namespace locks."""
    kept = os.statvfs(source).f_flag & _MS_KEPT  # statvfs's ST_NOSUID, ST_NODEV, ST_NOEXEC equal the MS_ flags
    _mount(source, target, None, _MS_BIND)
    _mount(None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags | kept)


def _placeholder(path: str, directory: bool) -> None:
    os.makedirs(path if directory else os.path.dirname(path), mode=0o755, exist_ok=True)
    if not directory:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def build_root(new_root: str, layout: dict, scratch_bytes: int, scratch_uid: int | None) -> None:
    """Make `new_root` (an empty directory) this mount namespace's root, holding only what `layout` names.

    The scratch tmpfs at /tmp is mounted before the binds, so that an interpreter installed under /tmp stays
    visible. Must run as the first process of a new PID and mount namespace, with CAP_SYS_ADMIN in them.
    """
    _mount("tmpfs", new_root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    owner = "" if scratch_uid is None else f",uid={scratch_uid},gid={scratch_uid}"
    os.mkdir(new_root + "/tmp", 0o755)
    _mount("tmpfs", new_root + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={scratch_bytes},mode=0700{owner}")
    for target, path in layout["symlinks"]:
        os.symlink(target, new_root + path)
    for path in [*layout["dirs"], *layout["files"]]:
        _placeholder(new_root + path, directory=os.path.isdir(path))
        _bind_read_only(path, new_root + path, _MS_NOSUID | _MS_NODEV)
    _make_dev(new_root + "/dev")
    os.mkdir(new_root + "/proc", 0o755)
    _mount("proc", new_root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY)
    _pivot_into(new_root)
    for path, flags in (("/dev", _MS_NOSUID | _MS_NOEXEC), ("/", _MS_NOSUID | _MS_NODEV)):  # nothing more goes in
        _mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags)


def _make_dev(dev: str) -> None:
    """A tmpfs holding binds of five harmless device nodes, and the usual links into /proc/self/fd."""
    os.mkdir(dev, 0o755)
    _mount("tmpfs", dev, "tmpfs", _MS_NOSUID | _MS_NOEXEC, "size=64k,mode=0755")
    for name in _DEVICES:
        _placeholder(f"{dev}/{name}", directory=False)
        _bind_read_only(f"/dev/{name}", f"{dev}/{name}", _MS_NOSUID | _MS_NOEXEC)  # read-only stops no device write
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"{dev}/{name}")


def _pivot_into(new_root: str) -> None:
    """pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only the new root."""
    os.chdir(new_root)
    _call("pivot_root", _libc.syscall(ctypes.c_long(_architecture()[2]), b".", b"."))
    _call("detach the host's root", _libc.umount2(b".", _MNT_DETACH))
    os.chdir("/")


def _architecture() -> tuple[int, int, int]:
    machine = os.uname().machine
    if machine not in _ARCHITECTURES:
        raise OSError(errno.ENOSYS, f"no system-call table for {machine} (known: {', '.join(_ARCHITECTURES)})")
    return _ARCHITECTURES[machine]


class _Instruction(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Instruction))]


def block_unix_sockets() -> None:
    """Install the seccomp filter on this process; it is inherited by every child and cannot be removed."""
    audit_arch, nr_socket, _ = _architecture()
    load, jump_eq, jump_ge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    kill, allow, fail_with = 0x80000000, 0x7FFF0000, 0x00050000  # SECCOMP_RET_KILL_PROCESS, _ALLOW, _ERRNO
    program = [
        (load, 0, 0, 4),  # seccomp_data.arch
        (jump_eq, 1, 0, audit_arch),
        (ret, 0, 0, kill),
        (load, 0, 0, 0),  # seccomp_data.nr
        (jump_ge, 0, 1, 0x40000000),  # the x32 ABI's numbers
        (ret, 0, 0, kill),
        (jump_eq, 0, 1, _NR_IO_URING_SETUP),
        (ret, 0, 0, fail_with | errno.EPERM),
        (jump_eq, 0, 3, nr_socket),
        (load, 0, 0, 16),  # the low half of args[0], the address family (little-endian)
        (jump_eq, 0, 1, _AF_UNIX),
        (ret, 0, 0, fail_with | errno.EACCES),
        (ret, 0, 0, allow),
    ]
    instructions = (_Instruction * len(program))(*(_Instruction(*step) for step in program))
    fprog = _Program(len(program), ctypes.cast(instructions, ctypes.POINTER(_Instruction)))
    no_new_privileges()
    _prctl("install the seccomp filter", _PR_SET_SECCOMP, 2, ctypes.addressof(fprog))


def no_new_privileges() -> None:
    """Nothing exec'd from here on gains privileges (set-uid bits and file capabilities are ignored)."""
    _prctl("set no_new_privs", _PR_SET_NO_NEW_PRIVS, 1)


def not_dumpable() -> None:
    _prctl("clear the dumpable flag", _PR_SET_DUMPABLE, 0)


def become(uid: int) -> None:
    """Switch this process to `uid` (and the same gid, no supplementary groups): every capability is lost."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _clear_capabilities()  # the inheritable set survives a change of uid


def drop_capabilities() -> None:
    """For a uid 0 that stays uid 0 (the root of a user namespace): no capability now, none at a later exec."""
    _prctl("set the securebits", _PR_SET_SECUREBITS, _SECBIT_NOROOT_AND_LOCKED)
    _prctl("clear the ambient capabilities", _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    with open("/proc/sys/kernel/cap_last_cap") as stream:
        last = int(stream.read())
    for capability in range(last + 1):
        _prctl("drop a capability", _PR_CAPBSET_DROP, capability)
    _clear_capabilities()


class _CapabilityHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapabilitySets(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _clear_capabilities() -> None:
    """capset(2) with empty effective, permitted and inheritable sets (version 3: two 32-bit halves)."""
    header, sets = _CapabilityHeader(0x20080522, 0), (_CapabilitySets * 2)()
    _call("clear the capabilities", _libc.capset(ctypes.byref(header), sets))
