"""Byte-level and tokenizer.json tokenizers, and safe incremental UTF-8 decoding."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.text.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDecoder, load_tokenizer

tok = ByteTokenizer()


@given(st.text())
def test_text_round_trip(text):
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


@given(st.text())
def test_streaming_never_splits_a_character(text):
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode(text, add_bos=True)] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


@given(st.binary())
def test_arbitrary_bytes_decode_safely(data):
    dec = IncrementalDecoder(tok)
    out = "".join(dec.push(i) for i in data) + dec.flush()  # byte-level: a byte is its own token id
    assert out == data.decode("utf-8", errors="replace")


def test_multibyte_character_waits_for_its_last_byte():
    dec = IncrementalDecoder(tok)
    euro = "€".encode()  # 3 bytes
    assert [dec.push(b) for b in euro] == ["", "", "€"]
    assert dec.push(0xFF) == "\ufffd" and dec.push(ord("a")) == "a"
    dec.push(0xE2)
    assert dec.flush() == "\ufffd"


def test_specials():
    eos = tok.special_id("<|eos|>")
    assert eos == tok.eos_id and eos >= 256 and tok.vocab_size == 256 + 7
    assert tok.token_bytes(eos) is None
    assert IncrementalDecoder(tok).push(eos) == ""
    assert tok.encode("a", add_bos=True) == [tok.bos_id, 97]


@pytest.fixture
def hf_tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["héllo wörld, naïve café € ≠ 漢字 " * 20, "the quick brown fox"] * 10, trainer)
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    return tmp_path


@given(text=st.text(max_size=60))
def test_tokenizer_json_round_trip_and_streaming(hf_tokenizer_dir, text):
    t = load_tokenizer(hf_tokenizer_dir)
    assert isinstance(t, HFTokenizer) and t.eos_id is not None
    ids = t.encode(text)
    assert t.decode(ids) == text
    dec = IncrementalDecoder(t)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == text
    assert dec.push(t.eos_id) == ""


def test_default_is_byte_level(tmp_path):
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)


@pytest.fixture
def sentencepiece_style_path(tmp_path):
    """A SentencePiece-style vocabulary: "\u2581" marks spaces, <0xNN> tokens carry bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"<0x{i:02X}>": i for i in range(256)}
    for ch in "\u2581abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
    merges = [("\u2581", "w"), ("h", "e"), ("l", "l")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    t.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    t.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


@given(text=st.text(alphabet="hello wrdé€漢", max_size=40))
def test_sentencepiece_style_streaming_keeps_spaces_and_bytes(sentencepiece_style_path, text):
    t = HFTokenizer(sentencepiece_style_path)
    ids = t.encode(text)
    dec = IncrementalDecoder(t)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == t.decode(ids) == text
