"""Conservative LRP through transformer blocks (MONAI's ViT: UNETR), as a temporary canonizer.

Attention and layer normalisation are not linear in their input, and their gradient reflects the
function only locally. Ali et al. 2022 (XAI for Transformers: Better Explanations through
Conservative Propagation, ICML) make them linear for the backward pass by holding the
non-linear factors constant, then apply the usual LRP rule to the linear map that is left:

LayerNorm (their LN-rule)
    ``y = gamma * (x - mean x) / sigma + beta`` with ``sigma = sqrt(var x + eps)`` constant is
    ``gamma / sigma`` times the centring matrix applied to ``x``, plus the bias ``beta``. The
    epsilon rule on it, ``R_in = x * J^T (R / (y +- eps))``, gives
    ``sum R_in = sum R (y - beta) / (y +- eps)``: the bias's share is absorbed, nothing else.
Attention heads (their AH-rule)
    ``y = W_o (P V(x)) + b_o`` with the softmax probabilities ``P`` constant is linear in the
    values; the same epsilon rule at the block's output (one backward of the block with ``P``
    detached, i.e. LRP-0 through ``qkv``, ``P V`` and ``out_proj``). Relevance reaches the tokens
    through the values only (queries and keys get none); the value and output biases absorb
    their share.
Residual sums ``z = x + h`` (the canonizer's part)
    the epsilon rule of a sum: ``R_x = x R / (z +- eps)``, ``R_h = h R / (z +- eps)``, so the
    skip path and the block share the relevance instead of both receiving all of it.
Position embedding
    a bias added to the patch tokens: the tokens keep ``t R / (t + p +- eps)``.
GELU and the MLP's activations
    pass relevance unchanged (the identity rule AttnLRP, Achtibat et al. 2024, uses for
    element-wise activations): the existing pass-through of :mod:`.lrp`.

:func:`transformer_rules` is the canonizer: for the run it swaps the ``forward`` of MONAI's
``TransformerBlock`` and ``PatchEmbeddingBlock`` for ones computing the same sums (bit for bit)
through :class:`EpsilonSum`, checks on a probe that every ``SABlock`` is reproduced by
:func:`attention_output` (MONAI's einsum and ``scaled_dot_product_attention`` paths alike), and
restores the original ``forward`` on exit, whatever happens. SwinUNETR's window attention, its
blocks' residual sums and functional layer norm take the same rules through :mod:`.lrp_swin`, and
in any network with transformer blocks MONAI's ``UnetResBlock`` residual sums are split by the
epsilon rule of a sum too; SwinUNETR's Hyena stages are refused (see :data:`REFUSED`).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods import lrp_attnlrp, lrp_swin
from esegeta_engine.methods.lrp_rules import stabilise

_NOTHING = object()
"""No instance attribute of that name was there before."""

ATTENTION = ("SABlock",)
"""MONAI attention blocks with a rule (:func:`attention_rule`)."""
SWAPPED = ("TransformerBlock", "PatchEmbeddingBlock")
"""MONAI blocks whose ``forward`` the canonizer swaps (residual / position-embedding sums)."""
REFUSED = {
    "HyenaTransformerBlock": "SwinUNETR's Hyena stages (HyenaTransformerBlock: FFT long convolutions with learnt "
                             "implicit kernels and gating) have no conservative rule here; its Swin stages do",
}


def monai_type(m: nn.Module, names: tuple[str, ...] | dict[str, str]) -> bool:
    """Whether ``m`` is exactly one of MONAI's classes ``names`` (a user subclass is not)."""
    t = type(m)
    return t.__name__ in names and t.__module__.startswith("monai.")


def is_attention(m: nn.Module) -> bool:
    """A MONAI self-attention block this module has a rule for."""
    return monai_type(m, ATTENTION)


def is_rearrange(m: nn.Module) -> bool:
    """einops' ``Rearrange`` layer: a pure reshuffle, its gradient routes relevance unchanged."""
    return type(m).__name__ == "Rearrange" and type(m).__module__.startswith("einops")


