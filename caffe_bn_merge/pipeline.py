"""The whole job as one library call, `merge`: read (`io.read`) -> graph -> rules (`rules.passes`)
-> emit (`io.emit`)."""

import hashlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MismatchError
from .graph import NetGraph, build_graph, included, inference_state
from .io import emit, read
from .io.user_schema import compile_schema
from .rules.hosts import DEFAULT_CONV_LIKE, is_host_type, read_host
from .rules.norms import NORM_TYPES
from .rules.passes import run_rules
from .rules.plan import FoldPlan, Rule
from .rules.rewrite import Rewrite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeOptions:
    """Which rules run besides the classic forward fold, and how to read forks' nets."""

    identity: bool = True  # remove Dropout, Split and exact identities
    backward: bool = True  # fold a chain into the layer reading it
    standalone: bool = True  # merge a chain that folds nowhere into one Scale
    bn_flavour: str = "auto"  # BatchNorm layout: auto or one of bn_variants.VARIANTS
    conv_like: tuple[str, ...] = DEFAULT_CONV_LIKE  # layer types that are Convolutions under another name
    caffe_proto: Path | None = None  # the fork's caffe.proto, to read its prototxt fields by name

    def rules(self) -> list[Rule]:
        wanted = {Rule.IDENTITY: self.identity, Rule.FORWARD: True, Rule.BACKWARD: self.backward}
        wanted[Rule.STANDALONE] = self.standalone
        return [rule for rule, on in wanted.items() if on]


@dataclass(frozen=True)
class MergeResult:
    """What a merge did: the plan it applied, layer counts by type, and where it wrote."""

    plan: FoldPlan
    layers_before: Counter[str]
    layers_after: Counter[str]
    output_model: Path | None
    output_weights: Path | None


@dataclass
class NetCache:
    """Parsed prototxts (the NetText and its graph) by the hash of the prototxt's bytes and the
    schema's path, for converting many caffemodels of a few architectures in one process: pass the
    same NetCache to each `merge`. Nothing derived from weights is kept, and nothing kept is
    changed by a merge (the rules rewrite a copy of the net). Holds at most `size` nets, the least
    recently used dropped first."""

    size: int = 64
    hits: int = 0
    misses: int = 0
    _nets: OrderedDict[tuple[bytes, str], tuple[object, NetGraph]] = field(default_factory=OrderedDict, repr=False)

    def parsed(self, model: Path, schema_path: Path | None, schema: object) -> tuple[object, NetGraph]:
        """The NetText of `model` and the graph of its net, parsed on a miss."""
        raw = read.read_net_bytes(model)
        key = (hashlib.blake2b(raw, digest_size=20).digest(), str(schema_path or ""))
        if key in self._nets:
            self.hits += 1
            self._nets.move_to_end(key)
            return self._nets[key]
        self.misses += 1
        net_text = read.parse_net_bytes(model, raw, schema)
        self._nets[key] = entry = (net_text, build_graph(net_text.net))
        if len(self._nets) > self.size:
            self._nets.popitem(last=False)
        return entry


def _parsed(model: Path, options: MergeOptions, cache: NetCache | None) -> tuple[object, NetGraph]:
    schema = compile_schema(options.caffe_proto) if options.caffe_proto else None
    if cache is not None:
        return cache.parsed(model, options.caffe_proto, schema)
    net_text = read.read_net_text(model, schema)
    return net_text, build_graph(net_text.net)


def default_outputs(model: Path, weights: Path) -> tuple[Path, Path]:
    """`<stem>_merged<suffix>` next to each input."""
    return (
        model.with_name(f"{model.stem}_merged{model.suffix}"),
        weights.with_name(f"{weights.stem}_merged{weights.suffix}"),
    )


