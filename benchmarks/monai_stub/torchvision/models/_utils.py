"""``IntermediateLayerGetter``: run a model's children in order and return chosen intermediate outputs."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


class IntermediateLayerGetter(nn.ModuleDict):
    """Keep ``model``'s direct children up to the last one named in ``return_layers``.

    ``forward(x)`` runs them in registration order and returns ``{return_layers[name]: output}`` for the
    named ones, in order. Children used only through ``forward`` code (not registered in order) are not
    supported, as in torchvision.
    """

    def __init__(self, model: nn.Module, return_layers: dict[str, str]) -> None:
        wanted = dict(return_layers)
        names = [name for name, _ in model.named_children()]
        if not set(wanted) <= set(names):
            raise ValueError(f"return_layers {sorted(set(wanted) - set(names))} are not children of the model")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        remaining = set(wanted)
        for name, module in model.named_children():
            layers[name] = module
            remaining.discard(name)
            if not remaining:
                break
        super().__init__(layers)
        self.return_layers = wanted

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        out: OrderedDict[str, Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out
