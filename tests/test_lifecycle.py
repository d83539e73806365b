"""The trainer's lifecycle: close, a dropped trainer, close after an I/O error, step() without backward()."""
from __future__ import annotations

import errno
import gc
import logging
import math
import os
import weakref

import helpers
import pytest
import torch
from helpers import engine_config
from transformers import LlamaForCausalLM

import engine
import engine._log
from engine.errors import AsyncIOError, EngineError, ModelAttachedError, TrainerClosedError
from engine.offload import is_placeholder
from engine.procinfo import locked_bytes


def tiny_llama() -> LlamaForCausalLM:
    return helpers.tiny_llama(vocab=128, hidden=32, inter=64, positions=32)


def config(tmp_path, **overrides) -> engine.Config:
    fields = dict(gradient_accumulation_steps=1, resident_threshold_bytes=1024)
    fields.update(overrides)
    return engine_config(tmp_path, lr=1e-3, **fields)


BATCH = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def train_step(trainer) -> float:
    loss = trainer(input_ids=BATCH, labels=BATCH).loss
    trainer.backward(loss)
    trainer.step()
    return loss.item()


def swap_dirs(tmp_path) -> list[str]:
    return sorted(d for d in os.listdir(tmp_path) if d.startswith("memascend-"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ----------------------------------------------------------------------------- item 4: use after close
def test_closed_trainer_and_its_model_refuse_to_run_never_nan(tmp_path):
    model = tiny_llama()
    trainer = engine.initialize(model, config(tmp_path))
    train_step(trainer)
    trainer.close()
    assert swap_dirs(tmp_path) == []
    # The model holds placeholders now: any forward through it (or a part of it) is refused.
    with pytest.raises(TrainerClosedError, match="restore_weights=True"):
        model(input_ids=BATCH, labels=BATCH)
    with pytest.raises(TrainerClosedError, match=r"model\.layers\.0\.mlp"):
        model.model.layers[0].mlp(torch.zeros(1, 32))
    # so does loading weights into its placeholders (nn.Module would bury a copy_ error in a RuntimeError)
    with pytest.raises(TrainerClosedError, match=r"cannot load 'model\.embed_tokens\.weight'"):
        model.load_state_dict(tiny_llama().state_dict())
    name = "model.embed_tokens.weight"
    calls = {"forward": lambda: trainer(input_ids=BATCH), "step": trainer.step,
             "backward": lambda: trainer.backward(torch.ones((), requires_grad=True)),
             "parameter": lambda: trainer.parameter(name), "weight": lambda: trainer.weight(name),
             "memory_report": trainer.memory_report,
             "save_checkpoint": lambda: trainer.save_checkpoint(str(tmp_path / "ckpt")),
             "load_checkpoint": lambda: trainer.load_checkpoint(str(tmp_path / "ckpt")),
             "save_pretrained": lambda: trainer.save_pretrained(str(tmp_path / "hf")),
             "optimizer.step": trainer.optimizer.step}
    for what, call in calls.items():
        with pytest.raises(TrainerClosedError, match=rf"the trainer is closed: {what}\(\)"):
            call()
    trainer.close()  # a second close does nothing
    # Its weights are gone: a new trainer on it is refused, naming the way to keep them.
    with pytest.raises(TrainerClosedError, match="restore_weights=True"):
        engine.initialize(model, config(tmp_path))
    assert swap_dirs(tmp_path) == []


def test_close_with_restore_weights_gives_the_model_its_trained_weights(tmp_path):
    model = tiny_llama()
    trainer = engine.initialize(model, config(tmp_path))
    for _ in range(2):
        train_step(trainer)
    trained = {n: trainer.parameter(n).clone() for n, _ in model.named_parameters()}
    trainer.close(restore_weights=True)
    assert swap_dirs(tmp_path) == []
    for n, p in model.named_parameters():
        assert not is_placeholder(p.data), n
        assert torch.equal(p.detach(), trained[n].view(p.shape)), n
    # The model is an ordinary module again: it evaluates like a fresh one with these weights ...
    reference = tiny_llama()
    reference.load_state_dict(trained, strict=False)
    with torch.no_grad():
        loss = model(input_ids=BATCH, labels=BATCH).loss
        assert torch.isfinite(loss)
        assert torch.equal(loss, reference(input_ids=BATCH, labels=BATCH).loss)
    # ... and a new trainer may take it (re-initializing after a restoring close works).
    with engine.initialize(model, config(tmp_path)) as again:
        assert torch.equal(again.parameter("lm_head.weight"), trained["lm_head.weight"])
        assert math.isfinite(train_step(again))


def test_second_trainer_on_an_attached_model_is_refused(tmp_path):
    model = tiny_llama()
    with engine.initialize(model, config(tmp_path)) as trainer:
        with pytest.raises(ModelAttachedError, match="already attached to a live trainer"):
            engine.initialize(model, config(tmp_path))
        with pytest.raises(ModelAttachedError, match="submodule '0'"):
            engine.initialize(torch.nn.Sequential(model), config(tmp_path))
        with pytest.raises(ModelAttachedError, match="a part of another model"):
            engine.initialize(model.model, config(tmp_path))
        train_step(trainer)  # the first trainer is unaffected
        assert trainer.global_steps == 1
    assert swap_dirs(tmp_path) == []


# ----------------------------------------------------------------------------- item 5: dropped trainers
def test_dropped_trainer_is_collected_and_releases_everything(tmp_path):
    gc.collect()
    fds, locked = open_fds(), locked_bytes()
    for i in range(3):  # no growth over several dropped trainers
        model = tiny_llama()
        trainer = engine.initialize(model, config(tmp_path))
        train_step(trainer)
        assert len(swap_dirs(tmp_path)) == 1
        assert open_fds() > fds
        if trainer.runtime.pool.locked:
            assert locked_bytes() >= locked + trainer.runtime.pool.capacity
        ref = weakref.ref(trainer)
        del trainer
        gc.collect()
        assert ref() is None, "the model's hooks keep the trainer alive"
        assert swap_dirs(tmp_path) == [], i
        assert locked_bytes() == locked, i
        assert open_fds() == fds, i
        # the model was released with it: it refuses to run rather than compute with NaN
        with pytest.raises(TrainerClosedError):
            model(input_ids=BATCH)


# ----------------------------------------------------------------------------- item 11: close after an I/O error
def fail_first_gradient_write(trainer, monkeypatch) -> list:
    """The first gradient write fails with ENOSPC the way the store reports it: on every wait."""
    store = trainer.runtime.store
    (swap,) = store.directories
    real_write = store.write_from
    failed = []

    class FullDisk:
        def __init__(self, request):
            self.request = request

        def done(self) -> bool:
            return self.request.done()

        def wait(self) -> None:
            self.request.wait()
            raise AsyncIOError(errno.ENOSPC, f"write of {self.request.key!r} failed: No space left on device",
                               os.path.join(swap, "swap.bin"), 0, 4096, "write")

    def write_from(key, *args, **kwargs):
        request = real_write(key, *args, **kwargs)
        if key[0] == "grad" and not failed:
            failed.append(key)
            return FullDisk(request)
        return request

    monkeypatch.setattr(store, "write_from", write_from)
    return failed


def test_close_after_a_failed_gradient_write_releases_everything_and_reports_once(tmp_path, monkeypatch):
    model = tiny_llama()
    trainer = engine.initialize(model, config(tmp_path))
    store, io, pool = trainer.runtime.store, trainer.runtime.io, trainer.runtime.pool
    (swap,) = store.directories
    failed = fail_first_gradient_write(trainer, monkeypatch)
    loss = trainer(input_ids=BATCH, labels=BATCH).loss
    trainer.backward(loss)  # the failed write is still in flight
    assert failed
    with pytest.raises(AsyncIOError, match="No space left") as info:
        trainer.close()
    assert info.value.errno == errno.ENOSPC
    # Everything was released all the same: swap directory, store, I/O ring, pool.
    assert not os.path.exists(swap) and swap_dirs(tmp_path) == []
    assert store._closed
    with pytest.raises(ValueError, match="closed"):
        _ = io.backend
    with pytest.raises(ValueError, match="closed"):
        pool.stats()
    trainer.close()  # the error was reported once: later calls are no-ops
    with pytest.raises(TrainerClosedError):
        trainer.step()


def test_leaving_a_with_block_on_an_error_keeps_that_error_when_close_fails_too(tmp_path, monkeypatch, caplog):
    model = tiny_llama()
    with pytest.raises(RuntimeError, match="the user's own error"):
        with engine.initialize(model, config(tmp_path)) as trainer:
            fail_first_gradient_write(trainer, monkeypatch)
            trainer.backward(trainer(input_ids=BATCH, labels=BATCH).loss)
            raise RuntimeError("the user's own error")
    assert swap_dirs(tmp_path) == []
    assert any("No space left" in r.getMessage() for r in caplog.records)  # the close error is logged


def test_close_after_a_failed_step_releases_everything(tmp_path):
    """The native fault injector fails one transfer (ENOSPC) in the backward of the second
    window's first micro-batch (here: a gradient write, whose read-back then fails its CRC).
    Whatever it hits, training raises an engine error, close() releases everything and
    raises at most once."""
    model = tiny_llama()
    trainer = engine.initialize(model, config(tmp_path, gradient_accumulation_steps=2))
    (swap,) = trainer.runtime.store.directories
    for _ in range(2):
        train_step(trainer)
    with pytest.raises(EngineError):
        for micro in range(2):
            loss = trainer(input_ids=BATCH, labels=BATCH).loss
            if micro == 0:
                trainer.runtime.io.inject_fault(3, errno.ENOSPC)
            trainer.backward(loss)
            trainer.step()
    del loss
    try:
        trainer.close()
    except EngineError:
        pass
    assert not os.path.exists(swap)
    assert trainer.runtime.store._closed and trainer.runtime.io._io is None and trainer.runtime.pool._arena is None
    trainer.close()


# ----------------------------------------------------------------------------- item 12: step() without backward()
def snapshot(trainer, model) -> dict:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    out = {("w", n): trainer.parameter(n).clone() for n in names}
    if trainer.plan.trainable_in_memory:
        opt = trainer.runtime.backend.optimizer
        for n in names:
            for k, v in opt.state.get(trainer.runtime.backend.master(n), {}).items():
                out[(k, n)] = v.clone()
    else:
        for n in names:
            for k in ("exp_avg", "exp_avg_sq"):
                out[(k, n)] = trainer.runtime.store.get((k, n)).clone()
    out["counters"] = (trainer.micro_steps, trainer.global_steps, trainer.skipped_steps)
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "counters":
            assert a[k] == b[k]
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("placement", ["nvme", "memory"])
def test_step_without_backward_changes_nothing_and_warns_once(tmp_path, caplog, monkeypatch, placement):
    monkeypatch.setattr(engine._log, "_said", set())  # once per process: forget earlier tests' warnings
    model = tiny_llama()
    with engine.initialize(model, config(tmp_path, trainable_placement=placement)) as trainer:
        assert trainer.plan.trainable_in_memory == (placement == "memory")
        train_step(trainer)  # moments are non-zero: a stray step would move the weights
        before = snapshot(trainer, model)
        with caplog.at_level(logging.WARNING, logger="engine"):
            for _ in range(3):
                trainer.step()
            trainer.optimizer.step()  # straight to the optimizer: nothing accumulated either
        assert_same_state(before, snapshot(trainer, model))
        warnings = [r.getMessage() for r in caplog.records if "no gradient since the last step" in r.getMessage()]
        assert len(warnings) == 2 and "step()" in warnings[0] and "optimizer.step()" in warnings[1]
        train_step(trainer)  # and training goes on from the same state
        assert trainer.global_steps == 2


def test_step_without_backward_inside_an_accumulation_window_is_not_a_micro_batch(tmp_path):
    """With gradient accumulation a stray step() does not advance the window: the boundary
    still comes after two micro-batches with gradients, as in a run without the stray call."""
    cfg = dict(gradient_accumulation_steps=2)
    results = []
    for stray in (False, True):
        model = tiny_llama()
        with engine.initialize(model, config(tmp_path, **cfg)) as trainer:
            train_step(trainer)
            if stray:
                trainer.step()
                assert trainer.micro_steps == 1 and trainer.global_steps == 0
            train_step(trainer)
            assert trainer.global_steps == 1
            results.append(snapshot(trainer, model))
    assert_same_state(*results)
