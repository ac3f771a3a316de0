"""DeRS upcycling for training: MoE models whose experts are a shared FFN plus light deltas.

    from ders_cli.training import upcycle_model, save_archive, load_trainable
    moe = upcycle_model(dense, experts=4, top_k=2, mode="lowrank", rank=4)
    ...train moe with any PyTorch loop or the HF Trainer...
    save_archive(moe, "moe.ders")          # then: ders expand moe.ders -> a vanilla MoE

The expert modules are ``ders_cli.hf.experts``' (the same that run archives). transformers is
needed here (it is not for the rest of ders).
"""

from ..hf.experts import DersExperts, DersProjection, DersSharedExpert
from .archive_io import load_trainable, save_archive, upcycle_checkpoint
from .upcycle import UpcycleSpec, expert_parameter_counts, moe_config, upcycle_model

__all__ = [
    "DersExperts",
    "DersProjection",
    "DersSharedExpert",
    "UpcycleSpec",
    "expert_parameter_counts",
    "load_trainable",
    "moe_config",
    "save_archive",
    "upcycle_checkpoint",
    "upcycle_model",
]
