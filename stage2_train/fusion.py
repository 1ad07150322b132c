"""Fusion strategies: how the hidden states of many LLM layers become one text condition (docs/method.md).

Every strategy is a convex combination of the layer-normed layers,

    H_cond(t, d) = sum_l alpha_{t,d}^(l) * LN(H^(l)),      alpha_{t,d} = softmax(z_{t,d}),

and differs only in what the logits ``z`` depend on:

=============  ==========================  ===============================  ========================
name           paper                       z                                weights shape
=============  ==========================  ===============================  ========================
penultimate    B1                          one-hot on hidden_states[-2]     ``[L]``
uniform        B2                          0 (mean of layers)               ``[L]``
static         B3                          one learned vector               ``[L]``
time           S1 (time-wise)              g(phi(sigma))                    ``[S, L]``
depth          S2 (depth-wise)             one learned vector per block     ``[blocks, L]``
joint          S3                          one g_d(phi(sigma)) per block    ``[S, blocks, L]``
=============  ==========================  ===============================  ========================

The layer norm is applied once per forward by the caller (``layer_norm_layers``), not once per DiT block;
each strategy's ``fuse`` is a single contraction over the layer axis (over blocks x layers for the
per-block strategies). All learned logits start at exactly zero, so every gated strategy starts uniform,
except the sigma gates under ``gate_init="reference"`` (see ``SigmaGates``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from semroute.shared.errors import SemrouteError

LN_EPS = 1e-5
# Our default phi(sigma) is the standard sinusoidal timestep embedding of t = 1000 * sigma (max period
# 1e4, the DiT/diffusers convention, and the t the model receives). Its fastest component turns by 1 rad
# per scheduler timestep (a sigma step of 1e-3), its slowest by ~0.1 rad over the whole [0, 1] range, so
# the gate sees sigma both finely resolved and as an almost linear coordinate. The reference embeds sigma
# itself (scale 1.0; most components then barely move over [0, 1]): the `gate_sigma_scale` model key.
SIGMA_EMBED_SCALE = 1000.0
# How the sigma gates start: "uniform" (ours: last layer zero, so every gate starts exactly uniform) or
# "reference" (the reference's generic xavier init reaches the last layer too: non-uniform from step 0).
GATE_INITS = ("uniform", "reference")


# --------------------------------------------------------------------------------------------------
# Helpers shared by every strategy and by the data side
# --------------------------------------------------------------------------------------------------


def layer_norm_layers(hidden: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """Parameter-free layer norm of each layer and token over the hidden dimension, in fp32.

    Args:
        hidden: ``[B, T, L, D]`` cached hidden states in any float dtype (bf16, fp16, fp32).
    Returns:
        ``[B, T, L, D]`` fp32. Padded (all-zero) tokens stay exactly zero.
    """
    return F.layer_norm(hidden.float(), (hidden.shape[-1],), eps=eps)


def resolve_layer_indices(layers: Sequence[int], num_hidden_layers: int) -> list[int]:
    """Map transformers ``hidden_states`` indices (negatives allowed, ``-2`` = penultimate) to ``0..N``.

    ``hidden_states`` has ``N + 1`` entries for an LLM with ``N = num_hidden_layers`` decoder layers:
    index 0 is the embedding output, index ``l`` the output of decoder layer ``l``.
    """
    resolved = []
    for index in layers:
        value = int(index) + num_hidden_layers + 1 if int(index) < 0 else int(index)
        if not 0 <= value <= num_hidden_layers:
            raise SemrouteError(
                f"LLM layer index {index} is out of range for an LLM with {num_hidden_layers} layers; "
                f"hidden_states indices run from 0 (embeddings) to {num_hidden_layers} (last layer), or -{num_hidden_layers + 1}..-1."
            )
        resolved.append(value)
    if len(set(resolved)) != len(resolved):
        raise SemrouteError(f"LLM layer list {list(layers)} names a layer twice (resolved: {resolved}).")
    return resolved


def gather_positions(wanted: Sequence[int], stored: Sequence[int], num_hidden_layers: int) -> list[int]:
    """Positions in a cache's stored layer list of the layers a model wants, in the model's order.

    Both lists are transformers ``hidden_states`` indices. A data loader gathers
    ``features[:, positions]`` so that the model receives exactly its configured layers.

    Raises:
        SemrouteError: naming the missing layers when the cache does not hold all wanted layers.
    """
    wanted = resolve_layer_indices(wanted, num_hidden_layers)
    stored = resolve_layer_indices(stored, num_hidden_layers)
    missing = [layer for layer in wanted if layer not in stored]
    if missing:
        raise SemrouteError(
            f"The text cache stores LLM layers {stored} (hidden_states indices) but the model reads {wanted}; "
            f"missing: {missing}. Re-encode the text with `semroute encode-text --layers` covering them "
            f"(e.g. `--layers all`), or configure the model's `text_layers` to layers the cache holds."
        )
    return [stored.index(layer) for layer in wanted]


def sigma_embedding(sigma: torch.Tensor, dim: int, scale: float = SIGMA_EMBED_SCALE) -> torch.Tensor:
    """phi(sigma): sinusoidal embedding ``[S, dim]`` (cos then sin) of ``scale * sigma`` for sigmas ``[S]`` in [0, 1].

    Component k < dim/2 is ``cos(scale * sigma * 10000^(-k / (dim/2)))``, component dim/2 + k the same sin.
    """
    return get_timestep_embedding(
        sigma.float().reshape(-1), dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=scale
    )


# --------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------

# einsum of the weights with the LN'd layers [B, T, L, D], keyed by (time_dependent, per_block).
_CONTRACTIONS = {
    (False, False): "l,btld->btd",
    (True, False): "bl,btld->btd",
    (False, True): "kl,btld->kbtd",  # k: DiT block
    (True, True): "bkl,btld->kbtd",
}


class Fusion(nn.Module):
    """One fusion strategy: routing weights over L layers and the fused condition they give.

    Class attributes say what the weights depend on: ``time_dependent`` (on sigma, so the fused text
    cannot be cached across sampling steps) and ``per_block`` (one mixture per DiT block).
    """

    name: ClassVar[str]
    time_dependent: ClassVar[bool] = False
    per_block: ClassVar[bool] = False

    def __init__(self, num_layers: int, num_blocks: int):
        super().__init__()
        self.num_layers, self.num_blocks = num_layers, num_blocks

    def weights(self, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Routing weights, fp32, non-negative, summing to 1 over the last (layer) axis.

        Shape ``[L]``, ``[blocks, L]`` (``per_block``), or with a leading ``[S]`` for ``S`` sigmas when
        ``time_dependent`` (then ``sigma`` ``[S]`` in [0, 1] is required).
        """
        return self.logits(sigma).float().softmax(dim=-1)

    def logits(self, sigma: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def fuse(self, hidden_ln: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Mix the LN'd layers.

        Args:
            hidden_ln: ``[B, T, L, D]`` fp32 output of ``layer_norm_layers``.
            sigma: ``[B]`` noise levels, used only by time-dependent strategies.
        Returns:
            ``[B, T, D]``, or ``[blocks, B, T, D]`` for per-block strategies; fp32.
        """
        weights = self.weights(sigma)
        # Keep the mixture in fp32 under bf16 autocast: einsum is on autocast's low-precision list.
        with torch.autocast(device_type=hidden_ln.device.type, enabled=False):
            return torch.einsum(_CONTRACTIONS[self.time_dependent, self.per_block], weights, hidden_ln.float())

    def reset_parameters(self) -> None:
        """Zero every logit so the strategy starts exactly uniform (no-op for parameter-free ones; the sigma
        gates follow their ``init``)."""

    def _require_sigma(self, sigma: torch.Tensor | None) -> torch.Tensor:
        if sigma is None:
            raise ValueError(f"the `{self.name}` fusion depends on the noise level; pass `sigma` ([S] tensor in [0, 1])")
        return torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)


# --------------------------------------------------------------------------------------------------
# The strategies
# --------------------------------------------------------------------------------------------------


class PenultimateFusion(Fusion):
    """B1: only ``hidden_states[-2]`` (the input to the last decoder layer), layer-normed. 0 parameters.

    ``position`` is where that layer sits in the model's ``text_layers``.
    """

    name = "penultimate"

    def __init__(self, num_layers: int, num_blocks: int, position: int):
        super().__init__(num_layers, num_blocks)
        self.position = position

    def weights(self, sigma=None):
        return F.one_hot(torch.tensor(self.position), self.num_layers).float()

    def fuse(self, hidden_ln, sigma=None):
        return hidden_ln[:, :, self.position].float()  # exact: no arithmetic on the other layers


class UniformFusion(Fusion):
    """B2: the mean of the LN'd layers. 0 parameters."""

    name = "uniform"

    def weights(self, sigma=None):
        return torch.full((self.num_layers,), 1.0 / self.num_layers)

    def fuse(self, hidden_ln, sigma=None):
        return hidden_ln.float().mean(dim=2)


class StaticFusion(Fusion):
    """B3: one learned logit vector ``z`` in R^L shared by all blocks and noise levels."""

    name = "static"

    def __init__(self, num_layers: int, num_blocks: int):
        super().__init__(num_layers, num_blocks)
        self.z = nn.Parameter(torch.zeros(num_layers))

    def logits(self, sigma=None):
        return self.z

    def reset_parameters(self):
        nn.init.zeros_(self.z)


class DepthWiseFusion(Fusion):
    """S2 (recommended): one learned logit vector per DiT block, ``[blocks, L]``, mixed in one einsum."""

    name = "depth"
    per_block = True

    def __init__(self, num_layers: int, num_blocks: int):
        super().__init__(num_layers, num_blocks)
        self.z = nn.Parameter(torch.zeros(num_blocks, num_layers))

    def logits(self, sigma=None):
        return self.z

    def reset_parameters(self):
        nn.init.zeros_(self.z)


class SigmaGates(nn.Module):
    """``n`` independent gates ``g(phi(sigma)) = W2 SiLU(W1 phi + b1) + b2`` with batched weights.

    Each gate is Linear(embed_dim, hidden_dim), SiLU, Linear(hidden_dim, L): 84,516 parameters at the
    defaults and L=36. The ``n`` gates of the joint strategy are stacked so that all blocks' logits come
    from two batched contractions instead of ``n`` small MLP calls. The weights live outside ``nn.Linear``
    so that no generic Linear initialisation can overwrite them; ``init`` alone decides how they start:

    - ``"uniform"``: ``W1``/``b1`` as torch initialises an ``nn.Linear``, ``W2``/``b2`` zero, so every gate
      outputs zero logits (uniform weights) at any sigma.
    - ``"reference"``: what the reference ends up with, its zero-init of the last layer being overwritten
      by its generic init: xavier-uniform ``W1`` and ``W2`` (per gate), zero biases; non-uniform at start.

    ``sigma_scale``: phi embeds ``sigma_scale * sigma`` (1000 ours, 1 the reference).
    """

    def __init__(self, n: int, num_layers: int, embed_dim: int = 128, hidden_dim: int = 512,
                 sigma_scale: float = SIGMA_EMBED_SCALE, init: str = "uniform"):
        super().__init__()
        if init not in GATE_INITS:
            raise SemrouteError(f"gate_init {init!r} is unknown; choose one of {', '.join(GATE_INITS)}")
        self.embed_dim, self.sigma_scale, self.init = embed_dim, float(sigma_scale), init
        self.w1 = nn.Parameter(torch.empty(n, hidden_dim, embed_dim))
        self.b1 = nn.Parameter(torch.empty(n, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(n, num_layers, hidden_dim))
        self.b2 = nn.Parameter(torch.empty(n, num_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "reference":
            # xavier_uniform_ of an nn.Linear(fan_in, fan_out): U(-b, b), b = sqrt(6 / (fan_in + fan_out)); all
            # n gates share one shape, hence one bound (nn.init's fan rule would misread a stacked 3-D tensor).
            for weight in (self.w1, self.w2):
                fan_out, fan_in = weight.shape[1:]
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                nn.init.uniform_(weight, -bound, bound)
            nn.init.zeros_(self.b1)
            nn.init.zeros_(self.b2)
            return
        # First layer as torch initialises nn.Linear (U(-1/sqrt(fan_in), 1/sqrt(fan_in))); last layer zero
        # so that every gate outputs zero logits, i.e. uniform weights, at any sigma.
        bound = 1.0 / math.sqrt(self.embed_dim)
        nn.init.uniform_(self.w1, -bound, bound)
        nn.init.uniform_(self.b1, -bound, bound)
        nn.init.zeros_(self.w2)
        nn.init.zeros_(self.b2)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        """``sigma``: ``[S]`` in [0, 1]. Returns logits ``[S, n, L]``."""
        phi = sigma_embedding(sigma.to(self.w1.device), self.embed_dim, self.sigma_scale).to(self.w1.dtype)  # [S, E]
        # A tiny MLP whose outputs are softmax logits: keep it out of bf16 autocast.
        with torch.autocast(device_type=self.w1.device.type, enabled=False):
            hidden = F.silu(torch.einsum("se,nhe->snh", phi, self.w1) + self.b1)  # [S, n, H]
            return torch.einsum("snh,nlh->snl", hidden, self.w2) + self.b2  # [S, n, L]


class TimeWiseFusion(Fusion):
    """S1: logits ``z = g(phi(sigma))`` from one small MLP of the noise level, shared by all blocks."""

    name = "time"
    time_dependent = True

    def __init__(self, num_layers: int, num_blocks: int, embed_dim: int = 128, hidden_dim: int = 512,
                 sigma_scale: float = SIGMA_EMBED_SCALE, init: str = "uniform"):
        super().__init__(num_layers, num_blocks)
        self.gate = SigmaGates(1, num_layers, embed_dim, hidden_dim, sigma_scale, init)

    def logits(self, sigma=None):
        return self.gate(self._require_sigma(sigma))[:, 0]  # [S, L]

    def reset_parameters(self):
        self.gate.reset_parameters()


class JointFusion(Fusion):
    """S3: one sigma gate per DiT block, logits ``[S, blocks, L]``."""

    name = "joint"
    time_dependent = True
    per_block = True

    def __init__(self, num_layers: int, num_blocks: int, embed_dim: int = 128, hidden_dim: int = 512,
                 sigma_scale: float = SIGMA_EMBED_SCALE, init: str = "uniform"):
        super().__init__(num_layers, num_blocks)
        self.gate = SigmaGates(num_blocks, num_layers, embed_dim, hidden_dim, sigma_scale, init)

    def logits(self, sigma=None):
        return self.gate(self._require_sigma(sigma))  # [S, blocks, L]

    def reset_parameters(self):
        self.gate.reset_parameters()


FUSIONS: dict[str, type[Fusion]] = {
    cls.name: cls
    for cls in (PenultimateFusion, UniformFusion, StaticFusion, TimeWiseFusion, DepthWiseFusion, JointFusion)
}


def build_fusion(name: str, num_layers: int, num_blocks: int, **options) -> Fusion:
    """Build the strategy ``name`` (a key of ``FUSIONS``) over ``num_layers`` layers and ``num_blocks`` blocks.

    ``options`` go to the class: ``position`` for ``penultimate``; ``embed_dim``/``hidden_dim``/``sigma_scale``/
    ``init`` for the sigma gates of ``time`` and ``joint``.
    """
    if name not in FUSIONS:
        raise SemrouteError(f"Unknown fusion {name!r}. Choose one of: {', '.join(FUSIONS)}.")
    return FUSIONS[name](num_layers, num_blocks, **options)


def default_text_layers(fusion: str, n_llm_layers: int, stored: Sequence[int] | None = None) -> list[int]:
    """The ``hidden_states`` a model reads when ``text_layers`` is unset (training and ``SemrouteDiT`` alike):
    for ``penultimate`` just ``[N-1]`` (``hidden_states[-2]``), else every layer the cache stores but the
    embeddings (index 0); ``stored`` None: a cache of every layer ``0..N``."""
    if fusion == "penultimate":
        return [n_llm_layers - 1]
    return [i for i in (range(n_llm_layers + 1) if stored is None else stored) if i != 0]
