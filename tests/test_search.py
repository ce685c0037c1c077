"""Greedy and beam search on tiny random models: invariants and exhaustive search."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from nmt.model import Seq2Seq
import nmt.search
from nmt.search import beam_search, greedy_search, top_per_row

PAD, UNK, BOS, EOS = 0, 1, 2, 3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and much faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(trg_vocab_size: int = 12, seed: int = 0, **kwargs) -> Seq2Seq:
    """A tiny untrained model with peaked output distributions, in eval mode."""
    torch.manual_seed(seed)
    args = dict(emb_dim=8, enc_hidden=6, dec_hidden=10, attn_dim=5, out_dim=8)
    model = Seq2Seq(src_vocab_size=15, trg_vocab_size=trg_vocab_size, **{**args, **kwargs})
    with torch.no_grad():  # sharpen the distributions so that search decisions matter
        model.decoder.output_layer.weight.mul_(4.0)
        model.decoder.output_layer.bias.normal_(0.0, 1.0)
    return model.eval()


def source_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random right-padded source sentences: ``[batch, max_len]`` ids, ``[batch]`` lengths."""
    generator = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(4, 15, (n,), generator=generator)
    return src, torch.tensor(lengths)


def teacher_forced_log_probs(model, src, src_length, hypotheses: list[list[int]]) -> torch.Tensor:
    """``log p(tokens + [eos] | src)`` for each token list, by teacher forcing.

    :param src: ``[src_len]`` one source sentence; :param src_length: its length
    :return: ``[len(hypotheses)]`` float64
    """
    n = len(hypotheses)
    trg_len = max(len(h) for h in hypotheses) + 1
    trg_in = torch.full((n, trg_len), PAD)
    trg_out = torch.full((n, trg_len), PAD)
    for i, tokens in enumerate(hypotheses):
        trg_in[i, : len(tokens) + 1] = torch.tensor([BOS] + tokens)
        trg_out[i, : len(tokens) + 1] = torch.tensor(tokens + [EOS])
    with torch.no_grad():
        src_batch = src[:src_length].expand(n, -1)
        logits = model(src_batch, torch.full((n,), src_length), trg_in)
    log_probs = F.log_softmax(logits.double(), dim=-1).gather(2, trg_out.unsqueeze(2)).squeeze(2)
    return log_probs.masked_fill(trg_out == PAD, 0.0).sum(1)


def normaliser(length: int, length_norm: str, alpha: float) -> float:
    """The length penalty of Wu et al. (2016) and friends; ``length`` includes eos."""
    return {"gnmt": ((5 + length) / 6) ** alpha, "average": length, "none": 1.0}[length_norm]


LENGTHS = [5, 1, 7, 3]


@pytest.mark.parametrize("cell", ["fused", "lstm"])
def test_beam_size_one_equals_greedy(cell):
    model = random_model(cell=cell)
    src, src_lengths = source_batch(LENGTHS)
    greedy = greedy_search(model, src, src_lengths)
    beam = beam_search(model, src, src_lengths, beam_size=1, length_norm="none")
    for [g], [b] in zip(greedy, beam):
        assert g.tokens == b.tokens
        assert g.score == pytest.approx(b.score, abs=1e-6)
        torch.testing.assert_close(g.attention, b.attention)


@pytest.mark.parametrize(
    "length_norm,alpha", [("none", 1.0), ("gnmt", 1.0), ("gnmt", 2.0), ("average", 1.0)]
)
@pytest.mark.parametrize(
    "trg_vocab_size,max_len,beam_size",
    # a beam that holds every candidate: (non-eos words) ** (max_len - 1) * (all words)
    [(6, 3, 3**2 * 4), (5, 4, 2**3 * 3)],
)
def test_wide_beam_equals_exhaustive_search(length_norm, alpha, trg_vocab_size, max_len, beam_size):
    model = random_model(trg_vocab_size, seed=1)
    src, src_lengths = source_batch([4, 2, 6], seed=1)
    results = beam_search(model, src, src_lengths, beam_size=beam_size, length_penalty=alpha,
                          length_norm=length_norm, max_len_a=0.0, max_len_b=max_len)
    words = [w for w in range(trg_vocab_size) if w not in (PAD, BOS, EOS)]
    every_sequence = [
        list(seq) for n in range(max_len + 1) for seq in itertools.product(words, repeat=n)
    ]
    normalisers = torch.tensor([normaliser(len(s) + 1, length_norm, alpha) for s in every_sequence])
    for i, [best] in enumerate(results):
        scores = teacher_forced_log_probs(model, src[i], int(src_lengths[i]), every_sequence)
        scores = scores / normalisers
        assert best.tokens == every_sequence[int(scores.argmax())]
        assert best.score == pytest.approx(float(scores.max()), abs=1e-5)


