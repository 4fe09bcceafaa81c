"""The whole job as one library call, `merge`: read (`io.read`) -> graph -> rules (`rules.passes`)
-> emit (`io.emit`)."""

import io
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from .defaults import MAX_PROTOTXT_MB
from .errors import MismatchError
from .graph import NetGraph, build_graph, included, inference_state
from .io import emit, outputs, read
from .io.files import net_digest
from .io.layout import Layout, Recipe
from .io.user_schema import compile_schema
from .logs import collected
from .net import FoldedHost
from .rules.hosts import DEFAULT_CONV_LIKE, is_host_type, read_host
from .rules.norms import NORM_TYPES, negative_variance, uses_batch_stats
from .rules.passes import folded_hosts, run_rules
from .rules.plan import FoldPlan, Rule
from .rules.replay import Recording, Round, replay
from .rules.rewrite import Rewrite
from .rules.stacked import Stacked

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
    assume_global_stats: bool = False  # fold BatchNorm set to batch statistics with its stored averages
    max_prototxt_mb: int = MAX_PROTOTXT_MB  # a larger prototxt is refused

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
    find_hosts: Callable[[], tuple[FoldedHost, ...]] = field(default=tuple, repr=False, compare=False)
    warnings: tuple[str, ...] = ()  # each distinct warning logged while merging
    assume_global_stats: bool = False  # BatchNorm set to batch statistics was folded with stored ones
    staged: outputs.Staged | None = None  # with `merge(..., stage=True)`: the pair, not yet published
    replayed: bool = False  # planned and written from an earlier merge of this layout (`NetCache`)

    @cached_property
    def hosts(self) -> tuple[FoldedHost, ...]:
        """Every host that took a fold (`maths.quant` reads them), found when first asked for."""
        return self.find_hosts()


@dataclass(frozen=True)
class Writing:
    """How `merge` writes: at all, over existing files, left staged for the caller to publish, with
    which other paths to check against the pair, and whom to tell about progress."""

    write: bool = True
    overwrite: bool = False
    stage: bool = False
    more_inputs: Sequence[Path] = ()
    more_outputs: Sequence[outputs.Output] = ()
    on_step: Callable[[str], None] = lambda step: None
    on_progress: Callable[[int, int], None] | None = None


@dataclass(frozen=True, eq=False)
class RecordedMerge:
    """A merge of one caffemodel, to replay for other weights of its layout: the layout of the
    caffemodel read, the rules' run (`rules.replay`), how the caffemodel was written and the
    prototxt written."""

    weights: Layout
    rules: Recording
    recipe: Recipe
    prototxt: bytes
    stacked: Stacked | None  # its questions answered at once, when they can be


@dataclass(frozen=True)
class Written:
    """The temporary paths of a merged pair, written and not yet published."""

    model: Path
    weights: Path


@dataclass
class Parsed:
    """A parsed prototxt: its NetText, the graph of its net, what follows from them alone, and
    (in a `NetCache`) the merges recorded with it."""

    net_text: object
    graph: NetGraph
    merges: dict[MergeOptions, list[RecordedMerge]] = field(default_factory=dict)

    @cached_property
    def outside_test(self) -> int:
        """How many layers the TEST phase leaves out."""
        net = self.net_text.net
        state = inference_state(net)
        return sum(1 for layer in net.layer if not included(layer, state))

    @cached_property
    def layer_types(self) -> Counter[str]:
        return Counter(layer.type for layer in self.net_text.net.layer)


@dataclass
class NetCache:
    """What converting many caffemodels of a few architectures in one process does once: pass the
    same NetCache to each `merge`. Per prototxt (by the hash of its bytes and the schema's path),
    its NetText and graph; per options, the merges it ran (`RecordedMerge`), each replayed for
    other weights of its caffemodel layout (`io.layout`) when the rules ask those weights the same
    questions and get the same answers (else the rules run, and that merge is kept too). No weight
    values are kept, and nothing kept is changed by a merge. Holds at most `size` prototxts and
    `merges` merges of each per options, the least recently used dropped first."""

    size: int = 64
    merges: int = 4
    hits: int = 0
    misses: int = 0
    _nets: OrderedDict[tuple[bytes, str], Parsed] = field(default_factory=OrderedDict, repr=False)

    def parsed(self, model: Path, options: MergeOptions, schema: object) -> Parsed:
        """`model` parsed, on a miss."""
        raw = read.read_net_bytes(model, options.max_prototxt_mb)
        schema_path = options.caffe_proto
        key = (net_digest(raw), str(schema_path or ""))
        if key in self._nets:
            self.hits += 1
            self._nets.move_to_end(key)
            entry = self._nets[key]
        else:
            self.misses += 1
            net_text = read.parse_net_bytes(model, raw, schema)
            self._nets[key] = entry = Parsed(net_text, build_graph(net_text.net))
            if len(self._nets) > self.size:
                self._nets.popitem(last=False)
        return entry

    def recorded(self, entry: Parsed, options: MergeOptions, weights: read.Weights) -> list[RecordedMerge]:
        """The merges recorded for caffemodels of `weights`' layout, the most recently used first;
        when there are any, they index `weights` (`Layout.index`)."""
        found = [recorded for recorded in entry.merges.get(options, []) if recorded.weights.matches(weights.buffer)]
        if found:
            found[0].weights.index(weights)
        return found

    def keep(self, entry: Parsed, options: MergeOptions, recorded: RecordedMerge) -> None:
        """Keep `recorded` (or mark it used) as the most recently used merge of `entry`."""
        found = entry.merges.setdefault(options, [])
        if recorded in found:
            found.remove(recorded)
        found.insert(0, recorded)
        del found[self.merges :]


