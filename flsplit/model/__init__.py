"""The model layer: split models and cuts, graph splits of any ``nn.Module``, the zoo, per-cut profiles."""
