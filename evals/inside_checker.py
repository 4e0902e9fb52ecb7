"""The sandbox's first process: confines itself, forks the sample's process, and runs the tests.

sandbox.py starts `python -S -P -c BOOT STATUS_FD` inside the isolation wrapper; BOOT loads the code of these
inside_*.py modules from a first frame on stdin and calls `main`, which reads two more marshal'd frames: the
confinement plan, then the job (the token, the trial, the limits, the site-packages folders). Standard
library only: see inside_wire.py.

The order is what keeps the sample out: confine (inside_confine.py), fork the sample's process (which drops
its privileges and waits for its code), and only then read the job. So the sample's process is a copy of this
interpreter that never held the token, the tests or the status descriptor; this one is not dumpable and, under
a root harness, runs under another uid than the sample, which can neither trace it nor read its memory.

The sample's code never runs here. The tests do: the problem's prompt (trusted: helpers such as HumanEval/32's
`poly`), then the test code, then `check(candidate)`, where `candidate` sends its arguments to the sample's
process (inside_candidate.py) and returns the plain value that comes back. A sample cannot reach the tests'
code, frames or builtins, nor hand them an object with its own `__eq__`: it can only answer. When the tests
pass an argument that is not a plain value (a function, say), this sample is scored again with its tests in
its own process (the old, weaker way), and the report says so.

The status descriptor receives "started" once the confinement is in place (any failure before that is the
sandbox's, not the sample's), then "TOKEN passed", "TOKEN in-process" or "TOKEN failed DETAIL", the last line
of the tests' exception or how the sample's process ended: a detail the sample's own output cannot displace.
"""

import _ast
import _signal
import builtins
import marshal
import os
import sys

import inside_candidate
import inside_confine as confine
from inside_wire import WireError, apply_limits, receive, send

_SCALARS = (bool, int, float, complex, str, bytes)
_CONTAINERS = (list, tuple, set, frozenset)
_NOT_RERAISED = (StopIteration, StopAsyncIteration)  # they would end the tests' loops early, not fail them
_SIGNALS = {number: name for name, number in vars(_signal).items()
            if name.startswith("SIG") and "_" not in name and name not in ("SIGIOT", "SIGCLD", "SIGPOLL")}  # fmt: skip


class SampleFailed(Exception):
    """The sample's process died or broke the protocol; the message is the whole detail."""


class TestsNeedInProcess(BaseException):
    """The tests passed an argument that cannot cross to the sample's process (a BaseException, so that the
    tests' own `except Exception` cannot swallow it)."""


def main() -> None:
    status = int(sys.argv[1])
    plan = marshal.loads(receive(0))  # unbuffered: the job stays in the pipe until the sample is forked
    try:
        _confine(plan)
    except OSError as error:
        print(f"qgpt-sandbox: {error}", file=sys.stderr, flush=True)
        os._exit(125)
    os.write(status, b"started\n")
    for module in plan["preload"]:  # the prompt's standard-library imports, shared with the fork
        try:
            __import__(module)
        except Exception:
            pass
    sample = Sample(plan)
    if plan["checker_uid"] is not None:
        confine.become(plan["checker_uid"])
        confine.not_dumpable()  # changing uid may reset it
    job = marshal.loads(receive(0))
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    apply_limits(job["limits"])
    sys.path.extend(job["site_packages"])
    sys.set_int_max_str_digits(0)  # a correct answer may be a huge integer
    try:
        _run(job, sample)
        verdict = "passed"
    except TestsNeedInProcess:
        verdict = "in-process"
    except SampleFailed as failure:
        verdict = f"failed {failure}"
    except BaseException as error:  # the tests failed: an assertion, or the sample's exception raised again
        sys.excepthook(type(error), error, error.__traceback__)
        verdict = f"failed {_last_line(error)}"
    # the verdict and the detail go where only this process writes (the sample's output is on stdout/stderr)
    os.write(status, f"{job['token']} {verdict}".replace("\n", " ").encode("utf-8", "backslashreplace") + b"\n")
    os._exit(0)