def _parsed(model: Path, options: MergeOptions, cache: NetCache | None) -> Parsed:
    schema = compile_schema(options.caffe_proto) if options.caffe_proto else None
    if cache is not None:
        return cache.parsed(model, options, schema)
    net_text = read.read_net_text(model, schema, options.max_prototxt_mb)
    return Parsed(net_text, build_graph(net_text.net))


def default_outputs(
    model: Path, weights: Path, output_model: Path | None = None, output_weights: Path | None = None
) -> tuple[Path, Path]:
    """The output paths: those given; one given alone has the other beside it (`out/x.prototxt` ->
    `out/x.caffemodel`); none given, `<stem>_merged<suffix>` next to each input."""
    if output_model is not None and output_weights is None and Path(output_model).name:
        return Path(output_model), Path(output_model).with_suffix(".caffemodel")
    if output_weights is not None and output_model is None and Path(output_weights).name:
        return Path(output_weights).with_suffix(".prototxt"), Path(output_weights)
    return (
        Path(output_model or model.with_name(f"{model.stem}_merged{model.suffix}")),
        Path(output_weights or weights.with_name(f"{weights.stem}_merged{weights.suffix}")),
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
    stage: bool = False,
    more_inputs: Sequence[Path] = (),
    more_outputs: Sequence[outputs.Output] = (),
    on_step: Callable[[str], None] = lambda step: None,
    on_progress: Callable[[int, int], None] | None = None,
    cache: NetCache | None = None,
) -> MergeResult:
    """Fold the BatchNorm/Scale layers of `model` + `weights`; write the merged pair unless `write`
    is False, replacing existing output files only when `overwrite`. With `stage`, the pair is left
    under temporary names (`MergeResult.staged`) for the caller to publish or discard. Every path
    written (the pair, and `more_outputs` the caller will write) is checked against every input
    (`more_inputs` too) and each other once the inputs are read. `on_step` hears the name of each
    step as it starts, `on_progress` (bytes done, total) the writing of the caffemodel (for progress
    displays). A `cache` shared by several merges parses each distinct prototxt once. The result
    lists the warnings logged on the way."""
    how = Writing(write, overwrite, stage, tuple(more_inputs), tuple(more_outputs), on_step, on_progress)
    model, weights = Path(model), Path(weights)
    with collected() as warnings:
        outputs_pair = default_outputs(model, weights, output_model, output_weights)
        result = _merge(model, weights, outputs_pair, options, how, cache)
    return replace(result, warnings=tuple(warnings))


