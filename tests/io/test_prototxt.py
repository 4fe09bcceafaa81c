"""Finding the top-level layer blocks of a prototxt's text (what the output keeps verbatim)."""

import pytest

from caffe_bn_merge.io.prototxt import layer_blocks

TEXT = """name: "t"  # a comment with a brace {
input_shape { dim: 1 }
layer {
  name: "a}"  # } in a comment
  top: 'b{'
}
  layer: { name: "c" param { lr_mult: 1 } }   # trailing comment
layer <name: "d">
layers {
  name: "v1"
}
some_message { layer { name: "nested, not top-level" } }
state  # the phase for every layer
{ phase: TEST }
layer  # a BatchNorm layer
"""
TEXT += "\n" * 100 + '  :  # its colon\n{ name: "e" }\n'  # far from its name


def test_layer_blocks_follow_braces_not_strings_or_comments() -> None:
    blocks = layer_blocks(TEXT)
    assert [b.field for b in blocks] == ["layer", "layer", "layer", "layers", "layer"]
    spans = [TEXT[b.start : b.end] for b in blocks]
    assert spans[0] == "layer {\n  name: \"a}\"  # } in a comment\n  top: 'b{'\n}\n"
    assert spans[1] == '  layer: { name: "c" param { lr_mult: 1 } }'  # a comment after it stays outside
    assert spans[2] == 'layer <name: "d">\n'
    assert spans[3].startswith("layers {") and spans[3].endswith("}\n")
    assert spans[4].startswith("layer  # a BatchNorm layer\n") and spans[4].endswith('{ name: "e" }\n')


@pytest.mark.parametrize("text", ['layer { name: "a }', "layer { name: 'a' }}", "layer { name: 'a' "])
def test_broken_text_has_no_blocks(text: str) -> None:
    try:
        blocks = layer_blocks(text)
    except ValueError:
        return
    assert blocks == []
