"""Streamed weights used outside their owning module's forward (a parent reads a child's weight).

transformers' Mamba mixer hands ``conv1d.weight`` and ``dt_proj.weight`` to functions instead of
calling those modules; a parent may call ``F.linear(x, self.child.weight)``. The streamer must
give such code the real weight (fetched on access, for the op, as if its module were called),
never the NaN placeholder. Every comparison is against the same model in
memory, fp32, with the tolerance of tests/test_streaming.py (relative 1e-6, in practice exact).
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")

import helpers  # noqa: E402

import engine  # noqa: E402
from engine.offload import ParameterStreamer, StreamingError, is_placeholder  # noqa: E402
from engine.storage import TensorStore  # noqa: E402

transformers.logging.set_verbosity_error()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    helpers.assert_close(actual, expected, what, finite=True)


# ---------------------------------------------------------------------- a plain parent using a child's weight
class ParentReadsChild(nn.Module):
    """``mix`` is called as a module; ``proj.weight`` is used by the parent (and, with ``call_child``,
    ``proj`` is also called normally); ``head.weight`` is only ever used by the parent's code."""

    def __init__(self, call_child: bool):
        super().__init__()
        self.call_child = call_child
        self.mix = nn.Linear(32, 48)
        self.proj = nn.Linear(48, 48)
        self.head = nn.Linear(48, 16, bias=False)

    def forward(self, x):
        h = torch.tanh(self.mix(x))
        h = F.linear(h, self.proj.weight, self.proj.bias)  # the parent reads the child's weight
        if self.call_child:
            h = self.proj(torch.relu(h))
        w = self.head.weight.t()  # a view escaping into later ops
        return h @ w


def _plain_step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = out.pow(2).mean()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("call_child", [False, True], ids=["parent_only", "child_called_too"])
@pytest.mark.parametrize("depth", [0, 1])
def test_parent_using_child_weight_matches_in_memory(call_child, depth, store):
    torch.manual_seed(0)
    ref = ParentReadsChild(call_child)
    model = copy.deepcopy(ref)
    x = torch.randn(5, 32)
    expected_out, expected_grads = _plain_step(ref, x)
    with torch.no_grad():
        expected_eval = ref(x)
    with ParameterStreamer(model, store, prefetch_depth=depth, resident_threshold_bytes=1024) as streamer:
        for step in range(3):  # the first step discovers the parent; later ones fetch up front
            out, grads = _plain_step(model, x)
            assert_close(out, expected_out, f"step {step}: output")
            for name, g in expected_grads.items():
                assert_close(grads[name], g, f"step {step}: grad of {name}")
            with torch.no_grad():
                assert_close(model(x), expected_eval, f"step {step}: no_grad output")
        assert all(is_placeholder(p.data) for p in (model.mix.weight, model.proj.weight, model.head.weight))
        stats = streamer.stats()
        assert stats["fetched_on_access"] >= 3 * 2 * 2  # proj and head, forward and no_grad
        assert stats["pool"]["grown_slots"] == 0, "fetch on access stays within the planned staging"
        assert ("F", "proj") in streamer.execution_order and ("F", "head") in streamer.execution_order
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.detach(), q.detach()), name


def test_scopes_seen_while_attached_are_forgotten_at_detach(store):
    torch.manual_seed(0)
    ref = ParentReadsChild(False)
    model = copy.deepcopy(ref)
    x = torch.randn(5, 32)
    streamer = ParameterStreamer(model, store, resident_threshold_bytes=1024)
    units = [u.name for u in streamer.params.units]
    for _ in range(2):  # attach, run (the root becomes a scope), detach: nothing lingers
        with streamer:
            assert_close(model(x).detach(), ref(x).detach(), "output")
            assert [u.name for u in streamer.params.units] == units + [""]
        assert [u.name for u in streamer.params.units] == units