@pytest.mark.parametrize("length_norm,cell", [("gnmt", "fused"), ("average", "fused"), ("none", "fused"), ("gnmt", "lstm")])
def test_scores_are_teacher_forced_log_probs_with_length_penalty(length_norm, cell):
    model = random_model(cell=cell)
    src, src_lengths = source_batch(LENGTHS)
    results = beam_search(model, src, src_lengths, beam_size=4, nbest=4, length_norm=length_norm,
                          length_penalty=0.6, max_len_a=1.0, max_len_b=2)
    greedy = greedy_search(model, src, src_lengths, max_len_a=1.0, max_len_b=2)
    for i, (hyps, [greedy_hyp]) in enumerate(zip(results, greedy)):
        n = int(src_lengths[i])
        assert all(len(h.tokens) <= n + 2 for h in hyps)
        expected = teacher_forced_log_probs(model, src[i], n, [h.tokens for h in hyps])
        for hyp, log_prob in zip(hyps, expected.tolist()):
            penalty = normaliser(len(hyp.tokens) + 1, length_norm, 0.6)
            assert hyp.score == pytest.approx(log_prob / penalty, abs=1e-5)
        [greedy_log_prob] = teacher_forced_log_probs(model, src[i], n, [greedy_hyp.tokens]).tolist()
        assert greedy_hyp.score == pytest.approx(greedy_log_prob, abs=1e-5)


@pytest.mark.parametrize("cell", ["fused", "lstm"])
@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_batched_results_equal_one_sentence_at_a_time(search, cell):
    model = random_model(enc_layers=2, dec_layers=2, cell=cell)
    src, src_lengths = source_batch(LENGTHS)

    def run(src, src_lengths):
        if search == "greedy":
            return greedy_search(model, src, src_lengths)
        return beam_search(model, src, src_lengths, beam_size=3, nbest=3)

    batched = run(src, src_lengths)
    for i, n in enumerate(LENGTHS):
        alone = run(src[i : i + 1, :n], src_lengths[i : i + 1])[0]
        assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
        for b, a in zip(batched[i], alone):
            assert b.score == pytest.approx(a.score, abs=1e-5)
            torch.testing.assert_close(b.attention, a.attention)


def test_nbest_hypotheses_are_distinct_and_sorted():
    model = random_model()
    src, src_lengths = source_batch(LENGTHS)
    for hyps in beam_search(model, src, src_lengths, beam_size=5, nbest=4):
        assert len(hyps) == 4
        assert len({tuple(h.tokens) for h in hyps}) == 4
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_attention_rows_cover_the_sentence_and_sum_to_one(search):
    model = random_model()
    src, src_lengths = source_batch(LENGTHS)
    if search == "greedy":
        results = greedy_search(model, src, src_lengths)
    else:
        results = beam_search(model, src, src_lengths, beam_size=3, nbest=3)
    for hyps, n in zip(results, LENGTHS):
        for hyp in hyps:
            assert hyp.attention.shape == (len(hyp.tokens) + 1, n)
            torch.testing.assert_close(hyp.attention.sum(1), torch.ones(len(hyp.tokens) + 1))


def test_special_tokens_are_never_emitted_and_max_length_holds():
    model = random_model(trg_vocab_size=5)
    src, src_lengths = source_batch(LENGTHS)
    results = beam_search(model, src, src_lengths, beam_size=4, nbest=4, max_len_a=0.0, max_len_b=3)
    for hyps in results:
        for hyp in hyps:
            assert len(hyp.tokens) <= 3
            assert not {PAD, BOS, EOS} & set(hyp.tokens)


@pytest.mark.parametrize(
    "bad", [dict(beam_size=0), dict(nbest=6), dict(nbest=0), dict(length_norm="wu")]
)
def test_bad_search_arguments_raise_value_error(bad):
    model = random_model()
    src, src_lengths = source_batch([3])
    with pytest.raises(ValueError):
        beam_search(model, src, src_lengths, **{"beam_size": 5, **bad})


@pytest.mark.parametrize("columns", [640, 700, 1000, 8000])  # whole blocks, and a tail after them
@pytest.mark.parametrize("k", [1, 4, 10])
@pytest.mark.parametrize("compiled", [True, False], ids=["kernel", "pytorch"])
def test_top_per_row_equals_topk(columns, k, compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(nmt.search, "kernels", lambda: None)
    elif nmt.search.kernels() is None:
        pytest.skip("no C compiler: the kernels are not built")
    generator = torch.Generator().manual_seed(columns + k)
    scores = F.log_softmax(3 * torch.randn(7, columns, generator=generator), dim=1)
    scores[1, :] = float("-inf")  # a row forced to one word, as at the maximum length
    scores[1, columns - 1] = -0.5
    scores[2, columns - 3 :] = 10.0 + torch.arange(3.0)  # the best in the tail
    values, columns_ = top_per_row(scores, k)
    expected = scores.topk(k, dim=1).values
    assert torch.equal(values, expected)
    assert torch.equal(scores.gather(1, columns_), values)
    assert all(len(set(row)) == k for row in columns_.tolist())  # distinct columns
    if compiled and columns // 64 > 2 * k:  # the kernel's ties in column order: a row of them gives its first k
        _, first = top_per_row(torch.zeros(2, columns), k)
        assert first.tolist() == [list(range(k))] * 2


def test_beam_search_over_a_wide_vocabulary_equals_plain_topk(monkeypatch):
    model = random_model(trg_vocab_size=3000)  # wide enough for top_per_row's blocks
    src, src_lengths = source_batch(LENGTHS)
    fast = beam_search(model, src, src_lengths, beam_size=5, nbest=5)
    monkeypatch.setattr(nmt.search, "top_per_row", lambda scores, k: scores.topk(k, dim=1))
    plain = beam_search(model, src, src_lengths, beam_size=5, nbest=5)
    assert [[h.tokens for h in hyps] for hyps in fast] == [[h.tokens for h in hyps] for hyps in plain]
    assert [[h.score for h in hyps] for hyps in fast] == [[h.score for h in hyps] for hyps in plain]
