"""Deciding what folds where. Each rule turns a graph into a list of `Action`s (values: nothing is
changed here) and a `Refusal` for every candidate it could not take. `passes.run_rules` runs them
in order, applying each rule's actions before the next rule looks at the net:

1. identity  (Dropout, Split, Power(1, 1, 0), a Scale/Bias/BatchNorm that is exactly the identity)
       Before: P -> a -> I -> b -> R        After: P -> a -> R
   Conditions: the readers of b can read a instead (nothing rewrites `a` before them); when b is a
   net output, the producer of a has I as its only reader and is renamed to write b.
2. forward   (the classic fold)
       Before: host -> v0 -> N1 -> ... -> Nk -> vk      After: host' -> vk
   Conditions: (1) host is a Convolution / Deconvolution / InnerProduct with one top and readable
   weights; (2) each v_{j-1} has exactly one reader, N_j, and is not a net output; (3) each N_j is a
   fixed per-channel affine map (BatchNorm with global statistics, Scale / Bias / Power(power 1)
   with one bottom, per channel on axis 1).
3. backward  (a chain before a layer)
       Before: v0 -> N1 -> ... -> Nk -> vk -> C         After: v0 -> C'
   Conditions: each v_j (j >= 1) has one reader; C is an InnerProduct or a Convolution with no
   padding (zero padding of a*x+b is not zero) and one bottom; its input channels match the chain's;
   nothing rewrites the blob v0 between N1 and C.
4. standalone  (a chain that cannot fold anywhere)
       Before: v0 -> N1 -> ... -> Nk -> vk              After: v0 -> Scale -> vk
   Conditions: two or more layers, or a BatchNorm (not SegNet's BN, a scale and shift already);
   the channel count is known.

Layers that must stay as written (`Context.fixed`: fields our schema lacks, a name other layers
share, blobs that are not float values) are never removed, folded or folded into.
"""

from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from ..graph import BlobVersion, LayerNode, NetGraph
from ..io.read import UndecodedLayer
from ..maths.affine import ChannelAffine
from ..maths.fold_math import HOST_LAYOUTS
from ..net import WeightLayer
from . import bn_variants
from .hosts import Host, is_host_type, read_host
from .norms import NORM_TYPES, Reader, affine_reader, channels_of, own_refusal, read_with, reads_rank
from .reasons import Reason, Refusal

Layers = Mapping[str, WeightLayer]
IDENTITY_TYPES = ("Dropout", "Split")
Read = tuple[str, int, int | None]  # an affine layer read through `Context.affine`: (name, channels, rank)
Asked = tuple["Reader | Refusal", "ChannelAffine | Refusal"]  # how a layer was read, and the answer


def read_of(node: LayerNode, channels: int, rank: int | None) -> Read:
    """The question `Context.affine` answers for `node`: the rank only where the answer depends
    on it, so that one layer reached by two rules is one question."""
    return node.name, channels, rank if reads_rank(node.param) else None


@dataclass(frozen=True)
class Context:
    """What the rules read besides the graph: the weights as the earlier rules left them, the
    user's choices, and the layers that must not change (they hold fields our schema lacks)."""

    layers: Layers
    bn_flavour: str = "auto"
    conv_like: frozenset[str] = frozenset()
    frozen: frozenset[str] = frozenset()
    duplicated: frozenset[str] = frozenset()  # names several layers share: Caffe's weights go by name
    assume_global_stats: bool = False  # fold BatchNorm set to batch statistics with its stored ones
    asked: dict[Read, "Asked"] | None = None  # when given, every `affine` question, how it was read, its answer

    def is_host(self, node: LayerNode) -> bool:
        return is_host_type(node.type, self.conv_like)

    def fixed(self, node: LayerNode) -> Refusal | None:
        """Why `node` must stay exactly as it is written and stored, if it must."""
        stored = self.layers.get(node.name)
        if node.name in self.frozen:
            return Refusal(Reason.UNKNOWN_FIELDS, f"'{node.name}'")
        if node.name in self.duplicated:
            return Refusal(Reason.DUPLICATE_NAME, f"'{node.name}'")
        if isinstance(stored, UndecodedLayer):
            return Refusal(Reason.UNDECODABLE_BLOBS, f"'{node.name}': {stored.problem}")
        return None

    def host(self, node: LayerNode) -> Host | Refusal:
        """The host `node` as folding sees it, or why it cannot take a fold."""
        return self.fixed(node) or read_host(node.param, self.layers.get(node.name))

    def affine(self, node: LayerNode, channels: int, rank: int | None) -> ChannelAffine | Refusal:
        """The map an affine-type layer computes, or why it is not a fixed one."""
        question = read_of(node, channels, rank)
        stored = self.layers.get(node.name)
        reader = self.fixed(node) or affine_reader(
            node.param, stored, channels, question[2], self.bn_flavour, self.assume_global_stats
        )
        answer = read_with(reader, stored)
        if self.asked is not None:
            self.asked[question] = (reader, answer)
        return answer

    def channels(self, node: LayerNode) -> int | None:
        return channels_of(node.param, self.layers.get(node.name))


