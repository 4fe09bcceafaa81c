"""caffe-bn-merge: fold BatchNorm/Scale layers of Caffe models into the layers they follow.

Library use (see README, "As a library")::

    from caffe_bn_merge import merge, verify
    result = merge("deploy.prototxt", "model.caffemodel")   # writes *_merged.* beside the inputs
    checked = verify(("deploy.prototxt", "model.caffemodel"), (result.output_model, result.output_weights))

The public names load on first use, so `merge-bn --help` starts without numpy or protobuf.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "InputError": "errors",
    "MergeError": "errors",
    "MergedRunError": "errors",
    "MismatchError": "errors",
    "OutputError": "errors",
    "UsageError": "errors",
    "VerifyError": "errors",
    "MergeOptions": "pipeline",
    "MergeResult": "pipeline",
    "NetCache": "pipeline",
    "merge": "pipeline",
    "build_report": "report",
    "decisions": "report",
    "VerifyResult": "verification.compare",
    "verify": "verification.compare",
}
__all__ = [*sorted(_PUBLIC), "__version__"]


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'caffe_bn_merge' has no attribute {name!r}")
    return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
