"""What the three probes of differential-attention share: the canonical view of a framework's attention layers
(parameters by canonical name, loaded, read back, their gradients) and whole-model helpers. Each probe names its
layers' attention module and the canonical -> framework parameter map."""

import torch

NEW = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "head_norm")  # the feature's parameters


class Views:
    """`canonical` {canonical name: parameter name in the attention module}, `attn(model, i)` layer i's attention
    module, `prefix` its path in the model with {} for i."""

    def __init__(self, canonical: dict, attn, prefix: str):
        self.canonical, self.attn, self.prefix = canonical, attn, prefix

    def new_param_names(self, i: int) -> dict:
        return {k: f"{self.prefix.format(i)}.{self.canonical[k]}" for k in NEW}

    def lambda_init(self, model, i: int) -> float:
        return float(self.attn(model, i).lambda_init)

    def mapped(self, model, i: int) -> dict:
        a, out = self.attn(model, i), {}
        for k, v in self.canonical.items():
            try:
                out[k] = a.get_parameter(v)
            except AttributeError:
                pass
        return out

    def attention_params(self, model, i: int) -> dict:
        return {k: p.detach() for k, p in self.mapped(model, i).items()}

    def load_attention(self, model, i: int, params: dict) -> None:
        mapped = self.mapped(model, i)
        missing = sorted(set(params) - set(mapped))
        where = self.prefix.rsplit(".", 1)[-1]
        assert not missing, f"layer {i} {where} lacks {[self.canonical[k] for k in missing]}"
        with torch.no_grad():
            for k, v in params.items():
                mapped[k].copy_(v)

    def attention_grads(self, model, i: int) -> dict:
        return {k: p.grad for k, p in self.mapped(model, i).items() if p.grad is not None}


def views(canonical: dict, attn, prefix: str) -> tuple:
    """A probe's new_param_names, lambda_init, attention_params, load_attention, attention_grads (see Views)."""
    v = Views(canonical, attn, prefix)
    return v.new_param_names, v.lambda_init, v.attention_params, v.load_attention, v.attention_grads


def param_shapes(model) -> dict:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))


def grads(model) -> dict:
    return {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
