"""dsv4.optim: optimizers. `muon`: V4's Muon for hidden matrices (single-device layer) and the Muon/AdamW split
of the parameters; see optim/README.md."""

from .muon import (MOONLIGHT, NS_PRESETS, PARAM_RULES, V4_HYBRID, BlockLayout, Muon, ParamAssignment, ParamRule,
                   assign_param_groups, muon_update, newton_schulz, no_weight_decay, orthogonal_blocks,
                   orthogonalized)

__all__ = ["MOONLIGHT", "NS_PRESETS", "PARAM_RULES", "V4_HYBRID", "BlockLayout", "Muon", "ParamAssignment",
           "ParamRule", "assign_param_groups", "muon_update", "newton_schulz", "no_weight_decay", "orthogonal_blocks",
           "orthogonalized"]
