"""V1 nets (`layers { type: CONVOLUTION }`) upgraded in memory to today's `layer` form, as Caffe's
own UpgradeV1Net does; what we write is always the new form."""

from . import proto

V1_TYPES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL", "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution", "DECONVOLUTION": "Deconvolution",
    "DATA": "Data", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}  # fmt: skip
_PARAM_LISTS = ("param", "blob_share_mode", "blobs_lr", "weight_decay")  # become ParamSpec entries
_RENAMED = {"blobs_lr": "lr_mult", "weight_decay": "decay_mult", "param": "name", "blob_share_mode": "share_mode"}
_HANDLED = {"type", "layer", *_PARAM_LISTS}


def upgrade_layer(old: object) -> object:
    """One V1LayerParameter as a LayerParameter (blobs included)."""
    layer = proto.LayerParameter()
    for field, value in old.ListFields():
        if field.name in _HANDLED:
            continue
        target = getattr(layer, field.name)
        if hasattr(target, "extend"):  # a repeated field
            target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(layer, field.name, value)
    layer.type = V1_TYPES.get(proto.V1LayerParameter.LayerType.Name(old.type), "")
    for name in _PARAM_LISTS:
        for i, value in enumerate(getattr(old, name)):
            while len(layer.param) <= i:
                layer.param.add()
            setattr(layer.param[i], _RENAMED[name], value)
    return layer


def upgrade_net(net: object) -> object:
    """A NetParameter with its V1 `layers` moved to `layer` (other fields as they are)."""
    upgraded = proto.NetParameter()
    upgraded.CopyFrom(net)
    upgraded.ClearField("layers")
    upgraded.layer.extend(upgrade_layer(old) for old in net.layers)
    return upgraded
