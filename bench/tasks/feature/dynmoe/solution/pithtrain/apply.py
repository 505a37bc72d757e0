"""Oracle of feature/dynmoe: add DynMoE top-any gating to a PithTrain workspace.

    python apply.py <workspace>

New code (RouterConfig.gating, TopAnyRouter, the `active_experts` metric) plus three small hooks, each placed
by an anchor that must occur exactly once; a missing anchor stops with a message and leaves every file
untouched.
"""

import sys

from source_edit import SourceEdits

CONFIG_FIELD = """\
    # "top_k": each token takes top_k experts. "top_any" (DynMoE): each token takes every expert whose score
    # passes that expert's trainable threshold (at least one), see TopAnyRouter; top_k, score_func,
    # norm_topk_prob and routed_scaling_factor are then unused.
    gating: str = "top_k"
"""

CONFIG_CHECKS = """\
        if self.gating not in ("top_k", "top_any"):
            raise ValueError(f"{prefix}.gating must be 'top_k' or 'top_any', got {self.gating!r}")
        if self.gating == "top_any" and (self.n_group > 1 or self.expert_bias or self.force_balanced):
            raise ValueError(
                f"{prefix}.gating='top_any' does not support n_group > 1, expert_bias or force_balanced"
            )
        if self.gating == "top_any" and self.lb_loss_level == "sequence":
            raise ValueError(f"{prefix}.lb_loss_level='sequence' is not supported with gating='top_any'")
"""

TOP_ANY_ROUTER = '''\
class TopAnyRouter(Router):
    """DynMoE top-any gating (Guo et al. 2024): a token activates every expert whose score passes that
    expert's trainable threshold, so the number of experts per token varies (at least one).

    s[t, e] = sigmoid(cos(x_t, weight[e])) and tau[e] = sigmoid(threshold[e]); expert e is active for token t
    when s[t, e] > tau[e]. Each of a token's K active experts gets weight 1/K. The step is differentiated as
    relu(s - tau) (straight-through, K held fixed), so `weight` and `threshold` train. A token with no
    active expert goes to its best-scoring one with weight 1 (no gradient). Slots: k = E per token, the
    chosen experts first (by score), the others with weight 0; `load` counts chosen (token, expert) pairs,
    and the balance loss uses them.
    """

    def __init__(self, hidden_size: int, cfg: RouterConfig):
        super().__init__(hidden_size, cfg)
        self.threshold = nn.Parameter(torch.zeros(cfg.num_experts))

    def forward(self, x: torch.Tensor, batch_size: int = 1) -> RouterOutput:
        cfg = self.cfg
        cos = F.normalize(x.float(), dim=-1) @ F.normalize(self.weight.float(), dim=-1).t()
        scores = cos.sigmoid()
        margin = F.relu(scores - self.threshold.float().sigmoid())
        active = margin > 0
        count = active.sum(dim=-1, keepdim=True)
        step = margin + (active.float() - margin).detach()  # value 0 or 1, gradient that of the margin
        best = F.one_hot(scores.argmax(dim=-1), cfg.num_experts).float()
        dense = torch.where(count > 0, step / count.clamp_min(1), best)  # [T, E] combine weights
        chosen = dense.detach() > 0
        expert_ids = (chosen.float() * 2 + scores.detach()).argsort(dim=-1, descending=True)
        load = chosen.sum(dim=0)
        zero = cos.new_zeros(())
        lb_loss = self.balance_loss(scores, expert_ids, load, batch_size) if cfg.lb_loss_coef else zero
        z_loss = torch.logsumexp(cos, dim=-1).square().mean() if cfg.z_loss_coef else zero
        return RouterOutput(expert_ids, dense.gather(1, expert_ids), lb_loss, z_loss, load)


'''

METRIC = '''\
def active_experts(load: torch.Tensor, tokens: int, router) -> dict:
    """DynMoE top-any gating: mean number of experts a token activated, per MoE layer (load [layers, E])."""
    if router.gating != "top_any" or load.numel() == 0:
        return {}
    return {"active_experts": (load.sum(dim=1).float() / tokens).tolist()}


'''


def main() -> None:
    edits = SourceEdits(sys.argv[1] if len(sys.argv) > 1 else ".")
    blocks = edits.file("pithtrain/models/blocks.py")
    blocks.before_line('    def validate(self, prefix: str = "model.router") -> None:', CONFIG_FIELD + "\n")
    blocks.before_line("        if self.num_experts < 1:", CONFIG_CHECKS)
    blocks.before_line("class GroupedExperts(nn.Module):", TOP_ANY_ROUTER)
    blocks.replace(
        "        self.gate = Router(hidden_size, router)\n",
        '        self.gate = (TopAnyRouter if router.gating == "top_any" else Router)(hidden_size, router)\n',
    )

    train = edits.file("pithtrain/train.py")
    train.before_line("def load_stats(", METRIC)
    train.find("    tokens_per_step = ")  # the name the metric line uses
    pad = train.indent("**load_stats(load),")
    train.after_line(
        "**load_stats(load),", f"{pad}**active_experts(load, tokens_per_step, cfg.model.router),\n"
    )
    edits.write()  # only now: every anchor was found
    print('apply.py: DynMoE top-any gating added (model.router.gating = "top_any")')


if __name__ == "__main__":
    main()
