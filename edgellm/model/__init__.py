"""The one model description every backend reads: config, named weights, tokenizer, loaders."""

from edgellm.model.config import ModelConfig, RopeScaling
from edgellm.model.description import ModelDescription, TokenizerSpec
from edgellm.model.weights import ModelWeights, WeightTensor

__all__ = [
    "ModelConfig",
    "ModelDescription",
    "ModelWeights",
    "RopeScaling",
    "TokenizerSpec",
    "WeightTensor",
]
