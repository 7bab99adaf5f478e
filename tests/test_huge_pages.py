"""Weights and the KV pool on transparent huge pages (worker/huge_pages.py): the move keeps every value
and every module's tensor, leaves shared storage alone, and does nothing where THP is off."""

from __future__ import annotations

import pytest
import torch

from kubeinfer.worker import Engine, SamplingParams
from kubeinfer.worker import huge_pages
from kubeinfer.worker.huge_pages import HUGE_PAGE, advise, move_weights_to_huge_pages, thp_mode

THP_ON = thp_mode() in ("madvise", "always")


@pytest.mark.parametrize("text,want", [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"),
                                       ("always madvise [never]", "never"), ("garbled", None)])
def test_thp_mode_reads_the_bracketed_word(tmp_path, text, want):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert thp_mode(str(path)) == want
    assert thp_mode(str(tmp_path / "absent")) is None


@pytest.mark.skipif(not THP_ON, reason=f"transparent huge pages are {thp_mode()!r} on this machine")
def test_advise_covers_the_whole_huge_pages_inside_a_tensor():
    t = torch.empty(3 * HUGE_PAGE, dtype=torch.uint8)
    advised = advise(t)
    assert advised in (2 * HUGE_PAGE, 3 * HUGE_PAGE)  # 3 whole pages only when t starts on a boundary
    assert advise(torch.empty(1000, dtype=torch.uint8)) == 0


@pytest.mark.skipif(not THP_ON, reason=f"transparent huge pages are {thp_mode()!r} on this machine")
@pytest.mark.parametrize("quantization", [None, "int4"])
def test_moving_the_weights_keeps_every_value_and_output(monkeypatch, tiny_llama_dir, quantization):
    monkeypatch.setattr(huge_pages, "MIN_TENSOR_BYTES", 4096)  # the tiny model's tensors are small
    monkeypatch.setattr(huge_pages, "ARENA_BYTES", 64 << 10)   # several arenas
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "never")
    plain = Engine(model=tiny_llama_dir, max_model_len=128, num_kv_blocks=16, quantization=quantization)
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "madvise")
    moved = Engine(model=tiny_llama_dir, max_model_len=128, num_kv_blocks=16, quantization=quantization)
    model = moved.runner.model
    big = [t for t in list(model.parameters()) + list(model.buffers()) if t.numel() * t.element_size() >= 4096]
    assert len({t.untyped_storage().data_ptr() for t in big}) < len(big)  # they share a few arenas now
    assert move_weights_to_huge_pages(model) == 0  # views of an arena are not moved twice
    plain_state = plain.runner.model.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, plain_state[name]), name
    run = lambda e: [(o.output_token_ids, o.logprobs) for o in e.generate([[5, 6, 7, 8, 9]], params)]  # noqa: E731
    assert run(moved) == run(plain)


def test_shared_storage_and_views_stay_put(monkeypatch):
    monkeypatch.setattr(huge_pages, "MIN_TENSOR_BYTES", 1024)
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "madvise")
    m = torch.nn.Module()
    whole = torch.randn(4096)
    m.register_buffer("a", whole[:2048])          # a view of a larger storage
    m.register_buffer("b", torch.randn(4096))     # owns its storage: moved
    shared = torch.randn(2048)
    m.register_buffer("c", shared)
    m.register_buffer("d", shared.view(32, 64))   # two tensors, one storage
    ptrs = {n: t.data_ptr() for n, t in m.named_buffers()}
    b = m.b.clone()
    assert move_weights_to_huge_pages(m) == 4096 * 4
    assert m.a.data_ptr() == ptrs["a"] and m.c.data_ptr() == ptrs["c"] and m.d.data_ptr() == ptrs["d"]
    assert m.b.data_ptr() != ptrs["b"] and torch.equal(m.b, b)


def test_nothing_moves_where_thp_is_off(monkeypatch):
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "never")
    m = torch.nn.Linear(1024, 1024)
    ptr = m.weight.data_ptr()
    assert move_weights_to_huge_pages(m) == 0 and m.weight.data_ptr() == ptr
