"""Signals that cannot be raised where they land (`io.outputs`): held back in `signals_held`
blocks and in the import system, or dropped by Python in a weakref callback; each is raised at
the next check, never lost, never printed. Real signals, sent to this process."""

import importlib
import os
import signal
import sys
import threading
import weakref

import pytest

from caffe_bn_merge.io.outputs import Interrupted, raise_pending_signal, signals_held, signals_raise


def _signal_self(signum: int = signal.SIGTERM) -> None:
    """Send `signum` to this process; its handler runs as this call returns."""
    os.kill(os.getpid(), signum)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_held_signal_is_raised_where_the_outermost_block_ends(depth: int, signum: int) -> None:
    reached = []
    with pytest.raises(Interrupted) as raised, signals_raise():
        with signals_held():
            for _ in range(depth - 1):
                with signals_held():
                    _signal_self(signum)
                    reached.append("inner")
            _signal_self(signum)
            reached.append("outer")
        reached.append("after")
    assert reached == ["inner"] * (depth - 1) + ["outer"] and raised.value.signum == signum


def test_without_a_signal_a_held_block_raises_nothing() -> None:
    with signals_raise(), signals_held(), signals_held():
        pass
    raise_pending_signal()


def test_a_held_block_in_another_thread_holds_nothing() -> None:
    """Only the main thread's blocks hold back (signal handlers run there): a signal meanwhile
    is raised in the main thread at once, and the other thread's block raises nothing."""
    entered, leave, errors = threading.Event(), threading.Event(), []

    def other() -> None:
        try:
            with signals_held():
                entered.set()
                leave.wait(10)
        except BaseException as err:  # whatever it is, the test fails on it
            errors.append(err)

    thread = threading.Thread(target=other)
    thread.start()
    entered.wait(10)
    reached = []
    try:
        with pytest.raises(Interrupted), signals_raise():
            _signal_self()
            reached.append("after")
    finally:
        leave.set()
        thread.join()
    assert reached == [] and errors == []


def _drop_in_a_weakref_callback() -> None:
    """A signal whose handler runs in a weakref callback, where Python cannot raise it."""

    class Held:
        pass

    held = Held()
    ref = weakref.ref(held, lambda _: _signal_self())
    del held
    assert ref() is None


@pytest.mark.parametrize("check", ["next check", "end of the block"])
def test_a_signal_python_drops_is_not_printed_and_is_raised_later(check: str, capfd) -> None:
    reached = []
    with pytest.raises(Interrupted) as raised, signals_raise():
        _drop_in_a_weakref_callback()
        reached.append("dropped")
        if check == "next check":
            raise_pending_signal()
            reached.append("after the check")
    assert reached == ["dropped"] and raised.value.signum == signal.SIGTERM
    assert capfd.readouterr().err == ""


def test_a_dropped_signal_wins_over_an_error_leaving_the_block(capfd) -> None:
    with pytest.raises(Interrupted) as raised, signals_raise():
        _drop_in_a_weakref_callback()
        raise ValueError("the block's own error")
    assert isinstance(raised.value.__context__, ValueError) and capfd.readouterr().err == ""


def test_a_signal_in_the_import_system_is_raised_once_the_import_is_done(tmp_path, monkeypatch) -> None:
    """At each event of an import in the import system's own frames in turn (where module locks
    are taken and released): the module loads whole, the signal comes at the next check."""
    (tmp_path / "freshly_loaded.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("freshly_loaded")  # the folder's finder made: each import below is alike
    events = _import_traced("freshly_loaded")
    assert events > 20
    for index in range(1, events + 1, max(1, events // 40)):
        loaded = []
        with pytest.raises(Interrupted), signals_raise():
            assert _import_traced("freshly_loaded", signal_at=index) >= index, "the signal was not delivered"
            loaded.append(sys.modules["freshly_loaded"].VALUE)
            raise_pending_signal()
        assert loaded == [1], f"raised inside the import, at its event {index}"


IMPORT_SYSTEM = ("importlib._bootstrap", "importlib._bootstrap_external")


def _import_traced(module: str, signal_at: int | None = None) -> int:
    """Import `module` afresh and count its events (call, line, return) in the import system's
    frames; at the `signal_at`-th, SIGTERM's handler is called with that frame, as Python calls it
    when the signal lands there. Returns the count."""
    count = 0

    def trace(frame, event, arg):
        nonlocal count
        if frame.f_globals.get("__name__") not in IMPORT_SYSTEM:
            return None
        count += 1
        if count == signal_at:
            sys.settrace(None)
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, frame)
            return None
        return trace

    sys.modules.pop(module, None)
    importlib.invalidate_caches()
    sys.settrace(trace)
    try:
        importlib.import_module(module)
    finally:
        sys.settrace(None)
    return count