def _confine(plan: dict) -> None:
    os.umask(0o022)
    if plan["new_root"] is not None:
        confine.build_root(plan["new_root"], plan["layout"], plan["scratch_bytes"], plan["sample_uid"])
    os.chdir(plan["workdir"])
    confine.block_unix_sockets()
    confine.not_dumpable()


def _run(job: dict, sample: "Sample") -> None:
    """Returns when the tests ran to the end; raises otherwise."""
    trial = job["trial"]
    program = trial["code"]
    if not trial["split"]:  # the tests in the sample's process: Problem.program's script
        program += f"\n{trial['test']}\ncheck({trial['entry_point']})\n"
    sample.send({"code": program, "entry_point": trial["entry_point"], "split": trial["split"],
                 "limits": job["limits"], "site_packages": job["site_packages"]})  # fmt: skip
    if not trial["split"]:
        sample.expect("done")
        return
    sample.expect("ready")
    namespace: dict = {}
    exec(compile(trial["context"], "prompt.py", "exec"), namespace)
    candidate = sample.function(trial["entry_point"])
    namespace[trial["entry_point"]] = candidate  # tests that call the function by its name get the sample's too
    exec(compile(trial["test"], "test.py", "exec"), namespace)
    namespace["check"](candidate)
    sample.close()


class Sample:
    """The sample's process, forked from this one with a pipe each way."""

    def __init__(self, plan: dict):
        requests_read, self.requests = os.pipe()
        self.replies, replies_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            _become_the_sample(plan, requests_read, replies_write)
        os.close(requests_read)
        os.close(replies_write)

    def function(self, name: str):
        def candidate(*args, **kwargs):
            if not _is_plain((args, kwargs)):
                raise TestsNeedInProcess
            self.send((args, kwargs))
            reply = self._reply()
            if reply[0] == "ok" and len(reply) == 2:
                return reply[1]
            if reply[0] == "raise" and len(reply) == 3 and all(type(part) is str for part in reply[1:]):
                raise _exception(reply[1], reply[2])
            raise SampleFailed(f"the sample broke the protocol: {str(reply)[:200]}")

        candidate.__name__ = candidate.__qualname__ = name
        return candidate

    def expect(self, word: str) -> None:
        """The sample's program ran: `ready` for calls, or `done` (its tests included); else its error line."""
        reply = self._reply()
        if reply[0] == "error" and len(reply) == 2 and type(reply[1]) is str:
            raise SampleFailed(reply[1])
        if reply != (word,):
            raise SampleFailed(f"the sample broke the protocol: {str(reply)[:200]}")

    def close(self) -> None:
        os.close(self.requests)  # the sample's process leaves at this end of file

    def send(self, message) -> None:
        try:
            send(self.requests, marshal.dumps(message))
        except BrokenPipeError:
            raise SampleFailed(self._fate()) from None

    def _reply(self) -> tuple:
        try:
            payload = receive(self.replies)
        except WireError as error:
            raise SampleFailed(f"the sample sent {error}") from None
        if payload is None:
            raise SampleFailed(self._fate())
        try:
            reply = _literal(compile(payload.decode("utf-8"), "reply", "eval", _ast.PyCF_ONLY_AST).body)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as error:
            raise SampleFailed(f"the sample's reply is not plain values ({type(error).__name__})") from None
        if type(reply) is not tuple or not reply or type(reply[0]) is not str:
            raise SampleFailed(f"the sample broke the protocol: {str(reply)[:200]}")
        return reply

    def _fate(self) -> str:
        """How the sample's process ended, once it closed its end of the pipe."""
        _, status = os.waitpid(self.pid, 0)
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            return f"killed by {_SIGNALS.get(number, f'signal {number}')}"
        return f"exited with status {os.waitstatus_to_exitcode(status)} before the tests finished"