def test_use_outside_any_forward_is_fetched_and_after_detach_is_an_error(tmp_path):
    torch.manual_seed(0)
    ref = ParentReadsChild(False)
    model = copy.deepcopy(ref)
    with TensorStore(tmp_path, grow_step="8MiB") as s:
        streamer = ParameterStreamer(model, s, resident_threshold_bytes=1024).attach()
        # user code computing with a streamed weight between steps gets its value, not NaN
        assert torch.equal(model.head.weight.sum(), ref.head.weight.sum())
        assert is_placeholder(model.head.weight.data)
        streamer.detach(restore=False)
        with pytest.raises(StreamingError, match=r"head\.weight.*detached"):
            model.head.weight.sum()
        with pytest.raises(StreamingError, match=r"mix\.weight"):
            model(torch.randn(2, 32))


# ---------------------------------------------------------------------- transformers' Mamba
def tiny_mamba(mixer_unit: bool, seed: int = 0):
    """``mixer_unit``: the mixer owns a streamed parameter (A_log) itself; otherwise it owns only
    resident ones and is an ancestor of units (conv1d, in/x/dt/out_proj) that it bypasses."""
    torch.manual_seed(seed)
    if mixer_unit:
        cfg = transformers.MambaConfig(vocab_size=128, hidden_size=32, state_size=8, num_hidden_layers=2,
                                       expand=2, conv_kernel=4, time_step_rank=2, use_cache=False)
    else:
        cfg = transformers.MambaConfig(vocab_size=128, hidden_size=32, state_size=2, num_hidden_layers=2,
                                       expand=2, conv_kernel=4, time_step_rank=8, use_cache=False)
    return transformers.MambaForCausalLM(cfg).float().train()


# bytes: with mixer_unit, A_log (2 KiB), conv1d (1 KiB), dt_proj (512 B) and the projections stream;
# without, A_log (512 B) stays resident and conv1d (1 KiB) / dt_proj (2 KiB) stream.
MAMBA_THRESHOLD = {True: 300, False: 600}


def _mamba_step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().clone(), out.loss.detach().clone(), grads


@pytest.mark.parametrize("mixer_unit", [True, False], ids=["mixer_unit", "mixer_not_unit"])
def test_mamba_streamed_matches_in_memory(mixer_unit, store):
    ref = tiny_mamba(mixer_unit)
    model = copy.deepcopy(ref)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, loss, grads = _mamba_step(ref, ids)
    assert len(grads) == len(list(ref.parameters()))
    with ParameterStreamer(model, store, prefetch_depth=1,
                           resident_threshold_bytes=MAMBA_THRESHOLD[mixer_unit]) as streamer:
        streamed = {sp.name for sp in streamer.params.streamed.values()}
        assert "backbone.layers.0.mixer.conv1d.weight" in streamed
        assert "backbone.layers.0.mixer.dt_proj.weight" in streamed
        assert ("backbone.layers.0.mixer.A_log" in streamed) == mixer_unit
        for step in range(2):
            got_logits, got_loss, got_grads = _mamba_step(model, ids)
            assert_close(got_logits, logits, f"step {step}: logits")
            assert_close(got_loss, loss, f"step {step}: loss")
            assert got_grads.keys() == grads.keys()
            for name, g in grads.items():
                assert_close(got_grads[name], g, f"step {step}: grad of {name}")
        model.eval()
        ref.eval()
        with torch.no_grad():
            assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, "eval logits")
        names = {u.name for u in streamer.params.units}
        assert {"backbone.layers.0.mixer", "backbone.layers.1.mixer"} <= names


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_mamba_with_activation_checkpointing_matches_in_memory(reentrant, store):
    ref = tiny_mamba(False)
    model = copy.deepcopy(ref)
    for m in (ref, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, loss, grads = _mamba_step(ref, ids)
    with ParameterStreamer(model, store, prefetch_depth=1, resident_threshold_bytes=MAMBA_THRESHOLD[False]):
        for step in range(2):
            got_logits, got_loss, got_grads = _mamba_step(model, ids)
            assert_close(got_loss, loss, f"step {step}: loss")
            assert got_grads.keys() == grads.keys()
            for name, g in grads.items():
                assert_close(got_grads[name], g, f"step {step}: grad of {name}")


def _mamba_reference_run(model, data, steps, lr=1e-3, wd=0.1):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, foreach=False)
    losses = []
    for x in data[:steps]:
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        losses.append(out.loss.item())
        opt.step()
        opt.zero_grad()
    return losses


