"""Checkpoints: crash-safe save/exact resume of the training state, and Hugging Face safetensors
checkpoints (larger than DRAM) in and out.

- :mod:`.state`: ``Trainer.save_checkpoint`` / ``Trainer.load_checkpoint``
- :mod:`.hf`: ``engine.from_pretrained`` / ``Trainer.save_pretrained``
- :mod:`.atomic`: temporary names, fsync, rename, ``latest``, retention, the save lock
- :mod:`.manifest`: ``manifest.json``, every field checked before the trainer is touched
- :mod:`.format` / :mod:`.transfer`: streamed safetensors I/O through pinned pool blocks
"""
from .format import CheckpointError, CheckpointWriteError, LatestNotDurableError, LatestNotUpdatedError

__all__ = ["CheckpointError", "CheckpointWriteError", "LatestNotDurableError", "LatestNotUpdatedError"]
