"""`python signal_tracer.py ARGS...`: run `merge-bn ARGS...` as if a termination signal landed at
one chosen point of its main thread. $SIGNAL_AT (JSON) says where: from the first call of the
function named `start`, the `index`-th event (call, line, return) in a frame of one of `modules`
(by module name); there the handler in place for `signal` is called with that frame, as Python
calls it when a signal lands there (or the signal is raised, when no Python handler is in
place), and the file `fired` is created. The test's timing is then
the same on every run, and every point of the chosen code can be reached in turn."""

import json
import os
import signal
import sys
from pathlib import Path


def _tracer(spec: dict) -> object:
    modules = frozenset(spec["modules"])
    state = {"armed": False, "count": 0}

    def trace(frame: object, event: str, arg: object) -> object:
        if not state["armed"]:
            if event != "call" or frame.f_code.co_name != spec["start"]:
                return None
            state["armed"] = True
        if frame.f_globals.get("__name__") not in modules:
            return None
        state["count"] += 1
        if state["count"] == spec["index"]:
            sys.settrace(None)
            Path(spec["fired"]).touch()
            handler = signal.getsignal(spec["signal"])
            if callable(handler):
                handler(spec["signal"], frame)  # an exception from here is raised in `frame`
            else:
                signal.raise_signal(spec["signal"])  # the default action, or none
            return None
        return trace

    return trace


if __name__ == "__main__":  # not when a spawned worker runs this file again as __mp_main__
    sys.argv = ["merge-bn", *sys.argv[1:]]
    sys.settrace(_tracer(json.loads(os.environ["SIGNAL_AT"])))
    from caffe_bn_merge.cli import run

    run()
