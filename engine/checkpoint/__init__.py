"""Checkpoints: crash-safe save/exact resume of the training state, and Hugging Face safetensors
checkpoints (larger than DRAM) in and out. Everything here uses only the offload runtime's
public surface (:class:`~engine.offload.runtime.OffloadRuntime`).

- :mod:`.state`: save/load of the training state (``Trainer.save_checkpoint`` / ``load_checkpoint``)
- :mod:`.slots`: the state's tensors (store keys, in-DRAM masters and moments) and their matching on load
- :mod:`.hf`: :func:`~.hf.load_pretrained` (meta model + initializer for ``engine.from_pretrained``
  and the CLI) and ``save_pretrained``
- :mod:`.hf_writer`: the one Hugging Face model-directory writer (shards, index, config.json)
- :mod:`.atomic`: checkpoint roots: temporary names, rename, ``latest``, retention, the save lock
- :mod:`.private`: private files: 0600/0700, O_EXCL | O_NOFOLLOW, fsync, rename (:class:`~.private.PrivateOutput`)
- :mod:`.manifest`: ``manifest.json``, every field checked before the trainer is touched
- :mod:`.format` / :mod:`.transfer` / :mod:`.sinks`: streamed safetensors I/O through pinned pool blocks
"""
from .format import CheckpointError, CheckpointWriteError, LatestNotDurableError, LatestNotUpdatedError

__all__ = ["CheckpointError", "CheckpointWriteError", "LatestNotDurableError", "LatestNotUpdatedError"]
