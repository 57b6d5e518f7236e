"""Graph passes, one per file: each takes a ``torch.fx.GraphModule`` and returns one."""
