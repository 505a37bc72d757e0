"""Framework adapters: how each framework becomes an agent workspace, is launched for a run spec, and is read back."""


def get(framework: str):
    """The adapter module for a framework name, variants included (`pithtrain-noskills`); an if-chain so
    grep finds every framework. Raises ValueError for an unknown name."""
    if framework in ("pithtrain", "pithtrain-noskills"):
        from adapters import pithtrain

        return pithtrain
    if framework == "torchtitan":
        from adapters import torchtitan

        return torchtitan
    if framework == "megatron":
        from adapters import megatron

        return megatron
    raise ValueError(f"no adapter for framework {framework!r}")
