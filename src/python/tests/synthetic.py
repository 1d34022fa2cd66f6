"""A tiny Llama-shaped model whose bytes are a function of (version, tensor): shared by the tests."""

import hashlib

from nccl_swap import Layout

LAYERS, HIDDEN, INTERMEDIATE, VOCABULARY, HEADS, KV_HEADS = 2, 64, 172, 256, 4, 2


def tensors(dtype: str = "BF16"):
    head = HIDDEN // HEADS
    shapes = [("model.embed_tokens.weight", [VOCABULARY, HIDDEN]), ("model.norm.weight", [HIDDEN]), ("lm_head.weight", [VOCABULARY, HIDDEN])]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", [HEADS * head, HIDDEN]), (p + "self_attn.k_proj.weight", [KV_HEADS * head, HIDDEN]),
                   (p + "self_attn.v_proj.weight", [KV_HEADS * head, HIDDEN]), (p + "self_attn.o_proj.weight", [HIDDEN, HEADS * head]),
                   (p + "mlp.gate_proj.weight", [INTERMEDIATE, HIDDEN]), (p + "mlp.up_proj.weight", [INTERMEDIATE, HIDDEN]),
                   (p + "mlp.down_proj.weight", [HIDDEN, INTERMEDIATE]), (p + "input_layernorm.weight", [HIDDEN]),
                   (p + "post_attention_layernorm.weight", [HIDDEN])]
    return [(name, dtype, shape) for name, shape in shapes]


def layout() -> Layout:
    return Layout.packed(tensors())


def data(version: int, name: str, nbytes: int) -> bytes:
    """SHAKE-128 of "version/name": never zeros, the same in every language that has SHAKE-128."""
    return hashlib.shake_128(f"{version}/{name}".encode()).digest(nbytes)


def fill(region, version: int) -> None:
    for t in region.layout:
        region.tensor(t.name)[:] = data(version, t.name, t.nbytes)


def holds(region, version: int) -> bool:
    return all(bytes(region.tensor(t.name)) == data(version, t.name, t.nbytes) for t in region.layout)