class Rule(StrEnum):
    IDENTITY = "identity"
    FORWARD = "forward"
    BACKWARD = "backward"
    STANDALONE = "standalone"


@dataclass(frozen=True)
class Rewire:
    """Set bottom (or top) number `slot` of the layer at NetParameter index `layer` to `blob`."""

    layer: int
    slot: int
    blob: str


@dataclass(frozen=True)
class Action:
    """One rewrite. `layers` are the layers it takes away (STANDALONE keeps the first, as a Scale)."""

    rule: Rule
    layers: tuple[str, ...]
    target: str = ""  # the host (FORWARD / BACKWARD) or the Scale layer left (STANDALONE)
    host: Host | None = None
    affine: ChannelAffine | None = None
    bottoms: tuple[Rewire, ...] = ()
    tops: tuple[Rewire, ...] = ()
    reads: tuple[Read, ...] = ()  # the maps `affine` composes, in order (`replay` reads them again)

    @property
    def removed(self) -> tuple[str, ...]:
        return self.layers[1:] if self.rule is Rule.STANDALONE else self.layers


@dataclass
class RuleResult:
    """What one rule decided: actions to apply, and refusals by layer name."""

    actions: list[Action] = field(default_factory=list)
    refusals: dict[str, Refusal] = field(default_factory=dict)


# --- chains of affine layers ------------------------------------------------------------------


def _walk(graph: NetGraph, version: BlobVersion, first: LayerNode | None = None) -> list[LayerNode]:
    """Affine-type layers from `version` on, each the sole reader of the previous one's output.
    `first`, when given, starts the walk without having to be the sole reader of its input."""
    nodes = [first] if first else []
    current = first.tops[0] if first else version
    while (reader := graph.sole_reader(current)) and reader.type in NORM_TYPES and len(reader.tops) == 1:
        nodes.append(reader)
        current = reader.tops[0]
    return nodes


