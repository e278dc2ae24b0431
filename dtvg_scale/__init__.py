"""dtvg_scale: Dynamic Task Vector Grouping (Zhang et al., ACL Findings 2025) on large frozen backbones."""

__version__ = "0.1.0"
