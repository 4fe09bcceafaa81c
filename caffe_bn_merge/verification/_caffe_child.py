"""Run one Caffe model on pycaffe (CPU) and save the requested blobs: the child side of caffe_backend.

Runs as a plain script under the pycaffe interpreter (scripts/install_pycaffe.sh), with nothing but
caffe, numpy and protobuf importable, so it imports nothing from caffe_bn_merge:

    python -I _caffe_child.py REQUEST.json

REQUEST.json: {"model", "weights", "inputs": [[blob, file.npy], ...], "outputs": [[layer, top], ...],
"out_dir"}. For output i it writes out_dir/out{i}.npy: the value of `top` right after `layer` ran
(in-place layers later in the net may overwrite the blob, so the net is run up to each layer in turn).
With "timing": {"models": [[model, weights], [model, weights]], "rounds", "warmup"} instead of
"model" / "weights" / "outputs", it loads both models, sets the inputs, runs `warmup` untimed forward
passes of each, then `rounds` rounds timing one forward pass of each (which goes first alternates),
and writes out_dir/times.json: [[seconds of the first model per round], [of the second]].
On failure: one line "caffe_child: error: ..." on stderr and exit code 1; Caffe's own fatal checks
abort the process with glog's "F... ] message" line instead.
"""

import json
import os
import sys

os.environ.setdefault("GLOG_minloglevel", "2")  # before caffe loads glog: errors and fatals only

PREFIX = "caffe_child: error: "


class ChildError(Exception):
    pass


def main(request_path: str) -> None:
    with open(request_path, encoding="utf-8") as file:
        request = json.load(file)
    try:
        import caffe
        import numpy as np
    except ImportError as err:
        raise ChildError(f"cannot import pycaffe in {sys.executable}: {err}") from err

    caffe.set_mode_cpu()
    if "timing" in request:
        _time(caffe, np, request)
        return
    net = caffe.Net(request["model"], caffe.TEST, weights=request["weights"])  # = Net(model, weights, TEST)
    _set_inputs(net, request["inputs"], np)

    layer_names = list(net._layer_names)
    index = {name: i for i, name in enumerate(layer_names)}
    wanted = [(str(layer), str(top)) for layer, top in request["outputs"]]
    for layer, top in wanted:
        if layer not in index:
            raise ChildError(f"no layer {layer!r} in the TEST net")
        if top not in net.top_names[layer]:
            raise ChildError(f"layer {layer!r} does not write {top!r} (tops: {', '.join(net.top_names[layer])})")

    # Run the net in order, stopping after each requested layer to copy its tops as they are then.
    results = {}
    start = 0
    for end in sorted({index[layer] for layer, _ in wanted}):
        net._forward(start, end)
        start = end + 1
        for i, (layer, top) in enumerate(wanted):
            if index[layer] == end:
                results[i] = np.array(net.blobs[top].data, dtype=np.float64)
    for i in range(len(wanted)):
        np.save(os.path.join(request["out_dir"], f"out{i}.npy"), results[i], allow_pickle=False)


def _set_inputs(net, inputs, np):
    """Load each [name, file.npy] into the net's input blob of that name, reshaping when needed."""
    reshaped = False
    values = {}
    for name, path in inputs:
        if name not in net.inputs:
            raise ChildError(f"{name!r} is not an input of the net (inputs: {', '.join(net.inputs)})")
        value = np.load(path, allow_pickle=False)
        values[name] = value
        if net.blobs[name].data.shape != value.shape:
            net.blobs[name].reshape(*value.shape)
            reshaped = True
    if reshaped:
        net.reshape()
    for name, value in values.items():
        net.blobs[name].data[...] = value


def _time(caffe, np, request):
    """Timing mode: interleaved forward passes of the models, seconds per round in times.json."""
    import time

    timing = request["timing"]
    nets = [caffe.Net(model, caffe.TEST, weights=weights) for model, weights in timing["models"]]
    for net in nets:
        _set_inputs(net, request["inputs"], np)
    for _ in range(int(timing["warmup"])):
        for net in nets:
            net.forward()
    times = [[] for _ in nets]
    for round_ in range(int(timing["rounds"])):
        order = range(len(nets)) if round_ % 2 == 0 else reversed(range(len(nets)))
        for i in order:
            start = time.perf_counter()
            nets[i].forward()
            times[i].append(time.perf_counter() - start)
    with open(os.path.join(request["out_dir"], "times.json"), "w", encoding="utf-8") as file:
        json.dump(times, file)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write(f"{PREFIX}usage: {sys.argv[0]} REQUEST.json\n")
        sys.exit(2)
    try:
        main(sys.argv[1])
    except ChildError as err:
        sys.stderr.write(f"{PREFIX}{err}\n")
        sys.exit(1)
    except Exception as err:  # one line for the parent, whatever went wrong
        sys.stderr.write(f"{PREFIX}{type(err).__name__}: {' '.join(str(err).split())}\n")
        sys.exit(1)
