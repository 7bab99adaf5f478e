import pytest
from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

from kubeinfer.worker.detokenizer import IncrementalDetokenizer
from kubeinfer.worker.sampling_params import SamplingParams
from kubeinfer.worker.tokenizer import Tokenizer

# Multi-byte text the tokenizer never saw in training, so it falls back to single-byte tokens that
# split characters; "héllo wörld" was seen, so those merge into whole-word tokens.
TEXT = "héllo wörld 日本語 🙂 The end is near. Stop here."
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["héllo wörld, hello world!", "The quick brown fox jumps over the lazy dog.",
                                 "Stop here. The end is near."] * 10, trainer)
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=[backend.token_to_id("<|eos|>")])


def stream(tok, ids, **params):
    d = IncrementalDetokenizer(tok, tok.encode(PROMPT), SamplingParams(**params))
    deltas = [d.add(i) for i in ids]
    return d, deltas, d.finish()


def token_ends(tok, ids):
    """Character offsets in decode(ids) at which each token's text ends (for the layout asserts)."""
    return [len(tok.decode(ids[:k + 1])) for k in range(len(ids))]


def test_deltas_reassemble_the_text_without_broken_characters(tok):
    ids = tok.encode(TEXT)
    assert "\ufffd" in tok.decode(ids[3:4])  # the test really splits characters across tokens
    d, deltas, tail = stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids) == TEXT == d.text
    assert tail == "" and not any("\ufffd" in x for x in deltas)
    assert not d.stopped and d.stop_reason is None


def test_decodes_a_bounded_window(tok, monkeypatch):
    ids = tok.encode(TEXT * 4)
    lengths = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda x, **kw: lengths.append(len(x)) or decode(x, **kw))
    _, deltas, tail = stream(tok, ids)
    assert "".join(deltas) + tail == TEXT * 4
    assert max(lengths) <= 12 < len(ids)  # 🙂 is four byte tokens: at most a few tokens of context


def test_unfinished_character_is_flushed_by_finish(tok):
    ids = tok.encode("ok 🙂")[:-1]  # cut the emoji's last byte
    d, deltas, tail = stream(tok, ids)
    assert "".join(deltas) == "ok " and tail == "\ufffd"
    assert d.text == tok.decode(ids)


def test_special_tokens(tok):
    eos = tok.eos_token_ids[0]
    ids = tok.encode("hello") + [eos]
    _, deltas, tail = stream(tok, ids)
    assert "".join(deltas) + tail == "hello"
    _, deltas, tail = stream(tok, ids, skip_special_tokens=False)
    assert "".join(deltas) + tail == "hello<|eos|>"


@pytest.mark.parametrize("stop", ["end is", "o wö", "日本", "🙂 T", "near"])
def test_stop_string_truncates(tok, stop):
    ids = tok.encode(TEXT)
    cut = TEXT.index(stop)
    for include in (False, True):
        d, deltas, tail = stream(tok, ids, stop=[stop, "never"], include_stop_str_in_output=include)
        expected = TEXT[:cut + len(stop)] if include else TEXT[:cut]
        # Deltas can't be retracted, so this also shows nothing past the cut was ever emitted.
        assert "".join(deltas) + tail == d.text == expected
        assert d.stopped and d.stop_reason == stop


def test_stop_layouts_are_what_the_test_claims(tok):
    ids = tok.encode(TEXT)
    ends = token_ends(tok, ids)
    start = TEXT.index("end is")
    spanned = [e for e in ends if start < e < start + len("end is")]
    assert len(spanned) >= 1  # "end is" spans several tokens
    start = TEXT.index("o wö")
    assert start + 1 in ends  # "o wö" starts inside "héllo" and ends inside " wörld"
    assert start not in ends and start + len("o wö") not in ends


def test_earliest_stop_wins_and_later_tokens_are_ignored(tok):
    ids = tok.encode(TEXT)
    d, deltas, tail = stream(tok, ids, stop=["Stop", "wör"])
    assert d.text == "héllo " and d.stop_reason == "wör"
    assert d.add(ids[0]) == "" and d.text == "héllo "


def test_partial_stop_is_held_back_then_flushed(tok):
    text = "Stop here. The end is"
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["end is near"]))
    emitted = "".join(d.add(i) for i in tok.encode(text))
    # The last len("end is near") - 1 characters could begin the stop string: held back.
    assert emitted == text[:len(text) - (len("end is near") - 1)] and d.text == emitted and not d.stopped
    assert emitted + d.finish() == text == d.text
    assert d.finish() == ""
