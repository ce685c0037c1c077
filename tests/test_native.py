"""The compiled CPU kernels (nmt/model/native.py) against the PyTorch operations they
replace, in value and gradients; and the fallback when they cannot be built."""

import logging
import weakref

import pytest
import torch
import torch.nn.functional as F

from nmt.model import attention as attention_module
from nmt.model import native
from nmt.model.attention import AdditiveAttention
from nmt.model.gru import fused_gru_gates
from nmt.model.output import linear_cross_entropy

kernels = native.kernels()
needs_kernels = pytest.mark.skipif(kernels is None, reason="no C compiler: the kernels are not built")


def plain_attention(query, keys, v_a, mask, annotations):
    """The formulas of AdditiveAttention, g query rows per sentence: (context, weights)."""
    group = query.size(0) // keys.size(0)
    keys, annotations, mask = (t.repeat_interleave(group, 0) for t in (keys, annotations, mask))
    energies = torch.tanh(keys + query.unsqueeze(1)) @ v_a
    weights = torch.softmax(energies.masked_fill(~mask, float("-inf")), dim=1)
    return (weights.unsqueeze(1) @ annotations).squeeze(1), weights


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3])
def test_attention_forward_equals_the_formulas(dtype, group):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(5, 7, 37, generator=g).to(dtype)  # an odd width: the vector loop's tail
    annotations = torch.randn(5, 7, 11, generator=g).to(dtype)
    query = torch.randn(5 * group, 37, generator=g).to(dtype)
    v = torch.randn(37, generator=g)
    mask = torch.arange(7) < torch.tensor([[7], [3], [5], [1], [6]])
    context, weights = kernels.attention_forward(query, keys, v, mask, annotations)
    expected = plain_attention(query.double(), keys.double(), v.double(), mask, annotations.double())
    assert context.dtype == dtype and weights.dtype == torch.float32
    assert weights.view(5, group, 7).masked_select(~mask.unsqueeze(1)).eq(0).all()  # exactly 0 on padding
    torch.testing.assert_close(weights.double(), expected[1], atol=2e-6, rtol=1e-5)
    context_tolerance = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(context.double(), expected[0], **context_tolerance)


@needs_kernels
def test_decoding_attention_is_the_same_with_and_without_kernels(monkeypatch):
    torch.manual_seed(0)
    attention = AdditiveAttention(key_size=6, query_size=5, attn_dim=37)
    keys, annotations = torch.randn(3, 7, 37), torch.randn(3, 7, 6)
    query, mask = torch.randn(3 * 4, 37), torch.arange(7) < torch.tensor([[7], [3], [5]])
    results = []
    for compiled in (kernels, None):
        monkeypatch.setattr(attention_module, "kernels", lambda compiled=compiled: compiled)
        with torch.no_grad():
            results.append(attention.attend(query, keys, annotations, mask))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("outputs", ["context", "both"])
