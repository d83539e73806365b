"""Drop-in routes from other training stacks onto the engine.

:mod:`engine.integrations.transformers`: ``OffloadTrainer`` / ``OffloadTrainerMixin`` for the
Hugging Face ``Trainer`` and its subclasses (TRL's ``SFTTrainer``...). This package imports
nothing itself (no transformers, no trl): import the submodule you use.
"""
