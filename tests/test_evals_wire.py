"""What crosses between the sample's process and the tests: plain values, read back without running anything.

The inside_*.py modules run inside the sandbox as top-level modules; here they are imported the same way.
"""

from __future__ import annotations

import math
import os
import sys
from collections import Counter, OrderedDict, namedtuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qgpt_code.evals.sandbox import EVALS_DIR

sys.path.insert(0, EVALS_DIR)
import inside_candidate  # noqa: E402
import inside_checker  # noqa: E402
import inside_wire  # noqa: E402

sys.path.remove(EVALS_DIR)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.complex_numbers(allow_nan=False)
    | st.text()
    | st.binary()
)
hashable = st.recursive(scalars, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=8)
plain_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.sets(hashable, max_size=4)
        | st.frozensets(hashable, max_size=3)
        | st.dictionaries(hashable, inner, max_size=4)
    ),
    max_leaves=12,
)


def cross(value):
    """A value's way from the sample's process to the tests."""
    text = inside_candidate._literal(("ok", inside_candidate.plain(value))).decode("utf-8")
    reply = inside_checker._literal(compile(text, "reply", "eval", 0x400).body)  # PyCF_ONLY_AST
    assert reply[0] == "ok"
    return reply[1]


@given(plain_values)
def test_plain_values_cross_unchanged(value):
    crossed = cross(value)
    assert crossed == value and type(crossed) is type(value)
    assert inside_checker._is_plain(value)


def test_special_values_cross():
    assert math.isnan(cross(float("nan"))) and cross(-math.inf) == -math.inf
    assert cross(complex(math.inf, -1)) == complex(math.inf, -1)
    assert cross(frozenset({frozenset({1})})) == {frozenset({1})} and cross(set()) == set()
    huge = 7**20000  # beyond the default limit on int-to-str conversion
    sys.set_int_max_str_digits(0)
    assert cross(huge) == huge
    assert cross("\ud800") == "\ud800"  # a lone surrogate in a string is a value like any other


def test_subclasses_cross_as_their_base_and_the_rest_is_refused():
    Pair = namedtuple("Pair", "a b")
    assert type(cross(Pair(1, 2))) is tuple and cross(Pair(1, 2)) == (1, 2)
    assert type(cross(Counter("aab"))) is dict and type(cross(OrderedDict(a=[1]))) is dict

    class Sneaky(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    assert type(cross(Sneaky(3))) is int and cross(Sneaky(3)) != 4

    class Index:
        def __index__(self):
            return 5

    assert cross(Index()) == 5
    for odd in (object(), (x for x in ()), print, type, Ellipsis):
        with pytest.raises(TypeError, match="cannot be passed to the tests"):
            inside_candidate.plain(odd)
    deep: list = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(ValueError, match="nested"):
        inside_candidate.plain(deep)


@pytest.mark.parametrize("text", [
    "__import__('os').system('touch /tmp/qgpt-pwned')", "print('x')", "open('/etc/passwd')", "x", "x.y",
    "[1, 2][0]", "lambda: 1", "{**{}}", "f'{1}'", "(1).__class__", "...", "not True", "1 * 2", "1 + 1",
    "set([1])", "frozenset(x=1)", "-'a'", "'a' + 2j",
])  # fmt: skip
def test_replies_that_are_not_literals_are_refused_without_running(text):
    with pytest.raises(ValueError, match="not a"):
        inside_checker._literal(compile(text, "reply", "eval", 0x400).body)
    assert not os.path.exists("/tmp/qgpt-pwned")


def test_the_tests_arguments_must_be_exactly_plain():
    assert inside_checker._is_plain(((1, [2.5, "a"], {"k": {3}}, None, b"x", 1j), {"key": (True,)}))
    Pair = namedtuple("Pair", "a b")
    for argument in (Pair(1, 2), abs, OrderedDict(), range(3), [object()]):
        assert not inside_checker._is_plain(((argument,), {}))


def test_a_builtin_exception_is_raised_again_as_itself():
    assert type(inside_checker._exception("ValueError", "bad")) is ValueError
    assert str(inside_checker._exception("KeyError", "k")) == "'k'"
    for name in ("StopIteration", "SystemExit", "KeyboardInterrupt", "not an identifier", "print"):
        error = inside_checker._exception(name, "m")
        assert type(error).__bases__ == (Exception,) and str(error) == "m"


def test_frames(tmp_path):
    read, write = os.pipe()
    inside_wire.send(write, b"hello")
    inside_wire.send(write, b"")
    os.write(write, (inside_wire.MAX_FRAME + 1).to_bytes(8, "big"))
    os.close(write)
    assert inside_wire.receive(read) == b"hello" and inside_wire.receive(read) == b""
    with pytest.raises(inside_wire.WireError, match="a message of"):
        inside_wire.receive(read)
    assert inside_wire.receive(read) is None  # the other side closed between frames
