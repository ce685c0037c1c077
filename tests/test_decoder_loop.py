"""The decoder's teacher-forcing loop as one autograd function (nmt/model/decoder_loop.py)
against the same loop stepped through autograd: the same outputs and gradients, in
float32 and under bfloat16 autocast, and used exactly where it applies."""

import copy

import pytest
import torch

import nmt.model.decoder as decoder_module
import nmt.model.decoder_loop as loop_module
from nmt.model import Seq2Seq, native

needs_kernels = pytest.mark.skipif(native.kernels() is None, reason="no C compiler: the kernels are not built")

SMALL = dict(src_vocab_size=31, trg_vocab_size=29, emb_dim=16, enc_hidden=12, dec_hidden=20, attn_dim=14,
             out_dim=16)


def small_model(**kwargs) -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(**{**SMALL, **kwargs}).train()


def batch(sentences: int = 7, src_len: int = 9, trg_len: int = 6):
    """Random ids with source padding of several lengths (id 0 pads)."""
    generator = torch.Generator().manual_seed(1)
    src = torch.randint(4, SMALL["src_vocab_size"], (sentences, src_len), generator=generator)
    lengths = torch.randint(2, src_len + 1, (sentences,), generator=generator)
    lengths[0] = src_len
    src[torch.arange(src_len) >= lengths.unsqueeze(1)] = 0
    trg = torch.randint(4, SMALL["trg_vocab_size"], (sentences, trg_len), generator=generator)
    return src, lengths, trg


def gradients(model: Seq2Seq, loop: bool, bf16: bool, monkeypatch, data=None) -> tuple[torch.Tensor, dict]:
    """The logits and every parameter's gradient of a fixed linear loss of them, with the
    decoder's loop as one function (``loop``) or stepped through autograd."""
    src, lengths, trg = data or batch()
    with monkeypatch.context() as patch:
        if not loop:
            patch.setattr(decoder_module, "runs_loop", lambda *args: False)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(src, lengths, trg)
            probe = torch.linspace(-1, 1, logits.numel()).view(logits.shape)
            (logits.float() * probe).sum().backward()
    return logits.detach().float(), {name: p.grad.clone() for name, p in model.named_parameters()}


@needs_kernels
@pytest.mark.parametrize("sentences,trg_len", [(7, 6), (40, 5)])
def test_loop_equals_stepping_through_autograd_in_float32(sentences, trg_len, monkeypatch):
    model = small_model()
    data = batch(sentences, trg_len=trg_len)
    stepped_logits, stepped = gradients(copy.deepcopy(model), False, False, monkeypatch, data)
    logits, ours = gradients(model, True, False, monkeypatch, data)
    torch.testing.assert_close(logits, stepped_logits, rtol=0, atol=0)  # the same operations forward
    for name in stepped:  # float32 rounding apart (sums in another order): 1e-5 of the largest entry
        error = (ours[name] - stepped[name]).abs().max() / stepped[name].abs().max()
        assert error < 1e-5, (name, error)


@pytest.mark.parametrize("sentences,trg_len", [(7, 6), (40, 5)])
def test_plain_loop_equals_stepping_through_autograd(sentences, trg_len, monkeypatch):
    """The loop by PyTorch operations, which a GPU runs (with CUDA's fused GRU-cell kernel for
    the gates, and here their formulas): forced on the CPU, without the kernels."""
    model = small_model()
    data = batch(sentences, trg_len=trg_len)
    stepped_logits, stepped = gradients(copy.deepcopy(model), False, False, monkeypatch, data)
    calls = []
    real = loop_module.decoder_loop
    with monkeypatch.context() as patch:
        patch.setattr(decoder_module, "runs_loop", lambda *args: True)
        patch.setattr(loop_module, "kernels", lambda: None)
        patch.setattr(loop_module, "decoder_loop", lambda *args: calls.append(args[0]) or real(*args))
        logits, ours = gradients(model, True, False, monkeypatch, data)
    assert calls == [None]  # compiled=None: the plain loop
    torch.testing.assert_close(logits, stepped_logits, rtol=1e-5, atol=1e-6)
    for name in stepped:
        error = (ours[name] - stepped[name]).abs().max() / stepped[name].abs().max()
        assert error < 1e-5, (name, error)


@needs_kernels
@pytest.mark.parametrize("sentences", [7, 50])  # rows 42 and 300: padded to 128 and 384 rows
def test_loop_under_bf16_autocast_is_as_close_to_float32_as_stepping(sentences, monkeypatch):
    """bf16 rounds the two differently (where each step's gradients are summed), so the
    test compares each with float32: the loop's error is no larger than stepping's."""
    model = small_model()
    data = batch(sentences)
    _, reference = gradients(copy.deepcopy(model), True, False, monkeypatch, data)
    stepped_logits, stepped = gradients(copy.deepcopy(model), False, True, monkeypatch, data)
    logits, ours = gradients(model, True, True, monkeypatch, data)
    torch.testing.assert_close(logits, stepped_logits, rtol=0, atol=0)
    for name in reference:
        scale = reference[name].abs().max()
        our_error = (ours[name] - reference[name]).abs().max() / scale
        stepped_error = (stepped[name] - reference[name]).abs().max() / scale
        assert ours[name].dtype == torch.float32, name
        assert our_error <= 2 * stepped_error + 4e-3, (name, our_error, stepped_error)


@needs_kernels
def test_gradients_of_some_inputs_alone_are_those_of_the_whole_backward_pass(monkeypatch):
    model = small_model()
    src, lengths, trg = batch()
    _, whole = gradients(model, True, False, monkeypatch)
    logits = model(src, lengths, trg)
    loss_probe = torch.linspace(-1, 1, logits.numel()).view(logits.shape)
    cell = model.decoder.cells[0]
    alone = torch.autograd.grad((logits * loss_probe).sum(), [cell.weight_hh, model.decoder.attention.key_layer.weight])
    torch.testing.assert_close(alone[0], whole["decoder.cells.0.weight_hh"])
    torch.testing.assert_close(alone[1], whole["decoder.attention.key_layer.weight"])


@needs_kernels
@pytest.mark.parametrize("kwargs,grad,used", [
    (dict(), True, True),
    (dict(), False, False),  # no gradient: steps through the decoding kernels instead
    (dict(cell="exact"), True, False),  # its step multiplies W_hh in two parts
    (dict(cell="lstm"), True, False),
    (dict(dec_layers=2), True, False),
])
def test_the_loop_runs_in_training_of_one_fused_gru_layer_only(kwargs, grad, used, monkeypatch):
    calls = []
    real = loop_module.decoder_loop
    monkeypatch.setattr(loop_module, "decoder_loop", lambda *args: calls.append(1) or real(*args))
    model = small_model(**kwargs)
    src, lengths, trg = batch()
    with torch.set_grad_enabled(grad):
        model(src, lengths, trg)
    assert bool(calls) == used