def test_mamba_training_on_nvme_matches_torch_adamw(tmp_path):
    ref = tiny_mamba(True)
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 128, (2, 12), generator=g) for _ in range(4)]
    ref_losses = _mamba_reference_run(ref, data, 4)
    cfg = engine.Config(nvme_path=str(tmp_path), optimizer=engine.AdamWConfig(lr=1e-3, weight_decay=0.1),
                        resident_threshold_bytes=MAMBA_THRESHOLD[True])
    losses = []
    with engine.initialize(model, cfg) as trainer:
        for x in data:
            out = trainer(input_ids=x, labels=x)
            trainer.backward(out.loss)
            trainer.step()
            losses.append(out.loss.item())
        assert trainer.memory_report()["steps"] == 4, "no step may be skipped as non-finite"
        weights = {name: trainer.parameter(name).clone() for name, _ in model.named_parameters()}
    assert os.listdir(tmp_path) == []
    # rtol 1e-5: the bound of tests/test_trainer.py::assert_same_training (torch's MKL sqrt vs the
    # fused kernel's IEEE sqrt, amplified by Adam on near-zero gradients)
    for a, b in zip(losses, ref_losses):
        assert math.isfinite(a) and math.isclose(a, b, rel_tol=1e-5), (losses, ref_losses)
    for name, p in ref.named_parameters():
        rel = ((weights[name].view(p.shape) - p.detach()).norm() / p.detach().norm()).item()
        assert rel <= 1e-5, (name, rel)


# ---------------------------------------------------------------------- writes to a streamed weight
def _tiny_llama():
    return helpers.tiny_llama(vocab=128, hidden=32, inter=64, positions=32)


def _trainer_config(tmp_path) -> engine.Config:
    return engine.Config(nvme_path=str(tmp_path), optimizer=engine.AdamWConfig(lr=1e-3, weight_decay=0.1),
                         resident_threshold_bytes=1024)


def _no_grad(fn):
    def run():
        with torch.no_grad():
            fn()
    return run


def _set_item(t):
    t[0] = 1.0


def _imul(t):
    t *= 2


WRITES = {  # each writes into the weight it is given
    "mul_": lambda w: w.mul_(2), "copy_": lambda w: w.copy_(torch.ones(w.shape)), "zero_": lambda w: w.zero_(),
    "fill_": lambda w: w.fill_(3.0), "setitem": _set_item, "imul": _imul,
    "add_out": lambda w: torch.add(torch.ones(w.shape), 1.0, out=w),
    "relu_inplace": lambda w: F.relu(w, inplace=True),
}  # Tensor.set_ is not dispatched to __torch_function__ (like a .data assignment): not interceptable


@pytest.mark.parametrize("grad_mode", ["grad", "no_grad"])
@pytest.mark.parametrize("write", list(WRITES))
def test_a_write_to_a_streamed_weight_is_refused_and_changes_nothing(write, grad_mode, store):
    torch.manual_seed(0)
    ref = ParentReadsChild(False)
    model = copy.deepcopy(ref)
    with ParameterStreamer(model, store, resident_threshold_bytes=1024) as streamer:
        weight = model.head.weight
        assert torch.equal(weight.sum(), ref.head.weight.sum())  # fetched on access: staged now
        op = (lambda: WRITES[write](weight)) if grad_mode == "grad" else _no_grad(lambda: WRITES[write](weight))
        with pytest.raises(StreamingError, match=r"'head\.weight'.*cannot be written.*trainer"):
            op()
        assert is_placeholder(weight.data) and type(weight).__name__ == "StreamedParameter"
        assert torch.equal(store.get(("param", "head.weight")), ref.head.weight.detach())
        assert torch.equal(weight.sum(), ref.head.weight.sum()), "the staged copy is unchanged too"
        x = torch.randn(3, 32)
        assert_close(model(x).detach(), ref(x).detach(), "output after the refused write")
        assert streamer.attached


