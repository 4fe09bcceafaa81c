"""Planning again for other weights of the same net, without walking the graph: the rules' run on
one caffemodel is recorded (`Recording`: per round, every question the rules asked of the weights,
how it was read and what it answered, and the actions planned), then replayed on another
caffemodel of the same layout.

The rules read weights only through `Context`: the hosts' and layers' blob counts and shapes (the
same for two caffemodels of one layout) and the maps of affine layers (`Context.affine`), read by
a reader decided from the layer's parameters and blob shapes (`norms.affine_reader`), whose values
decide only whether a map is refused (not finite) and whether it is the identity. So when every
recorded reader gives an answer of the same kind from the new weights, the rules would plan the
same actions: `replay` then gives them the new maps and hosts, and returns None otherwise (the
caller runs the rules). A question a later round asks again of blobs no rule has changed since is
answered once (the identity rule and the forward rule both read every BatchNorm and Scale).

Anything new the rules learn to read from weights must be read through `Context` (and compared
here), or replaying would miss a decision: tests/test_replay.py compares replayed and fresh merges
of many nets and weights byte for byte."""

from collections import Counter
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from ..maths.affine import ChannelAffine
from ..net import WeightLayer
from .hosts import Host
from .norms import Reader, read_with
from .plan import Action, Asked, Context, FoldPlan, Layers, Read, Rule
from .reasons import Refusal
from .rewrite import Rewrite

Answer = Refusal | bool  # a refusal, or whether the map was the identity


@dataclass(frozen=True)
class Question:
    """One `Context.affine` call of a round: what was asked, how the layer's blobs are read (decided
    from its parameters and their shapes, the same for every caffemodel of the layout), the answer."""

    read: Read
    reader: Reader | Refusal
    answer: Answer


@dataclass(frozen=True)
class Round:
    """One rule's planning: the questions it asked, the actions it planned (without their maps and
    hosts, which are the weights'), and the hosts they fold into without their arrays."""

    rule: Rule
    questions: tuple[Question, ...]
    actions: tuple[Action, ...]
    hosts: dict[str, Host]


def record_round(rule: Rule, context: Context, actions: list[Action]) -> Round:
    """A `Round` of `rule` from the answers `context.asked` collected and the actions planned."""
    asked: dict[Read, Asked] = context.asked
    questions = tuple(Question(read, reader, _answer(got)) for read, (reader, got) in asked.items())
    bare = tuple(replace(action, host=None, affine=None) for action in actions)  # no views of these weights kept
    hosts = {action.target: _bare_host(action.host) for action in actions if action.host is not None}
    return Round(rule, questions, bare, hosts)


def _bare_host(host: Host) -> Host:
    """`host` without its arrays: a zero-size bias stands for one."""
    return replace(host, weights=None, bias=None if host.bias is None else np.zeros(0))


def _answer(got: ChannelAffine | Refusal) -> Answer:
    return got if isinstance(got, Refusal) else got.is_identity()


@dataclass(frozen=True)
class Recording:
    """The rules' run on one caffemodel: its rounds, the plan they made and the net they left."""

    rounds: tuple[Round, ...]
    plan: FoldPlan  # without its actions (the rounds have them)
    net: object  # the rewritten NetParameter (shared, never changed)
    origin: tuple[int, ...]

    @cached_property
    def layer_types(self) -> Counter[str]:
        """The net's layers by type (a replay's caller copies it)."""
        return Counter(layer.type for layer in self.net.layer)


@dataclass(frozen=True)
class Given:
    """What a caller answered already for the caffemodel (`rules.stacked`): questions' maps (with
    the recorded answers), and actions' maps composed from them, by the questions they read."""

    maps: dict[Read, ChannelAffine]
    chains: dict[tuple[Read, ...], ChannelAffine]


def replay(recording: Recording, layers: Layers, given: Given | None = None) -> tuple[Rewrite, FoldPlan] | None:
    """The rewrite and plan the rules make for `layers` (a caffemodel of the recording's layout),
    or None when a question has another answer. Questions `given` are not asked again: the caller
    has checked their answers."""
    rewrite = Rewrite(recording.net, dict(layers), origin=list(recording.origin))
    actions: list[Action] = []
    earlier: dict[Read, tuple[WeightLayer | None, ChannelAffine | Refusal, Answer]] = {}  # and of which blobs
    given = given or Given({}, {})
    for round_ in recording.rounds:
        answers = {}
        for question in round_.questions:
            read = question.read
            if read in given.maps:
                answers[read] = given.maps[read]
                continue
            stored = rewrite.layers.get(read[0])
            known = earlier.get(read)
            if known is None or known[0] is not stored:  # asked in an earlier round of the same blobs
                got = read_with(question.reader, stored)
                known = earlier[read] = (stored, got, _answer(got))
            if known[2] != question.answer:
                return None
            answers[read] = known[1]
        planned = [_again(action, answers, given.chains, rewrite.layers, round_.hosts) for action in round_.actions]
        rewrite.edit_weights(planned)
        actions += planned
    plan = recording.plan  # its dicts copied: a caller may change what it is given
    return rewrite, replace(plan, actions=tuple(actions), reasons=dict(plan.reasons), types=dict(plan.types))


def _again(
    action: Action,
    answers: dict[Read, ChannelAffine],
    chains: dict[tuple[Read, ...], ChannelAffine],
    layers: Layers,
    hosts: dict[str, Host],
) -> Action:
    """`action` with its map composed from this caffemodel's answers (or given composed), and its
    host's arrays (as the caffemodel and the rounds before left them: the same shapes as recorded)."""
    affine = chains.get(action.reads)
    if affine is None:
        for read in action.reads:
            affine = answers[read] if affine is None else affine.then(answers[read])
    bare = hosts.get(action.target)
    host = None
    if bare is not None:
        blobs = layers[action.target].blobs
        host = replace(bare, weights=blobs[0], bias=None if bare.bias is None else blobs[1])
    return replace(action, affine=affine, host=host)
