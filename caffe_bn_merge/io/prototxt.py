"""Net prototxt text: finding each top-level `layer { ... }` block, and writing a changed net back
into the original text, so that untouched layers keep their comments, formatting and any field
our schema does not know, and `diff` shows only real changes.

Every layout protobuf's text format reads is understood, in time and memory linear in the text:
one line or many, LF or CRLF line ends, any blanks, comments anywhere (also between a field name and
its brace), braces and `#` inside strings, `layer {`, `layer{`, `layer: {`, `layer <...>`, and
fields after the layers. A changed layer is printed in its block's style: on one line if it was
written on one line, else with its indent step, line ends and comments.
"""

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from google.protobuf import text_format

from ..errors import InputError
from .bridge import convert

# What block structure depends on: braces, and strings and comments (which may hold braces).
_STRUCTURE = re.compile(r"""[{}<>]|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|\#[^\n]*|["']""")
_WORD = "_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # field name characters
_REST_OF_LINE = re.compile(r"[^\S\n]*(?:\n|\Z)")  # blanks up to the line end (or the text's end)
_BLANKS = re.compile(r"[ \t]*")
_INNER_INDENT = re.compile(r"\n([ \t]+)\S")  # a line's indent


@dataclass(frozen=True)
class Block:
    """A top-level `layer` (or V1 `layers`) block: the field name and its span in the text. A block
    owns whole lines when nothing else is on them: then `start` is its line's start and `end` is
    after its line end; otherwise they are the field name's start and the closing brace's end."""

    field: str
    start: int  # the line start before the field name, or the field name
    end: int  # after the line end that follows the closing brace, or after the brace
    name: int  # where the field name starts
    close: int  # after the closing brace


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
                current = _layer_opening(text, gap)
            depth += 1
        elif kind in ("}", ">"):
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced braces")
            if depth == 0 and current:
                blocks.append(_block(text, *current, token.end()))
                current = None
        elif kind in ("'", '"'):
            raise ValueError("unterminated string")
        gap = [(token.end(), token.end())]
    return blocks


def _layer_opening(text: str, gap: list[tuple[int, int]]) -> tuple[str, int, int] | None:
    """For a top-level brace opening a layer: its field, the line start before the field name
    (or the name, when something precedes it on its line) and the name's start."""
    field, name = _field_before(text, gap)
    if field not in ("layer", "layers"):
        return None
    return field, _line_start(text, name, gap[0][0]), name


def _block(text: str, field: str, start: int, name: int, close: int) -> Block:
    rest = _REST_OF_LINE.match(text, close)
    return Block(field, start, rest.end() if rest else close, name, close)


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


def _line_start(text: str, pos: int, floor: int) -> int:
    """The start of `pos`'s line if only blanks precede `pos` on it, else `pos`. `floor`: the end
    of the last string or brace before `pos`, so the search never goes back further than that."""
    newline = text.rfind("\n", floor, pos)
    if newline < 0 and floor > 0:
        return pos  # the string or brace at `floor` is on this line
    start = newline + 1
    return start if not text[start:pos].strip() else pos


@dataclass(frozen=True)
class Style:
    """How a block is written: one indent step inside it, its line end, or all on one line."""

    step: str = "  "
    newline: str = "\n"
    one_line: bool = False


def render_layer(layer: object, indent: str, field: str = "layer", style: Style = Style()) -> str:
    """One layer block in text format at `indent`, in `style`, ending with a line end."""
    end = style.newline
    if style.one_line:
        return f"{indent}{field} {{ {text_format.MessageToString(layer, as_one_line=True)} }}{end}"
    lines = text_format.MessageToString(layer).split("\n")  # nested two spaces a level
    body = "".join(f"{indent}{style.step * (1 + _depth(line))}{line.lstrip(' ')}{end}" for line in lines if line)
    return f"{indent}{field} {{{end}{body}{indent}}}{end}"


def _depth(line: str) -> int:
    return (len(line) - len(line.lstrip(" "))) // 2


def splice(text: str, blocks: Sequence[Block], replacements: Sequence[str | None]) -> str:
    """`text` with block i replaced by replacements[i] (None keeps it verbatim, "" removes it)."""
    out, pos = [], 0
    for block, new in zip(blocks, replacements, strict=True):
        start, end = _removed_span(text, block, pos) if new == "" else (block.start, block.end)
        out.append(text[pos:start])
        out.append(text[start:end] if new is None else new)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _removed_span(text: str, block: Block, floor: int) -> tuple[int, int]:
    """What a removed block takes with it: its lines when it owns them, else the blanks that would
    be left doubled on its line (looking back no further than `floor`)."""
    owns_start = block.start == 0 or text[block.start - 1] == "\n"
    owns_end = block.end == len(text) or text[block.end - 1] == "\n"
    if owns_start and owns_end:
        return block.start, block.end
    after = _BLANKS.match(text, block.close).end()
    if not owns_end:
        return block.name, after
    return floor + len(text[floor : block.name].rstrip(" \t")), after


