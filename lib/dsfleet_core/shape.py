"""A model's shape from its config.json alone (pure; no torch, no weights): what the planner sizes memory from.

``model_shape(config)`` counts the parameters of the causal-LM model transformers builds from that config, tensor
by tensor as the architecture's modeling code defines them, with tied embeddings counted once (what
``PreTrainedModel.num_parameters()`` reports); for mixture-of-experts models also the parameters one token passes
through (Mixtral-8x7B: 46.70B total, 12.88B active: ZeRO memory follows the total, FLOPs the active). Checked
against ``AutoModelForCausalLM.from_config(...)`` on the meta device for every family below at its published size
(tests/e2e/test_sizing_against_tools.py).

Families: llama, mistral, mixtral, qwen2, qwen3, gemma, gemma2, phi3 (one decoder layout with variations),
falcon, opt, bloom, gpt_neox, gpt2, phi. Another model_type raises ShapeError naming these.
"""

from __future__ import annotations


class ShapeError(ValueError):
    pass


GATED = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"}
FAMILIES = sorted(GATED | {"falcon", "opt", "bloom", "gpt_neox", "gpt2", "phi"})


def _get(cfg, *names, default=None):
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def _shape(family, vocab, hidden, layers, heads, kv_heads, head_dim, inter, per_layer, embed, other, lm_head,
           tied, experts=1, active=None):
    layer = sum(per_layer.values())
    total = embed + layers * layer + other + (0 if tied else lm_head)
    out = {"family": family, "params": total, "vocab": vocab, "hidden": hidden, "layers": layers, "heads": heads,
           "kv_heads": kv_heads, "head_dim": head_dim, "intermediate": inter, "tied_embeddings": tied,
           "embedding": embed, "lm_head": 0 if tied else lm_head, "per_layer": layer,
           # the biggest single tensor (ZeRO-3 gathers one at a time): the embedding or the lm head, else a matrix
           "largest_layer": max([embed, lm_head] + [v for v in per_layer.values()]),
           "experts": experts, "params_active": total if active is None else active}
    return out


