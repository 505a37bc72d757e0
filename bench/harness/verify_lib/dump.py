"""One forward and backward of each tiny model at a fixed seed and batch, saved for comparison: the
feature-off check runs this once with the pristine framework and once with the agent's and compares.

    python dump.py <configs dir> <out.pt>    (pithtrain is whichever PYTHONPATH gives)
"""

import sys

import torch

from pithtrain.config import load_config, model_classes


def main() -> None:
    configs, path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    out = {}
    for name in ("tiny-deepseek-v2-lite", "tiny-qwen3-moe"):
        cfg = load_config(f"{configs}/{name}.toml")
        torch.manual_seed(0)
        model = model_classes(cfg.family)[1](cfg.model)
        model.init_weights()
        x = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(1))
        o = model(x, labels=x.roll(-1, dims=1), return_logits=True)
        (o.loss + o.aux_loss).backward()
        out[name] = {
            "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()},
            "logits": o.logits.detach(),
            "loss": o.loss.detach(),
            "aux_loss": o.aux_loss.detach(),
            "expert_load": o.expert_load,
            "grads": {k: p.grad for k, p in model.named_parameters() if p.grad is not None},
        }
    torch.save(out, path)


if __name__ == "__main__":
    main()
