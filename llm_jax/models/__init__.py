"""Model code: one module per concept, composed into families (`families.py`).

Tensor names carry their shape as a suffix of upper-case letters, one per axis:

    B  batch                          D  d_model (residual stream)
    T  tokens (queries)               F  d_ff (MLP hidden width)
    S  tokens of the keys             N  query heads
    P  predicted positions (MLM)      K  key/value heads
    V  padded vocabulary              H  head_dim
    C  classes (labels)               R  rotary / sinusoid frequencies (half a head or of d_model)
    L  max_len (positions table, sampling window)
    Y  token types (BERT sentence A/B)
    1  a broadcast axis of size one

e.g. `q_BTNH` is the queries [batch, tokens, heads, head_dim] and `logits_BTV` the logits over the vocabulary.
"""
