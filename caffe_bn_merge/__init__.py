"""caffe-bn-merge: fold BatchNorm/Scale layers of Caffe models into the layers they follow.

Library use::

    from caffe_bn_merge import merge
    result = merge("deploy.prototxt", "model.caffemodel")   # writes *_merged.* beside the inputs
    print(len(result.plan.folds), [k.refusal for k in result.plan.kept])
"""

__version__ = "0.1.0"

from .errors import InputError, MergeError, MismatchError, OutputError
from .merge import MergeResult, merge

__all__ = ["InputError", "MergeError", "MergeResult", "MismatchError", "OutputError", "__version__", "merge"]
