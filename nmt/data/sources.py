"""Where parallel text comes from: local files, files by URL, or a Hugging Face dataset.

`open_split(config, split)` returns a `SplitSource` whose `pairs()` streams the split as
`(src, trg)` strings, one pair per line of the source, nothing dropped or altered except
the line terminator ("\\n", then one "\\r") and a UTF-8 byte-order mark on line 1.

- `local`: `config.path` is a file template with `{split}` and `{lang}`; plain or gzip,
  told apart by the first two bytes, not the name.
- `url`: the same template as URLs; each file is downloaded once into the cache
  (`$NMT_CACHE_DIR`, default `~/.cache/nmt/downloads`) and read from there.
- `hub`: `datasets.load_dataset(path, hub_config, split=...)`; `path` is a hub name or a
  local dataset folder. Columns come from `hub_columns`, else a `translation` dict keyed
  by language code, else columns named by the language codes. Line breaks inside a hub
  sentence become spaces (every artifact stores one sentence per line).
- a local mirror (`data_dir`, from `--data-dir` / `$NMT_DATA_DIR`) replaces url
  sources (a local source already names its files) by `{data_dir}/{split}.{lang}.gz` or `{data_dir}/{split}.{lang}`. For a hub
  source it is used the same way when it holds the training files, and is otherwise
  loaded as a local dataset folder in place of the hub name.

A split that does not exist raises `MissingSplit` (a `DataError`), so that the caller can
skip a missing test split with a warning while a missing train or valid split stays fatal.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nmt.data import DataError

MAX_LINE_BYTES = 1 << 20  # a longer "line" means the file is not sentence-per-line text
READ_BYTES = 1 << 20
HUB_BATCH = 10_000


class MissingSplit(DataError):
    """The requested split does not exist in the source."""


@dataclass(frozen=True)
class SplitSource:
    """One split of a parallel corpus, ready to be streamed (possibly more than once)."""

    split: str  # the split's name in the source
    where: str  # where it is read from, for messages
    _pairs: Callable[[], Iterator[tuple[str, str]]]

    def pairs(self) -> Iterator[tuple[str, str]]:
        """Stream the `(src, trg)` pairs in source order."""
        return self._pairs()


def open_split(config, split: str, *, data_dir: Path | None = None) -> SplitSource:
    """Locate one split of the corpus described by `config` (a recipe's DataConfig).

    Downloads (url) or loads (hub) what it needs; raises `MissingSplit` when the split
    does not exist and `DataError` for anything else that makes it unreadable.
    """
    langs = (config.src_lang, config.trg_lang)
    if config.source == "local":
        data_dir = None  # the recipe names its own files; a mirror is for downloads
    if data_dir is not None and (config.source == "url" or _mirror_has(data_dir, config.train_split, langs)):
        paths = [_mirror_file(Path(data_dir), split, lang) for lang in langs]
    elif config.source == "hub":
        name = str(data_dir) if data_dir is not None else config.path
        return _hub_split(config, split, name)
    elif config.source == "local":
        paths = [_local_file(_fill(config.path, split, lang)) for lang in langs]
    else:
        paths = [download(_fill(config.path, split, lang)) for lang in langs]
    src_path, trg_path = paths
    return SplitSource(split, f"{src_path}, {trg_path}", lambda: read_parallel(src_path, trg_path))


def describe(config, data_dir: Path | None = None) -> str:
    """A one-line description of where the corpus is read from."""
    if data_dir is not None and config.source != "local":
        return f"local mirror {data_dir}"
    if config.source == "hub":
        extra = f" ({config.hub_config})" if config.hub_config else ""
        return f"hub dataset {config.path}{extra}"
    return f"{config.source} {config.path}"


# ------------------------------------------------------------------------ text files


def read_lines(path: Path) -> Iterator[str]:
    """Stream the lines of a plain or gzip UTF-8 text file, without line terminators.

    Raises DataError naming the file (and the line, where there is one) when the file
    is missing, not gzip data despite the magic bytes, not UTF-8, or not text at all.
    Reads and decodes a block of lines at a time; only an error looks for its line.
    """
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    with raw:
        is_gzip = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
        lineno, pending = 0, b""  # lines done; an unfinished last line
        while True:
            try:
                block = stream.read(READ_BYTES)
            except (OSError, EOFError, zlib.error) as e:
                what = "unreadable gzip data" if is_gzip else "read error"
                raise DataError(f"{path}: line {lineno + 1}: {what} ({e})") from None
            if not block:
                break
            block = pending + block
            cut = block.rfind(b"\n") + 1
            pending = block[cut:]
            if len(pending) > MAX_LINE_BYTES:
                line = lineno + block.count(b"\n") + 1
                raise DataError(f"{path}: line {line}: longer than {MAX_LINE_BYTES:,} bytes; "
                                "not a file of one sentence per line")
            if cut:
                lines = _decode_lines(block[: cut - 1], path, lineno)
                lineno += len(lines)
                yield from lines
        if pending:
            yield from _decode_lines(pending, path, lineno)


def _decode_lines(data: bytes, path: Path, lineno: int) -> list[str]:
    """Decode "\n"-separated lines that follow line `lineno`; strip one "\r" from each."""
    nul = data.find(b"\0")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if 0 <= nul < e.start:
            raise _nul_error(path, lineno, data, nul) from None
        line = lineno + data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}: line {line}: invalid UTF-8 (at byte {column})") from None
    if nul >= 0:
        raise _nul_error(path, lineno, data, nul)
    lines = text.split("\n")
    if "\r" in text:
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if lineno == 0 and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    return lines


def _nul_error(path: Path, lineno: int, data: bytes, position: int) -> DataError:
    line = lineno + data.count(b"\n", 0, position) + 1
    return DataError(f"{path}: line {line}: NUL byte; not a text file")


def read_parallel(src_path: Path, trg_path: Path) -> Iterator[tuple[str, str]]:
    """Stream aligned lines of two files; unequal line counts raise DataError with both."""
    src_lines, trg_lines = read_lines(src_path), read_lines(trg_path)
    count = 0
    for src, trg in itertools.zip_longest(src_lines, trg_lines):
        if src is None or trg is None:
            longer = trg_lines if src is None else src_lines
            long_count = count + 1 + sum(1 for _ in longer)
            src_count, trg_count = (count, long_count) if src is None else (long_count, count)
            raise DataError(
                f"unequal line counts: {src_path} has {src_count} lines, {trg_path} has {trg_count}"
            )
        count += 1
        yield src, trg


def _fill(template: str, split: str, lang: str) -> str:
    return template.replace("{split}", split).replace("{lang}", lang)


def _local_file(path_text: str) -> Path:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise MissingSplit(f"{path}: file not found")
    return path


def _mirror_file(data_dir: Path, split: str, lang: str) -> Path:
    for name in (f"{split}.{lang}.gz", f"{split}.{lang}"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise MissingSplit(f"{data_dir / f'{split}.{lang}.gz'}: file not found (nor without .gz)")


def _mirror_has(data_dir: Path, split: str, langs: tuple[str, str]) -> bool:
    try:
        for lang in langs:
            _mirror_file(Path(data_dir), split, lang)
    except MissingSplit:
        return False
    return True


# ------------------------------------------------------------------------- downloads


def cache_dir() -> Path:
    """Where downloads are kept: `$NMT_CACHE_DIR`, else `~/.cache/nmt/downloads`."""
    return Path(os.environ.get("NMT_CACHE_DIR") or Path.home() / ".cache" / "nmt" / "downloads")


def download(url: str) -> Path:
    """The cached copy of `url`, downloaded first if needed (atomically, with a progress bar).

    The cache file is named by a hash of the URL plus its base name. A 404 (or a missing
    file:// file) raises MissingSplit; anything else unreachable raises DataError.
    """
    basename = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    target = cache_dir() / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{basename}"
    if target.is_file():
        return target
    hint = "use --data-dir for a local copy"
    try:
        response = urllib.request.urlopen(url, timeout=60)  # noqa: S310 - file:// is wanted
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise MissingSplit(f"cannot reach {url}: not found (HTTP 404); {hint}") from None
        raise DataError(f"cannot reach {url}: HTTP {e.code} {e.reason}; {hint}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, FileNotFoundError):
            raise MissingSplit(f"cannot reach {url}: no such file; {hint}") from None
        raise DataError(f"cannot reach {url}: {e.reason}; {hint}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot reach {url}: {e}; {hint}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        total = int(response.headers.get("Content-Length") or 0) or None
        with response, os.fdopen(fd, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, desc=basename, file=sys.stderr, disable=None
        ) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
        os.replace(tmp_name, target)
    except OSError as e:
        raise DataError(f"cannot reach {url}: download failed ({e}); {hint}") from None
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


# ------------------------------------------------------------------------------- hub


def _hub_split(config, split: str, name: str) -> SplitSource:
    dataset = _load_hub_split(name, config.hub_config, split)
    columns, pick = _column_reader(dataset, config, name)

    def pairs() -> Iterator[tuple[str, str]]:
        for batch in dataset.select_columns(columns).iter(batch_size=HUB_BATCH):
            for src, trg in zip(*pick(batch)):
                yield _one_line(src), _one_line(trg)

    return SplitSource(split, f"hub dataset {name} split {split}", pairs)


def _load_hub_split(name: str, hub_config: str, split: str):
    try:
        import datasets  # imported here: slow to import, and only the hub source needs it
    except ImportError:
        raise DataError("data.source 'hub' needs the 'datasets' package (pip install datasets)") from None
    hint = "use --data-dir for a local copy"
    try:
        return datasets.load_dataset(name, hub_config or None, split=split)
    except ValueError as e:
        message = _first_line(e)
        if message.startswith("Unknown split"):
            raise MissingSplit(f"hub dataset {name}: {message}") from None
        if "BuilderConfig" in message or "Config name" in message:
            raise DataError(f"hub dataset {name}: data.hub_config {hub_config!r}: {message}") from None
        raise DataError(f"hub dataset {name}: {message}") from None
    except (ConnectionError, OSError) as e:  # offline mode, DatasetNotFoundError, HTTP errors
        raise DataError(f"cannot reach hub dataset {name}: {_first_line(e)}; {hint}") from None


def _column_reader(dataset, config, name: str) -> tuple[list[str], Callable[[dict], tuple[list, list]]]:
    """The columns to read, and a function from a batch to its (sources, targets) lists."""
    existing = list(dataset.column_names)
    src_lang, trg_lang = config.src_lang, config.trg_lang

    def check(column: str) -> None:
        if column not in existing:
            raise DataError(f"hub dataset {name}: no column '{column}' (columns: {', '.join(existing)})")

    if config.hub_columns:
        src_col, trg_col = (str(c) for c in config.hub_columns)
        check(src_col)
        check(trg_col)
        return [src_col, trg_col], lambda b: (b[src_col], b[trg_col])
    if "translation" in existing:
        feature = dataset.features["translation"]
        keys = list(getattr(feature, "languages", None) or (feature if isinstance(feature, dict) else []))
        for lang in (src_lang, trg_lang):
            if keys and lang not in keys:
                raise DataError(
                    f"hub dataset {name}: column 'translation' has no '{lang}' (languages: {', '.join(keys)})"
                )

        def pick(batch: dict) -> tuple[list, list]:
            rows = batch["translation"]
            return [r.get(src_lang) for r in rows], [r.get(trg_lang) for r in rows]

        return ["translation"], pick
    for lang in (src_lang, trg_lang):
        if lang not in existing:
            raise DataError(
                f"hub dataset {name}: no column '{lang}' and no 'translation' column "
                f"(columns: {', '.join(existing)}); set data.hub_columns"
            )
    return [src_lang, trg_lang], lambda b: (b[src_lang], b[trg_lang])


def _one_line(value) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if "\n" in text or "\r" in text:
        text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return text


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