def _merge(
    model: Path, weights: Path, pair: tuple[Path, Path], options: MergeOptions, how: Writing, cache: NetCache | None
) -> MergeResult:
    output_model, output_weights = pair

    def on_step(name: str) -> None:  # a signal not raised yet where it came ends the merge here
        outputs.raise_pending_signal()
        how.on_step(name)

    on_step("reading")
    entry = _parsed(model, options, cache)
    net_text, graph = entry.net_text, entry.graph
    net = net_text.net
    with read.open_weights(weights, hold=True) as stored:  # the caffemodel stays as read until the block ends
        candidates = cache.recorded(entry, options, stored) if cache is not None else []
        if not candidates:
            read.index_weights(stored)
        targets = [outputs.Output(output_weights, "--output-weights"), outputs.Output(output_model, "--output-model")]
        written = [*targets, *how.more_outputs] if how.write else list(how.more_outputs)
        outputs.check_outputs((model, weights, *how.more_inputs), written, how.overwrite)
        if not candidates:  # else a caffemodel of this layout was paired with this net before
            _check_pairing(graph, stored, model, weights, options.conv_like)
        _log_input(entry)
        on_step("folding")
        replayed = _replay(candidates, stored)
        if replayed is not None:
            cache.keep(entry, options, replayed[0])
        rounds: list[Round] | None = [] if cache is not None and how.write and replayed is None else None
        recorded, rewrite, plan = replayed or (None, *run_rules(
            net, graph, stored, options.rules(), options.bn_flavour, frozenset(options.conv_like), net_text.frozen,
            options.assume_global_stats, rounds,
        ))  # fmt: skip
        _log_plan(plan, net, options.assume_global_stats)
        _warn_negative_variance(net, stored, plan, options.bn_flavour, recorded.stacked if recorded else None)
        stored.check()
        staged = outputs.Staged() if how.write else None
        try:
            if staged is not None:
                on_step("writing")
                if replayed is not None:
                    _write_recorded(staged, recorded, rewrite, stored, pair, how.on_progress)
                else:
                    _write(staged, net_text, rewrite, stored, plan.removed & set(stored.layers), pair, how.on_progress)
                if rounds is not None:
                    rules = Recording(tuple(rounds), plan, rewrite.net, tuple(rewrite.origin))
                    _record(cache, entry, options, stored, rules, Written(*map(staged.temporary, pair)))
                stored.check()  # the caffemodel was as read all along: the pair may be published
                if not how.stage:
                    staged.publish(how.overwrite)
                    staged.discard()
                    staged = None
            return MergeResult(
                plan,
                Counter(entry.layer_types),
                Counter(recorded.rules.layer_types if recorded else (layer.type for layer in rewrite.net.layer)),
                output_model if how.write else None,
                output_weights if how.write else None,
                find_hosts=lambda: folded_hosts(plan, rewrite, net, options.bn_flavour),
                assume_global_stats=options.assume_global_stats,
                staged=staged,
                replayed=replayed is not None,
            )
        except BaseException:  # a failed write, or the caffemodel changed while read: nothing staged is left
            if staged is not None:
                staged.discard()
            raise


def _log_plan(plan: FoldPlan, net: object, assume_global_stats: bool) -> None:
    """Log each action and each kept layer in net order; warn when batch statistics were assumed away."""
    if log.isEnabledFor(logging.INFO):
        order = {name: i for i, name in enumerate(plan.types)}
        for action in sorted(plan.actions, key=lambda a: order.get(a.layers[0], len(order))):
            target = f" -> {action.target}" if action.target else ""
            log.info("%s: %s%s", action.rule, " + ".join(action.layers), target)
        for kept in plan.kept:
            log.info("kept %s '%s': %s", kept.type, kept.layer, kept)
    if not assume_global_stats:
        return
    kept = {k.layer for k in plan.kept}
    assumed = [layer.name for layer in net.layer if uses_batch_stats(layer) and layer.name not in kept]
    if assumed:
        log.warning(
            "--assume-global-stats: %d BatchNorm layer(s) set to use batch statistics (use_global_stats: false; "
            "'%s'%s) were folded with their stored moving averages; this changes what Caffe computes for this "
            "file: the merged model is not the same function as the original in Caffe",
            len(assumed),
            assumed[0],
            ", ..." if len(assumed) > 1 else "",
        )


def _log_input(entry: Parsed) -> None:
    net_text = entry.net_text
    if net_text.blocks is None:
        log.warning("the prototxt is written anew (V1 `layers` upgraded, or its layout was not followed)")
    if net_text.frozen:
        names = ", ".join(sorted(net_text.frozen)[:3])
        log.warning(
            "%d layer(s) use fields our schema does not know (%s ...): kept exactly as written, "
            "since what those fields do is unknown",
            len(net_text.frozen),
            names,
        )
    other = entry.outside_test
    if other:
        log.warning("%d layer(s) outside the TEST phase kept as they are; folding follows the TEST phase", other)


def _warn_negative_variance(
    net: object, stored: read.Weights, plan: FoldPlan, flavour: str, stacked: Stacked | None = None
) -> None:
    """Warn once per folded BatchNorm whose stored variance has negative channels (counted at once
    for a replay whose questions were `stacked`: every BatchNorm folded was read there)."""
    folded = {name for action in plan.actions for name in action.layers}
    counts = stacked.negative_variance(stored.layers) if stacked is not None else None
    if counts is not None and not counts:
        return  # the common case: nothing negative, no need to walk the net
    for layer in net.layer:
        if layer.name not in folded:
            continue
        negative = (
            counts.get(layer.name, 0)
            if counts is not None
            else negative_variance(layer, stored.layers.get(layer.name), flavour)
        )
        if negative:
            log.warning(
                "%s '%s': %d channel(s) have negative variance; folded as Caffe computes them",
                layer.type,
                layer.name,
                negative,
            )


