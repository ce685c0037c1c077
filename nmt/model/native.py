"""The C kernels of ``kernels.c``: compiled on first use, loaded with ctypes.

Training on a CPU spends much of an update in chains of elementwise PyTorch operations,
each a pass over memory: the attention at every decoder step, the GRU's gates, and the
vocabulary-sized softmax of the loss (and decoding, in every step's log-probabilities and
their best words). ``kernels.c`` does each chain in one pass over data in the cache. It is
plain C with OpenMP, compiled here by the system's C compiler (``CC``, else ``cc``) for this
machine's CPU (``-march=native``) into a shared library cached under
``$XDG_CACHE_HOME/nmt/kernels`` (``~/.cache/nmt/kernels``), keyed by the source, the
compiler and the CPU: about a second, once per machine. It needs no Python headers and no
build tools but the compiler.

Where there is no compiler, or ``NMT_NATIVE=0`` is set, :func:`kernels` returns None and
the callers run their PyTorch operations instead: the same values, more slowly. The
kernels take contiguous CPU tensors of float32 or bfloat16; callers check that.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
# -ffp-contract=fast: FMAs for a * b + c (ISO C modes otherwise round the product first)
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared",
         "-std=c99"]
LIBS = ["-lm"]

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "attention_forward": [_P] * 7 + [_I] * 5 + [ctypes.c_int],
    "attention_backward": [_P] * 12 + [_I] * 4 + [ctypes.c_int],
    "log_softmax": [_P, _P, _P, _I, _I, ctypes.c_int],
    "smoothed_ce": [_P, _P, _I, _I, _P, _I, _F, _P, _P, ctypes.c_int],
    "gru_forward": [_P, _I, _I, _P, _P, _I, _P, _I, _P, _I, _P, _I, _I, ctypes.c_int],
    "gru_backward": [_P, _I, _I, _P, _P, _I, _P, _I, _P, _I, _P, _P, _P, _P, _I, _I, ctypes.c_int],
    "dropout": [_P, _P, _I, ctypes.c_uint64, ctypes.c_uint32, _F, ctypes.c_int],
}
_UNTYPED = {"top_k_rows": [_P, _I, _I, _I, _I, _P, _P, ctypes.c_int]}  # float32 only
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
KERNEL_DTYPES = tuple(_SUFFIX)  # what the kernels store tensors in
# A GRU step's input gates: ``[batch, 3 * hidden]``, or a pair of tensors holding its first
# rows and the rest (see nmt.model.gru.fused_gru_gates)
GatesX = Tensor | tuple[Tensor, Tensor]


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "cpu family", "model\t")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nmt" / "kernels"


def _compile(compiler: str) -> Path:
    """The shared library for this source, compiler and CPU, compiled unless cached."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS + LIBS), version, _cpu_signature()]).encode())
    library = _cache_dir() / f"{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: processes starting together (torchrun's
    # ranks) each compile, and none loads a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), *LIBS, "-o", tmp], capture_output=True, text=True, check=True)
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