def routes_exactly(m: nn.Module) -> bool:
    """A reshuffle (``Rearrange``) or MONAI's ``DropPath`` in eval mode (the identity): the gradient
    routes relevance through it unchanged."""
    return is_rearrange(m) or (monai_type(m, ("DropPath",)) and not m.training)


def has_rule(m: nn.Module) -> bool:
    """An attention block with a rule: MONAI's ``SABlock`` (hooked) or Swin ``WindowAttention``
    (its rule is in the canonizer's forward); the block's rule replaces its parts'."""
    return is_attention(m) or lrp_swin.is_window_attention(m)


class EpsilonSum(torch.autograd.Function):
    """``a + b``; the backward shares ``R`` by the epsilon rule of a sum (``a R / (z +- eps)`` ...)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, b)
        ctx.eps = eps
        return a + b

    @staticmethod
    def backward(ctx: Any, R: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        a, b = ctx.saved_tensors
        s = R / stabilise(a + b, ctx.eps)
        return (a * s).sum_to_size(a.shape), (b * s).sum_to_size(b.shape), None


def _heads(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of ``block``, each ``(batch, heads, tokens, dim_head)``."""
    b, n, _ = x.shape
    h, d = block.num_heads, block.dim_head
    if block.use_combined_linear:
        q, k, v = block.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = (lin(x).reshape(b, n, h, d).transpose(1, 2)
                   for lin in (block.to_q, block.to_k, block.to_v))
    if block.attention_dtype is not None:
        q, k = q.to(block.attention_dtype), k.to(block.attention_dtype)
    return q, k, v