@dataclass(frozen=True)
class Chain:
    """The longest prefix of a walk that reads as affine maps: its layers, their composition, and
    how each was read."""

    nodes: list[LayerNode]
    affine: ChannelAffine | None
    reads: tuple[Read, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(node.name for node in self.nodes)


def _read_chain(
    nodes: list[LayerNode], ctx: Context, channels: int, rank: int | None, refusals: dict[str, Refusal]
) -> Chain:
    """The longest prefix of `nodes` that reads as affine maps (`Chain`); the refusal that ends it
    goes into `refusals`."""
    affine: ChannelAffine | None = None
    for i, node in enumerate(nodes):
        step = ctx.affine(node, channels, rank)
        if isinstance(step, Refusal):
            refusals[node.name] = step
            nodes = nodes[:i]
            break
        affine = step if affine is None else affine.then(step)
    return Chain(nodes, affine, tuple(read_of(node, channels, rank) for node in nodes))


def _chain_channels(nodes: list[LayerNode], ctx: Context) -> int | None:
    return next((c for n in nodes if (c := ctx.channels(n)) is not None), None)


def _run_starts(graph: NetGraph) -> list[LayerNode]:
    """Affine-type layers that do not continue a chain (their input is not a sole-read affine output)."""
    starts = []
    for node in graph.layers:
        if node.type not in NORM_TYPES or len(node.bottoms) != 1 or len(node.tops) != 1:
            continue
        producer = graph.producer(node.bottoms[0])
        if not (producer and producer.type in NORM_TYPES and graph.sole_reader(node.bottoms[0]) is node):
            starts.append(node)
    return starts


# --- rule 1: identity -----------------------------------------------------------------------


def plan_identity(graph: NetGraph, ctx: Context) -> RuleResult:
    """Remove the identity layers that can be removed, as many at once as touch no blob name that
    another removal of this round touches (merge repeats the rule until none is left): each check
    `_bypass` makes is about the names a layer reads and writes, so removals on disjoint names are
    independent. In-place layers that leave no net output share their name (removing them changes
    no reader's name). A chain of N identity layers goes in about log2(N) rounds."""
    result = RuleResult()
    claimed: dict[str, bool] = {}  # blob name -> claimed by a removal of this round (True: alone)
    for node in graph.layers:
        if not _is_identity(node, ctx):
            continue
        names = {node.bottoms[0].name, *(top.name for top in node.tops)}
        alone = len(names) > 1 or any(top in graph.outputs for top in node.tops)
        if any(name in claimed and (alone or claimed[name]) for name in names):
            continue  # next round
        rewires = ctx.fixed(node) or _bypass(graph, node, ctx)
        if isinstance(rewires, Refusal):
            result.refusals[node.name] = rewires
            continue
        claimed.update(dict.fromkeys(names, alone))
        bottoms, tops = rewires
        result.actions.append(Action(Rule.IDENTITY, (node.name,), bottoms=bottoms, tops=tops))
    return result


def _is_identity(node: LayerNode, ctx: Context) -> bool:
    if node.type in IDENTITY_TYPES:
        return len(node.bottoms) == 1
    if node.type not in NORM_TYPES or len(node.bottoms) != 1 or len(node.tops) != 1:
        return False
    affine = ctx.affine(node, ctx.channels(node) or 1, None)
    return isinstance(affine, ChannelAffine) and affine.is_identity()


def _bypass(graph: NetGraph, node: LayerNode, ctx: Context) -> tuple[tuple[Rewire, ...], tuple[Rewire, ...]] | Refusal:
    """Rewires that let every reader of `node`'s tops read its bottom instead.

    - an in-place top: nothing to rewire, unless it is a net output while its input is also read
      elsewhere (removing the layer would then turn that output into a consumed blob);
    - a top that is a net output (or unread): the producer of the input is renamed to write it,
      only when the layer has that one top and is the input's only reader;
    - other tops: their readers read the input's name, unless a layer rewrites that name first.
    """
    source = node.bottoms[0]
    bottoms: list[Rewire] = []
    tops: list[Rewire] = []
    for top in node.tops:
        readers = graph.readers.get(top, [])
        if top.name in graph.pinned or source.name in graph.pinned:
            return Refusal(Reason.OUTPUT_NAME, f"'{top.name}' is read by a layer outside the TEST phase")
        if top.name == source.name:
            if top in graph.outputs and len(graph.readers[source]) > 1:
                return Refusal(Reason.OUTPUT_NAME, f"'{top.name}' is a net output only because of this layer")
            continue
        if not readers or top in graph.outputs:
            rename = _rename_producer(graph, source, node, top.name, ctx) if len(node.tops) == 1 else None
            if rename is None:
                return Refusal(Reason.OUTPUT_NAME, f"'{top.name}' is a net output")
            tops.append(rename)
            continue
        frozen = [r.name for r in readers if r.name in ctx.frozen]
        if frozen:
            return Refusal(Reason.UNKNOWN_FIELDS, f"its reader '{frozen[0]}' cannot be rewired")
        last = max(r.index for r in readers)
        if _rewritten(graph, source.name, node.index, last):
            return Refusal(Reason.OUTPUT_NAME, f"'{source.name}' is rewritten before '{top.name}' is read")
        bottoms += [Rewire(r.index, i, source.name) for r in readers for i, b in enumerate(r.bottoms) if b == top]
    return tuple(bottoms), tuple(tops)


def _rename_producer(graph: NetGraph, source: BlobVersion, node: LayerNode, name: str, ctx: Context) -> Rewire | None:
    producer = graph.producer(source)
    if producer is None or producer.type == "Input" or producer.name in ctx.frozen:
        return None
    if graph.sole_reader(source) is not node:
        return None
    return Rewire(producer.index, producer.tops.index(source), name)


def _rewritten(graph: NetGraph, blob: str, after: int, until: int, going: tuple[LayerNode, ...] = ()) -> bool:
    """True when a layer between indices `after` and `until` (inclusive), other than the `going`
    ones (about to be removed), writes `blob`."""
    writers = graph.writers(blob)
    gone = {n.index for n in going}
    return any(i not in gone for i in writers[bisect_right(writers, after) : bisect_right(writers, until)])


# --- rule 2: forward ------------------------------------------------------------------------


def plan_forward(graph: NetGraph, ctx: Context) -> RuleResult:
    """Fold each chain of affine layers into the host it follows."""
    result = RuleResult()
    for node in graph.layers:
        first = _first_norm_reader(graph, node)
        if not ctx.is_host(node) or first is None:
            continue
        host = ctx.host(node)
        if isinstance(host, Refusal):
            result.refusals[first.name] = host
            continue
        chain = _read_chain(_walk(graph, node.tops[0]), ctx, host.c_out, host.rank, result.refusals)
        if chain.nodes:
            top = Rewire(node.index, 0, chain.nodes[-1].tops[0].name)
            result.actions.append(_action(Rule.FORWARD, chain, node.name, host, tops=(top,)))
    folded = {name for action in result.actions for name in action.layers}
    for node in graph.layers:
        if node.type in NORM_TYPES and node.name not in folded and node.name not in result.refusals:
            result.refusals[node.name] = _explain(graph, node, ctx)
    return result


def _first_norm_reader(graph: NetGraph, node: LayerNode) -> LayerNode | None:
    readers = [r for top in node.tops for r in graph.readers.get(top, [])]
    return next((r for r in readers if r.type in NORM_TYPES), None)


def _explain(graph: NetGraph, node: LayerNode, ctx: Context) -> Refusal:
    """Why an affine layer that no forward chain reached cannot fold forward."""
    own = own_refusal(node.param, ctx.assume_global_stats)
    if own:
        return own
    version = node.bottoms[0]
    producer = graph.producer(version)
    if producer is None or producer.type == "Input":
        return Refusal(Reason.NET_INPUT, f"'{version.name}'")
    others = [r.name for r in graph.readers[version] if r is not node]
    if others:
        return Refusal(Reason.SHARED_INPUT, f"'{version.name}' is also read by " + ", ".join(f"'{n}'" for n in others))
    if producer.type in NORM_TYPES:
        return Refusal(Reason.BEHIND_KEPT, f"'{producer.name}'")
    host = _host_upstream(graph, producer, ctx)
    if host:
        return Refusal(Reason.NONLINEAR_BETWEEN, f"'{producer.name}' ({producer.type}) after '{host.name}'")
    return Refusal(Reason.NO_HOST, f"its input comes from '{producer.name}' ({producer.type})")


def _host_upstream(graph: NetGraph, node: LayerNode, ctx: Context) -> LayerNode | None:
    """The host found by walking up single-input layers from `node`, if one is there."""
    for _ in graph.layers:
        if node is None or len(node.bottoms) != 1:
            return None
        node = graph.producer(node.bottoms[0])
        if node is not None and ctx.is_host(node):
            return node
    return None


# --- rule 3: backward -----------------------------------------------------------------------


def plan_backward(graph: NetGraph, ctx: Context) -> RuleResult:
    """Fold each chain of affine layers into the one layer reading its output, where exact."""
    result = RuleResult()
    for start in _run_starts(graph):
        nodes = _walk(graph, start.bottoms[0], start)
        end = nodes[-1].tops[0]
        consumer = graph.sole_reader(end)
        host = _consumer_host(graph, consumer, nodes, ctx)
        if isinstance(host, Refusal):
            result.refusals[nodes[-1].name] = host
            continue
        channels = _chain_channels(nodes, ctx) or _input_channels(host)
        chain = _read_chain(nodes, ctx, channels, None, result.refusals)
        if len(chain.nodes) != len(nodes):
            continue
        if not _takes_channels(host, channels):
            detail = f"'{host.name}' takes {_input_channels(host)} input values, the chain has {channels} channels"
            result.refusals[nodes[-1].name] = Refusal(Reason.CONSUMER_UNSUITABLE, detail)
            continue
        bottom = Rewire(consumer.index, 0, start.bottoms[0].name)
        result.actions.append(_action(Rule.BACKWARD, chain, host.name, host, bottoms=(bottom,)))
    return result


def _consumer_host(graph: NetGraph, consumer: LayerNode | None, nodes: list[LayerNode], ctx: Context) -> Host | Refusal:
    """The consumer as a host that can take a chain on its input, or why it cannot."""
    if consumer is None or not ctx.is_host(consumer):
        what = "several layers or none" if consumer is None else f"'{consumer.name}' ({consumer.type})"
        return Refusal(Reason.CONSUMER_UNSUITABLE, f"its output goes to {what}")
    host = ctx.host(consumer)
    if isinstance(host, Refusal):
        return host
    if len(consumer.bottoms) != 1 or not HOST_LAYOUTS[host.layout].backward_ok:
        return Refusal(Reason.CONSUMER_UNSUITABLE, f"'{consumer.name}' ({consumer.type}) cannot take it exactly")
    if host.padded:
        return Refusal(Reason.CONSUMER_UNSUITABLE, f"'{consumer.name}' is padded: a*0+b is not 0 at its borders")
    source = nodes[0].bottoms[0].name
    if _rewritten(graph, source, nodes[0].index - 1, consumer.index - 1, tuple(nodes)):
        return Refusal(Reason.OUTPUT_NAME, f"'{source}' is rewritten before '{consumer.name}' reads it")
    return host


def _input_channels(host: Host) -> int:
    """Channels (Convolution) or input values (InnerProduct) the host reads."""
    w = host.weights
    return w.shape[1] * host.groups if host.layout == "conv" else w.size // host.c_out


def _takes_channels(host: Host, channels: int) -> bool:
    """A Convolution reads exactly `channels`; an InnerProduct reads channels x spatial positions."""
    size = _input_channels(host)
    return size == channels if host.layout == "conv" else size % channels == 0


# --- rule 4: standalone ---------------------------------------------------------------------


def plan_standalone(graph: NetGraph, ctx: Context) -> RuleResult:
    """Merge each remaining chain of affine layers into one Scale layer with bias."""
    result = RuleResult()
    for start in _run_starts(graph):
        nodes = _walk(graph, start.bottoms[0], start)
        channels = _chain_channels(nodes, ctx)
        if channels is None:
            result.refusals[start.name] = Refusal(Reason.UNKNOWN_CHANNELS)
            continue
        chain = _read_chain(nodes, ctx, channels, None, result.refusals)
        first = chain.nodes[0] if chain.nodes else None
        if len(chain.nodes) < 2 and not (first and _normalises(first, ctx)):
            continue
        top = Rewire(first.index, 0, chain.nodes[-1].tops[0].name)
        result.actions.append(_action(Rule.STANDALONE, chain, first.name, tops=(top,)))
    return result


def _normalises(node: LayerNode, ctx: Context) -> bool:
    """A BatchNorm, worth a Scale on its own; not SegNet's BN, already one scale and shift (and its
    fork has no Scale layer)."""
    if node.type not in ("BatchNorm", "BN"):
        return False
    return bn_variants.detect(node.param, ctx.layers[node.name].blobs, ctx.bn_flavour) != bn_variants.SEGNET


def _action(rule: Rule, chain: Chain, target: str, host: Host | None = None, **rewires: tuple[Rewire, ...]) -> Action:
    return Action(rule, chain.names, target, host, chain.affine, reads=chain.reads, **rewires)


RULES: dict[Rule, Callable[[NetGraph, Context], RuleResult]] = {
    Rule.IDENTITY: plan_identity,
    Rule.FORWARD: plan_forward,
    Rule.BACKWARD: plan_backward,
    Rule.STANDALONE: plan_standalone,
}


@dataclass(frozen=True)
class Kept:
    """A BatchNorm / Scale / Bias / Power (or identity) layer left as it was, and why."""

    layer: str
    type: str
    refusals: tuple[Refusal, ...]

    @property
    def refusal(self) -> Refusal:
        """The main reason: the first rule's."""
        return self.refusals[0]

    def __str__(self) -> str:
        return "; ".join(str(r) for r in self.refusals)


@dataclass(frozen=True)
class FoldPlan:
    """Every action applied, in order, every candidate layer left as it was, and for every layer
    any rule refused, its reasons (a collapsed chain keeps the reasons it could not fold)."""

    actions: tuple[Action, ...]
    kept: tuple[Kept, ...]
    reasons: dict[str, tuple[Refusal, ...]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)  # every layer of the input net, in order

    @property
    def removed(self) -> set[str]:
        """Names of the layers taken out of the net."""
        return {name for action in self.actions for name in action.removed}

    def by_rule(self, rule: Rule) -> list[Action]:
        return [a for a in self.actions if a.rule is rule]