@dataclass
class NetText:
    """A net prototxt: its text, the net as parsed (always in `layer` form), and per layer the text
    block it came from, so untouched layers are written back exactly as they were."""

    text: str
    net: object
    blocks: list[Block] | None  # None: the text is written anew (blocks not matched)
    frozen: frozenset[str]  # layers holding fields the schema does not know: never changed
    schema: "Schema"
    unknown_fields: bool = False  # the text holds fields the schema does not know
    upgraded: bool = False  # V1 `layers`: every block is printed anew in the `layer` form
    # Changed layers as printed, by (serialized layer, block start): a NetText reused for many
    # caffemodels (`pipeline.NetCache`) prints each distinct changed layer once.
    rendered: dict[tuple[bytes, int], str] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Schema:
    """The message classes prototxt text is parsed and printed with (ours, or `--caffe-proto`'s).
    Any other schema is bridged to ours through the binary form, which keeps unknown fields."""

    net_class: type
    layer_class: type

    def parse(self, text: str, strict: bool) -> tuple[object, set[str]]:
        """Text -> our NetParameter, and the names of the layers holding fields our schema has no
        place for (only with another schema); raises text_format.ParseError."""
        from . import proto

        net = self.net_class()
        text_format.Parse(text, net, allow_unknown_field=not strict)
        if self.net_class is proto.NetParameter:
            return net, set()
        layer_classes = ((net.layer, proto.LayerParameter), (net.layers, proto.V1LayerParameter))
        lossy = {layer.name for layers, ours in layer_classes for layer in layers if convert(layer, ours, True)[1]}
        return convert(net, proto.NetParameter)[0], lossy

    def render(self, layer: object, indent: str, style: Style = Style()) -> str:
        """Our LayerParameter -> a `layer { ... }` block in this schema's terms (see `render_layer`)."""
        return render_layer(self._theirs(layer, self.layer_class), indent, style=style)

    def render_net(self, net: object) -> str:
        return text_format.MessageToString(self._theirs(net, self.net_class))

    @staticmethod
    def _theirs(message: object, target_class: type) -> object:
        """One of our messages in this schema's terms; refuses to drop anything."""
        if isinstance(message, target_class):
            return message
        theirs, lost = convert(message, target_class)
        if lost:
            raise InputError(f"the --caffe-proto schema has no field for {', '.join(lost[:3])}")
        return theirs


def parse_net_text(text: str, schema: Schema) -> NetText:
    """Parse leniently: layers with fields the schema does not know are kept as written (frozen)."""
    from .upgrade import upgrade_net

    try:
        (net, lossy), unknown = schema.parse(text, strict=True), False
    except text_format.ParseError:
        (net, lossy), unknown = schema.parse(text, strict=False), True
    if any(old.HasField("layer") for old in net.layers):
        raise text_format.ParseError("V0 layers are not supported")
    blocks = _match_blocks(text, net)
    frozen = frozenset(_unknown_field_layers(text, blocks, net, schema)) if unknown and blocks else frozenset()
    frozen |= lossy if blocks else frozenset()
    unknown = unknown or bool(lossy)
    if net.layers:  # V1: blocks kept only where printing every layer anew loses nothing
        blocks = None if unknown or net.layer else blocks
        return NetText(text, upgrade_net(net), blocks, frozen, schema, unknown, upgraded=True)
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
        elif layer == original.net.layer[i] and not original.upgraded:
            replacements.append(None)
        else:
            replacements.append(_render_once(original, block, layer))
    return splice(original.text, original.blocks, replacements)


def _render_once(original: NetText, block: Block, layer: object) -> str:
    """`_rewritten(original, block, layer)`, remembered in `original.rendered`."""
    key = (layer.SerializeToString(deterministic=True), block.start)
    if key not in original.rendered:
        original.rendered[key] = _rewritten(original, block, layer)
    return original.rendered[key]


def _rewritten(original: NetText, block: Block, layer: object) -> str:
    """A changed layer in its block's style (`_style`), with the comments it held on lines of
    their own at its top."""
    text = original.text
    written = text[block.name : block.close]
    indent = text[block.start : block.name]  # blanks, or "" when the block does not start its line
    style = _style(written, indent)
    rendered = original.schema.render(layer, indent, style)
    comments = [token.group().rstrip() for token in _STRUCTURE.finditer(text, block.name, block.close)]
    opening, body = rendered.split(style.newline, 1)
    notes = "".join(f"{indent}{style.step}{note}{style.newline}" for note in comments if note.startswith("#"))
    return f"{opening}{style.newline}{notes}{body}".removesuffix(style.newline) + text[block.close : block.end]


def _style(written: str, indent: str) -> Style:
    """A block's style, from its text (field name to closing brace) and its indent: on one line or
    not, CRLF or LF, and the indent step of its first inner line (two spaces if none)."""
    if "\n" not in written:
        return Style(one_line=True)
    inner = _INNER_INDENT.search(written)
    step = inner.group(1).removeprefix(indent) if inner and inner.group(1).startswith(indent) else ""
    return Style(step or "  ", "\r\n" if "\r\n" in written else "\n")
