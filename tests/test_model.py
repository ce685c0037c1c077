"""Seq2Seq: masking, padding invariance, teacher forcing == step-wise decoding, ties,
argument checks, rebuilding from the config, and learning a toy task."""

import json

import pytest
import sacrebleu
import torch
import torch.nn.functional as F

import nmt.model.attention
import nmt.model.decoder
from nmt.model import Seq2Seq
from nmt.model.loop_weight import LoopWeight
from nmt.search import greedy_search

PAD, UNK, BOS, EOS = 0, 1, 2, 3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a busy machine, intra-op threads that
    wait for each other can slow the packed nn.GRU twentyfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

TINY = dict(src_vocab_size=13, trg_vocab_size=11, emb_dim=8, enc_hidden=6, dec_hidden=7,
            attn_dim=5, out_dim=4)
VARIANTS = [  # cell, layers, init_state, maxout
    ("fused", 1, "bridge", False),
    ("exact", 1, "bridge", False),
    ("fused", 2, "mean", True),
    ("exact", 2, "zero", True),
    ("lstm", 1, "bridge", False),
    ("lstm", 2, "mean", True),
    ("lstm", 2, "zero", False),
]


def tiny_model(cell="fused", layers=1, init_state="bridge", maxout=False, **kwargs) -> Seq2Seq:
    torch.manual_seed(0)
    args = {**TINY, **kwargs}
    model = Seq2Seq(cell=cell, enc_layers=layers, dec_layers=layers, init_state=init_state,
                    maxout=maxout, **args)
    return model.eval()


