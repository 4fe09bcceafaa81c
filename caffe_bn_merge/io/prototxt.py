"""Net prototxt text: finding each top-level `layer { ... }` block, and writing a changed net back
into the original text, so that untouched layers keep their comments, formatting and any field
our schema does not know, and `diff` shows only real changes.
"""

import dataclasses
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from google.protobuf import text_format

# What block structure depends on: braces, and strings and comments (which may hold braces).
_STRUCTURE = re.compile(r"""[{}<>]|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|\#[^\n]*|["']""")
_WORD = "_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # field name characters


@dataclass(frozen=True)
class Block:
    """A top-level `layer` (or V1 `layers`) block: the field name and its byte span in the text."""

    field: str
    start: int  # start of the line holding the field name
    end: int  # after the closing brace and the rest of its line


def layer_blocks(text: str) -> list[Block]:
    """Every top-level `layer` / `layers` block, in order."""
    blocks: list[Block] = []
    depth, current = 0, None
    gap = [(0, 0)]  # the text since the last string or brace, as spans between comments
    for token in _STRUCTURE.finditer(text):
        kind = token.group()
        gap[-1] = (gap[-1][0], token.start())
        if kind.startswith("#"):
            gap.append((token.end(), token.end()))
            continue
        if kind in ("{", "<"):
            if depth == 0:
                current = _field_before(text, gap)
                current = current if current[0] in ("layer", "layers") else None
            depth += 1
        elif kind in ("}", ">"):
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced braces")
            if depth == 0 and current:
                blocks.append(Block(current[0], _line_start(text, current[1]), _line_end(text, token.end())))
                current = None
        elif kind in ("'", '"'):
            raise ValueError("unterminated string")
        gap = [(token.end(), token.end())]
    return blocks


def _field_before(text: str, gap: list[tuple[int, int]]) -> tuple[str, int]:
    """The field name an opening brace belongs to (`name {` or `name: {`, comments between
    allowed): the last word of the text before the brace, and where that word starts."""
    colon = True  # one colon may follow the name
    for start, end in reversed(gap):
        piece = text[start:end].rstrip()
        if colon and piece.endswith(":"):
            piece, colon = piece[:-1].rstrip(), False
        if piece:
            word = piece[len(piece.rstrip(_WORD)) :]
            return word, start + len(piece) - len(word)
    return "", 0


def _line_start(text: str, pos: int) -> int:
    start = text.rfind("\n", 0, pos) + 1
    return start if not text[start:pos].strip() else pos


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else (end + 1 if not text[pos:end].strip() else pos)


def render_layer(layer: object, indent: str, field: str = "layer") -> str:
    """One layer block in text format, at `indent`."""
    body = text_format.MessageToString(layer, indent=len(indent) + 2)
    return f"{indent}{field} {{\n{body}{indent}}}\n"


def splice(text: str, blocks: Sequence[Block], replacements: Sequence[str | None]) -> str:
    """`text` with block i replaced by replacements[i] (None keeps it verbatim, "" removes it)."""
    out, pos = [], 0
    for block, new in zip(blocks, replacements, strict=True):
        out.append(text[pos : block.start])
        out.append(text[block.start : block.end] if new is None else new)
        pos = block.end
    out.append(text[pos:])
    return "".join(out)


def indent_of(text: str, block: Block) -> str:
    line = text[block.start : text.find("\n", block.start)]
    return line[: len(line) - len(line.lstrip())]


@dataclass
class NetText:
    """A net prototxt: its text, the net as parsed (always in `layer` form), and per layer the text
    block it came from, so untouched layers are written back exactly as they were."""

    text: str
    net: object
    blocks: list[Block] | None  # None: the text is written anew (V1 input, or blocks not matched)
    frozen: frozenset[str]  # layers holding fields the schema does not know: never changed
    schema: "Schema"
    unknown_fields: bool = False  # the text holds fields the schema does not know
    # Changed layers as printed, by (serialized layer, indent): a NetText reused for many caffemodels
    # (`pipeline.NetCache`) prints each distinct changed layer once.
    rendered: dict[tuple[bytes, str], str] = dataclasses.field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Schema:
    """The message classes prototxt text is parsed and printed with (ours, or `--caffe-proto`'s).
    Any other schema is bridged to ours through the binary form, which keeps unknown fields."""

    net_class: type
    layer_class: type

    def parse(self, text: str, strict: bool) -> object:
        """Text -> our NetParameter; raises text_format.ParseError."""
        from . import proto

        net = self.net_class()
        text_format.Parse(text, net, allow_unknown_field=not strict)
        return net if self.net_class is proto.NetParameter else proto.NetParameter.FromString(net.SerializeToString())

    def render(self, layer: object, indent: str) -> str:
        """Our LayerParameter -> a `layer { ... }` block in this schema's terms."""
        if not isinstance(layer, self.layer_class):
            layer = self.layer_class.FromString(layer.SerializeToString())
        return render_layer(layer, indent)

    def render_net(self, net: object) -> str:
        from . import proto

        if self.net_class is not proto.NetParameter:
            net = self.net_class.FromString(net.SerializeToString())
        return text_format.MessageToString(net)


def parse_net_text(text: str, schema: Schema) -> NetText:
    """Parse leniently: layers with fields the schema does not know are kept as written (frozen)."""
    from .upgrade import upgrade_net

    try:
        net, unknown = schema.parse(text, strict=True), False
    except text_format.ParseError:
        net, unknown = schema.parse(text, strict=False), True
    if any(old.HasField("layer") for old in net.layers):
        raise text_format.ParseError("V0 layers are not supported")
    blocks = _match_blocks(text, net)
    frozen = frozenset(_unknown_field_layers(text, blocks, net, schema)) if unknown and blocks else frozenset()
    if net.layers:
        net, blocks = upgrade_net(net), None
    return NetText(text, net, blocks, frozen, schema, unknown)


def _match_blocks(text: str, net: object) -> list[Block] | None:
    try:
        blocks = layer_blocks(text)
    except ValueError:
        return None
    return blocks if len(blocks) == len(net.layer) + len(net.layers) else None


def _unknown_field_layers(text: str, blocks: list[Block], net: object, schema: Schema) -> Iterator[str]:
    for block, layer in zip(blocks, [*net.layer, *net.layers], strict=True):
        try:
            schema.parse(text[block.start : block.end], strict=True)
        except text_format.ParseError:
            yield layer.name


def render_net_text(original: NetText, net: object, origin: Sequence[int]) -> str:
    """The text of `net`, whose layer i came from original layer origin[i]: untouched layers
    verbatim, changed ones printed anew, removed ones gone."""
    if original.blocks is None:
        return original.schema.render_net(net)
    now = dict(zip(origin, net.layer, strict=True))
    replacements: list[str | None] = []
    for i, block in enumerate(original.blocks):
        layer = now.get(i)
        if layer is None:
            replacements.append("")
        elif layer == original.net.layer[i]:
            replacements.append(None)
        else:
            replacements.append(_render_once(original, layer, indent_of(original.text, block)))
    return splice(original.text, original.blocks, replacements)


def _render_once(original: NetText, layer: object, indent: str) -> str:
    """`original.schema.render(layer, indent)`, remembered in `original.rendered`."""
    key = (layer.SerializeToString(deterministic=True), indent)
    if key not in original.rendered:
        original.rendered[key] = original.schema.render(layer, indent)
    return original.rendered[key]