def attention_probabilities(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The softmax probabilities ``P`` of ``block`` at input ``x`` (tokens ``(batch, n, hidden)``)."""
    q, k, _ = _heads(block, x)
    logits = torch.einsum("bhxd,bhyd->bhxy", q, k) * block.scale
    if block.rel_positional_embedding is not None:
        logits = block.rel_positional_embedding(x, logits, q)
    if block.causal:
        n = x.shape[-2]
        logits = logits.masked_fill(block.causal_mask[:, :, :n, :n] == 0, float("-inf"))
    return logits.softmax(dim=-1)


def attention_output(block: nn.Module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``block``'s output at ``x`` with the probabilities ``probs`` given: linear in ``x``."""
    _, _, v = _heads(block, x)
    out = torch.einsum("bhxy,bhyd->bhxd", probs.to(v.dtype), v)
    b, h, n, d = out.shape
    out = out.transpose(1, 2).reshape(b, n, h * d)
    return block.out_proj(out) if block.include_fc else out


def attention_rule(block: nn.Module, a: torch.Tensor, R: torch.Tensor, eps: float,
                   rule: str = "held") -> torch.Tensor:
    """AH-rule: the epsilon rule on ``block`` with its attention probabilities held constant
    (``rule="attnlrp"``: AttnLRP's rule, :func:`.lrp_attnlrp.attention`, relevance to queries and keys too)."""
    if rule == "attnlrp":
        return attnlrp_rule(block, a, R, eps)
    a = a.detach().requires_grad_(True)
    with torch.enable_grad():
        probs = attention_probabilities(block, a).detach()
        z = attention_output(block, a, probs)
        (g,) = torch.autograd.grad(z, a, R / stabilise(z.detach(), eps))
    return a.detach() * g


def attnlrp_rule(block: nn.Module, a: torch.Tensor, R: torch.Tensor, eps: float) -> torch.Tensor:
    """AttnLRP on MONAI's ``SABlock`` (its causal mask as ``-inf`` logits)."""
    if block.rel_positional_embedding is not None:
        raise MethodError("lrp: attention_rule attnlrp does not model an SABlock's decomposed relative position "
                          "embedding (it depends on the queries)", "use attention_rule: held for this model")
    n = a.shape[-2]
    extra = None
    if block.causal:
        causal = block.causal_mask[:, :, :n, :n] == 0
        extra = torch.zeros(1, 1, n, n, dtype=a.dtype, device=a.device).masked_fill(causal, float("-inf"))

    def project(o: torch.Tensor) -> torch.Tensor:
        b, h, t, d = o.shape
        o = o.transpose(1, 2).reshape(b, t, h * d)
        return block.out_proj(o) if block.include_fc else o

    return lrp_attnlrp.attention(a, R, eps, lambda x: _heads(block, x), block.scale, extra, project)


def layer_norm_rule(module: nn.LayerNorm, a: torch.Tensor, R: torch.Tensor, eps: float) -> torch.Tensor:
    """LN-rule: the epsilon rule on ``module`` with the standard deviation held constant."""
    a = a.detach().requires_grad_(True)
    dims = tuple(range(-len(module.normalized_shape), 0))
    with torch.enable_grad():
        sigma = torch.sqrt(a.var(dim=dims, unbiased=False, keepdim=True) + module.eps).detach()
        z = (a - a.mean(dim=dims, keepdim=True)) / sigma
        if module.weight is not None:
            z = z * module.weight.detach()
        if module.bias is not None:
            z = z + module.bias.detach()
        (g,) = torch.autograd.grad(z, a, R / stabilise(z.detach(), eps))
    return a.detach() * g


def _transformer_forward(eps: float) -> Any:
    def forward(self: nn.Module, x: torch.Tensor, context: Any = None, attn_mask: Any = None) -> torch.Tensor:
        if attn_mask is not None:
            raise MethodError("lrp: a TransformerBlock was called with an attention mask, which its "
                              "conservative rule does not model", "use a gradient method for this model")
        x = EpsilonSum.apply(x, self.attn(self.norm1(x)), eps)
        return EpsilonSum.apply(x, self.mlp(self.norm2(x)), eps)
    return forward


def _embedding_forward(eps: float) -> Any:
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(x)
        if self.proj_type == "conv":
            x = x.flatten(2).transpose(-1, -2)
        return self.dropout(EpsilonSum.apply(x, self.position_embeddings, eps))
    return forward


TRANSFORMER_PARTS = ("Attention", "Attn", "Embed", "Rearrange", "Transformer", "ViT")
"""Type-name parts that mark a transformer block (the refusal then says which rules are missing)."""


EXCITATION_WHY = (
    "excitation backprop's marginal winning probabilities (Zhang et al. 2016) are defined for non-negative "
    "activations sent through excitatory connections, but a transformer's LayerNorm centres every token (its "
    "output always has negative entries, and it feeds the attention's queries, keys and values) and the "
    "residual token stream is signed; no published rule extends c-MWP to attention or layer norms (the "
    "held-probability rules of Ali et al. 2022 are LRP's, with signed relevance): use lrp, which has them for "
    "UNETR and SwinUNETR")
"""Why excitation backprop refuses transformer blocks (one line of its refusal)."""


def refusal_hint(bad: list[str], why: str | None, attention: bool, method: str = "lrp") -> str:
    """What a refusal adds about transformer blocks among the module types ``bad``."""
    if why:
        return f" ({why})"
    if not any(k in t for t in bad for k in TRANSFORMER_PARTS):
        return ""
    if attention:
        return (" (a transformer's attention and embedding blocks: conservative rules, Ali et al. 2022, exist "
                "here only for MONAI's ViT blocks (SABlock, TransformerBlock, PatchEmbeddingBlock: UNETR) and "
                "Swin blocks (WindowAttention, SwinTransformerBlock: SwinUNETR))")
    if "excitation" in method:
        return f" (transformer blocks: {EXCITATION_WHY})"
    return (" (a transformer's attention and embedding blocks: the conservative attention rules of Ali et al. "
            "2022 exist for LRP on MONAI's ViT and Swin blocks, not for this method)")


def unsupported(net: nn.Module) -> str | None:
    """Why ``net``'s transformer blocks cannot take these rules (None: they can)."""
    for name, m in net.named_modules():
        if monai_type(m, ("TransformerBlock",)) and getattr(m, "with_cross_attention", False):
            return f"the TransformerBlock {name} has cross-attention, which has no conservative rule here"
        if monai_type(m, REFUSED):
            return REFUSED[type(m).__name__]
    return None


class _AttentionCheck:
    """Forward hooks checking that every attention block is reproduced by :func:`attention_output`
    on whatever forward runs while they are registered (the canonizer's probe)."""

    def __init__(self, net: nn.Module, rtol: float = 1e-5) -> None:
        names = {id(m): n for n, m in net.named_modules()}
        self.seen: list[str] = []
        self.bad: list[str] = []

        def check(m: nn.Module, args: tuple[Any, ...], y: Any) -> None:
            self.seen.append(names[id(m)])
            with torch.no_grad():
                ours = attention_output(m, args[0], attention_probabilities(m, args[0]))
            if not isinstance(y, torch.Tensor) or ours.shape != y.shape or \
                    float((ours - y).abs().max()) > rtol * max(float(y.abs().max()), 1.0):
                self.bad.append(names[id(m)])

        self.handles = [m.register_forward_hook(check) for m in net.modules() if is_attention(m)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def raise_if_bad(self) -> None:
        if self.bad:
            raise MethodError(f"lrp: the attention block(s) {', '.join(self.bad[:3])} compute something other "
                              "than MONAI's self-attention this rule reproduces (an attention mask or another "
                              "version)", "use a gradient method (integrated_gradients, input_x_gradient) for "
                              "this model")


@contextlib.contextmanager
def transformer_rules(net: nn.Module, probe: torch.Tensor, eps: float, rule: str = "held") -> Iterator[list[str]]:
    """Give MONAI's ViT blocks of ``net`` their conservative rules for the context.

    Parameters
    ----------
    net : nn.Module
        The network; only the ``forward`` of its ``TransformerBlock``/``PatchEmbeddingBlock``
        instances is swapped (an instance attribute), and removed again on exit.
    probe : torch.Tensor
        An input ``net`` accepts (one patch under sliding windows), to check the attention blocks.
    eps : float
        The epsilon of the residual and position-embedding sums.
    rule : str
        The attention rule of Swin window attention: ``held`` (Ali et al. 2022) or ``attnlrp``.

    Yields
    ------
    list of str
        The names of the attention blocks that take the AH-rule (empty: nothing was changed).
    """
    blocks = [m for m in net.modules() if monai_type(m, SWAPPED)]
    vit = bool(blocks) or any(is_attention(m) for m in net.modules())
    if not vit and not lrp_swin.has_swin(net):
        yield []
        return
    swapped: list[tuple[nn.Module, Any]] = []
    try:
        for m in blocks:
            make = _transformer_forward if type(m).__name__ == "TransformerBlock" else _embedding_forward
            swapped.append((m, m.__dict__.get("forward", _NOTHING)))
            m.__dict__["forward"] = types.MethodType(make(eps), m)
        with contextlib.ExitStack() as stack:
            checks = _AttentionCheck(net)
            try:  # one probe checks every swapped forward and attention block
                windows = stack.enter_context(lrp_swin.swin_rules(net, probe, eps, run_probe=True, rule=rule))
            finally:
                checks.remove()
            checks.raise_if_bad()
            yield checks.seen + windows
    finally:
        for m, before in reversed(swapped):  # exactly what was there: a user's own instance forward too
            if before is _NOTHING:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = before


def describe(attention: list[str], eps: float, rule: str = "held") -> str:
    """The map's note saying which rules the transformer blocks took."""
    names = f"{len(attention)} attention block(s) ({', '.join(attention[:2])}{' ...' if len(attention) > 2 else ''})"
    rest = ("residual sums (transformer and UnetResBlock) and the position embedding share it by the epsilon rule "
            f"(eps {eps:g}); window partitions, shifts and patch merging route it exactly; GELU passes it unchanged")
    if rule == "attnlrp":
        return (f"lrp: {names} use AttnLRP's rules (Achtibat et al. 2024): the softmax by its Taylor decomposition "
                "at the logits (its bias term absorbs relevance), the products P V and Q K^T by the uniform rule "
                "(half to each factor), so queries and keys get relevance too; a relative position bias or mask "
                "absorbs its share of the logits; the layer norms hold their standard deviations constant (Ali et "
                f"al. 2022); {rest}")
    return (f"lrp: {names} and the layer norms use the conservative rules of Ali et al. 2022: the attention "
            "probabilities and the norms' standard deviations are held constant (a Swin window's relative position "
            "bias and shift mask are inside them), so relevance reaches the tokens through the attention values "
            f"only (queries and keys get none); {rest}")
