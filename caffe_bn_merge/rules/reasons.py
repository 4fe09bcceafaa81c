"""Why a BatchNorm / Scale / Bias layer was not folded: one named reason per refusal."""

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Short, stable codes (used in the JSON report) with the text shown to users."""

    BATCH_STATS = "uses batch statistics (use_global_stats: false, SegNet's bn_mode LEARN), not a fixed map"
    TWO_BOTTOMS = "does not have one bottom and one top (a second bottom gives its scale at run time)"
    NOT_PER_CHANNEL = "is not per channel on axis 1"
    UNKNOWN_LAYOUT = "has a blob layout this version does not know"
    NOT_AFFINE = "is not an affine map"
    BAD_STATISTICS = "its parameters give NaN or infinity (Caffe's own output is not finite there)"
    UNKNOWN_CHANNELS = "its channel count is unknown (scalar maps only)"
    NET_INPUT = "reads a net input, not a layer output"
    SHARED_INPUT = "its input is also read by another layer"
    BEHIND_KEPT = "follows a layer that stays"
    NONLINEAR_BETWEEN = "a non-affine layer sits between it and the host"
    NO_HOST = "does not follow a Convolution, Deconvolution or InnerProduct"
    HOST_UNSUITABLE = "its host cannot take it"
    CONSUMER_UNSUITABLE = "the layer reading it cannot take it"
    OUTPUT_NAME = "removing it would rename a net output or a blob rewritten later"
    UNKNOWN_FIELDS = "a layer involved has fields our schema does not know, so it is kept as written"
    DUPLICATE_NAME = "a layer involved shares its name with another layer (Caffe gives weights by name)"
    UNDECODABLE_BLOBS = "a layer involved stores blobs that are not float values we read (a fork's encoding)"

    @property
    def code(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Refusal:
    """A reason plus the specifics (which layer, which blob)."""

    reason: Reason
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason.value} ({self.detail})" if self.detail else self.reason.value
