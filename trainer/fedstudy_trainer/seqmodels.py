"""Sequence models: GRU, LSTM and a temporal convolution network. One logit per sequence.

They take examples of shape (time steps, channels), batch first, and read the last time step
(the examples are padded at the start, so it is always a real one).

Under DP-SGD (``private``) the recurrent models use Opacus's ``DPGRU`` and ``DPLSTM``: the
same equations with layers whose per-example gradients Opacus can compute, and the same
tensor names as ``torch.nn.GRU`` and ``torch.nn.LSTM`` (in another order), so weights load
by name into either. The TCN has only 1-D convolutions and linear layers, which Opacus
handles as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional

from fedstudy.spec import Model


class RecurrentClassifier(nn.Module):
    """A GRU or LSTM over the sequence, then dropout and a linear layer on its last output."""

    def __init__(
        self,
        kind: str,
        channels: int,
        hidden: int,
        layers: int,
        dropout: float = 0.0,
        private: bool = False,
    ) -> None:
        super().__init__()
        classes: dict[tuple[str, bool], type[nn.Module]] = {
            ("gru", False): nn.GRU,
            ("lstm", False): nn.LSTM,
        }
        if private:
            # Opacus only under DP-SGD: importing it takes most of a second.
            from opacus.layers import DPGRU, DPLSTM  # type: ignore[import-untyped]

            classes.update({("gru", True): DPGRU, ("lstm", True): DPLSTM})
        if (kind, private) not in classes:
            raise ValueError(f"no recurrent layer {kind!r}")
        self.rnn = classes[kind, private](
            channels,
            hidden,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        if private:
            _only_torch_names(self, "rnn")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        last: torch.Tensor = out[:, -1, :]
        logit: torch.Tensor = self.head(self.dropout(last))
        return logit.squeeze(-1)


def _only_torch_names(owner: nn.Module, attribute: str) -> None:
    """Gives the Opacus recurrent layer ``owner.<attribute>`` the state dict of its torch
    counterpart.

    ``DPGRU``/``DPLSTM`` hold their weights in per-layer cells (``l0.ih.weight``) and
    register the same tensors again under torch's names (``weight_ih_l0``). Their own
    state-dict hook drops the cells' names only when the layer is the outermost module (inside
    another it filters a copy). Here the owner drops them, and loading puts them back as
    aliases of the torch names.
    """
    rnn = getattr(owner, attribute)
    old_to_new: dict[str, str] = dict(rnn.old_to_new)

    def drop(module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
        for old in old_to_new:
            state.pop(f"{prefix}{attribute}.{old}", None)

    def restore(
        module: nn.Module, state: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for old, new in old_to_new.items():
            if prefix + new in state and prefix + old not in state:
                state[prefix + old] = state[prefix + new]

    owner.register_state_dict_post_hook(drop)  # type: ignore[no-untyped-call]
    rnn.register_load_state_dict_pre_hook(restore)


class CausalBlock(nn.Module):
    """A causal dilated 1-D convolution (padded on the left only) → ReLU → dropout, with a
    residual connection (a 1x1 convolution where the width changes)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, dilation: int, dropout: float
    ) -> None:
        super().__init__()
        self.pad = (kernel - 1) * dilation
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, dilation=dilation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.skip = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(functional.relu(self.conv(functional.pad(x, (self.pad, 0)))))
        residual = x if self.skip is None else self.skip(x)
        result: torch.Tensor = out + residual
        return result


class TemporalConvNet(nn.Module):
    """``layers`` causal blocks with dilations 1, 2, 4, ...; a linear layer on the last step.

    The receptive field is ``1 + (kernel - 1) * (2**layers - 1)`` steps."""

    def __init__(
        self, channels: int, hidden: int, layers: int, kernel: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(
                CausalBlock(channels if i == 0 else hidden, hidden, kernel, 2**i, dropout)
                for i in range(layers)
            )
        )
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(x.transpose(1, 2))  # (batch, hidden, steps)
        logit: torch.Tensor = self.head(features[:, :, -1])
        return logit.squeeze(-1)


def build_sequence_model(model: Model, dims: tuple[int, ...], private: bool) -> nn.Module:
    """The study's sequence model for examples of shape ``dims`` = (steps, channels).

    The caller seeds torch's generator (``models.build_model``)."""
    if len(dims) != 2:
        raise ValueError(
            f"model {model.name} reads sequences of shape (steps, channels), not examples of "
            f"shape {dims}"
        )
    channels = dims[1]
    if model.name in ("gru", "lstm"):
        return RecurrentClassifier(
            model.name, channels, model.hidden_size, model.layer_count, model.dropout, private
        )
    if model.name == "tcn":
        return TemporalConvNet(
            channels, model.hidden_size, model.layer_count, model.kernel_size, model.dropout
        )
    raise ValueError(f"model {model.name} is not a sequence model")
