"""Training FLOPs per token, for model FLOPs utilisation (MFU).

Per token, a forward and backward through a weight matrix of N entries cost 6N FLOPs (2N for
the forward multiply-add, 4N for the two backward products). The embedding lookup is a gather,
not a product, so it is left out; the output head is a real product and counts. Attention adds,
per layer, QK^T and PV: 2 products of 2 * heads * head_dim FLOPs per visible key in the forward,
three times that with the backward, i.e. 12 * heads * head_dim * context per token (the PaLM
convention, which does not halve for causality). A sliding layer's context is capped by its window.
"""


def non_embedding_parameters(config):
    c = config
    attention = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    head = c.hidden_size * c.vocab_size
    return c.num_hidden_layers * (attention + mlp) + head


def flops_per_token(config, block_size):
    attention = sum(12 * config.num_attention_heads * config.head_dim *
                    (min(block_size, config.sliding_window) if config.is_sliding(i) else block_size)
                    for i in range(config.num_hidden_layers))
    return 6 * non_embedding_parameters(config) + attention
