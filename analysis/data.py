"""Text corpora named by a spec, tokenised once into non-overlapping windows.

Specs:
  ``default``        the Python standard library's ``pydoc_data`` topics (every install has it)
  ``wikitext2:PATH`` a WikiText raw file under the GPTQ/SliceGPT row convention
  ``PATH``           a plain text file, read as it is
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass(frozen=True)
class Corpus:
    text: str
    label: str  # what a report prints: "default (pydoc_data topics)", "wikitext2:test.txt" ...
    digest: str  # sha256 of the text (keys caches)
    source: Path | None = None  # the file it came from, if any (same file => disjoint windows)


def read_wikitext(path: Path) -> str:
    """GPTQ/SliceGPT convention: non-blank lines keep their newline, blank lines are empty
    rows, rows are joined by a blank line."""
    with open(path, encoding="utf-8", newline="") as f:
        raw = f.read()
    body = raw[:-1] if raw.endswith("\n") else raw  # the file's final newline ends its last row
    rows = [line + "\n" if line.strip() else "" for line in body.split("\n")]
    return "\n\n".join(rows)


def check_text_spec(spec: str) -> Path | None:
    """What ``load_corpus`` refuses without reading anything (an empty spec, a missing file, a
    folder): cheap, for checks before a model loads. The file's path, None for 'default'."""
    spec = (spec or "").strip()
    if not spec:
        raise ValueError("empty text spec; use 'default', a text file path, or wikitext2:PATH")
    if spec == "default":
        return None
    prefix = "wikitext2:" if spec.startswith("wikitext2:") else ""
    path = Path(spec[len(prefix):]).expanduser()
    _check_file(path, prefix)
    return path


def load_corpus(spec: str) -> Corpus:
    path = check_text_spec(spec)
    if path is None:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
        return Corpus(text, "default (Python pydoc_data topics)", _digest(text))
    if spec.strip().startswith("wikitext2:"):
        text = read_wikitext(path)
        label = f"wikitext2:{path.name}"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}), so it cannot be read as a "
                             "corpus: give a plain-text file (.txt, .md, code), saved as UTF-8") from e
        label = path.name
    if not text.strip():
        raise ValueError(f"{path} holds no text; give a file with some prose or code")
    return Corpus(text, label, _digest(text), path.resolve())


def corpus_from_text(text: str, label: str = "pasted text") -> Corpus:
    if not text.strip():
        raise ValueError("the text is empty; paste some prose or pick a corpus")
    return Corpus(text, label, _digest(text))


def _check_file(path: Path, prefix: str = "") -> None:
    if not path.exists():
        raise FileNotFoundError(f"text file {prefix}{path} not found; give an existing file, or 'default'")
    if path.is_dir():
        raise ValueError(f"{prefix}{path} is a folder; give a text file")