def test_reading_a_streamed_weight_into_another_tensor_still_works(store):
    torch.manual_seed(0)
    ref = ParentReadsChild(False)
    model = copy.deepcopy(ref)
    with ParameterStreamer(model, store, resident_threshold_bytes=1024):
        w = model.head.weight
        expected = ref.head.weight.detach()
        out = torch.zeros(w.shape)
        out.copy_(w)  # the weight is the source, not the target
        assert torch.equal(out, expected)
        acc = torch.ones(w.shape)
        acc.add_(w)
        assert torch.equal(acc, expected + 1)
        y = torch.empty(w.shape)
        with torch.no_grad():  # out= refuses inputs that require grad, as for any tensor
            torch.mul(w, 2.0, out=y)
        assert torch.equal(y, expected * 2)
        z = torch.zeros(2, *w.shape)
        z[1] = w
        assert torch.equal(z[1], expected)


def test_init_and_load_state_dict_into_an_attached_model_are_refused(tmp_path):
    model = _tiny_llama()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    new = {k: torch.full_like(v, 0.5) for k, v in sd.items()}
    name = "model.layers.0.mlp.up_proj.weight"
    with engine.initialize(model, _trainer_config(tmp_path)) as trainer:
        weight = model.get_parameter(name)
        with pytest.raises(StreamingError, match=rf"'{name}'.*cannot be written"):
            with torch.no_grad():
                nn.init.normal_(weight)
        with pytest.raises(StreamingError, match=rf"'{name}'.*cannot be written"):
            nn.init.zeros_(weight)
        with pytest.raises(StreamingError, match=r"cannot be written.*load_checkpoint"):
            model.load_state_dict(new)
        with pytest.raises(StreamingError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight'.*cannot be written.*"
                                                 r"key 'gate_proj\.weight'"):
            model.model.layers[0].mlp.load_state_dict(
                {k[len("model.layers.0.mlp."):]: v for k, v in new.items() if k.startswith("model.layers.0.mlp.")})
        # documented (README): state_dict of an attached model holds the NaN placeholders
        assert is_placeholder(model.state_dict()[name]) and torch.isnan(model.state_dict()[name]).all()
        for key, value in sd.items():
            if key in dict(model.named_parameters()):
                assert torch.equal(trainer.parameter(key).view(value.shape), value), key
        loss = trainer(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss
        assert torch.isfinite(loss)


def test_a_weight_used_after_close_is_a_trainer_closed_error(tmp_path):
    from engine.errors import TrainerClosedError

    model = _tiny_llama()
    trainer = engine.initialize(model, _trainer_config(tmp_path))
    trainer.close()
    x = torch.randn(2, 32)
    with pytest.raises(TrainerClosedError, match=r"lm_head\.weight.*trainer is closed"):
        F.linear(x, model.lm_head.weight)
    try:
        model.lm_head.weight.sum()
    except TrainerClosedError as exc:
        assert isinstance(exc, StreamingError)
    else:
        raise AssertionError("no error")
    assert is_placeholder(model.lm_head.weight.detach()), "documented: structural ops give the placeholder"


def test_streaming_error_is_one_class_in_the_error_hierarchy():
    from engine import errors
    from engine.offload import params

    assert errors.StreamingError is StreamingError is params.StreamingError
    assert issubclass(StreamingError, errors.EngineError)