def _check_pairing(
    graph: NetGraph, stored: read.Weights, model: Path, weights: Path, conv_like: tuple[str, ...]
) -> None:
    """Refuse a caffemodel that does not hold this prototxt's weights: host blobs that do not fit,
    missing statistics, or no weighted layer in common at all; say so when it looks merged. Hosts
    we cannot touch (blobs that do not decode, a name other layers share) are not checked."""
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
            f"of {model} ({listed}{', ...' if len(missing) > 3 else ''}){_undecoded(stored)}; "
            "are they from the same net?"
        )
    for node in hosts:
        layer = stored.layers.get(node.name)
        if layer is not None and not isinstance(layer, read.UndecodedLayer) and node.name not in graph.duplicated:
            read_host(node.param, layer)  # raises on blob count or shape mismatch


def _undecoded(stored: read.Weights) -> str:
    """What the caffemodel holds that we could not read, if anything, to say with a mismatch."""
    layer = next((layer for layer in stored.layers.values() if isinstance(layer, read.UndecodedLayer)), None)
    return f", and its layer '{layer.name}' does not decode ({layer.problem})" if layer else ""


def _write(
    staged: outputs.Staged,
    net_text: object,
    rewrite: Rewrite,
    stored: read.Weights,
    removed: set[str],
    pair: tuple[Path, Path],
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write the caffemodel and the prototxt under temporary names in `staged`, to be published
    together (the caller discards `staged` on failure)."""
    model, weights = pair
    emit.write_weights(stored, rewrite.edits, removed, staged.stage(weights), on_progress)
    emit.write_net_text(net_text, rewrite.net, rewrite.origin, staged.stage(model))


def _replay(candidates: list[RecordedMerge], stored: read.Weights) -> tuple[RecordedMerge, Rewrite, FoldPlan] | None:
    """The first of the `candidates` that replays for `stored`, with its rewrite and plan."""
    for recorded in candidates:
        given = recorded.stacked.maps(stored.layers) if recorded.stacked is not None else None
        if recorded.stacked is not None and given is None:
            continue  # an answer is not the recorded one
        again = replay(recorded.rules, stored.layers, given)
        if again is not None:
            return recorded, *again
    return None


def _write_recorded(
    staged: outputs.Staged,
    recorded: RecordedMerge,
    rewrite: Rewrite,
    stored: read.Weights,
    pair: tuple[Path, Path],
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """`_write` for a replayed merge: the caffemodel in the recorded layout, the recorded prototxt."""
    model, weights = pair
    with emit.atomic_output(staged.stage(weights)) as handle:
        recorded.recipe.write(stored, _blobs(rewrite, stored), handle)
    if on_progress is not None:
        on_progress(len(stored.buffer), len(stored.buffer))
    with emit.atomic_output(staged.stage(model)) as handle:
        handle.write(recorded.prototxt)


def _record(
    cache: NetCache, entry: Parsed, options: MergeOptions, stored: read.Weights, rules: Recording, staged: Written
) -> None:
    """Keep this merge for other weights of its layout (`RecordedMerge`), if the caffemodels read
    and written both have a layout and replaying the rules on these weights writes the same bytes.
    Never fails the merge: a merge that cannot be recorded is simply not kept."""
    try:
        recorded = _recorded(stored, rules, staged)
    except Exception as err:  # e.g. a written caffemodel with no layer left, a blob written in another shape
        log.debug("not recorded: %s: %s", type(err).__name__, err)
        return
    if recorded is not None:
        cache.keep(entry, options, recorded)


def _recorded(stored: read.Weights, rules: Recording, staged: Written) -> RecordedMerge | None:
    layout = Layout.of(stored)
    written = read.read_weights(staged.weights) if layout is not None else None
    merged = Layout.of(written) if written is not None else None
    rules = replace(rules, plan=replace(rules.plan, actions=()))
    if merged is None:
        return None
    stacked = Stacked.of(rules, stored.layers)
    again = replay(rules, stored.layers, stacked.maps(stored.layers) if stacked else None)
    if again is None:
        return None
    rewrite = again[0]
    recipe = Recipe.of(layout, merged, set(rewrite.edits))
    copy = io.BytesIO()
    recipe.write(stored, _blobs(rewrite, stored), copy)
    if copy.getvalue() != bytes(written.buffer):
        log.debug("not recorded: replaying the merge of %s wrote other bytes", stored.path)
        return None
    return RecordedMerge(layout, rules, recipe, staged.model.read_bytes(), stacked)


def _blobs(rewrite: Rewrite, stored: read.Weights) -> Callable[[str], Sequence[object]]:
    """A layer's blobs after `rewrite`: folded ones as made (`ScaledRows` not computed yet)."""
    return lambda name: rewrite.edits[name].blobs if name in rewrite.edits else stored.layers[name].blobs
