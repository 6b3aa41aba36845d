"""DeepSeek-V3 Multi-Token Prediction: our megatron model's main and MTP losses and every gradient equal a
reference assembled from transformers' own DeepSeek-V3 modules; the MTP checkpoint layout loads.

Reference (DeepSeek-V3 report, section 2.2; the checkpoint layout of the Hub release): the main model is
transformers' DeepseekV3ForCausalLM. MTP depth 1 takes its final-normed hidden states h and the embeddings
of the tokens one step ahead, ``x = eh_proj([enorm(embed(t[i+1])) | hnorm(h[i])])``, runs one more
DeepseekV3DecoderLayer (transformers' class, layer index num_hidden_layers, so an MoE layer), normalises
with ``shared_head.norm`` and predicts token i+2 with the shared ``lm_head``. Loss = mean main CE +
mtp_loss_scaling_factor * mean MTP CE, each over its valid (loss-masked) positions.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import models_hf_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)
from test_deepseek import TINY, naive_deepseek_state, tiny_deepseek  # noqa: E402

import mindspeed_models as mm  # noqa: E402
from mindspeed_models.pretrained import load_state  # noqa: E402

LAYERS = TINY["num_hidden_layers"]
SCALE = 0.3  # mtp_loss_scaling_factor (DeepSeek-V3's first-phase weight; megatron's default is 0.1)


class Reference(torch.nn.Module):
    """transformers' DeepSeek-V3 + one MTP module made of transformers' classes (random weights)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

        self.cfg, self.main = tiny_deepseek(seed)
        # The same architecture one layer deeper: its last layer is the MTP transformer layer, built
        # (and later saved) exactly as transformers builds a decoder layer of that index.
        deeper = AutoModelForCausalLM.from_config(self.main.config.__class__(**{**self.cfg, "num_hidden_layers": LAYERS + 1}))
        helpers.randomize_(deeper, seed + 11)
        self.block = deeper.model.layers[LAYERS].eval()
        with torch.no_grad():
            self.block.mlp.gate.e_score_correction_bias.copy_(0.3 * torch.randn(8, generator=torch.Generator().manual_seed(2)))
        hidden, eps = self.cfg["hidden_size"], self.cfg["rms_norm_eps"]
        self.enorm, self.hnorm, self.head_norm = (DeepseekV3RMSNorm(hidden, eps) for _ in range(3))
        self.eh_proj = torch.nn.Linear(2 * hidden, hidden, bias=False)
        helpers.randomize_(torch.nn.ModuleList([self.enorm, self.hnorm, self.head_norm, self.eh_proj]), seed + 12)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor):
        """(main per-token CE [B, S], MTP per-token CE [B, S] for label i+1, MTP loss mask [B, S])."""
        from transformers.masking_utils import create_causal_mask

        model = self.main.model
        h = model(input_ids=ids).last_hidden_state
        main = F.cross_entropy(self.main.lm_head(h).flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        ahead = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
        x = self.eh_proj(torch.cat([self.enorm(model.embed_tokens(ahead)), self.hnorm(h)], -1))
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        mask = create_causal_mask(
            config=self.main.config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=positions
        )
        x = self.block(x, attention_mask=mask, position_ids=positions, position_embeddings=model.rotary_emb(x, positions))
        mtp_logits = self.main.lm_head(self.head_norm(x))
        mtp_labels = torch.cat([labels[:, 1:], torch.zeros_like(labels[:, :1])], 1)
        mtp_mask = torch.cat([loss_mask[:, 1:], torch.zeros_like(loss_mask[:, :1])], 1)
        mtp = F.cross_entropy(mtp_logits.flatten(0, 1), mtp_labels.flatten(), reduction="none").view_as(labels)
        return main, mtp, mtp_mask

    def megatron_state(self, tensors=None) -> dict[str, torch.Tensor]:
        """Our (megatron) names of the reference's tensors (or of ``tensors``, same keys as state_dict())."""
        sd = self.state_dict()
        if tensors is not None:  # gradients: buffers (the router expert bias) have none and are not compared
            sd = {k: tensors.get(k, torch.zeros_like(v)) for k, v in sd.items()}

        class _Named:  # naive_deepseek_state reads hf_model.state_dict(); the MTP block poses as layer LAYERS
            def state_dict(self):
                out = {k.removeprefix("main."): v for k, v in sd.items() if k.startswith("main.")}
                block = {k.removeprefix("block."): v for k, v in sd.items() if k.startswith("block.")}
                out.update({f"model.layers.{LAYERS}.{k}": v for k, v in block.items()})
                return out

        mapped = naive_deepseek_state({**self.cfg, "num_hidden_layers": LAYERS + 1}, _Named())
        out = {k: v for k, v in mapped.items() if not k.startswith(f"decoder.layers.{LAYERS}.")}
        mtp = "mtp.layers.0."
        out.update({mtp + "transformer_layer." + k.removeprefix(f"decoder.layers.{LAYERS}."): v
                    for k, v in mapped.items() if k.startswith(f"decoder.layers.{LAYERS}.")})  # fmt: skip
        for ours, theirs in (("enorm", "enorm"), ("hnorm", "hnorm"), ("final_layernorm", "head_norm"), ("eh_proj", "eh_proj")):
            out[f"{mtp}{ours}.weight"] = sd[f"{theirs}.weight"]
        return out


def _tokens(vocab: int, batch: int = 2, seq: int = 9):
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    loss_mask = torch.ones(batch, seq)
    loss_mask[1, 5:] = 0  # a shorter second sequence: its tail counts in neither loss
    return tokens[:, :-1], tokens[:, 1:], loss_mask


def _ours(ref: Reference):
    spec = mm.from_hf_config(ref.cfg, perform_initialization=False, mtp_loss_scaling_factor=SCALE)
    assert spec.config.mtp_num_layers == 1 and spec.hf_config["num_nextn_predict_layers"] == 1
    model = mm.build_model(spec)
    load_state(model, ref.megatron_state())
    return model


def test_mtp_loss_and_gradients_match_reference():
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    ref = Reference()
    model = _ours(ref)
    ids, labels, loss_mask = _tokens(ref.cfg["vocab_size"])
    main, mtp, mtp_mask = ref(ids, labels, loss_mask)
    ref_mtp = (mtp * mtp_mask).sum() / mtp_mask.sum()
    ((main * loss_mask).sum() / loss_mask.sum() + SCALE * ref_mtp).backward()

    MTPLossLoggingHelper.tracker.clear()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    losses = model.train()(ids, positions, None, labels=labels, loss_mask=loss_mask)
    assert losses.shape == labels.shape
    torch.testing.assert_close(losses, main.detach(), rtol=1e-5, atol=1e-5)
    ((losses * loss_mask).sum() / loss_mask.sum()).backward()
    tracked = MTPLossLoggingHelper.tracker["values"][0]  # megatron's logged MTP loss of depth 1 (unscaled mean)
    torch.testing.assert_close(tracked, ref_mtp.detach(), rtol=1e-5, atol=1e-6)

    grads = ref.megatron_state({n: p.grad for n, p in ref.named_parameters() if p.grad is not None})
    mtp_params = 0
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        mtp_params += name.startswith("mtp.") and bool(p.grad.abs().sum() > 0)
    assert mtp_params >= 10, "the MTP loss must reach the MTP layer's parameters"
    assert model.embedding.word_embeddings.weight.grad.abs().sum() > 0


def test_logits_without_labels_skip_mtp_and_match_transformers():
    ref = Reference()
    model = _ours(ref).eval()
    assert type(model).__name__ == "MTPGPTModel" and hasattr(model, "mtp")
    ids, mask = helpers.batch(ref.cfg["vocab_size"])
    with torch.no_grad():
        ours = mm.logits(model, ids, mask)
    helpers.assert_logits_match(ours, helpers.hf_logits(ref.main, ids, mask), mask)


def test_mtp_num_layers_zero_builds_the_main_model_only():
    ref = Reference()
    spec = mm.from_hf_config(ref.cfg, perform_initialization=False, mtp_num_layers=0)
    assert spec.config.mtp_num_layers is None and spec.hf_config["num_nextn_predict_layers"] == 0
    model = mm.build_model(spec)
    assert not hasattr(model, "mtp")
    load_state(model, naive_deepseek_state(ref.cfg, ref.main))


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_mtp_num_layers(value):
    with pytest.raises(ValueError, match="mtp_num_layers"):
        mm.from_hf_config(tiny_deepseek()[0], mtp_num_layers=value)
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        mm.from_hf_config({**tiny_deepseek()[0], "num_nextn_predict_layers": value})


def _save_with_mtp(ref: Reference, directory) -> None:
    """The Hub layout: the main model as save_pretrained writes it, plus layer ``num_hidden_layers`` = MTP."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ref.main.save_pretrained(directory)
    deeper = AutoModelForCausalLM.from_config(ref.main.config.__class__(**{**ref.cfg, "num_hidden_layers": LAYERS + 1}))
    deeper.model.layers[LAYERS] = ref.block
    deeper.save_pretrained(directory / "deeper")  # per-expert tensor names, as in the Hub checkpoint
    tensors = load_file(directory / "model.safetensors")
    prefix = f"model.layers.{LAYERS}."
    tensors.update({k: v for k, v in load_file(directory / "deeper" / "model.safetensors").items() if k.startswith(prefix)})
    extra = {"enorm.weight": ref.enorm.weight, "hnorm.weight": ref.hnorm.weight, "eh_proj.weight": ref.eh_proj.weight,
             "shared_head.norm.weight": ref.head_norm.weight, "shared_head.head.weight": ref.main.lm_head.weight,
             "embed_tokens.weight": ref.main.model.embed_tokens.weight}  # fmt: skip
    tensors.update({prefix + k: v.detach().clone() for k, v in extra.items()})
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_load_pretrained_reads_the_mtp_layer(tmp_path):
    pytest.importorskip("mindspeed_ckpt.maps")
    ref = Reference()
    _save_with_mtp(ref, tmp_path)
    loaded = mm.load_pretrained(tmp_path)
    assert loaded.spec.config.mtp_num_layers == 1
    expected = ref.megatron_state()
    state = loaded.model.state_dict()
    for name in expected:
        assert torch.equal(state[name], expected[name]), name
    ids, mask = helpers.batch(ref.cfg["vocab_size"])
    helpers.assert_logits_match(loaded.logits(ids, mask), helpers.hf_logits(ref.main, ids, mask), mask)


def test_load_pretrained_without_mtp_tensors_builds_no_mtp(tmp_path, caplog):
    """transformers' save_pretrained writes no MTP layer: the model is the main decoder, with a warning."""
    pytest.importorskip("mindspeed_ckpt.maps")
    ref = Reference()
    ref.main.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mindspeed_models.config"):
        loaded = mm.load_pretrained(tmp_path)
    assert any("no MTP tensors" in r.getMessage() for r in caplog.records)
    assert loaded.spec.config.mtp_num_layers is None and not hasattr(loaded.model, "mtp")
    ids, mask = helpers.batch(ref.cfg["vocab_size"])
    helpers.assert_logits_match(loaded.logits(ids, mask), helpers.hf_logits(ref.main, ids, mask), mask)
