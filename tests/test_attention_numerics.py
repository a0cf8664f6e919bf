"""Swapped GPT-OSS attention on CPU (torch reference core): same numbers as the model's eager attention, the
state dict untouched, exact fallback for masks TE cannot express, and the unswapped path unchanged."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lightning_te_moe.attention import swap_attention, unswap_attention
from lightning_te_moe.attention.dispatch import SWAP_ATTR
from tests.experts_helpers import tiny_model

SEQ = 20  # longer than the tiny model's sliding window (8): both layer types are exercised


def _calls(model: torch.nn.Module) -> list[dict[str, int]]:
    return [dict(m.__dict__[SWAP_ATTR].calls) for m in model.modules() if SWAP_ATTR in m.__dict__]


def _loss_and_grads(model, ids, mask, valid):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = (logits.float().logsumexp(-1) * valid).sum() / valid.sum()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("arch", ["gpt_oss", "mixtral", "qwen3_moe"])
@pytest.mark.parametrize("padded", [False, True])
def test_reference_core_matches_eager_logits_and_grads(padded, arch):
    torch.manual_seed(0)
    original = tiny_model(arch)
    swapped = copy.deepcopy(original)
    swap_attention(swapped, core="reference")
    ids = torch.randint(1, 64, (3, SEQ))
    mask = torch.ones(3, SEQ, dtype=torch.long)
    if padded:
        mask[1, 14:] = 0
        mask[2, 5:] = 0
    valid = mask.float()[..., None].squeeze(-1)
    ref_logits, ref_grads = _loss_and_grads(original, ids, mask, valid)
    logits, grads = _loss_and_grads(swapped, ids, mask, valid)
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], ref_logits[keep], rtol=1e-4, atol=1e-5)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    assert any(k.endswith("sinks") for k in grads) is (arch == "gpt_oss")
    assert len(_calls(swapped)) == 2 and all(c == {"core": 1} for c in _calls(swapped))


def test_state_dict_keys_and_values_unchanged_and_unswap_restores():
    model = tiny_model("gpt_oss")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swap_attention(model, core="reference")
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    sinks = [p for n, p in model.named_parameters() if n.endswith("sinks")]
    assert len(sinks) == 2 and len(list(model.parameters())) == len(before)
    # train the sinks through the swapped core; the HF parameter itself moves
    ids = torch.randint(1, 64, (2, SEQ))
    model(input_ids=ids).logits.sum().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in sinks)
    assert unswap_attention(model) == 2
    fresh = tiny_model("gpt_oss", seed=1)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def _fallback_case(model, **inputs):
    original = copy.deepcopy(model)
    swap_attention(model, core="reference")
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(**inputs).logits
        ref = original(**inputs).logits
    assert torch.equal(out, ref)
    return _calls(model), [str(w.message) for w in caught]


def test_left_padding_falls_back_exactly():
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, :4] = 0
    calls, warned = _fallback_case(tiny_model("gpt_oss"), input_ids=torch.randint(1, 64, (2, SEQ)), attention_mask=mask)
    assert all(list(c) == ["left padding (TE reads padding as sequence lengths)"] for c in calls)
    assert any("left padding" in w for w in warned)


def test_packed_position_ids_give_the_models_own_numbers():
    """GPT-OSS (transformers 5.17) builds its masks without position ids: packing is not masked by its own
    attention either, and the swap keeps exactly that behaviour."""
    position_ids = torch.cat([torch.arange(12), torch.arange(SEQ - 12)])[None].expand(2, -1)
    calls, _ = _fallback_case(tiny_model("gpt_oss"), input_ids=torch.randint(1, 64, (2, SEQ)),
                              position_ids=position_ids)
    assert all(c == {"core": 1} for c in calls)


def test_a_packed_sequence_mask_is_not_taken_by_te():
    from transformers.masking_utils import create_causal_mask

    model = tiny_model("gpt_oss")
    swap_attention(model, core="reference")
    position_ids = torch.cat([torch.arange(12), torch.arange(SEQ - 12)])[None]
    mask = create_causal_mask(model.config, torch.zeros(1, SEQ, 32), None, None, position_ids=position_ids)
    assert "packed sequences" in mask.for_te(None).reason
    plain = create_causal_mask(model.config, torch.zeros(1, SEQ, 32), None, None, position_ids=torch.arange(SEQ)[None])
    assert plain.for_te(None).usable and plain.for_te(None).key_valid is None


def test_generation_with_cache_falls_back_exactly():
    from transformers import DynamicCache

    model = tiny_model("gpt_oss")
    original = copy.deepcopy(model)
    swap_attention(model, core="reference")
    ids = torch.randint(1, 64, (1, SEQ))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = []
        for m in (model, original):
            cache = DynamicCache(config=m.config)
            m(input_ids=ids, past_key_values=cache, use_cache=True)
            outs.append(m(input_ids=ids[:, :1], past_key_values=cache, use_cache=True).logits)
    assert torch.equal(*outs)
    assert all(c == {"core": 1, "cached keys/values (generation)": 1} for c in _calls(model))


def test_plugin_on_cpu_leaves_attention_numerics_untouched():
    from lightning_te_moe import TEMoEPrecision

    model = tiny_model("gpt_oss")
    reference = copy.deepcopy(model)
    TEMoEPrecision(print_plan=False, guard=False, swap_experts=False).convert_module(model)
    ids = torch.randint(1, 64, (2, SEQ))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("arch", ["gpt_oss", "mixtral"])
def test_without_a_padding_mask_te_takes_the_causal_mask_unchecked(arch, monkeypatch):
    """No padding mask, no overlay: the mask is causal (sliding where the layer is) by construction, so TE's own mask
    is taken without expanding and checking the model's (that check syncs with the host once per layer type)."""
    import transformers.masking_utils as masking_utils

    torch.manual_seed(0)
    original = tiny_model(arch)
    swapped = copy.deepcopy(original)
    swap_attention(swapped, core="reference")
    ids = torch.randint(1, 64, (2, SEQ))
    ones = torch.ones(2, SEQ)
    ref_logits, ref_grads = _loss_and_grads(original, ids, None, ones)

    def no_check(*args, **kwargs):
        raise AssertionError("the dense mask check ran for a plainly causal mask")

    monkeypatch.setattr(masking_utils, "sdpa_mask", no_check)
    logits, grads = _loss_and_grads(swapped, ids, None, ones)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    assert all(c == {"core": 1} for c in _calls(swapped))
    with pytest.raises(AssertionError, match="dense mask check ran"):  # a padding mask still gets checked
        swapped(input_ids=ids, attention_mask=torch.ones(2, SEQ, dtype=torch.long))