def merge(
    model: Path,
    weights: Path,
    output_model: Path | None = None,
    output_weights: Path | None = None,
    options: MergeOptions = MergeOptions(),  # frozen, so one shared default is safe
    *,
    write: bool = True,
    overwrite: bool = False,
    on_step: Callable[[str], None] = lambda step: None,
    cache: NetCache | None = None,
) -> MergeResult:
    """Fold the BatchNorm/Scale layers of `model` + `weights`; write the merged pair unless `write`
    is False, replacing existing output files only when `overwrite`. `on_step` hears the name of
    each step as it starts (for progress displays). A `cache` shared by several merges parses each
    distinct prototxt once."""
    model, weights = Path(model), Path(weights)
    defaults = default_outputs(model, weights)
    output_model = Path(output_model or defaults[0])
    output_weights = Path(output_weights or defaults[1])
    on_step("reading")
    net_text, graph = _parsed(model, options, cache)
    net = net_text.net
    stored = read.read_weights(weights)
    if write:
        emit.check_outputs((model, weights), (output_model, output_weights), overwrite)
    _check_pairing(graph, stored, model, weights, options.conv_like)
    _log_input(net_text)
    on_step("folding")
    rewrite, plan = run_rules(
        net, graph, stored, options.rules(), options.bn_flavour, frozenset(options.conv_like), net_text.frozen
    )
    for action in plan.actions:
        log.info("%s: %s%s", action.rule, " + ".join(action.layers), f" -> {action.target}" if action.target else "")
    for kept in plan.kept:
        log.info("kept %s '%s': %s", kept.type, kept.layer, kept)
    if write:
        on_step("writing")
        dropped = plan.removed & set(stored.layers)
        _write(net_text, rewrite, stored, dropped, output_model, output_weights)
    return MergeResult(
        plan,
        Counter(layer.type for layer in net.layer),
        Counter(layer.type for layer in rewrite.net.layer),
        output_model if write else None,
        output_weights if write else None,
    )


def _log_input(net_text: object) -> None:
    if net_text.blocks is None:
        log.warning("the prototxt is written anew (V1 `layers` upgraded, or its layout was not followed)")
    if net_text.frozen:
        names = ", ".join(sorted(net_text.frozen)[:3])
        log.warning(
            "%d layer(s) use fields our schema does not know (%s ...): kept exactly as written; "
            "--caffe-proto with the fork's caffe.proto lets them fold",
            len(net_text.frozen),
            names,
        )
    state = inference_state(net_text.net)
    other = sum(1 for layer in net_text.net.layer if not included(layer, state))
    if other:
        log.warning("%d layer(s) outside the TEST phase kept as they are; folding follows the TEST phase", other)


def _check_pairing(
    graph: NetGraph, stored: read.Weights, model: Path, weights: Path, conv_like: tuple[str, ...]
) -> None:
    """Refuse a caffemodel that does not hold this prototxt's weights: host blobs that do not fit,
    missing statistics, or no weighted layer in common at all; say so when it looks merged."""
    hosts = [n for n in graph.layers if is_host_type(n.type, conv_like)]
    norms = [n for n in graph.layers if n.type in NORM_TYPES and n.type != "Power" and len(n.bottoms) == 1]
    missing_hosts = [n.name for n in hosts if n.name not in stored.layers]
    missing_norms = [n.name for n in norms if n.name not in stored.layers]
    if missing_norms and hosts and not missing_hosts:
        raise MismatchError(
            f"{weights} has no BatchNorm/Scale weights for {len(missing_norms)} layers of {model} "
            f"('{missing_norms[0]}', ...): it looks already merged; use it with its merged prototxt"
        )
    missing = missing_norms + (missing_hosts if len(missing_hosts) == len(hosts) else [])
    if missing:
        listed = ", ".join(f"'{name}'" for name in missing[:3])
        raise MismatchError(
            f"{weights} has no weights for {len(missing)} of the {len(hosts) + len(norms)} weighted layers "
            f"of {model} ({listed}{', ...' if len(missing) > 3 else ''}); are they from the same net?"
        )
    for node in hosts:
        if node.name in stored.layers:
            read_host(node.param, stored.layers[node.name])  # raises on blob count or shape mismatch


def _write(
    net_text: object, rewrite: Rewrite, stored: read.Weights, removed: set[str], model: Path, weights: Path
) -> None:
    """Write the caffemodel, then the prototxt; never leave one without the other."""
    emit.write_weights(stored, rewrite.edits, removed, weights)
    try:
        emit.write_net_text(net_text, rewrite.net, rewrite.origin, model)
    except BaseException:
        weights.unlink(missing_ok=True)
        raise
