"""Text generation: sampling parameters and processors, the prefill/decode/sample loop, the Engine."""

from sambay.generate.engine import Completion, Engine, SequenceDelta, TokenLogprob, decode_step, prefill
from sambay.generate.guided import GuidedDecoding
from sambay.generate.sampling import REASONING_DEFAULTS, SamplingParams, sample

__all__ = [
    "REASONING_DEFAULTS",
    "Completion",
    "Engine",
    "GuidedDecoding",
    "SamplingParams",
    "SequenceDelta",
    "TokenLogprob",
    "decode_step",
    "prefill",
    "sample",
]
