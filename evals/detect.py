"""Which isolation works on this machine: each mode is probed by scoring one tiny trial through it.

`detect("auto")` takes bubblewrap, else unshare (both keep the host's files out of reach), and says why it did
not take bubblewrap; when neither works it refuses, with each one's reason: untrusted code does not run without
filesystem isolation unless the user asks for `--isolation none` by name. A named mode that does not work
raises with the reason (the wrapper's or the checker's own error line).
"""

from __future__ import annotations

import functools
from dataclasses import replace

from qgpt_code.evals.isolation import BUILDERS, MODES, Isolation, SandboxError
from qgpt_code.evals.sandbox import PASSED, Limits, Sandbox, Trial

_PROBE = Trial(
    code="def echo(value):\n    return value\n",
    test="def check(candidate):\n    assert candidate([1, 'a', None, 2.5]) == [1, 'a', None, 2.5]\n",
    entry_point="echo",
)
_INSTALL = {"bwrap": "bubblewrap is not installed (apt-get install bubblewrap)",
            "unshare": "util-linux's unshare is not installed"}  # fmt: skip


@functools.cache
def probe(mode: str) -> Isolation | str:
    """The isolation if it works here, else why not."""
    isolation = BUILDERS[mode]()
    if isolation is None:
        return _INSTALL[mode]
    with Sandbox(Limits(timeout_s=60), isolation) as sandbox:
        trial = sandbox.run(_PROBE)
    return isolation if trial.outcome == PASSED else f"it does not work here: {trial.detail}"


def available(mode: str) -> Isolation | None:
    found = probe(mode)
    return found if isinstance(found, Isolation) else None


def detect(requested: str = "auto") -> Isolation:
    """The isolation to use: the one requested, or with `auto` the strongest that works here."""
    if requested not in MODES:
        raise SandboxError(f"unknown isolation {requested!r}; expected one of {', '.join(MODES)}")
    if requested != "auto":
        found = probe(requested)
        if isinstance(found, str):
            raise SandboxError(f"--isolation {requested}: {found}")
        return found
    reasons: list[str] = []
    for mode in ("bwrap", "unshare"):
        found = probe(mode)
        if isinstance(found, Isolation):
            return replace(found, notes=tuple(f"not using {reason}" for reason in reasons))
        reasons.append(f"{mode}: {found}")
    raise SandboxError(
        "refusing to run untrusted samples without filesystem isolation (" + "; ".join(reasons) + "). "
        "Install bubblewrap (apt-get install bubblewrap), or pass --isolation none if this machine is itself "
        "a throwaway sandbox"
    )
