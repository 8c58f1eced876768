"""Tiny random models of every Transformers family the adapter is checked on, built from configs
(nothing downloaded): hidden size 64, 2 layers, 4 heads (2 key/value heads where the family has
GQA), weights drawn wide enough (``INIT``) that a wrong mask moves the logits well past the
tolerance. Shared by ``tests/test_hf_families.py`` and ``benchmarks/hf_parity.py``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as T

VOCAB, INIT = 97, 0.2
WINDOW = 4  # sliding windows shorter than the prompts, so that they matter
SLIDING_THEN_FULL = ["sliding_attention", "full_attention"]


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "decoder", "encoder" or "encoder-decoder"
    make: Callable[[], tuple[T.PretrainedConfig, type]]
    sdpa: bool = True  # Transformers has an sdpa path for it
    packing: bool = False  # Transformers detects packed rows from position_ids
    positions: bool = True  # takes position_ids (trees of candidates)

    def build(self, impl: str) -> torch.nn.Module:
        config, cls = self.make()
        torch.manual_seed(0)  # the same weights for every implementation
        return cls._from_config(config, attn_implementation=impl).eval()


def _decoder(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                bos_token_id=None, eos_token_id=None, pad_token_id=0, initializer_range=INIT,
                **extra)  # fmt: skip


def _moe() -> dict:
    return dict(num_local_experts=4, num_experts_per_tok=2)


FAMILIES = {f.name: f for f in [
    Family("llama", "decoder", lambda: (T.LlamaConfig(**_decoder()), T.LlamaForCausalLM),
           packing=True),
    Family("mistral", "decoder", lambda: (T.MistralConfig(**_decoder(sliding_window=WINDOW)),
                                          T.MistralForCausalLM), packing=True),
    Family("mixtral", "decoder", lambda: (T.MixtralConfig(**_decoder(sliding_window=WINDOW,
                                          **_moe())), T.MixtralForCausalLM), packing=True),
    Family("qwen2", "decoder", lambda: (T.Qwen2Config(**_decoder()), T.Qwen2ForCausalLM),
           packing=True),
    Family("qwen3", "decoder", lambda: (T.Qwen3Config(**_decoder(head_dim=16)),
                                        T.Qwen3ForCausalLM), packing=True),
    Family("phi3", "decoder", lambda: (T.Phi3Config(**_decoder()), T.Phi3ForCausalLM),
           packing=True),
    Family("gemma2", "decoder", lambda: (T.Gemma2Config(**_decoder(
        head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=5.0,
        final_logit_softcapping=30.0, query_pre_attn_scalar=16)), T.Gemma2ForCausalLM),
        sdpa=False, packing=True),
    Family("gemma3", "decoder", lambda: (T.Gemma3TextConfig(**_decoder(
        head_dim=16, sliding_window=WINDOW, layer_types=SLIDING_THEN_FULL,
        query_pre_attn_scalar=16)), T.Gemma3ForCausalLM), packing=True),
    Family("gpt_oss", "decoder", lambda: (T.GptOssConfig(**_decoder(
        head_dim=16, sliding_window=WINDOW, layer_types=SLIDING_THEN_FULL, **_moe())),
        T.GptOssForCausalLM), sdpa=False),  # its eager attention does not unpack either
    Family("gpt2", "decoder", lambda: (T.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=None,
        eos_token_id=None, initializer_range=INIT), T.GPT2LMHeadModel), packing=True),
    Family("opt", "decoder", lambda: (T.OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
        num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=None, eos_token_id=None, init_std=INIT), T.OPTForCausalLM)),
    Family("bert", "encoder", lambda: (T.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, initializer_range=INIT), T.BertModel)),
    Family("modernbert", "encoder", lambda: (T.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, local_attention=WINDOW, global_attn_every_n_layers=2,
        pad_token_id=0, bos_token_id=None, eos_token_id=None, cls_token_id=1, sep_token_id=2,
        initializer_range=INIT), T.ModernBertModel)),
    Family("bart", "encoder-decoder", lambda: (T.BartConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=None, decoder_start_token_id=1, forced_eos_token_id=None,
        init_std=INIT), T.BartForConditionalGeneration)),
    Family("t5", "encoder-decoder", lambda: (T.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=None, decoder_start_token_id=0, initializer_factor=1.0),
        T.T5ForConditionalGeneration)),
]}  # fmt: skip

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22, 23], [30, 31, 32, 33, 34, 35, 36]]


def padded(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``PROMPTS`` as one batch, padded on ``side`` with token 0: ids and the 0/1 mask."""
    n = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), n, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        cols = slice(n - len(p), n) if side == "left" else slice(0, len(p))
        ids[i, cols], am[i, cols] = torch.tensor(p), 1
    return ids, am


def packed_row() -> tuple[torch.Tensor, torch.Tensor]:
    """``PROMPTS`` packed into one row: ids and the position ids that restart at each prompt."""
    ids = torch.tensor([[t for p in PROMPTS for t in p]])
    pos = torch.tensor([[i for p in PROMPTS for i in range(len(p))]])
    return ids, pos


def prefill_inputs(kind: str) -> tuple[dict, object]:
    """A family's padded batch (left-padded for decoders, right-padded otherwise), and the rows
    to compare: the real tokens (every row of an encoder-decoder's decoder is real)."""
    ids, am = padded("left" if kind == "decoder" else "right")
    if kind == "encoder-decoder":
        return {"input_ids": ids, "attention_mask": am, "decoder_input_ids": ids[:, :5]}, ...
    return {"input_ids": ids, "attention_mask": am}, am.bool()


@torch.no_grad()
def layer_outputs(model: torch.nn.Module, kind: str, **inputs) -> list[torch.Tensor]:
    """Every layer's hidden states and the output (logits, or an encoder's last state)."""
    out = model(**inputs, output_hidden_states=True)
    if kind == "encoder-decoder":
        return [*out.encoder_hidden_states, *out.decoder_hidden_states, out.logits]
    return [*out.hidden_states, out.logits if kind == "decoder" else out.last_hidden_state]