@functools.cache
def kernels() -> Kernels | None:
    """The compiled kernels, or None where they are off (``NMT_NATIVE=0``) or cannot be
    built (no C compiler, or it failed: logged once)."""
    if os.environ.get("NMT_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    try:
        library = ctypes.CDLL(str(_compile(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        log.warning("no compiled CPU kernels (%s: %s); using PyTorch operations, slower",
                    compiler, detail.strip().splitlines()[-1] if detail.strip() else error)
        return None
    return Kernels(library)


class Kernels:
    """Typed entry points of ``kernels.c``; every tensor contiguous, on the CPU."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._functions = {}
        for name, argtypes in _SIGNATURES.items():
            for suffix in _SUFFIX.values():
                function = getattr(library, f"{name}_{suffix}")
                function.argtypes, function.restype = argtypes, None
                self._functions[name, suffix] = function
        for name, argtypes in _UNTYPED.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, None
            self._functions[name, "f32"] = function

    def _get(self, name: str, dtype: torch.dtype):
        return self._functions[name, _SUFFIX[dtype]]

    def attention_forward(self, query: Tensor, keys: Tensor, v: Tensor, mask: Tensor, annotations: Tensor,
                          out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """One step of additive attention: energies ``v^T tanh(q_i + k_j)``, their softmax
        over the real positions and the context ``sum_j a_ij h_j``.

        :param query: ``[batch * g, attn]``, ``g`` rows per sentence
        :param keys: ``[batch, src_len, attn]``, the query's dtype
        :param v: ``[attn]`` float32
        :param mask: ``[batch, src_len]`` bool, True on real positions
        :param annotations: ``[batch, src_len, key_size]``, the query's dtype
        :param out: (context, weights) to write into, else new tensors
        :return: the context ``[batch * g, key_size]`` (the annotations' dtype, summed in
            float32) and the weights ``[batch * g, src_len]`` float32, 0 on padding
        """
        batch, src_len, attn = keys.shape
        key_size = annotations.size(2)
        if out is None:
            out = torch.empty(query.size(0), key_size, dtype=annotations.dtype), torch.empty(query.size(0), src_len)
        context, weights = out
        _check(query, keys, v, mask, annotations, context, weights)
        rows = query.size(0)
        _shaped((context, (rows, key_size), annotations.dtype), (weights, (rows, src_len), torch.float32))
        self._get("attention_forward", keys.dtype)(
            query.data_ptr(), keys.data_ptr(), v.data_ptr(), mask.data_ptr(), annotations.data_ptr(),
            weights.data_ptr(), context.data_ptr(), batch, query.size(0) // batch, src_len, attn, key_size,
            torch.get_num_threads(),
        )
        return context, weights

    def attention_backward(self, query: Tensor, keys: Tensor, v: Tensor, mask: Tensor, annotations: Tensor,
                           weights: Tensor, grad_context: Tensor, grad_weights: Tensor | None,
                           sums: tuple[Tensor, Tensor | None, Tensor], out: Tensor | None = None) -> Tensor:
        """The gradients of :meth:`attention_forward` for one query row per sentence, from
        its weights and the gradients of its outputs (``grad_context`` in the annotations'
        dtype, ``grad_weights`` float32 or None): returns the query's (float32; into ``out``
        where given) and adds the keys', the annotations' and v's into ``sums``, float32
        tensors of their shapes (None for the annotations': not computed, as where the
        caller sums ``a_i grad_context_i`` over the steps in one matmul itself)."""
        batch, src_len, attn = keys.shape
        grad_query = torch.empty(batch, attn) if out is None else out
        grad_keys, grad_annotations, grad_v = sums
        optional = [t for t in (grad_weights, grad_annotations) if t is not None]
        _check(query, keys, v, mask, annotations, weights, grad_context, grad_query, grad_keys, grad_v, *optional)
        _shaped((grad_query, (batch, attn), torch.float32))
        self._get("attention_backward", keys.dtype)(
            query.data_ptr(), keys.data_ptr(), v.data_ptr(), mask.data_ptr(), annotations.data_ptr(),
            weights.data_ptr(), grad_context.data_ptr(), grad_weights.data_ptr() if grad_weights is not None else None,
            grad_query.data_ptr(), grad_keys.data_ptr(),
            grad_annotations.data_ptr() if grad_annotations is not None else None, grad_v.data_ptr(),
            batch, src_len, attn, annotations.size(2), torch.get_num_threads(),
        )
        return grad_query

    def log_softmax(self, logits: Tensor, bias: Tensor | None = None) -> Tensor:
        """``F.log_softmax(logits + bias, dim=1, dtype=torch.float32)`` of ``[rows, vocab]``
        logits, bias ``[vocab]`` float32 or None."""
        _check(logits, *([bias] if bias is not None else []))
        out = torch.empty(logits.shape)
        self._get("log_softmax", logits.dtype)(
            logits.data_ptr(), bias.data_ptr() if bias is not None else None, out.data_ptr(), logits.size(0),
            logits.size(1), torch.get_num_threads(),
        )
        return out

    def top_k(self, scores: Tensor, k: int, block: int) -> tuple[Tensor, Tensor]:
        """``scores.topk(k, dim=1)`` of float32 ``[rows, columns]`` scores, ``k <= 64``,
        through the maxima of blocks of ``block`` columns (:func:`nmt.search.top_per_row`);
        equal values in column order."""
        if not 1 <= k <= 64 or scores.dtype != torch.float32:
            raise ValueError(f"top_k takes float32 scores and 1 <= k <= 64, got {scores.dtype} and k={k}")
        _check(scores)
        rows, columns = scores.shape
        values, picked = torch.empty(rows, k), torch.empty(rows, k, dtype=torch.int64)
        self._get("top_k_rows", torch.float32)(
            scores.data_ptr(), rows, columns, k, block, values.data_ptr(), picked.data_ptr(), torch.get_num_threads()
        )
        return values, picked

    def smoothed_ce_(self, logits: Tensor, bias: Tensor, target: Tensor, ignore_index: int, smoothing: float,
                     losses: Tensor, grad_bias: Tensor | None) -> None:
        """Per-row label-smoothed cross-entropy of ``logits + bias`` (``[rows, vocab]``,
        bias ``[vocab]`` float32) into ``losses`` ``[rows]`` float32 (0 on ignored rows);
        with ``grad_bias`` ``[vocab]`` float32, overwrite the logits with the loss's
        gradient and add its column sums into ``grad_bias``. ``target``: ``[rows]`` int64."""
        rows, vocab = logits.shape
        _check(logits, bias, target, losses, *([grad_bias] if grad_bias is not None else []))
        self._get("smoothed_ce", logits.dtype)(
            logits.data_ptr(), bias.data_ptr(), rows, vocab, target.data_ptr(), ignore_index, smoothing,
            losses.data_ptr(), grad_bias.data_ptr() if grad_bias is not None else None, torch.get_num_threads(),
        )

    def gru_forward(self, gates_x: GatesX, gates_h: Tensor, h: Tensor, real: Tensor | None,
                    out: Tensor | None = None) -> Tensor:
        """The new state of :func:`nmt.model.gru.fused_gru_gates` (same arguments; all of one
        dtype, rows may be strided), into ``out`` (contiguous) where given."""
        # (the parts held here until the call returns: _gates_x may have copied them)
        (first, rest), gates_h, h = _gates_x(gates_x), _rows(gates_h), _rows(h)
        out = torch.empty(h.shape, dtype=h.dtype) if out is None else out
        _check(out)
        _shaped((out, h.shape, h.dtype))
        self._get("gru_forward", h.dtype)(
            *_strided_pair(first, rest), *_strided(gates_h, h), *_strided_mask(real), out.data_ptr(), h.size(0),
            h.size(1), torch.get_num_threads(),
        )
        return out

    def gru_backward(self, gates_x: GatesX, gates_h: Tensor, h: Tensor, real: Tensor | None, grad: Tensor,
                     out: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The gradients of :meth:`gru_forward`'s inputs gates_x, gates_h and h from its
        output's, the gates recomputed; gates_x's ``[batch, 3 * hidden]`` whole (a view of it
        for each of a pair's parts). Into ``out`` (contiguous, that order) where given."""
        (first, rest), gates_h, h, grad = _gates_x(gates_x), _rows(gates_h), _rows(h), grad.contiguous()
        if out is None:
            out = torch.empty(gates_h.shape, dtype=h.dtype), torch.empty(gates_h.shape, dtype=h.dtype), \
                torch.empty_like(grad)
        grad_x, grad_gates_h, grad_h = out
        _check(*out)
        _shaped((grad_x, gates_h.shape, h.dtype), (grad_gates_h, gates_h.shape, h.dtype),
                (grad_h, h.shape, h.dtype))
        self._get("gru_backward", h.dtype)(
            *_strided_pair(first, rest), *_strided(gates_h, h), *_strided_mask(real), grad.data_ptr(),
            grad_x.data_ptr(), grad_gates_h.data_ptr(), grad_h.data_ptr(), h.size(0), h.size(1), torch.get_num_threads(),
        )
        return grad_x, grad_gates_h, grad_h

    def dropout(self, x: Tensor, p: float, seed: int) -> Tensor:
        """``x`` with each element zeroed with probability ``p`` (to 2^-32) and the rest
        scaled by ``1 / (1 - p)``, the elements chosen by ``seed`` (``0 <= seed < 2^64``) and
        their position alone: the same seed on the output's gradient is the backward pass."""
        _check(x)
        out = torch.empty_like(x)
        self._get("dropout", x.dtype)(
            x.data_ptr(), out.data_ptr(), x.numel(), seed, min(round(p * 2**32), 2**32 - 1), 1.0 / (1.0 - p),
            torch.get_num_threads(),
        )
        return out


def _rows(t: Tensor) -> Tensor:
    """``t`` ``[rows, n]``, each row contiguous (rows may be further apart)."""
    return t if t.stride(1) == 1 and t.device.type == "cpu" else t.contiguous().cpu()


def _gates_x(gates_x: GatesX) -> tuple[Tensor, Tensor | None]:
    """A step's input gates as the kernels read them: its (first) rows and the rest (None for
    one tensor), each row contiguous, and rows as far apart in both parts."""
    if not isinstance(gates_x, tuple):
        return _rows(gates_x), None
    first, rest = (_rows(part) for part in gates_x)
    if first.size(0) > 1 and rest.size(0) > 1 and first.stride(0) != rest.stride(0):
        first, rest = first.contiguous(), rest.contiguous()
    return first, rest


def _strided_pair(first: Tensor, rest: Tensor | None) -> list:
    """The kernels' gates_x arguments (from :func:`_gates_x`): the first part's pointer, the
    row stride (one row's is no matter), the first part's rows and the rest's pointer."""
    stride = first.stride(0) if rest is None or first.size(0) > 1 else rest.stride(0)
    return [first.data_ptr(), stride, first.size(0), rest.data_ptr() if rest is not None else None]


def _strided(*tensors: Tensor) -> list:
    """Each tensor's data pointer and row stride."""
    return [x for t in tensors for x in (t.data_ptr(), t.stride(0))]


def _strided_mask(real: Tensor | None) -> list:
    """A ``[rows, 1]`` bool mask's pointer and row stride, or (None, 0)."""
    return [None, 0] if real is None else [real.data_ptr(), real.stride(0)]


def _shaped(*outputs: tuple[Tensor, tuple, torch.dtype]) -> None:
    """Outputs given to the kernels, (tensor, shape, dtype): of the shape and dtype they write."""
    for tensor, shape, dtype in outputs:
        if tensor.shape != torch.Size(shape) or tensor.dtype != dtype:
            raise ValueError(f"compiled kernels write {dtype} {tuple(shape)} here, got {tensor.dtype} "
                             f"{tuple(tensor.shape)}")


def _check(*tensors: Tensor) -> None:
    """The kernels read raw memory: every tensor contiguous and on the CPU."""
    for tensor in tensors:
        if not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise ValueError(f"compiled kernels take contiguous CPU tensors, got {tensor.device} {tensor.stride()}")
