"""On a CUDA GPU the model computes what it computes on the CPU.

The GPU takes other code paths: PyTorch's fused GRU-cell kernel in the decoder, cuDNN
in the encoder, fused Adam. These tests compare them with the CPU in strict fp32 (no
TF32), and are skipped on machines without a GPU (CI has none; run them on one).
"""

import copy
from pathlib import Path

import pytest
import torch

from nmt.model import Seq2Seq
from nmt.model.gru import FusedGRUCell
from nmt.search import beam_search

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def strict_fp32():
    """TF32 matmuls would differ from the CPU in the fourth digit."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_fused_kernel_cell_matches_its_equations_forward_and_backward():
    torch.manual_seed(0)
    cell = FusedGRUCell(6, 16).to(CUDA)
    gates_x = torch.randn(5, 48, device=CUDA, requires_grad=True)
    h = torch.randn(5, 16, device=CUDA, requires_grad=True)
    kernel = cell.step(gates_x, h)  # CUDA, matching dtypes: the fused kernel
    # the same equations written out, through autograd
    x_r, x_z, x_n = gates_x.chunk(3, dim=1)
    h_r, h_z, h_n = torch.nn.functional.linear(h, cell.weight_hh, cell.bias_hh).chunk(3, dim=1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    expected = (1 - z) * n + z * h
    assert torch.allclose(kernel, expected, atol=1e-6)
    grad = torch.randn_like(kernel)
    got = torch.autograd.grad(kernel, (gates_x, h, cell.weight_hh, cell.bias_hh), grad)
    want = torch.autograd.grad(expected, (gates_x, h, cell.weight_hh, cell.bias_hh), grad)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)


@pytest.mark.parametrize("cell", ["fused", "exact", "lstm"])
def test_loss_and_gradients_on_gpu_equal_the_cpu(cell):
    torch.manual_seed(1)
    cpu = Seq2Seq(src_vocab_size=20, trg_vocab_size=18, emb_dim=8, enc_hidden=6, dec_hidden=10,
                  attn_dim=5, out_dim=8, cell=cell)
    gpu = copy.deepcopy(cpu).to(CUDA)
    src = torch.randint(4, 20, (4, 7))
    src_lengths = torch.tensor([7, 5, 3, 1])
    src[1, 5:], src[2, 3:], src[3, 1:] = 0, 0, 0
    trg_in = torch.randint(4, 18, (4, 6))
    trg_out = torch.randint(4, 18, (4, 6))
    trg_out[2, 4:] = 0  # padding
    losses = []
    for model, dev in ((cpu, "cpu"), (gpu, CUDA)):
        logits = model(src.to(dev), src_lengths.to(dev), trg_in.to(dev))
        # the logits, and the training loss computed with the output layer (one block on a GPU)
        loss = logits.float().log_softmax(-1).mean()
        loss = loss + model(src.to(dev), src_lengths.to(dev), trg_in.to(dev), trg_out.to(dev), label_smoothing=0.1)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert torch.allclose(p.grad, q.grad.cpu(), atol=1e-5), name


def test_beam_search_on_gpu_finds_what_the_cpu_finds():
    torch.manual_seed(2)
    cpu = Seq2Seq(src_vocab_size=20, trg_vocab_size=18, emb_dim=8, enc_hidden=6, dec_hidden=10,
                  attn_dim=5, out_dim=8).eval()
    with torch.no_grad():
        cpu.decoder.output_layer.weight.mul_(4.0)
    gpu = copy.deepcopy(cpu).to(CUDA)
    src = torch.randint(4, 20, (6, 5))
    lengths = torch.tensor([5, 5, 4, 3, 2, 1])
    for row, n in enumerate(lengths.tolist()):
        src[row, n:] = 0
    on_cpu = beam_search(cpu, src, lengths, beam_size=3, nbest=3)
    on_gpu = beam_search(gpu, src.to(CUDA), lengths.to(CUDA), beam_size=3, nbest=3)
    for a, b in zip(on_cpu, on_gpu):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


def test_bf16_decoding_on_gpu_keeps_the_attention_in_float32():
    torch.manual_seed(2)
    model = Seq2Seq(src_vocab_size=20, trg_vocab_size=18, emb_dim=8, enc_hidden=6, dec_hidden=10,
                    attn_dim=5, out_dim=8).eval().to(CUDA)
    src = torch.randint(4, 20, (3, 5), device=CUDA)
    lengths = torch.tensor([5, 4, 2], device=CUDA)
    results = []
    for bf16 in (False, True):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            enc = model.encode(src, lengths)
            assert enc.keys.dtype == torch.float32
            log_probs, _, weights = model.decode_step(torch.full((3,), 2, device=CUDA), model.init_state(enc), enc)
        assert log_probs.dtype == weights.dtype == torch.float32
        results.append(log_probs)
    torch.testing.assert_close(results[1], results[0], atol=0.05, rtol=0.0)


def test_auto_precision_uses_tf32_matmuls_and_fp32_does_not():
    from nmt.train_utils import precision_name, setup_precision

    assert setup_precision("auto", CUDA) is False
    assert torch.backends.cuda.matmul.allow_tf32 and precision_name(False, CUDA) == "fp32, TF32 matmuls"
    assert setup_precision("fp32", CUDA) is False
    assert not torch.backends.cuda.matmul.allow_tf32 and precision_name(False, CUDA) == "fp32"
    assert setup_precision("bf16", CUDA) is True


def test_adam_is_fused_on_the_gpu():
    from nmt.recipe import load_recipe
    from nmt.train_utils import make_optimizer

    model = Seq2Seq(src_vocab_size=20, trg_vocab_size=18, emb_dim=8, enc_hidden=6, dec_hidden=10,
                    attn_dim=5, out_dim=8).to(CUDA)
    optimizer = make_optimizer(model, load_recipe(Path(__file__).parent.parent / "recipes/multi30k-tiny.yaml").train)
    assert optimizer.defaults["fused"] is True


def test_decoder_loop_on_gpu_equals_stepping_through_autograd(monkeypatch):
    """In float32 training on a GPU the decoder's loop is one autograd function
    (nmt.model.decoder_loop, with CUDA's fused GRU-cell kernel): the same loss and
    gradients as the steps through autograd."""
    from nmt.model import decoder as decoder_module
    from nmt.model import decoder_loop as loop_module

    torch.manual_seed(3)
    model = Seq2Seq(src_vocab_size=30, trg_vocab_size=25, emb_dim=16, enc_hidden=12, dec_hidden=20,
                    attn_dim=14, out_dim=16).to(CUDA).train()
    src = torch.randint(4, 30, (40, 9), device=CUDA)
    src_lengths = torch.randint(1, 10, (40,), device=CUDA)
    src_lengths[0] = 9
    src[torch.arange(9, device=CUDA) >= src_lengths.unsqueeze(1)] = 0
    trg_in, trg_out = torch.randint(4, 25, (40, 7), device=CUDA), torch.randint(4, 25, (40, 7), device=CUDA)
    calls, real = [], loop_module.decoder_loop
    monkeypatch.setattr(loop_module, "decoder_loop", lambda *args: calls.append(args[0]) or real(*args))
    results = []
    for loop in (True, False):
        monkeypatch.setattr(decoder_module, "runs_loop", lambda *args, loop=loop: loop)
        model.zero_grad()
        loss = model(src, src_lengths, trg_in, trg_out, label_smoothing=0.1)
        loss.backward()
        results.append((loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    assert calls == [None]  # once, by PyTorch operations
    (loss, ours), (stepped_loss, stepped) = results
    assert loss == pytest.approx(stepped_loss, abs=1e-5)
    for name in stepped:
        assert torch.allclose(ours[name], stepped[name], atol=1e-5, rtol=1e-4), name