def _become_the_sample(plan: dict, requests: int, replies: int) -> None:
    """In the forked child: drop everything this process holds that the sample must not, then serve."""
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the job (and its token) is still in the stdin pipe
        for fd in map(int, os.listdir("/proc/self/fd")):  # the status descriptor and the other pipe ends
            if fd > 2 and fd not in (requests, replies):
                try:
                    os.close(fd)
                except OSError:  # listdir's own descriptor, closed already
                    pass
        if plan["sample_uid"] is not None:
            confine.become(plan["sample_uid"])
        elif plan["drop_capabilities"]:
            confine.drop_capabilities()
    except BaseException as error:
        os.write(2, f"qgpt-sandbox: cannot become the sample: {error}\n".encode())
        os._exit(127)
    try:
        inside_candidate.serve(requests, replies)
    except SystemExit as leaving:  # sys.exit() in the sample: the status a script would leave with
        code = leaving.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
        _exit(0 if code is None else code if isinstance(code, int) else 1)
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the traceback, as the interpreter would print it
        _exit(1)
    _exit(1)  # serve() never returns; this child must never run the checker's code


def _exit(status: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status & 0xFF)


def _is_plain(value, depth: int = 0) -> bool:
    """Exactly None, bool, int, float, complex, str, bytes, or lists, tuples, sets and dicts of them."""
    kind = type(value)
    if value is None or kind in _SCALARS:
        return True
    if depth > 100:
        return False
    if kind in _CONTAINERS:
        return all(_is_plain(item, depth + 1) for item in value)
    if kind is dict:
        return all(_is_plain(key, depth + 1) and _is_plain(item, depth + 1) for key, item in value.items())
    return False


def _literal(node, depth: int = 0):
    """The value of a parsed Python literal, as repr() writes plain values (inf, nan, infj and frozenset({...})
    included); anything else raises ValueError. Parsed with compile(), so nothing of the reply runs."""
    if depth > 200:
        raise ValueError("nested too deeply")
    kind = type(node)

    def inner(child):
        return _literal(child, depth + 1)

    if kind is _ast.Constant and node.value is not Ellipsis:
        return node.value
    if kind in (_ast.Tuple, _ast.List, _ast.Set):
        items = [inner(item) for item in node.elts]
        return tuple(items) if kind is _ast.Tuple else items if kind is _ast.List else set(items)
    if kind is _ast.Dict and None not in node.keys:
        return {inner(key): inner(value) for key, value in zip(node.keys, node.values, strict=True)}
    if kind is _ast.Name and node.id in ("inf", "nan", "infj", "nanj"):
        return float(node.id) if len(node.id) == 3 else complex(0, float(node.id[:3]))
    if kind is _ast.UnaryOp and type(node.op) in (_ast.USub, _ast.UAdd):
        operand = _number(inner(node.operand))
        return -operand if type(node.op) is _ast.USub else operand
    if kind is _ast.BinOp and type(node.op) in (_ast.Add, _ast.Sub):  # a complex number: (1+2j)
        left, right = _number(inner(node.left)), _number(inner(node.right))
        if type(right) is complex:
            return left + right if type(node.op) is _ast.Add else left - right
    if kind is _ast.Call and type(node.func) is _ast.Name and not node.keywords:  # set(), frozenset({...})
        if node.func.id == "set" and not node.args:
            return set()
        if node.func.id == "frozenset" and len(node.args) <= 1:
            return frozenset(inner(node.args[0]) if node.args else ())
    raise ValueError(f"not a plain value: {kind.__name__}")


def _last_line(error: BaseException) -> str:
    import traceback  # only a failure pays for it

    return traceback.format_exception_only(type(error), error)[-1].strip()


def _number(value):
    if type(value) not in (int, float, complex):
        raise ValueError("not a number")
    return value


def _exception(name: str, message: str) -> Exception:
    """The sample's exception as the tests will see it: the builtin class of that name, or one named like it."""
    builtin = getattr(builtins, name, None) if name.isidentifier() else None
    if isinstance(builtin, type) and issubclass(builtin, Exception) and not issubclass(builtin, _NOT_RERAISED):
        try:
            return builtin(message)
        except Exception:
            pass
    named = type(name if name.isidentifier() else "SampleError", (Exception,), {"__module__": "builtins"})
    return named(message)
