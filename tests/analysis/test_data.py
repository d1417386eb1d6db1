"""Tests of analysis.data: corpora, windows, calibration draws and the split."""
from __future__ import annotations

import random

import pytest
import torch

from analysis.data import calibration_windows, load_corpus, make_split, read_wikitext, windows


def test_read_wikitext_keeps_the_last_row_with_or_without_a_final_newline(tmp_path):
    with_nl, without = tmp_path / "a.txt", tmp_path / "b.txt"
    with_nl.write_text(" = Title = \n\n first line\n last line\n")
    without.write_text(" = Title = \n\n first line\n last line")
    expected = " = Title = \n" + "\n\n" + "" + "\n\n" + " first line\n" + "\n\n" + " last line\n"  # rows, blank-joined
    assert read_wikitext(with_nl) == expected
    assert read_wikitext(without) == expected


def test_load_corpus_says_what_to_give(tmp_path):
    assert "pydoc_data" in load_corpus("default").label
    with pytest.raises(ValueError, match="empty text spec"):
        load_corpus("  ")
    with pytest.raises(FileNotFoundError, match="not found; give an existing file"):
        load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="is a folder"):
        load_corpus(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="text file wikitext2:.*nope.txt not found"):
        load_corpus(f"wikitext2:{tmp_path / 'nope.txt'}")
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n")
    with pytest.raises(ValueError, match="holds no text"):
        load_corpus(str(blank))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text \\(byte 3: unexpected end of data\\).*saved as UTF-8"):
        load_corpus(str(latin))


def test_windows_are_the_first_non_overlapping_ones_and_refuse_bad_counts():
    t = torch.arange(1000)
    w = windows(t, 100, 3)
    assert w.shape == (3, 100) and torch.equal(w[1], torch.arange(100, 200))
    assert windows(t, 300).shape == (3, 300)  # all of them, remainder dropped
    for n in (0, -1):
        with pytest.raises(ValueError, match="at least 1"):
            windows(t, 100, n)
    with pytest.raises(ValueError, match="only 10"):
        windows(t, 100, 11)
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(t[:50], 100)


def test_calibration_windows_are_seeded_and_stay_out_of_the_reserved_span():
    t = torch.arange(5000)
    a, b = calibration_windows(t, 64, 20, seed=3, reserved_tokens=1000), calibration_windows(t, 64, 20, seed=3,
                                                                                            reserved_tokens=1000)
    assert torch.equal(a, b) and a.shape == (20, 64)
    assert int(a.min()) >= 1000 and torch.equal(a[:, 1:] - a[:, :-1], torch.ones(20, 63, dtype=a.dtype))
    assert not torch.equal(a, calibration_windows(t, 64, 20, seed=4, reserved_tokens=1000))
    with pytest.raises(ValueError, match="at least 1"):
        calibration_windows(t, 64, 0)
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(t, 64, 2, reserved_tokens=4990)
    with pytest.raises(ValueError, match="would repeat the text; ask for at most 62 windows"):
        calibration_windows(t, 64, 63, reserved_tokens=1000)  # 63 x 64 > the 4,000 tokens left
    assert calibration_windows(t, 64, 62, reserved_tokens=1000).shape == (62, 64)


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_split_from_one_file_never_overlaps(tmp_path):
    f = tmp_path / "t.txt"
    rng = random.Random(0)  # random letters: every 100-token window occurs once
    f.write_text("".join(chr(97 + rng.randrange(26)) for _ in range(4000)))
    c = load_corpus(str(f))
    sp = make_split(_CharTokenizer(), c, c, 100, 5, 8)
    assert sp.eval_ids.shape == (5, 100) and sp.calib_ids.shape == (8, 100)
    assert "t.txt, 5 x 100 tokens" == sp.eval_label
    assert sp.calib_label == "t.txt, 8 x 100 tokens (seed 0; after the first 500 tokens, kept for evaluation)"
    # more evaluation windows move the calibration windows: their label says so too
    assert "after the first 600 tokens" in make_split(_CharTokenizer(), c, c, 100, 6, 8).calib_label
    ids = torch.tensor(_CharTokenizer()(c.text)["input_ids"])
    starts = [next(i for i in range(500, ids.numel()) if torch.equal(ids[i:i + 100], row)) for row in sp.calib_ids]
    assert min(starts) >= 500  # after the 5 x 100 evaluation tokens
    other = make_split(_CharTokenizer(), c, c, 100, 5, 8, seed=1)
    assert other.digest != sp.digest


def test_kept_text_file_outlives_its_source_and_keeps_its_name(tmp_path):
    from analysis.data import keep_text_file, load_corpus

    up = tmp_path / "upload" / "notes.txt"
    up.parent.mkdir()
    up.write_text("some prose to calibrate on\n", encoding="utf-8")
    root = tmp_path / "kept"
    kept = keep_text_file(up, root)
    assert kept.name == "notes.txt" and kept.is_relative_to(root) and kept.read_bytes() == up.read_bytes()
    assert keep_text_file(up, root) == kept  # the same bytes: the same copy
    label = load_corpus(str(kept)).label
    up.unlink()  # the server deletes its temporary copy
    assert load_corpus(str(kept)).label == label == "notes.txt"
    other = tmp_path / "notes.txt"
    other.write_text("other prose\n", encoding="utf-8")
    assert keep_text_file(other, root) != kept  # same name, other bytes: another copy
    assert not list(root.rglob("*.part"))
    with pytest.raises(FileNotFoundError, match="not found"):
        keep_text_file(up, root)
