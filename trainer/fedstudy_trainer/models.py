"""The study's model, built identically at every site, and its weights as numpy arrays.

Models output one logit per row (shape ``(batch,)``). The tensor names of the state dict are
the names on the wire, so they must not depend on anything but the study's model and the
number of features.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedstudy.spec import IMAGE_MODELS, SEQUENCE_MODELS, TREE_MODELS, Model, StudySpec
from fedstudy_trainer.cnn import build_image_model
from fedstudy_trainer.seqmodels import build_sequence_model

Weights = dict[str, npt.NDArray[np.float32]]


class LogisticRegression(nn.Module):
    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out.squeeze(-1)


class MLP(nn.Module):
    """Linear → ReLU (→ Dropout) per hidden size, then a Linear to one logit."""

    def __init__(self, n_features: int, hidden: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out.squeeze(-1)


def build_model(
    model: Model, shape: int | tuple[int, ...], seed: int = 0, *, private: bool = False
) -> nn.Module:
    """The study's model for examples of ``shape`` (a table's feature count, or a dataset's
    ``input_shape``), with its initial weights drawn from ``seed`` (the study's seed).
    ``private``: the study trains with DP-SGD (image models then take GroupNorm).

    The global random state is left as it was: the draw happens in a forked generator.
    """
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"a model needs examples of a positive shape, got {dims}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model.name in IMAGE_MODELS:
            return build_image_model(model, dims, private)
        if model.name in SEQUENCE_MODELS:
            return build_sequence_model(model, dims, private)
        if model.name in TREE_MODELS:
            raise ValueError(
                f"model {model.name} is grown by XGBoost (fedstudy_trainer.boosting), not "
                "built as a torch module"
            )
        if len(dims) != 1:
            raise ValueError(
                f"model {model.name} takes a table's rows, not examples of shape {dims}"
            )
        n_features = dims[0]
        if model.name == "logistic-regression":
            return LogisticRegression(n_features)
        return MLP(n_features, list(model.hidden), model.dropout)


def build_study_model(spec: StudySpec, shape: int | tuple[int, ...]) -> nn.Module:
    """``build_model`` with the study's model, seed and privacy."""
    return build_model(spec.model, shape, spec.seed, private=spec.privacy is not None)


def get_weights(module: nn.Module) -> Weights:
    """A copy of the state dict as float32 contiguous numpy arrays, in state-dict order."""
    return {
        name: np.array(t.detach().cpu().numpy(), dtype=np.float32, order="C", copy=True)
        for name, t in module.state_dict().items()
    }


def set_weights(module: nn.Module, weights: Mapping[str, npt.NDArray[np.generic]]) -> None:
    """Loads arrays into the module; names and shapes must be exactly the module's."""
    state = module.state_dict()
    unknown = [n for n in weights if n not in state]
    missing = [n for n in state if n not in weights]
    if unknown or missing:
        raise ValueError(f"weights do not match the model: unknown {unknown}, missing {missing}")
    new_state = {}
    for name, current in state.items():
        array = np.asarray(weights[name])
        if tuple(array.shape) != tuple(current.shape):
            raise ValueError(
                f"tensor {name}: shape {list(array.shape)}, the model has {list(current.shape)}"
            )
        new_state[name] = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
    module.load_state_dict(new_state)
