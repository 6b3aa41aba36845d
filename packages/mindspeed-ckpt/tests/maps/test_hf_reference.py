"""The HF side of the maps against transformers itself: tiny models of every family are saved
with ``save_pretrained`` (the Hub layout), converted to megatron names and back, and loaded
again by transformers with no missing weight and identical logits."""

import json

import pytest
import torch
from ckpt_tiny_configs import CONFIGS
from safetensors import safe_open
from safetensors.torch import save_file

from mindspeed_ckpt.maps import hf_to_mcore, mcore_to_hf, rules

transformers = pytest.importorskip("transformers")


def _save_tiny(key, path):
    cfg = dict(CONFIGS[key])
    model_type = cfg.pop("model_type")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **cfg))
    with torch.no_grad():  # some families initialise norms/biases to constants; make every tensor distinctive
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.eval().save_pretrained(path)
    hf_config = json.loads((path / "config.json").read_text())
    with safe_open(path / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return model, hf_config, tensors


def _add_mtp_layers(hf_config, tensors):
    """transformers neither builds nor saves DeepSeek's MTP layers: add random ones in the Hub
    layout (their embed_tokens / shared_head.head are copies of the main ones)."""
    first = hf_config["num_hidden_layers"]
    g = torch.Generator().manual_seed(1)
    for r in rules(hf_config):
        if not r.hf[0].startswith(f"model.layers.{first}."):
            continue
        for name, shape in zip(r.hf, r.hf_shapes, strict=True):
            if r.alias:
                main = "model.embed_tokens.weight" if "embed_tokens" in name else "lm_head.weight"
                tensors[name] = tensors[main].clone()
            else:
                tensors[name] = torch.randn(shape, generator=g)


def _logits(model, vocab):
    ids = torch.arange(12).remainder(vocab).reshape(2, 6)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_transformers_checkpoint_round_trip(key, tmp_path):
    model, hf_config, tensors = _save_tiny(key, tmp_path / "hf")
    if hf_config.get("num_nextn_predict_layers"):
        with pytest.raises(ValueError, match="num_nextn_predict_layers"):
            hf_to_mcore(hf_config, tensors)
        _add_mtp_layers(hf_config, tensors)

    for dtype in (torch.float32, torch.bfloat16):
        hf = {k: v.to(dtype) for k, v in tensors.items()}
        mc = hf_to_mcore(hf_config, hf, padded_vocab_size=128)  # raises on any unconsumed HF tensor
        back = mcore_to_hf(hf_config, mc)
        assert back.keys() == hf.keys()
        for k in hf:
            assert back[k].dtype == dtype and torch.equal(back[k], hf[k]), k

    out = tmp_path / "back"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(hf_config))
    save_file(mcore_to_hf(hf_config, hf_to_mcore(hf_config, tensors, padded_vocab_size=100)), out / "model.safetensors")
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    first_mtp = f"model.layers.{hf_config['num_hidden_layers']}."
    assert all(k.startswith(first_mtp) for k in info["unexpected_keys"])  # only MTP, which HF skips
    assert torch.equal(_logits(reloaded.eval(), hf_config["vocab_size"]), _logits(model, hf_config["vocab_size"]))