def model_shape(config):
    """{family, params, params_active, vocab, hidden, layers, heads, kv_heads, head_dim, intermediate, embedding,
    lm_head, per_layer, largest_layer, tied_embeddings, experts} from a config.json mapping."""
    cfg = dict(config.get("text_config") or {}, **{k: v for k, v in config.items() if k != "text_config"}) \
        if config.get("text_config") else dict(config)
    family = str(cfg.get("model_type") or "")
    if family not in FAMILIES:
        raise ShapeError("cannot size model_type %r from its config (known: %s)" % (family, ", ".join(FAMILIES)))
    V = int(_get(cfg, "vocab_size"))
    if family in GATED:
        H, L = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
        nh = int(cfg["num_attention_heads"])
        nkv = int(_get(cfg, "num_key_value_heads", default=nh))
        hd = int(_get(cfg, "head_dim", default=H // nh))
        inter = int(cfg["intermediate_size"])
        bias = bool(cfg.get("attention_bias", False))
        qkv_bias = bias or family == "qwen2"
        q, kv, o = nh * hd, nkv * hd, nh * hd
        attn = {"q": H * q + (q if qkv_bias else 0), "k": H * kv + (kv if qkv_bias else 0),
                "v": H * kv + (kv if qkv_bias else 0), "o": o * H + (H if bias else 0)}
        if family == "qwen3":
            attn["qk_norm"] = 2 * hd
        norms = 4 * H if family == "gemma2" else 2 * H
        mlp_bias = bool(cfg.get("mlp_bias", False))
        mlp_one = 3 * H * inter + ((2 * inter + H) if mlp_bias else 0)
        tied = bool(cfg.get("tie_word_embeddings", family in ("gemma", "gemma2")))
        if family == "mixtral":
            E, k = int(cfg["num_local_experts"]), int(cfg["num_experts_per_tok"])
            per_layer = dict(attn, norms=norms, router=H * E, experts=E * mlp_one)
            shape = _shape(family, V, H, L, nh, nkv, hd, inter, per_layer, V * H, H, V * H, tied, experts=E)
            active = shape["params"] - L * (E - k) * mlp_one
            shape["params_active"] = active
            shape["largest_layer"] = max(V * H, H * inter)
            return shape
        per_layer = dict(attn, norms=norms, mlp=mlp_one)
        shape = _shape(family, V, H, L, nh, nkv, hd, inter, per_layer, V * H, H, V * H, tied)
        shape["largest_layer"] = max(V * H, H * inter, H * q)
        return shape
    if family == "falcon":
        H, L, nh = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        hd = H // nh
        new = bool(cfg.get("new_decoder_architecture", False))
        if new:
            nkv = int(_get(cfg, "num_kv_heads", default=nh))
        else:
            nkv = 1 if cfg.get("multi_query", True) else nh
        bias = bool(cfg.get("bias", False))
        inter = int(_get(cfg, "ffn_hidden_size", default=4 * H))
        qkv = H * (nh * hd + 2 * nkv * hd) + ((nh * hd + 2 * nkv * hd) if bias else 0)
        norms = (2 if new and int(_get(cfg, "num_ln_in_parallel_attn", default=2)) == 2 else 1) * 2 * H
        if not new and not cfg.get("parallel_attn", True):
            norms = 4 * H
        per_layer = {"qkv": qkv, "dense": H * H + (H if bias else 0), "mlp": 2 * H * inter + ((inter + H) if bias else 0),
                     "norms": norms}
        tied = bool(cfg.get("tie_word_embeddings", True))
        shape = _shape(family, V, H, L, nh, nkv, hd, inter, per_layer, V * H, 2 * H, V * H, tied)
        shape["largest_layer"] = max(V * H, H * inter)
        return shape
    if family == "opt":
        H, L, nh = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        F = int(cfg["ffn_dim"])
        proj = int(_get(cfg, "word_embed_proj_dim", default=H))
        bias = bool(cfg.get("enable_bias", True))
        b = 1 if bias else 0
        per_layer = {"attn": 4 * (H * H + b * H), "fc": 2 * H * F + b * (F + H),
                     "norms": 2 * (2 * H if cfg.get("layer_norm_elementwise_affine", True) else 0)}
        other = (int(cfg["max_position_embeddings"]) + 2) * H
        if proj != H:
            other += 2 * proj * H
        if cfg.get("do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm", False):
            other += 2 * H
        tied = bool(cfg.get("tie_word_embeddings", True))
        shape = _shape(family, V, H, L, nh, nh, H // nh, F, per_layer, V * proj, other, V * proj, tied)
        shape["largest_layer"] = max(V * proj, H * F)
        return shape
    if family == "bloom":
        H = int(_get(cfg, "hidden_size", "n_embed"))
        L, nh = int(_get(cfg, "n_layer", "num_hidden_layers")), int(_get(cfg, "n_head", "num_attention_heads"))
        per_layer = {"norms": 4 * H, "qkv": H * 3 * H + 3 * H, "dense": H * H + H, "mlp": 8 * H * H + 5 * H}
        tied = bool(cfg.get("tie_word_embeddings", True))
        shape = _shape(family, V, H, L, nh, nh, H // nh, 4 * H, per_layer, V * H, 2 * H + 2 * H, V * H, tied)
        shape["largest_layer"] = max(V * H, 4 * H * H)
        return shape
    if family == "gpt_neox":
        H, L, nh = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        inter = int(cfg["intermediate_size"])
        b = 1 if cfg.get("attention_bias", True) else 0
        per_layer = {"norms": 4 * H, "qkv": H * 3 * H + b * 3 * H, "dense": H * H + b * H,
                     "mlp": 2 * H * inter + inter + H}
        tied = bool(cfg.get("tie_word_embeddings", False))
        shape = _shape(family, V, H, L, nh, nh, H // nh, inter, per_layer, V * H, 2 * H, V * H, tied)
        shape["largest_layer"] = max(V * H, H * inter)
        return shape
    if family == "gpt2":
        H = int(_get(cfg, "n_embd", "hidden_size"))
        L, nh = int(_get(cfg, "n_layer", "num_hidden_layers")), int(_get(cfg, "n_head", "num_attention_heads"))
        inter = int(_get(cfg, "n_inner", default=4 * H))
        P = int(_get(cfg, "n_positions", "max_position_embeddings"))
        per_layer = {"norms": 4 * H, "attn": H * 3 * H + 3 * H + H * H + H, "mlp": 2 * H * inter + inter + H}
        tied = bool(cfg.get("tie_word_embeddings", True))
        shape = _shape(family, V, H, L, nh, nh, H // nh, inter, per_layer, V * H, P * H + 2 * H, V * H, tied)
        shape["largest_layer"] = max(V * H, H * inter)
        return shape
    # phi (phi-1/1.5/2): parallel attention + MLP, biases everywhere, an lm head with a bias
    H, L, nh = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    nkv = int(_get(cfg, "num_key_value_heads", default=nh))
    hd = H // nh
    inter = int(cfg["intermediate_size"])
    per_layer = {"norm": 2 * H, "q": H * nh * hd + nh * hd, "kv": 2 * (H * nkv * hd + nkv * hd),
                 "dense": nh * hd * H + H, "mlp": 2 * H * inter + inter + H}
    if cfg.get("qk_layernorm"):
        per_layer["qk_norm"] = 4 * hd
    tied = bool(cfg.get("tie_word_embeddings", False))
    shape = _shape(family, V, H, L, nh, nkv, hd, inter, per_layer, V * H, 2 * H, V * H + V, tied)
    shape["largest_layer"] = max(V * H, H * inter)
    return shape