def keep_text_file(path: str | Path, root: Path) -> Path:
    """A lasting copy of the text file ``path`` under ``root``, in a folder named by a digest of
    its bytes, with the file's own name (which labels the text). An uploaded file is a temporary
    copy that the server deletes; a page that names the kept copy still finds it after a
    restart. The same bytes map to the same copy, written once (to a temporary name, then
    renamed)."""
    src = Path(path)
    _check_file(src)
    data = src.read_bytes()
    dest = root / hashlib.sha256(data).hexdigest()[:16] / src.name
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        part.write_bytes(data)
        part.replace(dest)
    return dest


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tokenize(tokenizer, corpus: Corpus) -> Tensor:
    """The corpus as one 1-D LongTensor of token ids, no BOS (the evaluation convention)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer (no tokenizer files beside its weights), so it cannot read "
                         "text: copy its base model's tokenizer files into its folder")
    ids = tokenizer(corpus.text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: Tensor, seqlen: int, n: int | None = None) -> Tensor:
    """The first ``n`` (default: all) non-overlapping windows of ``seqlen``; remainder dropped.
    Returns (n, seqlen)."""
    if seqlen < 2:
        raise ValueError("seqlen must be at least 2")
    if n is not None and n < 1:
        raise ValueError(f"asked for {n} windows; ask for at least 1")
    total = tokens.numel() // seqlen
    if total == 0:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one window of {seqlen}; "
                         "give a longer text or a smaller seqlen")
    if n is not None and n > total:
        raise ValueError(f"asked for {n} windows of {seqlen} tokens but the text has only {total} "
                         f"({tokens.numel()} tokens); ask for at most {total} or lower seqlen")
    return tokens[: (n or total) * seqlen].reshape(-1, seqlen)


def calibration_windows(tokens: Tensor, seqlen: int, n: int, seed: int = 0,
                        reserved_tokens: int = 0) -> Tensor:
    """``n`` windows of ``seqlen`` drawn GPTQ-style (``random.seed(seed)``, then
    ``i = randint(lo, N - seqlen - 1)`` per window) from tokens ``[reserved_tokens, N)``.

    When calibration and evaluation come from one file, pass the evaluation span as
    ``reserved_tokens`` so the two never overlap. Returns (n, seqlen)."""
    if n < 1:
        raise ValueError(f"asked for {n} calibration windows; ask for at least 1")
    lo, hi = reserved_tokens, tokens.numel() - seqlen - 1
    if hi < lo:
        avail = tokens.numel() - reserved_tokens
        raise ValueError(f"only {avail} tokens are left for calibration, fewer than one window of {seqlen}; "
                         "use a longer text or a smaller seqlen" + (", or fewer evaluation windows (they come "
                                                                     "first from the same text)" if reserved_tokens
                                                                     else ""))
    avail = tokens.numel() - reserved_tokens
    if n * seqlen > avail:
        raise ValueError(f"asked for {n} calibration windows of {seqlen} tokens ({n * seqlen:,} tokens) from "
                         f"{avail:,} tokens of text: the windows would repeat the text; ask for at most "
                         f"{avail // seqlen} windows, or give a longer text")
    rng = random.Random(seed)
    starts = [rng.randint(lo, hi) for _ in range(n)]
    return torch.stack([tokens[i: i + seqlen] for i in starts])


@dataclass(frozen=True)
class TextSplit:
    """Evaluation and calibration windows for one experiment, with their labels."""

    eval_ids: Tensor  # (E, seqlen)
    calib_ids: Tensor  # (C, calib_seqlen)
    eval_label: str
    calib_label: str
    digest: str  # keys caches: both corpora, the windowing and the seed


def make_split(tokenizer, eval_corpus: Corpus, calib_corpus: Corpus, seqlen: int, eval_windows: int | None,
               calib_windows: int, calib_seqlen: int | None = None, seed: int = 0) -> TextSplit:
    """Tokenise each corpus once; calibration never overlaps evaluation when they share a file."""
    cs = calib_seqlen or seqlen
    ev_tok = tokenize(tokenizer, eval_corpus)
    ev = windows(ev_tok, seqlen, eval_windows)
    same = eval_corpus.digest == calib_corpus.digest
    cal_tok = ev_tok if same else tokenize(tokenizer, calib_corpus)
    cal = calibration_windows(cal_tok, cs, calib_windows, seed, reserved_tokens=ev.numel() if same else 0)
    key = f"{eval_corpus.digest}:{calib_corpus.digest}:{seqlen}:{ev.shape[0]}:{cs}:{calib_windows}:{seed}"
    # one file for both: the calibration windows are drawn after the evaluation span, so they move with it
    after = f"; after the first {ev.numel():,} tokens, kept for evaluation" if same else ""
    return TextSplit(ev, cal, f"{eval_corpus.label}, {ev.shape[0]} x {seqlen} tokens",
                     f"{calib_corpus.label}, {calib_windows} x {cs} tokens (seed {seed}{after})", _digest(key))
