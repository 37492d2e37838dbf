import hashlib

import pytest

from lowbit.data import calibration_text, calibration_windows, eval_text, read_text_file
from lowbit.errors import LowbitError


def test_wikitext2_test_text_is_byte_exact():
    text = eval_text("wikitext2")
    assert len(text) == 1_294_336
    assert hashlib.sha256(text.encode("utf-8")).hexdigest().startswith("696cca6b65a171b0")


def test_ptb_is_space_joined_stripped_lines_and_lambada_has_all_items():
    ptb = eval_text("ptb")
    assert "\n" not in ptb and ptb.startswith("no it was n't black monday but while")
    assert eval_text("lambada_text").count("\n\n") >= 5152


def test_calibration_windows_are_seeded_and_never_from_test(tiny_tokenizer):
    a = calibration_windows(tiny_tokenizer, "wikitext2", nsamples=4, seqlen=64, seed=3)
    b = calibration_windows(tiny_tokenizer, "wikitext2", nsamples=4, seqlen=64, seed=3)
    c = calibration_windows(tiny_tokenizer, "wikitext2", nsamples=4, seqlen=64, seed=4)
    assert a.shape == (4, 64) and a.equal(b) and not a.equal(c)
    with pytest.raises(LowbitError, match="test split"):
        calibration_text("lambada_text")


def test_user_text_files(tmp_path, tiny_tokenizer):
    good = tmp_path / "a.txt"
    good.write_text("hello world " * 50)
    assert read_text_file(good).startswith("hello")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(LowbitError, match="is empty"):
        read_text_file(empty)
    with pytest.raises(LowbitError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LowbitError, match="not UTF-8"):
        read_text_file(binary)
    with pytest.raises(LowbitError, match="at least 2049 are needed"):
        calibration_windows(tiny_tokenizer, str(good), nsamples=2, seqlen=2048)
