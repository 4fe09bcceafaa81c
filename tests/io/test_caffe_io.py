"""Reading and writing caffemodels: legacy 4-D shapes, double_data, unpacked floats, atomic and
streamed writes."""

import errno
import os
import threading

import numpy as np
import pytest
from harness import merge_and_check

from caffe_bn_merge import merge, net
from caffe_bn_merge.io import emit, proto, streaming, wire
from caffe_bn_merge.io import read as caffe_io
from caffe_bn_merge.synthetic.synth import NetBuilder


def _conv_bn_net() -> NetBuilder:
    b = NetBuilder("t", (1, 3, 8, 8), seed=5)
    b.scale(b.bn(b.conv("data", 4, name="c"), name="bn"), name="sc")
    return b


def _write_with_protobuf(b: NetBuilder, path, legacy: bool, double: bool) -> None:
    """The same weights as b's, stored the old way (legacy num/channels/height/width, double_data)."""
    net = proto.NetParameter()
    types = {layer.name: layer.type for layer in b.net.layer}
    for name, blobs in b.blobs.items():
        layer = net.layer.add(name=name, type=types[name])
        for array in blobs:
            blob = layer.blobs.add()
            if legacy:
                dims = (1,) * (4 - array.ndim) + array.shape
                blob.num, blob.channels, blob.height, blob.width = dims
            else:
                blob.shape.dim.extend(array.shape)
            (blob.double_data if double else blob.data).extend(np.asarray(array).ravel().tolist())
    path.write_bytes(net.SerializeToString())


@pytest.mark.parametrize(("legacy", "double"), [(True, False), (False, True), (True, True)])
def test_old_blob_storage_is_read_and_kept(legacy: bool, double: bool, tmp_path) -> None:
    b = _conv_bn_net()
    prototxt, caffemodel = tmp_path / "t.prototxt", tmp_path / "t.caffemodel"
    b.save(prototxt, tmp_path / "unused.caffemodel")
    _write_with_protobuf(b, caffemodel, legacy, double)
    merged = merge_and_check((prototxt, caffemodel), tmp_path, "reference")
    assert merged.removed == {"bn", "sc"}
    conv = caffe_io.read_weights(merged.merged[1]).layers["c"]
    assert conv.legacy_shape == [legacy, legacy]
    assert conv.blobs[0].dtype == (np.float64 if double else np.float32)


def test_unpacked_floats_are_read(tmp_path) -> None:
    values = np.arange(6, dtype="<f4")
    dims = wire.encode_varint(2) + wire.encode_varint(3)
    shape = wire.encode_length_delimited(1, dims) + dims
    blob = wire.encode_length_delimited(7, shape) + shape
    blob += b"".join(wire.encode_varint(5 << 3 | wire.FIXED32) + v.tobytes() for v in values)
    layer = proto.LayerParameter(name="x", type="Scale").SerializeToString()
    layer += wire.encode_length_delimited(7, blob) + blob
    path = tmp_path / "w.caffemodel"
    path.write_bytes(wire.encode_length_delimited(100, layer) + layer)
    stored = caffe_io.read_weights(path).layers["x"]
    np.testing.assert_array_equal(stored.blobs[0], values.reshape(2, 3))


def test_failed_write_leaves_nothing(tmp_path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), emit.atomic_output(target) as handle:
        handle.write(b"partial")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_blob_views_are_zero_copy(tmp_path) -> None:
    b = _conv_bn_net()
    b.save(tmp_path / "t.prototxt", tmp_path / "t.caffemodel")
    with caffe_io.read_weights(tmp_path / "t.caffemodel", hold=True) as stored:
        blob = stored.layers["c"].blobs[0]
        assert stored.mapping is not None  # a memory map under a lease, not a private copy
        assert not blob.flags.writeable and not blob.flags.owndata