def test_training_attention_gradients_equal_the_plain_formulas(dtype, outputs):
    """Several teacher-forcing steps over the same keys and annotations: the kernels'
    gradients, summed over the steps in float32 and handed over once, against autograd
    through the plain formulas in float64 on the same (rounded) inputs; with a loss of the
    context alone (no gradient reaches the weights) and of both."""
    torch.manual_seed(0)
    attention = AdditiveAttention(key_size=6, query_size=5, attn_dim=37)
    keys = (torch.randn(3, 7, 37) * 2).to(dtype).requires_grad_()
    annotations = torch.randn(3, 7, 6).to(dtype).requires_grad_()
    queries = [(torch.randn(3, 37) * 2).to(dtype).requires_grad_() for _ in range(4)]
    mask = torch.arange(7) < torch.tensor([[7], [3], [5]])
    probes = [(torch.randn(3, 6), torch.randn(3, 7) if outputs == "both" else 0) for _ in queries]

    def loss(attend, queries):
        total = 0
        for query, (probe_context, probe_weights) in zip(queries, probes):
            context, weights = attend(query)
            total = total + (context * probe_context).sum() + (weights * probe_weights).sum()
        return total

    attend = attention.attender(keys, annotations, mask)
    assert isinstance(attend, attention_module._CompiledAttention)
    inputs = [keys, annotations, *queries, attention.energy_layer.weight]
    ours = torch.autograd.grad(loss(attend, queries), inputs)
    v_a = attention.energy_layer.weight.detach().double().squeeze(0).requires_grad_()
    keys64, annotations64 = (t.detach().double().requires_grad_() for t in (keys, annotations))
    queries64 = [q.detach().double().requires_grad_() for q in queries]

    def plain(query):
        return plain_attention(query, keys64, v_a, mask, annotations64)

    ref = torch.autograd.grad(loss(plain, queries64), [keys64, annotations64, *queries64, v_a])
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    assert [t.dtype for t in ours] == [dtype] * (2 + len(queries)) + [torch.float32]  # the inputs' dtypes
    for got, expected in zip(ours, ref):
        torch.testing.assert_close(got.double().view_as(expected), expected, **tolerance)
    assert not attend.pass_.sums  # handed over


@needs_kernels
def test_training_attention_is_freed_after_its_backward_pass():
    """The autograd graph refers to the pass's tensors, not to an object whose tensors
    refer to the graph: such a cycle runs through autograd's C++ nodes, which Python's
    cycle collector does not see, and leaked the keys of every update (5-15 MB each)."""
    attention = AdditiveAttention(key_size=6, query_size=5, attn_dim=8)
    keys, annotations = torch.randn(3, 7, 8, requires_grad=True), torch.randn(3, 7, 6, requires_grad=True)
    attend = attention.attender(keys, annotations, torch.ones(3, 7, dtype=torch.bool))
    pass_ = weakref.ref(attend.pass_)
    context, weights = attend(torch.randn(3, 8, requires_grad=True))
    context.sum().backward()
    del attend, context, weights
    assert pass_() is None


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_softmax_equals_pytorch(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 1003, generator=g) * 8).to(dtype)  # an odd width
    bias = torch.randn(1003, generator=g)
    got = kernels.log_softmax(logits)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    torch.testing.assert_close(got.double(), F.log_softmax(logits.double(), dim=1), atol=1e-5, rtol=1e-6)
    with_bias = kernels.log_softmax(logits, bias)
    torch.testing.assert_close(with_bias.double(), F.log_softmax(logits.double() + bias.double(), dim=1),
                               atol=1e-5, rtol=1e-6)