def pad_batch(sentences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``sentences``: ``[batch, max_len]`` ids and ``[batch]`` lengths."""
    lengths = torch.tensor([len(s) for s in sentences])
    batch = torch.full((len(sentences), int(lengths.max())), PAD)
    for i, sentence in enumerate(sentences):
        batch[i, : len(sentence)] = torch.tensor(sentence)
    return batch, lengths


SHORT, LONG = [4, 5, 6], [7, 8, 9, 10, 11, 12, 4]
TRG_IN = [BOS, 4, 5, 6, 7]


def test_attention_sums_to_one_and_is_zero_on_padding():
    model = tiny_model()
    src, src_lengths = pad_batch([SHORT, LONG])
    enc = model.encode(src, src_lengths)
    state = model.init_state(enc)
    for token in TRG_IN:
        _, state, weights = model.decode_step(torch.tensor([token, token]), state, enc)
        torch.testing.assert_close(weights.sum(1), torch.ones(2))
        assert torch.all(weights[0, len(SHORT) :] == 0)
        assert torch.all(weights[0, : len(SHORT)] > 0)


def test_attention_values_and_gradients_match_the_equations():
    """The hand-written backward of energies and context against autograd through the
    plain formulas of Bahdanau et al. (2015), in float64."""
    from nmt.model.attention import AdditiveAttention

    torch.manual_seed(0)
    attention = AdditiveAttention(key_size=6, query_size=5, attn_dim=4).double()
    state = torch.randn(3, 5, dtype=torch.double, requires_grad=True)
    annotations = torch.randn(3, 7, 6, dtype=torch.double, requires_grad=True)
    mask = torch.arange(7) < torch.tensor([[7], [3], [5]])
    probe_c, probe_a = torch.randn(3, 6, dtype=torch.double), torch.randn(3, 7, dtype=torch.double)

    def plain():
        keys = annotations @ attention.key_layer.weight.t()
        hidden = torch.tanh((state @ attention.query_layer.weight.t()).unsqueeze(1) + keys)
        energies = (hidden @ attention.energy_layer.weight.t()).squeeze(2).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(energies, dim=1)
        return (weights.unsqueeze(2) * annotations).sum(1), weights

    def ours():
        return attention(state, attention.compute_keys(annotations), annotations, mask)

    params = [state, annotations, *attention.parameters()]
    results = []
    for fn in (plain, ours):
        context, weights = fn()
        loss = (context * probe_c).sum() + (weights * probe_a).sum()
        results.append((context, weights, torch.autograd.grad(loss, params)))
    (c0, a0, g0), (c1, a1, g1) = results
    torch.testing.assert_close(c1, c0)
    torch.testing.assert_close(a1, a0)
    for expected, got in zip(g0, g1):
        torch.testing.assert_close(got, expected)
    with torch.no_grad():  # decoding takes a shorter path to the same values
        c2, a2 = ours()
    torch.testing.assert_close(c2, c0)
    torch.testing.assert_close(a2, a0)


@pytest.mark.parametrize("block_elements", [1, 40, 1 << 18])  # rows per block: 1; 2 (the last 1); all 7
def test_decoding_energies_by_blocks_equal_the_formula(monkeypatch, block_elements):
    monkeypatch.setattr(nmt.model.attention, "_BLOCK_ELEMENTS", block_elements)
    generator = torch.Generator().manual_seed(0)
    query, keys, v_a = (torch.randn(*shape, generator=generator, dtype=torch.float64)
                        for shape in [(7, 5), (7, 3, 5), (5,)])
    expected = torch.tanh(keys + query.unsqueeze(1)) @ v_a
    torch.testing.assert_close(nmt.model.attention._blocked_energies(query, keys, v_a), expected)
    # three query rows (beams) per sentence, against the sentence's keys held once
    beams = torch.randn(21, 5, generator=generator, dtype=torch.float64)
    expected = torch.tanh(keys.repeat_interleave(3, 0) + beams.unsqueeze(1)) @ v_a
    torch.testing.assert_close(nmt.model.attention._blocked_energies(beams, keys, v_a), expected)


@pytest.mark.parametrize("grad", [False, True])
def test_beams_attend_to_their_sentence_held_once(grad):
    """Beam search keeps each sentence's keys and annotations once for its k beams (k
    consecutive query rows): the same context and weights as with them repeated."""
    from nmt.model.attention import AdditiveAttention

    torch.manual_seed(0)
    attention = AdditiveAttention(key_size=6, query_size=5, attn_dim=4).double()
    annotations = torch.randn(3, 7, 6, dtype=torch.double)
    mask = torch.arange(7) < torch.tensor([[7], [3], [5]])
    keys = attention.compute_keys(annotations)
    query = torch.randn(12, 5, dtype=torch.double)  # 4 beams per sentence
    with torch.set_grad_enabled(grad):
        grouped = attention(query, keys, annotations, mask)
        repeated = attention(query, *(t.repeat_interleave(4, 0) for t in (keys, annotations, mask)))
    for got, expected in zip(grouped, repeated):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("cell,layers,init_state,maxout", VARIANTS)
def test_padding_does_not_change_a_sentence(cell, layers, init_state, maxout):
    model = tiny_model(cell, layers, init_state, maxout)
    alone, alone_lengths = pad_batch([SHORT])
    batch, batch_lengths = pad_batch([SHORT, LONG])  # SHORT now carries 4 pads
    trg_in = torch.tensor([TRG_IN, TRG_IN])

    enc_alone, enc_batch = model.encode(alone, alone_lengths), model.encode(batch, batch_lengths)
    n = len(SHORT)
    torch.testing.assert_close(enc_batch.annotations[0, :n], enc_alone.annotations[0])
    assert torch.all(enc_batch.annotations[0, n:] == 0)
    first_of_batch = model.reorder_state(model.init_state(enc_batch), torch.tensor([0]))
    torch.testing.assert_close(first_of_batch, model.init_state(enc_alone))  # a tensor, or (h, c)
    torch.testing.assert_close(
        model(batch, batch_lengths, trg_in)[:1], model(alone, alone_lengths, trg_in[:1])
    )


@pytest.mark.parametrize("cell,layers,init_state,maxout", VARIANTS)
@pytest.mark.parametrize("grad", [True, False])  # search: the stacked matrices made once, in encode
def test_teacher_forcing_equals_step_by_step_decoding(cell, layers, init_state, maxout, grad):
    model = tiny_model(cell, layers, init_state, maxout)
    src, src_lengths = pad_batch([SHORT, LONG])
    trg_in = torch.tensor([TRG_IN, [BOS, 9, 8, 7, 6]])
    expected = F.log_softmax(model(src, src_lengths, trg_in), dim=-1)  # batch x trg_len x vocab

    with torch.set_grad_enabled(grad):
        enc = model.encode(src, src_lengths)
        assert (enc.decoding is None) == grad
        state = model.init_state(enc)
        for i in range(trg_in.size(1)):
            log_probs, state, _ = model.decode_step(trg_in[:, i], state, enc)
            assert log_probs.dtype == torch.float32
            torch.testing.assert_close(log_probs, expected[:, i])


class PlainLoopWeight(LoopWeight):
    """A LoopWeight that always computes with plain autograd ops."""

    def __init__(self, weight, bias=None):
        self.steps, self.deferred, self.weight, self.bias = [], False, weight, bias


@pytest.mark.parametrize("cell,layers,init_state,maxout", VARIANTS)
def test_teacher_forcing_gradients_equal_step_by_step(cell, layers, init_state, maxout, monkeypatch):
    """In training the decoder computes the gradients of its per-step weights once for the
    whole target (nmt.model.loop_weight); stepping one word at a time with plain autograd
    computes them at every step. Both give the same gradients."""
    model = tiny_model(cell, layers, init_state, maxout).train()  # dropout is 0
    src, src_lengths = pad_batch([SHORT, LONG])
    trg_in = torch.tensor([TRG_IN, [BOS, 9, 8, 7, 6]])
    target = torch.randn(2, trg_in.size(1), model.decoder.output_layer.out_features)

    def gradients(logits):
        model.zero_grad()
        (F.log_softmax(logits, dim=-1) * target).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    whole = gradients(model(src, src_lengths, trg_in))
    monkeypatch.setattr(nmt.model.decoder, "LoopWeight", PlainLoopWeight)
    enc = model.encode(src, src_lengths)
    state, steps = model.init_state(enc), []
    for i in range(trg_in.size(1)):
        features, state, _ = model.decoder.step(trg_in[:, i], state, enc.keys, enc.annotations, enc.mask)
        steps.append(model.decoder.logits(features, model.decoder.decoding_weights()))
    stepped = gradients(torch.stack(steps, dim=1))
    assert whole.keys() == stepped.keys()
    for name in whole:
        torch.testing.assert_close(whole[name], stepped[name], msg=name)


def test_encoder_output_select_and_reorder_state():
    model = tiny_model(layers=2)
    src, src_lengths = pad_batch([SHORT, LONG])
    enc = model.encode(src, src_lengths)
    index = torch.tensor([1, 1, 0])
    picked = enc.select(index)
    torch.testing.assert_close(picked.keys, enc.keys[index])
    assert torch.equal(picked.mask, enc.mask[index])
    state = model.init_state(enc)
    torch.testing.assert_close(model.reorder_state(state, index), state[:, index])
    lstm = tiny_model("lstm", layers=2)
    h, c = lstm.init_state(lstm.encode(src, src_lengths))
    assert torch.all(c == 0)
    torch.testing.assert_close(lstm.reorder_state((h, c), index), (h[:, index], c[:, index]))


def test_tied_parameters_are_shared():
    model = tiny_model(tie_output=True, out_dim=TINY["emb_dim"])
    assert model.decoder.output_layer.weight is model.decoder.embed.weight
    assert model.encoder.embed.weight is not model.decoder.embed.weight

    model = tiny_model(tie_all=True, out_dim=TINY["emb_dim"], trg_vocab_size=13)
    shared = model.decoder.embed.weight
    assert model.decoder.output_layer.weight is shared and model.encoder.embed.weight is shared
    untied = tiny_model(out_dim=TINY["emb_dim"], trg_vocab_size=13)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in untied.parameters()) - 2 * shared.numel()


@pytest.mark.parametrize(
    "bad,argument",
    [
        (dict(cell="rnn"), "cell"),
        (dict(init_state="last"), "init_state"),
        (dict(emb_dim=0), "emb_dim"),
        (dict(dec_layers=1.5), "dec_layers"),
        (dict(dropout_hidden=1.0), "dropout_hidden"),
        (dict(dropout_word=-0.1), "dropout_word"),
        (dict(maxout="yes"), "maxout"),
        (dict(tie_output=True), "out_dim == emb_dim"),
        (dict(tie_all=True, out_dim=8), "src_vocab_size == trg_vocab_size"),
        (dict(eos_id=0), "distinct"),
        (dict(eos_id=11), "eos_id"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(bad, argument):
    with pytest.raises(ValueError, match=argument):
        Seq2Seq(**{**TINY, **bad})


def test_config_rebuilds_an_identical_model():
    model = tiny_model("exact", 2, "mean", True, tie_output=True, out_dim=8, dropout_word=0.1)
    config = json.loads(json.dumps(model.config))  # survives a JSON checkpoint
    rebuilt = Seq2Seq(**config).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config == model.config
    src, src_lengths = pad_batch([SHORT, LONG])
    trg_in = torch.tensor([TRG_IN, TRG_IN])
    torch.testing.assert_close(rebuilt(src, src_lengths, trg_in), model(src, src_lengths, trg_in))


@pytest.mark.parametrize("cell", ["fused", "exact", "lstm"])
def test_forward_and_backward_under_bfloat16_autocast(cell):
    model = tiny_model(cell, 2).train()
    src, src_lengths = pad_batch([SHORT, LONG])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(src, src_lengths, torch.tensor([TRG_IN, TRG_IN]))
    assert logits.isfinite().all()
    logits.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("cell,layers", [("fused", 1), ("exact", 2), ("lstm", 1)])
def test_decoding_under_bfloat16_autocast_is_close_to_float32(cell, layers):
    model = tiny_model(cell, layers)
    src, src_lengths = pad_batch([SHORT, LONG])
    results = []
    for bf16 in (False, True):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            enc = model.encode(src, src_lengths)
            assert enc.decoding.context.dtype == (torch.bfloat16 if bf16 else torch.float32)
            assert enc.keys.dtype == enc.annotations.dtype == torch.float32  # attention in float32
            state, steps = model.init_state(enc), []
            for token in TRG_IN:
                log_probs, state, _ = model.decode_step(torch.tensor([token, token]), state, enc)
                assert log_probs.dtype == torch.float32
                steps.append(log_probs)
        results.append(torch.stack(steps))
    torch.testing.assert_close(results[1], results[0], atol=0.05, rtol=0.0)


def test_word_dropout_only_in_training():
    model = tiny_model(dropout_word=0.5)
    src, src_lengths = pad_batch([SHORT, LONG])
    trg_in = torch.tensor([TRG_IN, TRG_IN])
    torch.testing.assert_close(model(src, src_lengths, trg_in), model(src, src_lengths, trg_in))
    model.train()
    assert not torch.equal(model(src, src_lengths, trg_in), model(src, src_lengths, trg_in))


# --- learning a toy task ------------------------------------------------------------

REVERSE_VOCAB = 20


def reverse_batch(batch_size: int, generator: torch.Generator):
    """Random sentences of 3-8 tokens from ids 4..19 and their reversals.

    :return: src ``[batch, src_len]``, src_lengths ``[batch]``, trg_in and trg_out
        ``[batch, trg_len]`` (bos + reversal, reversal + eos)
    """
    lengths = torch.randint(3, 9, (batch_size,), generator=generator)
    sentences = [torch.randint(4, REVERSE_VOCAB, (int(n),), generator=generator).tolist()
                 for n in lengths]
    src, src_lengths = pad_batch(sentences)
    trg_in, _ = pad_batch([[BOS] + s[::-1] for s in sentences])
    trg_out, _ = pad_batch([s[::-1] + [EOS] for s in sentences])
    return src, src_lengths, trg_in, trg_out


def train_reverser(cell: str, steps: int) -> tuple[Seq2Seq, list[float]]:
    """Adam with a linear decay to zero and gradient clipping: the decay keeps the late
    loss spikes of a near-perfect model from landing just before the evaluation."""
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(2)
    model = Seq2Seq(src_vocab_size=REVERSE_VOCAB, trg_vocab_size=REVERSE_VOCAB, emb_dim=32,
                    enc_hidden=64, dec_hidden=64, attn_dim=64, out_dim=32, cell=cell)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    losses = []
    for _ in range(steps):
        src, src_lengths, trg_in, trg_out = reverse_batch(64, generator)
        logits = model(src, src_lengths, trg_in)
        loss = F.cross_entropy(logits.flatten(0, 1), trg_out.flatten(), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_fused_model_learns_to_reverse_sequences():
    model, losses = train_reverser("fused", steps=300)
    src, src_lengths, _, trg_out = reverse_batch(200, torch.Generator().manual_seed(99))
    hypotheses = greedy_search(model, src, src_lengths)
    system = [" ".join(map(str, hyps[0].tokens)) for hyps in hypotheses]
    reference = [" ".join(str(t) for t in row.tolist() if t not in (PAD, EOS)) for row in trg_out]
    bleu = sacrebleu.corpus_bleu(system, [reference]).score
    assert bleu >= 95, f"BLEU {bleu:.1f}, training loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_exact_model_trains():
    _, losses = train_reverser("exact", steps=100)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}"


def test_decoding_weights_are_made_once_per_translation_and_not_kept_past_it():
    """Inside reusing_decoding_weights, the batches of a translation share the decoder's
    stacked matrices (one set per autocast dtype), also with blocks nested in it or
    overlapping it; once the last block closes nothing is kept, so a parameter changed in
    place in between (as an optimizer step does, without a trace to check) is seen."""
    model = tiny_model("fused", 1)
    src, src_lengths = pad_batch([SHORT, LONG])

    def matrices():
        with torch.inference_mode():
            return model.encode(src, src_lengths).decoding

    assert matrices() is not matrices()
    with model.reusing_decoding_weights():
        first = matrices()
        with model.reusing_decoding_weights():  # nested, as an ensemble of one model twice
            assert matrices() is first
        assert matrices() is first
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.encode(src, src_lengths).decoding
        assert bf16.context.dtype == torch.bfloat16 and bf16 is not first
        other = model.reusing_decoding_weights()  # another thread's translation, say, which
        other.__enter__()  # begins inside this block and ends after it
    assert matrices() is first
    other.__exit__(None, None, None)
    assert matrices() is not first  # the last block closed: nothing kept
    with torch.no_grad():
        model.decoder.deep_output.bias.add_(1.0)  # in embedding_bias, a concatenation (a copy)
    deep_bias = model.decoder.deep_output.bias
    assert torch.equal(matrices().embedding_bias[-deep_bias.numel():], deep_bias)
    assert not torch.equal(first.embedding_bias[-deep_bias.numel():], deep_bias)