def test_ordered_writer_keeps_order_and_runs_actions_after_earlier_writes(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(streaming, "AHEAD", 2)  # few buffers: blocks wait for earlier writes
    done: list[int] = []
    path = tmp_path / "out.bin"
    with path.open("wb") as handle, streaming.OrderedWriter(handle) as out:
        for i in range(20):
            out.write(bytes([i]))
            out.compute(3 + i % 5, lambda buffer, i=i: buffer.__setitem__(slice(None), bytes([100 + i]) * len(buffer)))
            out.then(lambda i=i: done.append((i, handle.tell())))
    pieces = [bytes([i]) + bytes([100 + i]) * (3 + i % 5) for i in range(20)]
    assert path.read_bytes() == b"".join(pieces)
    assert done == [(i, sum(map(len, pieces[: i + 1]))) for i in range(20)]


def test_ordered_writer_passes_on_a_failed_block(tmp_path) -> None:
    def broken(buffer: memoryview) -> None:
        raise ValueError("no such block")

    with (
        pytest.raises(ValueError, match="no such block"),
        (tmp_path / "o").open("wb") as handle,
        streaming.OrderedWriter(handle) as out,
    ):
        out.compute(4, broken)


@pytest.mark.parametrize("block_bytes", [64, 1 << 20])
def test_written_weights_do_not_depend_on_block_size(block_bytes: int, tmp_path, monkeypatch) -> None:
    """Folded blobs are streamed in blocks; the file is the same whatever the block size."""
    b = NetBuilder("t", (1, 8, 6, 6), seed=3)
    b.scale(b.bn(b.conv(b.scale(b.bn(b.conv("data", 12, name="c1"), name="b1"), name="s1"), 20, name="c2"), name="b2"))
    b.save(tmp_path / "t.prototxt", tmp_path / "t.caffemodel")
    outputs = []
    for size in (block_bytes, 1 << 30):
        monkeypatch.setattr(net, "BLOCK_BYTES", size)
        out = tmp_path / f"m{size}"
        merge(tmp_path / "t.prototxt", tmp_path / "t.caffemodel", out.with_suffix(".prototxt"), out.with_suffix(".w"))
        outputs.append(out.with_suffix(".w").read_bytes())
    assert outputs[0] == outputs[1]


def test_ordered_writer_holds_only_what_waits_for_a_block(tmp_path, monkeypatch) -> None:
    """Data is written at once unless a block before it is still being computed, and no more than
    HELD_BYTES of it waits (so folded arrays made in between are not all kept)."""
    monkeypatch.setattr(streaming, "HELD_BYTES", 8)
    computed = threading.Event()
    with (tmp_path / "o").open("wb") as handle, streaming.OrderedWriter(handle) as out:
        out.write(b"ab")
        assert handle.tell() == 2
        out.compute(2, lambda buffer: computed.wait(10) and buffer.__setitem__(slice(None), b"cd"))
        out.write(b"ef")
        assert handle.tell() == 2
        threading.Timer(0.2, computed.set).start()
        out.write(b"0123456789")
        assert handle.tell() == 16
    assert (tmp_path / "o").read_bytes() == b"abcdef0123456789"


def _net_with_untouched_weights(tmp_path):
    """conv + BatchNorm + Scale (folds) before an InnerProduct of 1.2 MB that stays as it is."""
    b = NetBuilder("t", (1, 16, 8, 8), seed=4)
    b.ip(b.scale(b.bn(b.conv("data", 16, name="c"), name="bn"), name="sc"), 300, name="fc")
    b.save(tmp_path / "t.prototxt", tmp_path / "t.caffemodel")
    return tmp_path / "t.prototxt", tmp_path / "t.caffemodel"


def _merged_weights(model, weights, out) -> bytes:
    merge(model, weights, out.with_suffix(".prototxt"), out.with_suffix(".caffemodel"))
    return out.with_suffix(".caffemodel").read_bytes()


def test_untouched_bytes_are_copied_in_the_kernel_or_written_alike(tmp_path, monkeypatch) -> None:
    model, weights = _net_with_untouched_weights(tmp_path)
    monkeypatch.setattr(emit, "VERBATIM_CHUNK", 100_000)  # several chunks for the 1.2 MB record
    kernel_copy, copies = os.copy_file_range, []

    def counted(*args):
        copies.append(args[2])
        return kernel_copy(*args)

    monkeypatch.setattr(os, "copy_file_range", counted)
    copied = _merged_weights(model, weights, tmp_path / "a")
    assert len(copies) >= 12 and sum(copies) >= 1_200_000

    def refused(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refused)
    assert _merged_weights(model, weights, tmp_path / "b") == copied
    stored = caffe_io.read_weights(tmp_path / "b.caffemodel").layers["fc"].blobs[0]
    np.testing.assert_array_equal(stored, caffe_io.read_weights(weights).layers["fc"].blobs[0])


def test_a_caffemodel_replaced_after_reading_is_not_copied_from(tmp_path) -> None:
    """The kernel copy reads the file by name again: if that is no longer the file read, the
    bytes come from the one read (its memory map) instead."""
    _, weights = _net_with_untouched_weights(tmp_path)
    original = weights.read_bytes()
    stored = caffe_io.read_weights(weights)
    replacement = tmp_path / "other.caffemodel"
    replacement.write_bytes(bytes(len(original)))
    os.replace(replacement, weights)
    emit.write_weights(stored, {}, set(), tmp_path / "copy.caffemodel")
    assert (tmp_path / "copy.caffemodel").read_bytes() == original