@needs_kernels
@pytest.mark.parametrize("bf16", [False, True])
def test_decoding_steps_are_the_same_with_and_without_kernels(monkeypatch, bf16):
    """Seq2Seq.decode_step: attention, log-softmax and the output bias through the kernels,
    against PyTorch's operations; in float32 and under bf16 autocast (search's precision)."""
    from nmt.model import Seq2Seq, seq2seq

    torch.manual_seed(0)
    model = Seq2Seq(src_vocab_size=20, trg_vocab_size=18, emb_dim=8, enc_hidden=6, dec_hidden=10, attn_dim=5,
                    out_dim=8).eval()
    src, lengths = torch.randint(3, 20, (4, 6)), torch.tensor([6, 3, 5, 1])
    tokens = torch.randint(3, 18, (4, 3))
    results = []
    for compiled in (kernels, None):
        monkeypatch.setattr(seq2seq, "kernels", lambda compiled=compiled: compiled)
        monkeypatch.setattr(attention_module, "kernels", lambda compiled=compiled: compiled)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            enc = model.encode(src, lengths)
            state, steps = model.init_state(enc), []
            for t in range(tokens.size(1)):
                log_probs, state, weights = model.decode_step(tokens[:, t], state, enc)
                steps += [log_probs, weights]
        results.append(steps)
    tolerance = dict(atol=1e-5, rtol=1e-5) if not bf16 else dict(atol=0.05, rtol=0.02)
    for ours, theirs in zip(*results):
        assert ours.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, **tolerance)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_and_its_gradient_equal_pytorch_cross_entropy(dtype, smoothing):
    """The kernel's per-row loss and gradient written over the logits, against PyTorch's
    cross-entropy in float64 of the same stored logits."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 1003, generator=g) * 4).to(dtype)
    bias = torch.randn(1003, generator=g)
    target = torch.randint(1, 1003, (9,), generator=g)
    target[4] = 0  # ignored
    x = (logits.double() + bias.double()).requires_grad_()
    expected = F.cross_entropy(x, target, ignore_index=0, label_smoothing=smoothing, reduction="none")
    expected.sum().backward()
    losses, grad_bias, grad = torch.empty(9), torch.zeros(1003), logits.clone()
    kernels.smoothed_ce_(grad, bias, target, 0, smoothing, losses, grad_bias)
    torch.testing.assert_close(losses.double(), expected.detach(), atol=1e-4, rtol=1e-5)
    atol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16 stores the gradient to 3 digits
    torch.testing.assert_close(grad.double(), x.grad, atol=atol, rtol=0)
    torch.testing.assert_close(grad_bias.double(), x.grad.sum(0), atol=1e-5, rtol=1e-5)
    assert grad[4].abs().max() == 0
    no_grad_losses = torch.empty(9)
    kernels.smoothed_ce_(logits.clone(), bias, target, 0, smoothing, no_grad_losses, None)
    torch.testing.assert_close(no_grad_losses, losses)


@needs_kernels
@pytest.mark.parametrize("grad", [True, False])
def test_training_loss_is_the_same_with_and_without_kernels(monkeypatch, grad):
    """linear_cross_entropy in float32 through the kernel and through PyTorch's operations."""
    g = torch.Generator().manual_seed(0)
    features, weight = torch.randn(700, 16, generator=g), torch.randn(300, 16, generator=g)
    bias, target = torch.randn(300, generator=g), torch.randint(0, 300, (700,), generator=g)
    results = []
    for compiled in (kernels, None):
        monkeypatch.setattr("nmt.model.output.kernels", lambda compiled=compiled: compiled)
        params = [t.clone().requires_grad_(grad) for t in (features, weight, bias)]
        loss = linear_cross_entropy(*params, target, smoothing=0.1)
        results.append([loss, *(torch.autograd.grad(loss, params) if grad else [])])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("parts", ["one", "pair", "pair with other strides"])
def test_gru_gates_equal_the_formulas(dtype, masked, grad, parts):
    """The kernels' GRU step and its gradients against autograd through the plain
    formulas in float64 on the same stored inputs; the input gates strided, as the
    encoder's steps of a [batch, src_len, 3 * hidden] projection are, and the mask too.
    The input gates may come as a pair of tensors, the first rows and the rest (the
    encoder's two directions), each part getting its own gradient."""
    g = torch.Generator().manual_seed(0)
    projected = (torch.randn(6, 4, 3 * 37, generator=g) * 2).to(dtype).requires_grad_(grad)
    other = (torch.randn(6, 4 if parts == "pair" else 5, 3 * 37, generator=g) * 2).to(dtype).requires_grad_(grad)
    # rows 4 * 3 * 37 apart (5 * 3 * 37 in the second part, in the last case)
    gates_x = projected[:, 1] if parts == "one" else (projected[:2, 1], other[2:, 3])
    gates_h = (torch.randn(6, 3 * 37, generator=g) * 2).to(dtype).requires_grad_(grad)
    h = torch.randn(6, 37, generator=g).to(dtype).requires_grad_(grad)
    mask = torch.tensor([[True, True], [True, False], [True, True], [False, False], [True, True], [True, False]])
    real = mask[:, 1:] if masked else None  # [6, 1], rows 2 apart
    probe = torch.randn(6, 37, generator=g)
    whole = torch.cat(gates_x) if parts != "one" else gates_x
    inputs64 = [t.detach().double().requires_grad_() for t in (whole, gates_h, h)]
    expected = fused_gru_gates(*inputs64, real)  # float64: the plain formulas
    expected_grads = torch.autograd.grad((expected * probe).sum(), inputs64)
    inputs = [*(gates_x if parts != "one" else [gates_x]), gates_h, h]
    with torch.set_grad_enabled(grad):
        got = fused_gru_gates(gates_x, gates_h, h, real)
    assert got.dtype == dtype and (got.grad_fn is not None) == grad
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got.double(), expected.detach(), **tolerance)
    if masked:
        assert torch.equal(got[3], h[3]) and torch.equal(got[1], h[1])  # padding keeps the state
    if grad:
        ours = torch.autograd.grad((got * probe).sum(), inputs)
        if parts != "one":  # the two parts' gradients, joined
            ours = (torch.cat(ours[:2]), *ours[2:])
        for name, ours, theirs in zip(("gates_x", "gates_h", "h"), ours, expected_grads):
            assert ours.dtype == dtype
            torch.testing.assert_close(ours.double(), theirs, **tolerance, msg=name)


