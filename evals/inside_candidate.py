"""The sample's process: runs the sample's code, then answers the checker's calls of its function.

The checker (inside_checker.py) forks it before it reads its own job, and calls `serve` once the fork has
dropped privileges and every descriptor but the two pipe ends (stdin is /dev/null; the seccomp filter is
inherited). The first request is the sample's job (its code, the entry point, the limits, the site-packages
folders); it never holds the tests or the token. Each later request is one call, (args, kwargs); each reply is
a Python literal: ("ok", value) with the value made plain (see `plain`), or ("raise", exception name,
message). A program that fails to run replies ("error", its exception's last line). With the tests in this
process (split false) the program is the whole script, tests included, and the reply is ("done",) when it
returns. Standard library only: see inside_wire.py.
"""

import marshal
import os
import sys

from inside_wire import apply_limits, receive, send

_SCALARS = (bool, int, float, complex, str, bytes)  # bool before int: True must stay True


def serve(requests: int, replies: int) -> None:
    """Never returns: the process leaves when the checker closes the requests pipe, or the program fails."""
    job = marshal.loads(receive(requests))
    apply_limits(job["limits"])
    sys.path.extend(job["site_packages"])
    namespace: dict = {}
    try:
        exec(compile(job["code"], "sample.py", "exec"), namespace)
        if job["split"] and job["entry_point"] not in namespace:
            raise NameError(f"name {job['entry_point']!r} is not defined")
    except Exception as error:
        send(replies, _literal(("error", _last_line(error))))
        raise
    finally:
        sys.stdout.flush()
    if not job["split"]:
        _leave(replies, ("done",))
    function = namespace[job["entry_point"]]
    send(replies, _literal(("ready",)))
    while (request := receive(requests)) is not None:
        args, kwargs = marshal.loads(request)
        send(replies, _answer(function, args, kwargs))
    _leave(replies, None)


def _answer(function, args: tuple, kwargs: dict) -> bytes:
    try:
        return _literal(("ok", plain(function(*args, **kwargs))))
    except Exception as error:
        try:
            message = str(error)
        except Exception:
            message = "<the message could not be printed>"
        return _literal(("raise", type(error).__name__, message))


def plain(value, depth: int = 0):
    """The value as plain data: None, bool, int, float, complex, str, bytes, and lists, tuples, sets and dicts
    of them. A subclass becomes its base (a namedtuple a tuple, a Counter a dict), an integer-like object an int
    (numpy's integers); anything else raises TypeError."""
    if value is None or type(value) in _SCALARS:
        return value
    if depth > 100:
        raise ValueError("the value is nested more than 100 levels deep")
    for kind in _SCALARS:
        if isinstance(value, kind):
            return kind(value)
    for kind in (list, tuple, set, frozenset):
        if isinstance(value, kind):
            return kind(plain(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return {plain(key, depth + 1): plain(item, depth + 1) for key, item in value.items()}
    if hasattr(type(value), "__index__"):
        return int(value.__index__())
    kind = type(value)
    raise TypeError(
        f"the sample returned a {kind.__module__}.{kind.__qualname__} object, which cannot be passed to the tests "
        "(they get plain values: None, bool, int, float, complex, str, bytes, and lists, tuples, sets and dicts)"
    )


def _literal(value) -> bytes:
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # a correct answer may be a huge integer
    try:
        return repr(value).encode("utf-8", "backslashreplace")
    finally:
        sys.set_int_max_str_digits(limit)


def _last_line(error: BaseException) -> str:
    import traceback  # only a failing program pays for it

    return traceback.format_exception_only(type(error), error)[-1].strip()


def _leave(replies: int, last) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if last is not None:
        send(replies, _literal(last))
    os._exit(0)