def test_no_compiler_falls_back_to_pytorch_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native.kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="nmt.model.native"):
            assert native.kernels() is None
            assert native.kernels() is None
        assert len(caplog.records) == 1 and "no-such-compiler" in caplog.records[0].getMessage()
    finally:
        native.kernels.cache_clear()


def test_nmt_native_0_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("NMT_NATIVE", "0")
    native.kernels.cache_clear()
    try:
        assert native.kernels() is None
        attention = AdditiveAttention(4, 4, 4)
        with torch.enable_grad():
            attend = attention.attender(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
        assert not isinstance(attend, attention_module._CompiledAttention)
    finally:
        native.kernels.cache_clear()


@needs_kernels
def test_compiled_library_is_cached_and_rebuilt_for_another_source(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = native._compile("cc")
    assert first.exists() and first.parent == tmp_path / "nmt" / "kernels"
    stamp = first.stat().st_mtime_ns
    assert native._compile("cc") == first and first.stat().st_mtime_ns == stamp  # cached
    changed = tmp_path / "kernels.c"
    changed.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    assert native._compile("cc") != first
    assert [p.suffix for p in (tmp_path / "nmt" / "kernels").iterdir()] == [".so", ".so"]  # no temporary left


@needs_kernels
def test_outputs_given_to_the_kernels_must_have_the_shape_and_dtype_they_write():
    """The kernels write through raw pointers: an output of another shape or dtype is refused."""
    torch.manual_seed(0)
    h, gates = torch.randn(3, 4), torch.randn(3, 12)
    for wrong in (torch.empty(3, 5), torch.empty(3, 4, dtype=torch.bfloat16), torch.empty(4, 3).t()):
        with pytest.raises(ValueError, match="compiled kernels"):
            kernels.gru_forward(gates, gates, h, None, out=wrong)
    out = torch.empty(3, 4)
    assert kernels.gru_forward(gates, gates, h, None, out=out) is out
    torch.testing.assert_close(out, kernels.gru_forward(gates, gates, h, None))
    with pytest.raises(ValueError, match="compiled kernels"):
        kernels.gru_backward(gates, gates, h, None, torch.randn(3, 4), out=(torch.empty(3, 12),) * 2 + (out[:2],))
    query, keys, annotations = torch.randn(2, 5), torch.randn(2, 3, 5), torch.randn(2, 3, 6)
    v, mask = torch.randn(5), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="compiled kernels"):
        kernels.attention_forward(query, keys, v, mask, annotations, out=(torch.empty(2, 5), torch.empty(2, 3)))
    context, weights = torch.empty(2, 6), torch.empty(2, 3)
    kernels.attention_forward(query, keys, v, mask, annotations, out=(context, weights))
    expected = kernels.attention_forward(query, keys, v, mask, annotations)
    torch.testing.assert_close((context, weights), expected)
